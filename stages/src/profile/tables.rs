//! Profiling one file: every table it holds, read and described (columns, statistics, head,
//! DDL, a description found beside it), or rejected with the reason.

use std::path::Path;

use kiln_pipeline::rows::row_id;
use kiln_pipeline::stage::Rejection;
use serde::{Deserialize, Serialize};

use super::Profile;
use super::readers::{self, FileRead, Format, Table, TableRead};
use super::stats::{ColumnProfile, ColumnStats};

/// One output row: the metadata of one table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TableProfile {
    row_id: String,
    parent_ids: Vec<String>,
    path: String,
    format: String,
    table: String,
    description: Option<String>,
    row_count: u64,
    column_count: u64,
    column_names: Vec<String>,
    columns: Vec<ColumnProfile>,
    head: String,
    ddl: Option<String>,
    sampled: bool,
}

/// What became of one table; a file's list of these is what the row cache stores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum TableOutcome {
    Profiled(Box<TableProfile>),
    Rejected(Rejection),
}

impl Profile {
    /// Profiles one file, every table of it.
    pub(super) async fn profile_file(&self, shown: &str, path: &Path) -> Vec<TableOutcome> {
        let file_id = row_id(&[], shown.as_bytes());
        let reject = |reason: &str, detail: String| {
            vec![TableOutcome::Rejected(Rejection {
                row_id: file_id.clone(),
                reason: reason.into(),
                detail: format!("{shown}: {detail}"),
            })]
        };
        let Some(format) = Format::of(path) else {
            return reject(
                "unsupported_format",
                "not a CSV, TSV, XLSX, SQLite, Parquet, JSON or JSON lines file (by extension)".into(),
            );
        };
        match std::fs::metadata(path) {
            Err(e) => return reject("unreadable", e.to_string()),
            Ok(m) if m.len() == 0 => return reject("empty", "the file is empty".into()),
            Ok(m) if m.len() > self.max_file_mib * 1024 * 1024 => {
                return reject("oversized", format!("{} bytes, over `max_file_mib` = {}", m.len(), self.max_file_mib));
            }
            Ok(m) if matches!(format, Format::Xlsx | Format::Json) && m.len() > self.max_loaded_mib * 1024 * 1024 => {
                return reject(
                    "oversized",
                    format!(
                        "{} bytes; {} files are read whole, up to `max_loaded_mib` = {}",
                        m.len(),
                        format.name(),
                        self.max_loaded_mib
                    ),
                );
            }
            Ok(_) => {}
        }
        let keep = |rows: u64| self.keeps(rows);
        let read = match format {
            Format::Csv | Format::Tsv | Format::Parquet | Format::Jsonl => {
                readers::read_with_datafusion(path, format, self.sample_rows, &keep).await
            }
            Format::Json | Format::Xlsx | Format::Sqlite => {
                let (path, this) = (path.to_path_buf(), self.clone());
                tokio::task::spawn_blocking(move || {
                    let keep = |rows: u64| this.keeps(rows);
                    match format {
                        Format::Json => readers::read_json_array(&path, this.sample_rows),
                        Format::Xlsx => readers::read_xlsx(&path, None, this.sample_rows, &keep),
                        _ => readers::read_sqlite(&path, None, this.sample_rows, &keep),
                    }
                })
                .await
                .unwrap_or_else(|e| Err(format!("reader crashed: {e}")))
            }
        };
        let FileRead { tables, ddl } = match read {
            Ok(read) => read,
            Err(e) => return reject("unreadable", e),
        };
        if tables.is_empty() {
            return reject("empty", "no table, sheet or record found".into());
        }
        let description = sidecar_description(path);
        tables.into_iter().map(|t| self.profile_table(shown, format, t, &description, &ddl)).collect()
    }

