//! Benchmark items in their published formats, each with its gold answer as a
//! [`crate::graders::Gold`], for evaluation.
//!
//! - InfiAgent-DABench ([`Benchmark::Dabench`]): a folder with `da-dev-questions.jsonl` (id,
//!   question, concepts, constraints, format, file_name, level), `da-dev-labels.jsonl` (id,
//!   common_answers) and `da-dev-tables/<file_name>`. The question the agent reads is the
//!   question, its constraints and the required `@name[value]` format, as the benchmark's own
//!   prompt has them.
//! - QRData ([`Benchmark::Qrdata`]): a folder with `QRData.json` (data_description, question,
//!   answer, data_files, meta_data.question_type) and `data/<data_files>`.
//! - kiln's own `rl` export ([`Benchmark::Rl`]): its Parquet file, so that held-out kiln
//!   questions are a benchmark too. The gold is the result CSV (for SQL tasks, graded as a
//!   table) or the gold answer (a value, numbers within 3%); data files are relative to the
//!   evaluating pipeline's folder, as in the pipeline that exported them.
//!
//! A file that is missing or does not parse is one error naming the file, the line (or item)
//! and what is wrong; an item whose data file is missing names the item and the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::StageError;
use crate::graders::{Gold, options};

/// A benchmark format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Benchmark {
    /// InfiAgent-DABench.
    Dabench,
    /// QRData.
    Qrdata,
    /// kiln's `rl` export.
    Rl,
}

/// One benchmark item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The benchmark's own id.
    pub id: String,
    /// The question as the agent reads it.
    pub question: String,
    /// What the data is, when the benchmark says (QRData).
    pub context: Option<String>,
    /// The data files, resolved.
    pub files: Vec<PathBuf>,
    /// The expected answer.
    pub gold: Gold,
    /// The item's group in reports: DABench's level, QRData's question type, a kiln question's
    /// category.
    pub group: String,
    /// The table the question is about, when the file holds several (a kiln SQLite question).
    pub table: Option<String>,
}

impl Benchmark {
    /// The files that list the items and their gold answers, in folder `dir`.
    pub fn index_files(self, dir: &Path) -> Vec<PathBuf> {
        match self {
            Benchmark::Dabench => vec![dir.join("da-dev-questions.jsonl"), dir.join("da-dev-labels.jsonl")],
            Benchmark::Qrdata => vec![dir.join("QRData.json")],
            Benchmark::Rl => vec![dir.to_path_buf()],
        }
    }

    /// Every item of the benchmark at `path` (its folder; for [`Benchmark::Rl`], the Parquet
    /// file), in file order; `base_dir` resolves the data files of an `rl` export.
    pub fn load(self, path: &Path, base_dir: &Path) -> Result<Vec<Item>, StageError> {
        match self {
            Benchmark::Dabench => dabench(path),
            Benchmark::Qrdata => qrdata(path),
            Benchmark::Rl => rl(path, base_dir),
        }
    }
}

