//! DA-Code: data-science tasks over a folder of files; the result-table (`compare_csv`) and
//! named-value (`compare_text`) tasks are loaded, the others are skipped.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::{Item, Loaded, json_lines};
use crate::StageError;
use crate::graders::Gold;

/// The task list, relative to the benchmark's folder.
pub(super) const TASKS: &str = "configs/task/all.jsonl";
/// The evaluation configs, relative to the benchmark's folder.
pub(super) const EVAL: &str = "configs/eval/eval_all.jsonl";

#[derive(Deserialize)]
struct Task {
    id: String,
    instruction: String,
    #[serde(default)]
    hardness: String,
}

#[derive(Deserialize)]
struct Eval {
    id: String,
    func: Vec<String>,
    #[serde(default)]
    result: Vec<serde_json::Value>,
    #[serde(default)]
    options: Vec<serde_json::Value>,
}

/// The gold of `eval`, or why the item is skipped.
fn gold(dir: &Path, eval: &Eval, eval_path: &Path) -> Result<Result<(Gold, String), String>, StageError> {
    let bad = |what: &str| StageError::invalid(eval_path, format!("item {}: {what}", eval.id));
    let (func, result) = match (eval.func.as_slice(), eval.result.as_slice()) {
        ([func], [result]) => (func.as_str(), result),
        _ => return Ok(Err("several outputs".into())),
    };
    match func {
        "compare_csv" => {
            let files: Vec<&str> = result["file"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).collect();
            let [file] = files.as_slice() else { return Ok(Err("several outputs".into())) };
            let path = dir.join("gold").join(&eval.id).join(file);
            let csv = std::fs::read_to_string(&path).map_err(|e| StageError::io(&path, e))?;
            let ask = format!("Write the result to `{file}` and name that file in your final answer.");
            Ok(Ok((Gold::Table { csv }, ask)))
        }
        "compare_text" => {
            let object = result["number"].get(0).and_then(|o| o.as_object()).ok_or_else(|| bad("no result.number"))?;
            let fields = object
                .iter()
                .map(|(k, v)| (k.clone(), v.as_array().cloned().unwrap_or_else(|| vec![v.clone()])))
                .collect();
            let ignore_order = eval.options.first().and_then(|o| o["ignore_order"].as_bool()).unwrap_or(false);
            let ask = "Give the final answer as the JSON object the task asks for.".to_string();
            Ok(Ok((Gold::Fields { fields, ignore_order }, ask)))
        }
        other => Ok(Err(format!("graded by {other}"))),
    }
}

/// The items of the DA-Code folder `dir`.
pub(super) fn load(dir: &Path) -> Result<Loaded, StageError> {
    let (tasks_path, eval_path) = (dir.join(TASKS), dir.join(EVAL));
    let evals: HashMap<String, Eval> =
        json_lines::<Eval>(&eval_path)?.into_iter().map(|(_, e)| (e.id.clone(), e)).collect();
    let mut loaded = Loaded::default();
    for (line, task) in json_lines::<Task>(&tasks_path)? {
        let eval = evals.get(&task.id).ok_or_else(|| {
            StageError::invalid(
                &eval_path,
                format!("no evaluation config for item {} (line {line} of the tasks)", task.id),
            )
        })?;
        let (gold, ask) = match gold(dir, eval, &eval_path)? {
            Ok(g) => g,
            Err(why) => {
                *loaded.skipped.entry(why).or_default() += 1;
                continue;
            }
        };
        let source = dir.join("source").join(&task.id);
        let mut files: Vec<_> = std::fs::read_dir(&source)
            .map_err(|e| {
                StageError::invalid(&tasks_path, format!("item {}: data folder `{}`: {e}", task.id, source.display()))
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let question = format!("{}\n{ask}", task.instruction.trim());
        let group = if task.hardness.is_empty() { "all".to_string() } else { task.hardness };
        loaded.items.push(Item::new(task.id, question, files, gold, group));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graders::grade;

    /// The published DA-Code configs and gold of the tasks whose gold is shipped, with a
    /// stand-in data folder per task (the task data, `source/`, is not shipped beside the
    /// repository).
    fn with_sources(published: &Path) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(published.join("gold"), dir.path().join("gold")).unwrap();
        std::fs::create_dir_all(dir.path().join("configs/task")).unwrap();
        std::fs::create_dir_all(dir.path().join("configs/eval")).unwrap();
        std::fs::copy(published.join(EVAL), dir.path().join(EVAL)).unwrap();
        let mut tasks = String::new();
        let text = std::fs::read_to_string(published.join(TASKS)).unwrap();
        for (line, (_, task)) in text.lines().zip(json_lines::<Task>(&published.join(TASKS)).unwrap()) {
            if published.join("gold").join(&task.id).is_dir() {
                let source = dir.path().join("source").join(&task.id);
                std::fs::create_dir_all(&source).unwrap();
                std::fs::write(source.join("data.csv"), "x\n1\n").unwrap();
                tasks.push_str(line);
                tasks.push('\n');
            }
        }
        std::fs::write(dir.path().join(TASKS), tasks).unwrap();
        dir
    }

    #[test]
    fn tables_and_named_values_load_the_rest_is_skipped() {
        let Some(published) = super::super::shared("benchmarks/da_code") else { return };
        let dir = with_sources(&published);
        let loaded = load(dir.path()).unwrap();
        assert!(!loaded.items.is_empty() && !loaded.skipped.is_empty(), "{:?}", loaded.skipped);
        let table = loaded.items.iter().find(|i| i.id == "data-sa-043").unwrap();
        let Gold::Table { csv } = &table.gold else { panic!("{:?}", table.gold) };
        assert!(csv.starts_with("Sum-of-squared residuals"));
        assert!(table.question.ends_with("Write the result to `result.csv` and name that file in your final answer."));
        assert!(grade("result.csv", Some(csv), &table.gold).correct);
        assert!(!grade("result.csv", Some("Sum-of-squared residuals\n0.09\n"), &table.gold).correct);
        let text = loaded.items.iter().find(|i| i.id == "di-text-004").unwrap();
        let right = r#"{"The most frequent experience level": ["Senior-level"], "ratio": [0.4613]}"#;
        assert!(grade(right, None, &text.gold).correct);
        assert!(!grade(&right.replace("Senior", "Mid"), None, &text.gold).correct);
        assert_eq!(text.group, "Medium");
        assert!(text.files[0].ends_with("source/di-text-004/data.csv"));
    }

    #[test]
    fn a_missing_data_folder_names_the_item() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("configs/task")).unwrap();
        std::fs::create_dir_all(dir.path().join("configs/eval")).unwrap();
        std::fs::create_dir_all(dir.path().join("gold/t-1")).unwrap();
        std::fs::write(dir.path().join("gold/t-1/result.csv"), "a\n1\n").unwrap();
        std::fs::write(dir.path().join(TASKS), r#"{"id": "t-1", "instruction": "Do it.", "hardness": "Easy"}"#)
            .unwrap();
        let eval = r#"{"id": "t-1", "func": ["compare_csv"], "result": [{"file": ["result.csv"]}], "options": [{}]}"#;
        std::fs::write(dir.path().join(EVAL), eval).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("all.jsonl") && err.contains("item t-1: data folder"), "{err}");
        std::fs::write(dir.path().join(EVAL), eval.replace("t-1", "t-2")).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no evaluation config for item t-1 (line 1 of the tasks)"), "{err}");
    }
}
