//! Reading tables out of data files as Arrow batches: DataFusion for CSV, TSV, Parquet and JSON
//! lines, calamine for XLSX (every sheet), rusqlite for SQLite (every table), serde_json for JSON
//! arrays. Only a sample of rows is ever held in memory; row counts stream over the whole table.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};

/// File formats the profiler reads, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// Tab-separated values with a header row.
    Tsv,
    /// Excel workbook: one table per sheet.
    Xlsx,
    /// SQLite database: one table per table.
    Sqlite,
    /// Apache Parquet.
    Parquet,
    /// A JSON array of objects.
    Json,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format of `path`, from its extension.
    pub fn of(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "csv" => Format::Csv,
            "tsv" | "tab" => Format::Tsv,
            "xlsx" | "xlsm" | "xls" | "ods" => Format::Xlsx,
            "sqlite" | "sqlite3" | "db" => Format::Sqlite,
            "parquet" => Format::Parquet,
            "json" => Format::Json,
            "jsonl" | "ndjson" => Format::Jsonl,
            _ => return None,
        })
    }

    /// Lowercase name, as stored in the `format` column.
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Xlsx => "xlsx",
            Format::Sqlite => "sqlite",
            Format::Parquet => "parquet",
            Format::Json => "json",
            Format::Jsonl => "jsonl",
        }
    }
}

/// One table read from a file: its exact row count and a sample of its rows.
#[derive(Debug)]
pub struct Table {
    /// Sheet or table name; the file stem for single-table formats.
    pub name: String,
    /// Exact number of rows.
    pub row_count: u64,
    /// Schema of the rows.
    pub schema: Arc<Schema>,
    /// The first rows, at most the sample size (empty when the table was not sampled).
    pub rows: Vec<RecordBatch>,
    /// True when `rows` hold fewer rows than the table.
    pub sampled: bool,
}

/// A table, or why it could not be read.
pub type TableRead = Result<Table, TableError>;

/// A table that could not be read.
#[derive(Debug)]
pub struct TableError {
    /// Sheet or table name.
    pub name: String,
    /// Short reason.
    pub reason: &'static str,
    /// Details.
    pub detail: String,
}

/// Everything read from one file.
#[derive(Debug, Default)]
pub struct FileRead {
    /// The tables, in file order.
    pub tables: Vec<TableRead>,
    /// CREATE TABLE statements of a SQLite database.
    pub ddl: Option<String>,
}

/// Which tables to sample: given a row count, whether the table is worth profiling.
pub type Keep<'a> = &'a (dyn Fn(u64) -> bool + Sync);

/// Reads a file with DataFusion (CSV, TSV, Parquet, JSON lines).
pub async fn read_with_datafusion(
    path: &Path,
    format: Format,
    sample_rows: usize,
    keep: Keep<'_>,
) -> Result<FileRead, String> {
    let ctx = SessionContext::new();
    let location = path.to_str().ok_or("the path is not valid UTF-8")?;
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| format!(".{e}")).unwrap_or_default();
    let df = match format {
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Tsv { b'\t' } else { b',' };
            let schema = csv_schema(path, delimiter, sample_rows.max(1000))?;
            let options = CsvReadOptions::new()
                .has_header(true)
                .delimiter(delimiter)
                .newlines_in_values(true)
                .schema(&schema)
                .file_extension(&ext);
            ctx.read_csv(location, options).await
        }
        Format::Parquet => ctx.read_parquet(location, ParquetReadOptions::default().file_extension(&ext)).await,
        _ => ctx.read_json(location, JsonReadOptions::default().file_extension(&ext)).await,
    }
    .map_err(|e| e.strip_backtrace())?;
    let name = file_stem(path);
    let read = async {
        let row_count = df.clone().count().await? as u64;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let rows = match keep(row_count) {
            false => Vec::new(),
            true if row_count <= sample_rows as u64 => df.collect().await?,
            true => df.limit(0, Some(sample_rows))?.collect().await?,
        };
        Ok::<_, datafusion::error::DataFusionError>(Table {
            name: name.clone(),
            row_count,
            schema,
            rows,
            sampled: row_count > sample_rows as u64,
        })
    };
    let table = read.await.map_err(|e| TableError { name, reason: "unreadable", detail: e.strip_backtrace() });
    Ok(FileRead { tables: vec![table], ddl: None })
}

