//! kiln's own `rl` export: its Parquet file, or the same columns as JSON lines (`.jsonl`).

use std::path::Path;

use serde::Deserialize;

use super::{Item, data_file, json_lines};
use crate::StageError;
use crate::graders::Gold;

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
    #[serde(default)]
    expert_trajectory: Vec<kiln_llm::Message>,
}

pub(super) fn load(path: &Path, base_dir: &Path) -> Result<Vec<Item>, StageError> {
    let rows: Vec<(String, serde_json::Value)> = if path.extension().is_some_and(|e| e == "jsonl") {
        json_lines::<serde_json::Value>(path)?.into_iter().map(|(line, v)| (format!("line {line}"), v)).collect()
    } else {
        parquet_rows(path)?.into_iter().enumerate().map(|(i, v)| (format!("row {}", i + 1), v)).collect()
    };
    let export_dir = path.parent().unwrap_or(Path::new(""));
    rows.into_iter()
        .map(|(at, row)| {
            let r: RlRow = serde_json::from_value(row)
                .map_err(|e| StageError::invalid(path, format!("{at}: not an `rl` export row: {e}")))?;
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
            let mut item = Item::new(r.row_id, r.question, files, gold, group);
            item.table = r.table;
            item.expert = r.expert_trajectory;
            Ok(item)
        })
        .collect()
}

/// The rows of an `rl` export's Parquet file.
fn parquet_rows(path: &Path) -> Result<Vec<serde_json::Value>, StageError> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = std::fs::File::open(path).map_err(|e| StageError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| StageError::invalid(path, format!("not an `rl` export: {e}")))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StageError::invalid(path, format!("not an `rl` export: {e}")))?;
    let rows = kiln_pipeline::rows::to_json_rows(&batches).map_err(|e| StageError::invalid(path, e))?;
    Ok(rows.into_iter().map(serde_json::Value::Object).collect())
}