    fn profile_table(
        &self,
        shown: &str,
        format: Format,
        table: TableRead,
        description: &Option<String>,
        ddl: &Option<String>,
    ) -> TableOutcome {
        let name = match &table {
            Ok(t) => t.name.clone(),
            Err(e) => e.name.clone(),
        };
        let id = row_id(&[], format!("{shown}\0{name}").as_bytes());
        let reject = |reason: &str, detail: String| {
            TableOutcome::Rejected(Rejection {
                row_id: id.clone(),
                reason: reason.into(),
                detail: format!("{shown} [{name}]: {detail}"),
            })
        };
        let t: Table = match table {
            Ok(t) => t,
            Err(e) => return reject(e.reason, e.detail),
        };
        let columns = t.schema.fields().len() as u64;
        if t.row_count < self.min_rows {
            return reject("too_few_rows", format!("{} rows, under `min_rows` = {}", t.row_count, self.min_rows));
        }
        if t.row_count > self.max_rows {
            return reject("too_many_rows", format!("{} rows, over `max_rows` = {}", t.row_count, self.max_rows));
        }
        if columns < self.min_columns || columns > self.max_columns {
            return reject(
                if columns < self.min_columns { "too_few_columns" } else { "too_many_columns" },
                format!(
                    "{columns} columns, outside `min_columns`..=`max_columns` = {}..={}",
                    self.min_columns, self.max_columns
                ),
            );
        }

        let mut stats: Vec<ColumnStats> =
            t.schema.fields().iter().map(|f| ColumnStats::new(f.name(), f.data_type())).collect();
        let examined: u64 = t.rows.iter().map(|b| b.num_rows() as u64).sum();
        for batch in &t.rows {
            for (s, col) in stats.iter_mut().zip(batch.columns()) {
                s.update(col);
            }
        }
        let empty = stats.iter().filter(|s| s.is_empty(examined)).count();
        if columns > 0 && empty as f64 / columns as f64 > self.max_empty_columns {
            return reject(
                "anomalous_columns",
                format!(
                    "{empty} of {columns} columns hold no value, over `max_empty_columns` = {}",
                    self.max_empty_columns
                ),
            );
        }
        let head = match head_json(&t, self.head_rows) {
            Ok(h) => h,
            Err(e) => return reject("unreadable", format!("rows cannot be rendered: {e}")),
        };
        let columns_profile: Vec<ColumnProfile> = stats.into_iter().map(|s| s.finish(self.max_unique_values)).collect();
        TableOutcome::Profiled(Box::new(TableProfile {
            row_id: id.clone(),
            parent_ids: Vec::new(),
            path: shown.to_string(),
            format: format.name().to_string(),
            table: t.name.clone(),
            description: description.clone(),
            row_count: t.row_count,
            column_count: columns,
            column_names: t.schema.fields().iter().map(|f| f.name().clone()).collect(),
            columns: columns_profile,
            head,
            ddl: ddl.clone(),
            sampled: t.sampled,
        }))
    }
}

/// The first `n` rows as a JSON array of objects, keys in column order.
fn head_json(t: &Table, n: usize) -> std::result::Result<String, arrow::error::ArrowError> {
    let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
    for b in kiln_pipeline::rows::head(&t.rows, n) {
        writer.write(&b)?;
    }
    writer.finish()?;
    let text = String::from_utf8_lossy(&writer.into_inner()).into_owned();
    Ok(format!("[{}]", text.lines().collect::<Vec<_>>().join(",")))
}

/// A description kept beside the file: `<stem>.md`, `<stem>.txt`, `<name>.md`, or the folder's
/// `README.md`; at most 4000 characters.
fn sidecar_description(path: &Path) -> Option<String> {
    let dir = path.parent()?;
    let stem = path.file_stem()?.to_string_lossy();
    let name = path.file_name()?.to_string_lossy();
    let candidates =
        [format!("{stem}.md"), format!("{stem}.txt"), format!("{name}.md"), "README.md".into(), "README.txt".into()];
    candidates
        .iter()
        .map(|c| dir.join(c))
        .filter(|c| c != path)
        .find_map(|c| std::fs::read_to_string(c).ok())
        .map(|text| text.trim().chars().take(4000).collect())
}