/// Reads every row of one table (`name`: the sheet or SQLite table; ignored for single-table
/// formats). For tables already profiled, so of bounded size.
pub async fn read_table(path: &Path, name: &str) -> Result<Table, String> {
    let format = Format::of(path).ok_or("unsupported format")?;
    let all = |_: u64| true;
    let read = match format {
        Format::Csv | Format::Tsv | Format::Parquet | Format::Jsonl => {
            read_with_datafusion(path, format, usize::MAX, &all).await
        }
        Format::Json => read_json_array(path, usize::MAX),
        Format::Xlsx | Format::Sqlite => {
            let (path, name) = (path.to_path_buf(), name.to_string());
            tokio::task::spawn_blocking(move || {
                // Only the table asked for is read, not the whole workbook or database.
                if format == Format::Xlsx {
                    read_xlsx(&path, Some(&name), usize::MAX, &all)
                } else {
                    read_sqlite(&path, Some(&name), usize::MAX, &all)
                }
            })
            .await
            .map_err(|e| e.to_string())?
        }
    }?;
    let single = !matches!(format, Format::Xlsx | Format::Sqlite);
    read.tables
        .into_iter()
        .find(|t| single || t.as_ref().map_or_else(|e| e.name == name, |t| t.name == name))
        .ok_or_else(|| format!("no table `{name}` in {}", path.display()))?
        .map_err(|e| e.detail)
}

/// Infers a CSV file's schema from its first `max_records` rows, making blank or repeated
/// header names unique (real files have both, and DataFusion would reject them).
fn csv_schema(path: &Path, delimiter: u8, max_records: usize) -> Result<Schema, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let format = arrow::csv::reader::Format::default().with_header(true).with_delimiter(delimiter);
    let (schema, _) = format.infer_schema(file, Some(max_records)).map_err(|e| e.to_string())?;
    let names = header_names(schema.fields().iter().map(|f| f.name().clone()));
    Ok(Schema::new(schema.fields().iter().zip(names).map(|(f, n)| f.as_ref().clone().with_name(n)).collect::<Vec<_>>()))
}

/// Reads a JSON file holding an array of objects.
pub fn read_json_array(path: &Path, sample_rows: usize) -> Result<FileRead, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    let name = file_stem(path);
    let not_table = |detail: &str| FileRead {
        tables: vec![Err(TableError { name: name.clone(), reason: "not_tabular", detail: detail.to_string() })],
        ddl: None,
    };
    let Some(items) = value.as_array() else { return Ok(not_table("the JSON document is not an array of records")) };
    if !items.iter().all(|v| v.is_object()) {
        return Ok(not_table("the JSON array holds values that are not objects"));
    }
    let schema =
        arrow::json::reader::infer_json_schema_from_iterator(items.iter().map(Ok)).map_err(|e| e.to_string())?;
    let schema = Arc::new(schema);
    let sample = &items[..items.len().min(sample_rows)];
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone()).build_decoder().map_err(|e| e.to_string())?;
    decoder.serialize(sample).map_err(|e| e.to_string())?;
    let rows = decoder.flush().map_err(|e| e.to_string())?.into_iter().collect();
    let table = Table { name, row_count: items.len() as u64, schema, rows, sampled: items.len() > sample_rows };
    Ok(FileRead { tables: vec![Ok(table)], ddl: None })
}

