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
//! - TableBench ([`Benchmark::Tablebench`]): its JSON lines file (or a JSON array) of items with
//!   id, qtype, qsubtype, question, answer and the table inline (`table`: columns and data) or
//!   as a CSV beside the file (`table_csv`). Inline tables become CSV files when the evaluation
//!   runs. As in the recipe, chart (Visualization) and forecasting (TrendForecasting) items
//!   are skipped.
//! - BIRD ([`Benchmark::Bird`]): a folder with `mini_dev_sqlite.json` (or `dev.json`:
//!   question_id, db_id, question, evidence, SQL, difficulty) and
//!   `dev_databases/<db_id>/<db_id>.sqlite`. The gold is the gold SQL's result, computed when
//!   the evaluation runs.
//! - DiscoveryBench ([`Benchmark::Discoverybench`]): a folder of dataset folders, each with
//!   `metadata_<n>.json` (datasets, domain_knowledge, queries with true_hypothesis) beside its
//!   data files. The gold is the true hypothesis, an open answer graded by the LLM judge.
//! - DA-Code ([`Benchmark::Dacode`]): a folder with `configs/task/all.jsonl` (id, instruction,
//!   hardness), `configs/eval/eval_all.jsonl` (id, func, result, options), `gold/<id>/` and the
//!   task's data in `source/<id>/`. Items graded by `compare_csv` (a result table) and
//!   `compare_text` (named values) are loaded; the others (models, images, databases) are
//!   skipped.
//! - kiln's own `rl` export ([`Benchmark::Rl`]): its Parquet file, so that held-out kiln
//!   questions are a benchmark too. The gold is the result CSV (for SQL tasks, graded as a
//!   table) or the gold answer (a value, numbers within 3%); data files are relative to the
//!   evaluating pipeline's folder, as in the pipeline that exported them.
//!
//! A file that is missing or does not parse is one error naming the file, the line (or item)
//! and what is wrong; an item whose data file is missing names the item and the file.

mod bird;
mod dabench;
mod dacode;
mod discoverybench;
mod qrdata;
mod rl;
mod tablebench;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::StageError;
use crate::graders::Gold;

pub use bird::query_csv;

/// A benchmark format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Benchmark {
    /// InfiAgent-DABench.
    Dabench,
    /// QRData.
    Qrdata,
    /// TableBench.
    Tablebench,
    /// BIRD (mini-dev or dev), SQLite.
    Bird,
    /// DiscoveryBench.
    Discoverybench,
    /// DA-Code.
    Dacode,
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
    /// What the data is, when the benchmark says (QRData, BIRD's evidence, DiscoveryBench's
    /// domain knowledge).
    pub context: Option<String>,
    /// The data files, resolved; the first is the one the question is about.
    pub files: Vec<PathBuf>,
    /// The expected answer.
    pub gold: Gold,
    /// The item's group in reports: DABench's level, QRData's question type, a kiln question's
    /// category.
    pub group: String,
    /// The table the question is about, when the file holds several (a kiln SQLite question).
    pub table: Option<String>,
    /// A table given inline (TableBench), as CSV: written to a file named `<id>.csv` when the
    /// evaluation runs, and shown to the agent as its data file.
    pub inline_csv: Option<String>,
    /// The query whose result on the first data file (a SQLite database) is the gold table
    /// (BIRD): run when the evaluation runs.
    pub gold_sql: Option<String>,
    /// The expert trajectory of a kiln `rl` export item (empty elsewhere): what RL's SFT term
    /// trains on.
    pub expert: Vec<kiln_llm::Message>,
}

impl Item {
    /// An item with its files, gold and group, and nothing else.
    fn new(id: String, question: String, files: Vec<PathBuf>, gold: Gold, group: String) -> Self {
        Item {
            id,
            question,
            context: None,
            files,
            gold,
            group,
            table: None,
            inline_csv: None,
            gold_sql: None,
            expert: Vec::new(),
        }
    }
}

/// What a benchmark's files hold: the items kiln grades, and how many it skipped and why.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Loaded {
    /// The items, in file order.
    pub items: Vec<Item>,
    /// Items left out, by reason (charts, forecasting, model training tasks...).
    pub skipped: BTreeMap<String, usize>,
}

impl From<Vec<Item>> for Loaded {
    fn from(items: Vec<Item>) -> Self {
        Loaded { items, skipped: BTreeMap::new() }
    }
}

impl Benchmark {
    /// The files that list the items and their gold answers, at `path`.
    pub fn index_files(self, path: &Path) -> Vec<PathBuf> {
        match self {
            Benchmark::Dabench => vec![path.join("da-dev-questions.jsonl"), path.join("da-dev-labels.jsonl")],
            Benchmark::Qrdata => vec![path.join("QRData.json")],
            Benchmark::Bird => vec![bird::index(path)],
            Benchmark::Discoverybench => discoverybench::metadata_files(path).unwrap_or_default(),
            Benchmark::Dacode => vec![path.join(dacode::TASKS), path.join(dacode::EVAL)],
            Benchmark::Tablebench | Benchmark::Rl => vec![path.to_path_buf()],
        }
    }

