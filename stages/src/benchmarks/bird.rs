//! BIRD (mini-dev or dev, SQLite): questions over databases; the gold is the gold SQL's result.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Item, data_file, id_text, json_file};
use crate::StageError;
use crate::graders::Gold;

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    question_id: Option<serde_json::Value>,
    db_id: String,
    question: String,
    #[serde(default)]
    evidence: String,
    #[serde(rename = "SQL")]
    sql: String,
    #[serde(default)]
    difficulty: Option<String>,
}

/// The questions file in `dir`: `mini_dev_sqlite.json` when there is one, else `dev.json`.
pub(super) fn index(dir: &Path) -> PathBuf {
    let mini = dir.join("mini_dev_sqlite.json");
    if mini.is_file() { mini } else { dir.join("dev.json") }
}

/// The items of the BIRD folder `dir`.
pub(super) fn load(dir: &Path) -> Result<Vec<Item>, StageError> {
    let path = index(dir);
    let raw: Vec<Raw> = json_file(&path)?;
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let id = r.question_id.as_ref().map(id_text).unwrap_or_else(|| i.to_string());
            let db = format!("{0}/{0}.sqlite", r.db_id);
            let files = vec![data_file(&dir.join("dev_databases"), &db, &id, &path)?];
            let question = format!(
                "{}\nSave the rows that answer it with execute_sql(sql, output_path='result.csv') and name that file in your final answer.",
                r.question.trim()
            );
            let group = r.difficulty.unwrap_or_else(|| "all".into());
            let mut item = Item::new(id, question, files, Gold::Table { csv: String::new() }, group);
            item.context = Some(r.evidence).filter(|e| !e.trim().is_empty());
            item.gold_sql = Some(r.sql);
            Ok(item)
        })
        .collect()
}

/// The result of `sql` on the SQLite database at `database` (opened read-only) as CSV with a
/// header: integers and text as they are, reals as Rust writes them, NULL as an empty cell.
pub fn query_csv(database: &Path, sql: &str) -> Result<String, StageError> {
    use rusqlite::types::ValueRef;
    let invalid = |e: &dyn std::fmt::Display| StageError::invalid(database, format!("gold query {sql:?}: {e}"));
    let conn = rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| invalid(&e))?;
    let mut stmt = conn.prepare(sql).map_err(|e| invalid(&e))?;
    let names: Vec<String> = stmt.column_names().into_iter().map(str::to_string).collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(&names).map_err(|e| invalid(&e))?;
    let mut rows = stmt.query([]).map_err(|e| invalid(&e))?;
    while let Some(row) = rows.next().map_err(|e| invalid(&e))? {
        let cells = (0..names.len())
            .map(|i| {
                Ok(match row.get_ref(i)? {
                    ValueRef::Null => String::new(),
                    ValueRef::Integer(n) => n.to_string(),
                    ValueRef::Real(x) => x.to_string(),
                    ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
                })
            })
            .collect::<Result<Vec<String>, rusqlite::Error>>()
            .map_err(|e| invalid(&e))?;
        w.write_record(&cells).map_err(|e| invalid(&e))?;
    }
    String::from_utf8(w.into_inner().map_err(|e| invalid(&e))?).map_err(|e| invalid(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graders::{execution_match, grade};

    /// A BIRD folder with the published questions and, for each database, its published schema
    /// (no rows: the databases themselves are not shipped).
    fn from_schemas(bird: &Path) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(bird.join("mini_dev_sqlite.json"), dir.path().join("mini_dev_sqlite.json")).unwrap();
        for schema in std::fs::read_dir(bird.join("schemas")).unwrap() {
            let schema = schema.unwrap().path();
            let db = schema.file_stem().unwrap().to_string_lossy().into_owned();
            let folder = dir.path().join("dev_databases").join(&db);
            std::fs::create_dir_all(&folder).unwrap();
            let conn = rusqlite::Connection::open(folder.join(format!("{db}.sqlite"))).unwrap();
            conn.execute_batch(&std::fs::read_to_string(&schema).unwrap()).unwrap();
        }
        dir
    }

    #[test]
    fn every_mini_dev_gold_query_runs_on_its_schema() {
        let Some(bird) = super::super::shared("benchmarks/bird_minidev") else { return };
        let dir = from_schemas(&bird);
        let items = load(dir.path()).unwrap();
        assert_eq!(items.len(), 500);
        assert_eq!(items[0].id, "1471");
        assert_eq!(items[0].group, "simple");
        assert!(items[0].context.as_deref().unwrap().starts_with("ratio of customers who pay in EUR"));
        assert!(items[0].files[0].ends_with("dev_databases/debit_card_specializing/debit_card_specializing.sqlite"));
        for item in &items {
            let csv = query_csv(&item.files[0], item.gold_sql.as_deref().unwrap())
                .unwrap_or_else(|e| panic!("item {}: {e}", item.id));
            assert!(csv.lines().count() <= 2, "item {}: empty tables give a header and at most an aggregate", item.id);
        }
    }

    #[test]
    fn the_gold_is_the_gold_querys_rows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("dev_databases/shop")).unwrap();
        let db = dir.path().join("dev_databases/shop/shop.sqlite");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE sales (city TEXT, amount REAL, n INTEGER);
             INSERT INTO sales VALUES ('Lyon', 2.5, 1), ('Lyon', 1.0, 2), ('Nice', 4.25, NULL);",
        )
        .unwrap();
        let questions = serde_json::json!([{"question_id": 3, "db_id": "shop", "question": "Total per city?",
            "evidence": "", "SQL": "SELECT city, SUM(amount) AS total FROM sales GROUP BY city", "difficulty": "simple"}]);
        std::fs::write(dir.path().join("dev.json"), questions.to_string()).unwrap();
        let items = load(dir.path()).unwrap();
        assert_eq!(items[0].context, None);
        let gold = query_csv(&items[0].files[0], items[0].gold_sql.as_deref().unwrap()).unwrap();
        assert_eq!(gold, "city,total\nLyon,3.5\nNice,4.25\n");
        assert_eq!(query_csv(&db, "SELECT n FROM sales").unwrap(), "n\n1\n2\n\"\"\n");
        let gold = Gold::Table { csv: gold.clone() };
        assert!(grade("result.csv", Some("total,city\n4.25,Nice\n3.5,Lyon\n"), &gold).correct);
        assert!(!grade("result.csv", Some("city,total\nLyon,3.5\n"), &gold).correct);
        let Gold::Table { csv } = &gold else { unreachable!() };
        assert!(execution_match("c,t\nNice,4.25\nLyon,3.5\n", csv), "BIRD compares rows, not names");
        assert!(!execution_match("total,city\n4.25,Nice\n3.5,Lyon\n", csv), "nor columns out of order");
        let err = query_csv(&db, "SELECT nope FROM sales").unwrap_err().to_string();
        assert!(err.contains("shop.sqlite") && err.contains("no such column: nope"), "{err}");
        std::fs::remove_file(&db).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("dev.json") && err.contains("item 3: data file"), "{err}");
    }
}