/// Reads every sheet of a workbook (or only the sheet `only`); the first row of a sheet is its
/// header.
pub fn read_xlsx(path: &Path, only: Option<&str>, sample_rows: usize, keep: Keep<'_>) -> Result<FileRead, String> {
    use calamine::{Data, Reader, open_workbook_auto};
    let mut book = open_workbook_auto(path).map_err(|e| e.to_string())?;
    let mut tables = Vec::new();
    for sheet in book.sheet_names() {
        if only.is_some_and(|o| o != sheet) {
            continue;
        }
        let range = match book.worksheet_range(&sheet) {
            Ok(r) => r,
            Err(e) => {
                tables.push(Err(TableError { name: sheet, reason: "unreadable", detail: e.to_string() }));
                continue;
            }
        };
        let mut rows = range.rows();
        let Some(header) = rows.next() else {
            tables.push(Err(TableError { name: sheet, reason: "empty", detail: "the sheet has no cells".into() }));
            continue;
        };
        let names = header_names(header.iter().map(|c| c.to_string()));
        let row_count = range.height().saturating_sub(1) as u64;
        let mut columns: Vec<Vec<Cell>> = vec![Vec::new(); names.len()];
        if keep(row_count) {
            for row in rows.take(sample_rows) {
                for (i, col) in columns.iter_mut().enumerate() {
                    col.push(match row.get(i) {
                        None | Some(Data::Empty) | Some(Data::Error(_)) => Cell::Null,
                        Some(Data::Int(v)) => Cell::Int(*v),
                        Some(Data::Float(v)) => Cell::Float(*v),
                        Some(Data::Bool(v)) => Cell::Bool(*v),
                        Some(Data::String(s)) if s.trim().is_empty() => Cell::Null,
                        Some(Data::String(s)) => Cell::Text(s.clone()),
                        Some(Data::DateTime(d)) => {
                            Cell::Text(d.as_datetime().map(show_datetime).unwrap_or_else(|| d.to_string()))
                        }
                        Some(other) => Cell::Text(other.to_string()),
                    });
                }
            }
        }
        let batch = cells_to_batch(&names, columns, true).map_err(|e| e.to_string())?;
        tables.push(Ok(Table {
            name: sheet,
            row_count,
            schema: batch.schema(),
            rows: vec![batch],
            sampled: row_count > sample_rows as u64,
        }));
    }
    Ok(FileRead { tables, ddl: None })
}

fn show_datetime(d: chrono::NaiveDateTime) -> String {
    if d.time() == chrono::NaiveTime::MIN { d.date().to_string() } else { d.to_string() }
}

/// Reads every table of a SQLite database (or only the table `only`), read-only. The DDL
/// always covers the whole database.
pub fn read_sqlite(path: &Path, only: Option<&str>, sample_rows: usize, keep: Keep<'_>) -> Result<FileRead, String> {
    use rusqlite::types::ValueRef;
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "query_only", true).map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")
        .map_err(|e| format!("not a readable SQLite database: {e}"))?;
    let listed: Vec<(String, Option<String>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(|rows| rows.collect())
        .map_err(|e| format!("not a readable SQLite database: {e}"))?;
    let ddl = listed.iter().filter_map(|(_, sql)| sql.clone()).map(|s| format!("{s};")).collect::<Vec<_>>().join("\n");

    let mut tables = Vec::new();
    for (name, _) in listed.into_iter().filter(|(n, _)| only.is_none_or(|o| o == n)) {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let read = || -> rusqlite::Result<Table> {
            let row_count: i64 = conn.query_row(&format!("SELECT count(*) FROM {quoted}"), [], |r| r.get(0))?;
            let mut stmt = conn.prepare(&format!("SELECT * FROM {quoted} LIMIT ?1"))?;
            let names = header_names(stmt.column_names().into_iter().map(str::to_string));
            let mut columns: Vec<Vec<Cell>> = vec![Vec::new(); names.len()];
            let limit = if keep(row_count as u64) { sample_rows as i64 } else { 0 };
            let mut rows = stmt.query([limit])?;
            while let Some(row) = rows.next()? {
                for (i, col) in columns.iter_mut().enumerate() {
                    col.push(match row.get_ref(i)? {
                        ValueRef::Null => Cell::Null,
                        ValueRef::Integer(v) => Cell::Int(v),
                        ValueRef::Real(v) => Cell::Float(v),
                        ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                        ValueRef::Blob(b) => Cell::Text(format!("<blob of {} bytes>", b.len())),
                    });
                }
            }
            let batch = cells_to_batch(&names, columns, false)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            Ok(Table {
                name: name.clone(),
                row_count: row_count as u64,
                schema: batch.schema(),
                rows: vec![batch],
                sampled: row_count > sample_rows as i64,
            })
        };
        tables.push(read().map_err(|e| TableError { name: name.clone(), reason: "unreadable", detail: e.to_string() }));
    }
    Ok(FileRead { tables, ddl: Some(ddl) })
}