    /// Every item of the benchmark at `path` (its folder; for [`Benchmark::Tablebench`] and
    /// [`Benchmark::Rl`], the file), in file order; `base_dir` resolves the data files of an
    /// `rl` export.
    pub fn load(self, path: &Path, base_dir: &Path) -> Result<Loaded, StageError> {
        match self {
            Benchmark::Dabench => dabench::load(path).map(Loaded::from),
            Benchmark::Qrdata => qrdata::load(path).map(Loaded::from),
            Benchmark::Tablebench => tablebench::load(path),
            Benchmark::Bird => bird::load(path).map(Loaded::from),
            Benchmark::Discoverybench => discoverybench::load(path).map(Loaded::from),
            Benchmark::Dacode => dacode::load(path),
            Benchmark::Rl => rl::load(path, base_dir).map(Loaded::from),
        }
    }

    /// The format's name, as written in a pipeline.
    pub fn name(self) -> &'static str {
        match self {
            Benchmark::Dabench => "dabench",
            Benchmark::Qrdata => "qrdata",
            Benchmark::Tablebench => "tablebench",
            Benchmark::Bird => "bird",
            Benchmark::Discoverybench => "discoverybench",
            Benchmark::Dacode => "dacode",
            Benchmark::Rl => "rl",
        }
    }
}

/// An id as text: JSON strings as they are, numbers as written.
fn id_text(id: &serde_json::Value) -> String {
    id.as_str().map(str::to_string).unwrap_or_else(|| id.to_string())
}

/// The JSON file at `path`, parsed, or an error naming the file and the line.
fn json_file<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| StageError::invalid(path, format!("line {}: {e}", e.line())))
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

/// `../shared/<rel>` beside the repository, when it is there (tests on the published files).
#[cfg(test)]
fn shared(rel: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared").join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipped: no ../shared/{rel}");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graders::grade;

    fn shared(name: &str) -> Option<PathBuf> {
        super::shared(&format!("benchmarks/formats/{name}"))
    }

    #[test]
    fn dabench_items_carry_their_labels_and_files() {
        let Some(dir) = shared("dabench") else { return };
        let items = Benchmark::Dabench.load(&dir, Path::new("")).unwrap().items;
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
        let items = Benchmark::Qrdata.load(&dir, Path::new("")).unwrap().items;
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
            Benchmark::Dabench.load(dir.path(), Path::new("")).unwrap().items[0].gold,
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
        let verl = |i: u64, truth: &str| {
            serde_json::json!({"data_source": "kiln/rl", "ability": "data_analysis",
                "reward_model": {"style": "answer", "ground_truth": truth},
                "extra_info": {"index": i, "question_id": format!("q{i}")}})
        };
        let rows: Vec<serde_json::Value> = vec![
            serde_json::json!({"row_id": "q1", "parent_ids": ["t1"], "prompt": [message], "question": "How many?",
                "gold_answer": "42", "data_files": ["data/a.csv"], "category": "counting", "difficulty": 1,
                "expert_trajectory": [message]}),
            serde_json::json!({"row_id": "q2", "parent_ids": ["t2"], "prompt": [message], "question": "Per city?",
                "gold_answer": "see rl.results/q2.csv", "gold_result_csv": "rl.results/q2.csv",
                "data_files": ["data/shop.sqlite"], "table": "sales", "category": "grouping", "difficulty": 3,
                "expert_trajectory": [message]}),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, mut row)| {
            row.as_object_mut().unwrap().extend(verl(i as u64 + 1, "42").as_object().unwrap().clone());
            row
        })
        .collect();
        let batch = kiln_pipeline::rows::to_batch(&crate::export::rl_schema(), &rows).unwrap();
        let file = std::fs::File::create(dir.path().join("out/rl.parquet")).unwrap();
        let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();

        let items = Benchmark::Rl.load(&dir.path().join("out/rl.parquet"), dir.path()).unwrap().items;
        assert_eq!(items[0].gold, Gold::Value { value: "42".into(), tolerance: 0.03 });
        assert_eq!(items[0].group, "counting");
        assert_eq!(items[1].gold, Gold::Table { csv: "name,n\nLyon,3\n".into() });
        assert_eq!((items[1].group.as_str(), items[1].table.as_deref()), ("grouping (depth 3)", Some("sales")));
        assert!(items[1].files[0].ends_with("data/shop.sqlite"));
        let err = Benchmark::Rl.load(&dir.path().join("out/rl.parquet"), Path::new("/nowhere")).unwrap_err();
        assert!(err.to_string().contains("item q1: data file"), "{err}");
    }
}
