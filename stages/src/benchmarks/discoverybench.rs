//! DiscoveryBench: hypothesis-discovery questions over one or more datasets; the gold is the
//! true hypothesis, an open answer for the LLM judge.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Item, data_file, json_file};
use crate::StageError;
use crate::graders::Gold;

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    domain_knowledge: String,
    datasets: Vec<Dataset>,
    queries: Vec<Vec<Query>>,
}

#[derive(Deserialize)]
struct Dataset {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    columns: Option<Columns>,
}

#[derive(Deserialize)]
struct Columns {
    #[serde(default)]
    raw: Vec<Column>,
}

#[derive(Deserialize)]
struct Column {
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct Query {
    qid: serde_json::Value,
    question: String,
    true_hypothesis: String,
}

/// Every `<dataset folder>/metadata_<n>.json` under `dir`, sorted.
pub(super) fn metadata_files(dir: &Path) -> Result<Vec<PathBuf>, StageError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| StageError::io(dir, e))? {
        let sub = entry.map_err(|e| StageError::io(dir, e))?.path();
        if !sub.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&sub).map_err(|e| StageError::io(&sub, e))? {
            let file = file.map_err(|e| StageError::io(&sub, e))?.path();
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with("metadata_") && name.ends_with(".json") {
                files.push(file);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// What the agent is told about the data: the domain knowledge, each dataset and its columns.
fn context(m: &Metadata) -> String {
    let mut text = String::new();
    if !m.domain_knowledge.trim().is_empty() {
        let _ = writeln!(text, "Domain knowledge: {}", m.domain_knowledge.trim());
    }
    for d in &m.datasets {
        let _ = writeln!(text, "`{}`: {}", d.name, d.description.trim());
        for c in d.columns.iter().flat_map(|c| &c.raw) {
            let _ = writeln!(text, "- {}: {}", c.name, c.description.trim());
        }
    }
    text.trim_end().to_string()
}

/// The items of the DiscoveryBench folder `dir` (one folder per dataset).
pub(super) fn load(dir: &Path) -> Result<Vec<Item>, StageError> {
    let files = metadata_files(dir)?;
    if files.is_empty() {
        return Err(StageError::invalid(dir, "no `<dataset>/metadata_<n>.json` in this folder"));
    }
    let mut items = Vec::new();
    for path in files {
        let m: Metadata = json_file(&path)?;
        let folder = path.parent().unwrap_or(dir);
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let name = folder.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        for q in m.queries.iter().flatten() {
            let id = format!("{name}/{}/{}", stem.trim_start_matches("metadata_"), super::id_text(&q.qid));
            let data =
                m.datasets.iter().map(|d| data_file(folder, &d.name, &id, &path)).collect::<Result<Vec<_>, _>>()?;
            let question = format!(
                "{}\nAnswer with the hypothesis the data supports, in one or two sentences, with the numbers that support it.",
                q.question.trim()
            );
            let group = if m.domain.is_empty() { "all".to_string() } else { m.domain.clone() };
            let mut item = Item::new(id, question, data, Gold::Open { reference: q.true_hypothesis.clone() }, group);
            item.context = Some(context(&m)).filter(|c| !c.is_empty());
            items.push(item);
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_train_split_loads_with_every_dataset() {
        let Some(dir) = super::super::shared("corpus/csv/discoverybench_train") else { return };
        let items = load(&dir).unwrap();
        assert!(items.len() >= 10, "{}", items.len());
        let first = items.iter().find(|i| i.id == "nls_bmi/0/0").unwrap();
        assert!(first.question.starts_with("What are the factors related to time preference"));
        assert!(matches!(&first.gold, Gold::Open { reference } if reference.contains("coefficient 0.3596")));
        let context = first.context.as_deref().unwrap();
        assert!(context.starts_with("Domain knowledge: Spending and saving"), "{context}");
        assert!(context.contains("- BMI: Body mass index"), "{context}");
        assert_eq!(first.group, "sociology");
        let several = items.iter().find(|i| i.id.starts_with("immigration_offshoring_effect_on_employment/")).unwrap();
        assert!(several.files.len() >= 2 && several.files.iter().all(|f| f.is_file()), "{:?}", several.files);
    }

    #[test]
    fn a_missing_dataset_names_the_query() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("study")).unwrap();
        let meta = serde_json::json!({"domain": "x", "datasets": [{"name": "gone.csv"}],
            "queries": [[{"qid": 4, "question": "Q?", "true_hypothesis": "H."}]]});
        std::fs::write(dir.path().join("study/metadata_2.json"), meta.to_string()).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("metadata_2.json") && err.contains("item study/2/4: data file"), "{err}");
        let err = load(&dir.path().join("study")).unwrap_err().to_string();
        assert!(err.contains("no `<dataset>/metadata_<n>.json`"), "{err}");
    }
}