/// One cell of a dynamically typed source (a sheet, a SQLite table).
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Empty.
    Null,
    /// Integer.
    Int(i64),
    /// Floating point.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// Anything else, as text.
    Text(String),
}

/// Builds a batch from columns of cells, each typed by what it holds: integers, then floats,
/// then booleans, else text. With `integral_floats`, floats that are all whole become integers
/// (spreadsheets store every number as a float).
pub fn cells_to_batch(
    names: &[String],
    columns: Vec<Vec<Cell>>,
    integral_floats: bool,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let arrays: Vec<ArrayRef> = columns.into_iter().map(|c| cells_to_array(c, integral_floats)).collect();
    let fields: Vec<Field> =
        names.iter().zip(&arrays).map(|(n, a)| Field::new(n, a.data_type().clone(), true)).collect();
    let options = arrow::record_batch::RecordBatchOptions::new().with_row_count(arrays.first().map(|a| a.len()));
    RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &options)
}

fn cells_to_array(cells: Vec<Cell>, integral_floats: bool) -> ArrayRef {
    let has = |f: fn(&Cell) -> bool| cells.iter().any(f);
    let text = has(|c| matches!(c, Cell::Text(_)));
    let float = has(|c| matches!(c, Cell::Float(_)));
    let int = has(|c| matches!(c, Cell::Int(_)));
    let boolean = has(|c| matches!(c, Cell::Bool(_)));
    let whole = |v: f64| v.fract() == 0.0 && v.abs() < 9.0e15;
    let all_whole = cells.iter().all(|c| !matches!(c, Cell::Float(v) if !whole(*v)));
    if text || (boolean && (int || float)) || !(int || float || boolean) {
        let values = cells.into_iter().map(|c| match c {
            Cell::Null => None,
            Cell::Int(v) => Some(v.to_string()),
            Cell::Float(v) => Some(v.to_string()),
            Cell::Bool(v) => Some(v.to_string()),
            Cell::Text(s) => Some(s),
        });
        return Arc::new(StringArray::from_iter(values));
    }
    if boolean {
        return Arc::new(BooleanArray::from_iter(cells.into_iter().map(|c| match c {
            Cell::Bool(v) => Some(v),
            _ => None,
        })));
    }
    if float && !(integral_floats && all_whole) {
        return Arc::new(Float64Array::from_iter(cells.into_iter().map(|c| match c {
            Cell::Int(v) => Some(v as f64),
            Cell::Float(v) => Some(v),
            _ => None,
        })));
    }
    Arc::new(Int64Array::from_iter(cells.into_iter().map(|c| match c {
        Cell::Int(v) => Some(v),
        Cell::Float(v) => Some(v as i64),
        _ => None,
    })))
}

/// Column names from a header: blanks become `column_<n>`, repeats get a `_<k>` suffix.
fn header_names(raw: impl Iterator<Item = String>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (i, name) in raw.enumerate() {
        let base = if name.trim().is_empty() { format!("column_{}", i + 1) } else { name.trim().to_string() };
        let mut candidate = base.clone();
        let mut k = 2;
        while names.contains(&candidate) {
            candidate = format!("{base}_{k}");
            k += 1;
        }
        names.push(candidate);
    }
    names
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_typed_by_content() {
        let batch = cells_to_batch(
            &["i".into(), "f".into(), "t".into(), "w".into()],
            vec![
                vec![Cell::Int(1), Cell::Null],
                vec![Cell::Float(1.5), Cell::Int(2)],
                vec![Cell::Int(1), Cell::Text("x".into())],
                vec![Cell::Float(2.0), Cell::Float(3.0)],
            ],
            true,
        )
        .unwrap();
        let types: Vec<String> = batch.schema().fields().iter().map(|f| f.data_type().to_string()).collect();
        assert_eq!(types, ["Int64", "Float64", "Utf8", "Int64"]);
        assert_eq!(batch.num_rows(), 2);
    }

    #[test]
    fn header_names_are_unique_and_non_empty() {
        let names = header_names(["a", "", "a", " b "].into_iter().map(String::from));
        assert_eq!(names, ["a", "column_2", "a_2", "b"]);
    }
}
