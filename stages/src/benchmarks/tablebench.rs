//! TableBench: items with their table inline, graded per question type by the published rules.

use std::path::Path;

use serde::Deserialize;

use super::{Item, Loaded, data_file, json_file, json_lines};
use crate::StageError;
use crate::graders::Gold;

#[derive(Deserialize)]
struct Raw {
    id: String,
    qtype: String,
    qsubtype: String,
    question: String,
    answer: serde_json::Value,
    #[serde(default)]
    table: Option<serde_json::Value>,
    #[serde(default)]
    table_csv: Option<String>,
}

/// A table as TableBench writes it.
#[derive(Deserialize)]
struct Table {
    columns: Vec<serde_json::Value>,
    data: Vec<Vec<serde_json::Value>>,
}

/// How TableBench grades a subtype: exact match, within 10%, or open text (ROUGE-L in the
/// paper; an LLM judge here).
fn gold(qtype: &str, qsubtype: &str, answer: String) -> Gold {
    match (qtype, qsubtype) {
        ("DataAnalysis", "CorrelationAnalysis" | "StatisticalAnalysis") => {
            Gold::Parts { answer, tolerance: Some(0.10) }
        }
        ("DataAnalysis", "ImpactAnalysis") | ("FactChecking" | "NumericalReasoning", _) => {
            Gold::Parts { answer, tolerance: None }
        }
        _ => Gold::Open { reference: answer },
    }
}

/// `table` as CSV text.
fn csv_text(table: &Table) -> Result<String, String> {
    let cell = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(table.columns.iter().map(cell)).map_err(|e| e.to_string())?;
    for row in &table.data {
        w.write_record(row.iter().map(cell)).map_err(|e| e.to_string())?;
    }
    String::from_utf8(w.into_inner().map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

/// The items of the TableBench file at `path` (JSON lines, or one JSON array).
pub(super) fn load(path: &Path) -> Result<Loaded, StageError> {
    let raw: Vec<(usize, Raw)> = if path.extension().is_some_and(|e| e == "jsonl") {
        json_lines(path)?
    } else {
        json_file::<Vec<Raw>>(path)?.into_iter().enumerate().map(|(i, r)| (i + 1, r)).collect()
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut loaded = Loaded::default();
    for (at, r) in raw {
        if r.qtype == "Visualization" || r.qsubtype == "TrendForecasting" {
            *loaded.skipped.entry(format!("{} (as in the recipe)", r.qsubtype)).or_default() += 1;
            continue;
        }
        let bad = |what: String| StageError::invalid(path, format!("item {} (entry {at}): {what}", r.id));
        let answer = r.answer.as_str().map(str::to_string).unwrap_or_else(|| r.answer.to_string());
        let question = format!(
            "{}\nGive the final answer as the value(s) only, separated by commas if there are several (for example `1062` or `Yes, 25.3`).",
            r.question.trim()
        );
        let mut item = Item::new(r.id.clone(), question, Vec::new(), gold(&r.qtype, &r.qsubtype, answer), r.qtype);
        match (&r.table, &r.table_csv) {
            (Some(table), _) => {
                let table: Table = match table {
                    serde_json::Value::String(text) => serde_json::from_str(text),
                    other => serde_json::from_value(other.clone()),
                }
                .map_err(|e| bad(format!("`table` is not {{columns, data}}: {e}")))?;
                item.inline_csv = Some(csv_text(&table).map_err(bad)?);
            }
            (None, Some(file)) => item.files.push(data_file(dir, file, &r.id, path)?),
            (None, None) => return Err(bad("neither `table` nor `table_csv`".into())),
        }
        loaded.items.push(item);
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::graders::grade;

    const EXAMPLES: &str = "benchmarks/tablebench/eval_examples";

    #[test]
    fn the_published_examples_load_with_their_tables() {
        let Some(dir) = super::super::shared(EXAMPLES) else { return };
        let loaded = load(&dir.join("inference_results/o3-mini-2025-01-31=TableBench_DP=Example.jsonl")).unwrap();
        assert_eq!(loaded.items.len(), 48);
        assert_eq!(
            loaded.skipped,
            BTreeMap::from([
                ("ChartGeneration (as in the recipe)".into(), 3),
                ("TrendForecasting (as in the recipe)".into(), 3)
            ])
        );
        let first = &loaded.items[0];
        let csv = first.inline_csv.as_deref().unwrap();
        assert!(
            csv.starts_with("-,Theme,Films,Participants,Cities,Countries,Jury\n2011,Small things in life,86,620,14,1,"),
            "{csv}"
        );
        assert!(grade("Final Answer: 1062", None, &first.gold).correct);
        assert!(!grade("1061", None, &first.gold).correct);
        for item in &loaded.items {
            let answer = match &item.gold {
                Gold::Parts { answer, .. } | Gold::Open { reference: answer } => answer,
                other => panic!("{other:?}"),
            };
            if let Gold::Parts { .. } = item.gold {
                assert!(grade(answer, None, &item.gold).correct, "the gold grades itself: {}", item.id);
            }
        }
    }

    /// The published example evaluation of o3-mini: on the exact-match subtypes, our verdicts
    /// on its parsed predictions give the published EM per subtype.
    #[test]
    fn exact_match_reproduces_the_published_scores() {
        let Some(dir) = super::super::shared(EXAMPLES) else { return };
        let parsed = dir.join("parsed_results/o3-mini-2025-01-31=TableBench_DP=Example.jsonl");
        let published: serde_json::Value =
            json_file(&dir.join("evaluation_results/llm_eval_subtype_results.json")).unwrap();
        let mut ours: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for (_, row) in json_lines::<serde_json::Value>(&parsed).unwrap() {
            let (qtype, sub) = (row["qtype"].as_str().unwrap(), row["qsubtype"].as_str().unwrap());
            let gold = gold(qtype, sub, row["answer"].as_str().unwrap().to_string());
            if !matches!(gold, Gold::Parts { tolerance: None, .. }) {
                continue;
            }
            let prediction = &row["parsed_result"];
            let e = ours.entry(format!("{qtype}_{sub}")).or_default();
            e.0 += 1;
            e.1 += u32::from(grade(prediction["parsed_prediction"].as_str().unwrap(), None, &gold).correct);
        }
        assert_eq!(ours.len(), 11);
        for (subtype, (n, right)) in ours {
            let em = published["o3-mini-2025-01-31/DP"][&subtype]["EM"].as_f64().unwrap();
            assert!((f64::from(right) / f64::from(n) * 100.0 - em).abs() < 0.01, "{subtype}: {right}/{n} vs {em}");
        }
    }

    #[test]
    fn tables_given_as_files_must_exist() {
        let Some(file) = super::super::shared("benchmarks/tablebench/tablebench_54_examples.json") else { return };
        let err = load(&file).unwrap_err().to_string();
        assert!(err.contains("item 4ee382645d542fe6e3f05e71925c5cb8: data file") && err.contains("not found"), "{err}");
    }
}