/// The objects of a JSON lines file, each with its line number.
fn json_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<(usize, T)>, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|v| (i + 1, v))
                .map_err(|e| StageError::invalid(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// `file` of item `id` in `dir`, which must exist.
fn data_file(dir: &Path, file: &str, id: &str, listed_in: &Path) -> Result<PathBuf, StageError> {
    let path = dir.join(file);
    if !path.is_file() || file.contains("..") {
        return Err(StageError::invalid(listed_in, format!("item {id}: data file `{}` not found", path.display())));
    }
    Ok(path)
}

#[derive(Deserialize)]
struct DabenchQuestion {
    id: serde_json::Value,
    question: String,
    #[serde(default)]
    constraints: String,
    format: String,
    file_name: String,
    #[serde(default)]
    level: String,
}

#[derive(Deserialize)]
struct DabenchLabel {
    id: serde_json::Value,
    common_answers: Vec<(String, String)>,
}

fn id_text(id: &serde_json::Value) -> String {
    id.as_str().map(str::to_string).unwrap_or_else(|| id.to_string())
}

fn dabench(dir: &Path) -> Result<Vec<Item>, StageError> {
    let (questions_path, labels_path) = (dir.join("da-dev-questions.jsonl"), dir.join("da-dev-labels.jsonl"));
    let labels: HashMap<String, Vec<(String, String)>> = json_lines::<DabenchLabel>(&labels_path)?
        .into_iter()
        .map(|(_, l)| (id_text(&l.id), l.common_answers))
        .collect();
    let tables = dir.join("da-dev-tables");
    json_lines::<DabenchQuestion>(&questions_path)?
        .into_iter()
        .map(|(line, q)| {
            let id = id_text(&q.id);
            let label = labels.get(&id).ok_or_else(|| {
                StageError::invalid(&labels_path, format!("no label for item {id} (line {line} of the questions)"))
            })?;
            let mut question = q.question.trim().to_string();
            if !q.constraints.trim().is_empty() {
                question.push_str(&format!("\nConstraints: {}", q.constraints.trim()));
            }
            question.push_str(&format!("\nAnswer format: {}", q.format.trim()));
            Ok(Item {
                files: vec![data_file(&tables, &q.file_name, &id, &questions_path)?],
                id,
                question,
                context: None,
                gold: Gold::Named(label.clone()),
                group: q.level,
                table: None,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct QrdataItem {
    #[serde(default)]
    data_description: String,
    question: String,
    answer: serde_json::Value,
    data_files: Vec<String>,
    meta_data: QrdataMeta,
    #[serde(default)]
    qrdata_index: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct QrdataMeta {
    question_type: String,
}

fn qrdata(dir: &Path) -> Result<Vec<Item>, StageError> {
    let path = dir.join("QRData.json");
    let text = std::fs::read_to_string(&path).map_err(|e| StageError::io(&path, e))?;
    let items: Vec<QrdataItem> =
        serde_json::from_str(&text).map_err(|e| StageError::invalid(&path, format!("line {}: {e}", e.line())))?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            let id = q.qrdata_index.as_ref().map(id_text).unwrap_or_else(|| i.to_string());
            let answer = id_text(&q.answer);
            let gold = match q.meta_data.question_type.as_str() {
                "numerical" => Gold::Value { value: answer, tolerance: 0.03 },
                "multiple_choice" => {
                    let letter = answer.trim().chars().next().filter(|c| c.is_ascii_uppercase()).ok_or_else(|| {
                        StageError::invalid(
                            &path,
                            format!("item {id}: a multiple-choice answer is a letter, got {answer:?}"),
                        )
                    })?;
                    Gold::Choice { letter, options: options(&q.question) }
                }
                other => {
                    return Err(StageError::invalid(
                        &path,
                        format!("item {id}: question_type {other:?} is neither numerical nor multiple_choice"),
                    ));
                }
            };
            let files =
                q.data_files.iter().map(|f| data_file(&dir.join("data"), f, &id, &path)).collect::<Result<_, _>>()?;
            Ok(Item {
                id,
                question: q.question,
                context: Some(q.data_description).filter(|d| !d.is_empty()),
                files,
                gold,
                group: q.meta_data.question_type,
                table: None,
            })
        })
        .collect()
}

/// The columns of an `rl` export row an evaluation reads.
#[derive(Deserialize)]
struct RlRow {
    row_id: String,
    question: String,
    gold_answer: Option<String>,
    gold_result_csv: Option<String>,
    data_files: Vec<String>,
    table: Option<String>,
    category: Option<String>,
    difficulty: Option<u32>,
}

fn rl(path: &Path, base_dir: &Path) -> Result<Vec<Item>, StageError> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = std::fs::File::open(path).map_err(|e| StageError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| StageError::invalid(path, format!("not an `rl` export: {e}")))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StageError::invalid(path, format!("not an `rl` export: {e}")))?;
    let rows = kiln_pipeline::rows::to_json_rows(&batches).map_err(|e| StageError::invalid(path, e))?;
    let export_dir = path.parent().unwrap_or(Path::new(""));
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let r: RlRow = serde_json::from_value(serde_json::Value::Object(row))
                .map_err(|e| StageError::invalid(path, format!("row {}: not an `rl` export row: {e}", i + 1)))?;
            let gold = match (&r.gold_result_csv, &r.gold_answer) {
                (Some(csv), _) => {
                    let csv_path = export_dir.join(csv);
                    Gold::Table { csv: std::fs::read_to_string(&csv_path).map_err(|e| StageError::io(csv_path, e))? }
                }
                (None, Some(answer)) => Gold::Value { value: answer.clone(), tolerance: 0.03 },
                (None, None) => {
                    return Err(StageError::invalid(
                        path,
                        format!("item {}: no gold answer and no result CSV", r.row_id),
                    ));
                }
            };
            let files =
                r.data_files.iter().map(|f| data_file(base_dir, f, &r.row_id, path)).collect::<Result<_, _>>()?;
            let group = match (r.category, r.difficulty) {
                (Some(c), Some(d)) if d > 1 => format!("{c} (depth {d})"),
                (Some(c), _) => c,
                (None, _) => "uncategorised".into(),
            };
            Ok(Item { id: r.row_id, question: r.question, context: None, files, gold, group, table: r.table })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graders::grade;

    /// The shared format examples, when present beside the repository.
    fn shared(name: &str) -> Option<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/benchmarks/formats").join(name);
        if dir.is_dir() {
            Some(dir)
        } else {
            eprintln!("skipped the {name} format example: no ../shared/benchmarks");
            None
        }
    }

    #[test]
    fn dabench_items_carry_their_labels_and_files() {
        let Some(dir) = shared("dabench") else { return };
        let items = Benchmark::Dabench.load(&dir, Path::new("")).unwrap();
        assert_eq!(items.len(), 3);
        assert!(items[1].question.contains("Answer format: @records_1990[count]"));
        assert!(items[0].files[0].ends_with("da-dev-tables/surveys.csv"));
        assert_eq!(items[2].group, "hard");
        assert!(grade("@records_1990[1311] @top_species[DM]", None, &items[1].gold).correct);
        assert!(!grade("@records_1990[1310] @top_species[DM]", None, &items[1].gold).correct);
    }

    #[test]
    fn qrdata_items_are_numerical_or_multiple_choice() {
        let Some(dir) = shared("qrdata") else { return };
        let items = Benchmark::Qrdata.load(&dir, Path::new("")).unwrap();
        assert_eq!(items.len(), 2);
        assert!(grade("About 0.47 of them.", None, &items[0].gold).correct);
        assert!(!grade("0.5", None, &items[0].gold).correct, "6% off");
        assert!(grade("A", None, &items[1].gold).correct);
        assert!(grade("1985", None, &items[1].gold).correct);
        assert!(!grade("B", None, &items[1].gold).correct);
    }

    #[test]
    fn broken_files_name_the_file_and_the_item() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("da-dev-tables")).unwrap();
        std::fs::write(dir.path().join("da-dev-tables/a.csv"), "x\n1\n").unwrap();
        let q = r#"{"id": 7, "question": "Q?", "format": "@n[v]", "file_name": "a.csv"}"#;
        std::fs::write(dir.path().join("da-dev-questions.jsonl"), format!("{q}\n{{oops\n")).unwrap();
        std::fs::write(dir.path().join("da-dev-labels.jsonl"), r#"{"id": 7, "common_answers": [["n", "1"]]}"#).unwrap();
        let err = Benchmark::Dabench.load(dir.path(), Path::new("")).unwrap_err().to_string();
        assert!(err.contains("da-dev-questions.jsonl: line 2:"), "{err}");
        std::fs::write(dir.path().join("da-dev-questions.jsonl"), q.replace("a.csv", "b.csv")).unwrap();
        let err = Benchmark::Dabench.load(dir.path(), Path::new("")).unwrap_err().to_string();
        assert!(err.contains("item 7: data file") && err.contains("b.csv` not found"), "{err}");
        std::fs::write(dir.path().join("da-dev-questions.jsonl"), q.replace("7", "8")).unwrap();
        let err = Benchmark::Dabench.load(dir.path(), Path::new("")).unwrap_err().to_string();
        assert!(err.contains("no label for item 8"), "{err}");
        std::fs::write(dir.path().join("da-dev-questions.jsonl"), q).unwrap();
        assert_eq!(
            Benchmark::Dabench.load(dir.path(), Path::new("")).unwrap()[0].gold,
            Gold::Named(vec![("n".into(), "1".into())])
        );
    }

    #[test]
    fn an_rl_export_is_a_benchmark() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/a.csv"), "x\n1\n").unwrap();
        std::fs::write(dir.path().join("data/shop.sqlite"), "").unwrap();
        std::fs::create_dir_all(dir.path().join("out/rl.results")).unwrap();
        std::fs::write(dir.path().join("out/rl.results/q2.csv"), "name,n\nLyon,3\n").unwrap();
        let message = serde_json::json!({"role": "user", "content": "q"});
        let rows = vec![
            serde_json::json!({"row_id": "q1", "parent_ids": ["t1"], "prompt": [message], "question": "How many?",
                "gold_answer": "42", "data_files": ["data/a.csv"], "category": "counting", "difficulty": 1,
                "expert_trajectory": [message]}),
            serde_json::json!({"row_id": "q2", "parent_ids": ["t2"], "prompt": [message], "question": "Per city?",
                "gold_answer": "see rl.results/q2.csv", "gold_result_csv": "rl.results/q2.csv",
                "data_files": ["data/shop.sqlite"], "table": "sales", "category": "grouping", "difficulty": 3,
                "expert_trajectory": [message]}),
        ];
        let batch = kiln_pipeline::rows::to_batch(&crate::export::rl_schema(), &rows).unwrap();
        let file = std::fs::File::create(dir.path().join("out/rl.parquet")).unwrap();
        let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();

        let items = Benchmark::Rl.load(&dir.path().join("out/rl.parquet"), dir.path()).unwrap();
        assert_eq!(items[0].gold, Gold::Value { value: "42".into(), tolerance: 0.03 });
        assert_eq!(items[0].group, "counting");
        assert_eq!(items[1].gold, Gold::Table { csv: "name,n\nLyon,3\n".into() });
        assert_eq!((items[1].group.as_str(), items[1].table.as_deref()), ("grouping (depth 3)", Some("sales")));
        assert!(items[1].files[0].ends_with("data/shop.sqlite"));
        let err = Benchmark::Rl.load(&dir.path().join("out/rl.parquet"), Path::new("/nowhere")).unwrap_err();
        assert!(err.to_string().contains("item q1: data file"), "{err}");
    }
}
