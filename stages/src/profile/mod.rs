//! `profile`: one row of metadata per table found in data files (RECIPE section 1).
//!
//! Reads CSV, TSV, XLSX (every sheet), SQLite (every table), Parquet, JSON and JSON lines, and
//! writes for each table its description (from a sidecar file), head rows, column names and
//! types, per-column min/max, unique values (capped) and null counts, row and column counts,
//! and for SQLite the CREATE TABLE DDL of the whole database. Tables outside the row and column
//! thresholds, and files that cannot be read, go to the rejection ledger with a reason.
//!
//! Each file's result goes through the row cache, keyed by its path, size, modification time and
//! the parameters: a rerun after a crash only reads the files not yet profiled.
//!
//! ```toml
//! [stages.files]
//! kind = "profile"
//! paths = ["data/*.csv", "data/*.xlsx", "data/*.sqlite"]
//! min_rows = 20
//! max_rows = 1000
//! ```

pub(crate) mod readers;
pub(crate) mod stats;
mod tables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, SchemaRef};
use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use kiln_pipeline::cache::CacheKey;
use kiln_pipeline::rows::{schema_with_lineage, to_batch};
use kiln_pipeline::stage::{CheckCx, FileDep, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result, progress};
use serde::{Deserialize, Serialize};

use crate::families::PROFILED_TABLE;

use crate::paths::expand;
use stats::ColumnProfile;
use tables::TableOutcome;

/// Parameters of a `profile` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Files or glob patterns (`data/**/*.csv`), relative to the pipeline file. Required.
    pub paths: Vec<String>,
    /// Tables with fewer rows are rejected (`too_few_rows`). Default: 20.
    #[serde(default = "default_min_rows")]
    pub min_rows: u64,
    /// Tables with more rows are rejected (`too_many_rows`). Default: 1000.
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
    /// Tables with fewer columns are rejected. Default: 1.
    #[serde(default = "default_min_columns")]
    pub min_columns: u64,
    /// Tables with more columns are rejected. Default: 200.
    #[serde(default = "default_max_columns")]
    pub max_columns: u64,
    /// Number of head rows kept per table. Default: 5.
    #[serde(default = "default_head_rows")]
    pub head_rows: usize,
    /// Unique values listed per column, at most. Default: 20.
    #[serde(default = "default_max_unique_values")]
    pub max_unique_values: usize,
    /// Column statistics are computed over at most this many rows; row counts are always
    /// exact. Default: 100000.
    #[serde(default = "default_sample_rows")]
    pub sample_rows: usize,
    /// Files larger than this many MiB are rejected (`oversized`) without being read.
    /// Default: 1024.
    #[serde(default = "default_max_file_mib")]
    pub max_file_mib: u64,
    /// Tables where more than this share of columns hold no value at all are rejected
    /// (`anomalous_columns`). Between 0 and 1. Default: 0.5.
    #[serde(default = "default_max_empty_columns")]
    pub max_empty_columns: f64,
    /// XLSX and JSON-array files are read whole; larger ones are rejected (`oversized`).
    /// Default: 256.
    #[serde(default = "default_max_loaded_mib")]
    pub max_loaded_mib: u64,
    /// How many files are read at once. Default: the number of CPUs.
    #[serde(default)]
    pub parallelism: Option<usize>,
}

fn default_min_rows() -> u64 {
    20
}
fn default_max_rows() -> u64 {
    1000
}
fn default_min_columns() -> u64 {
    1
}
fn default_max_columns() -> u64 {
    200
}
fn default_head_rows() -> usize {
    5
}
fn default_max_unique_values() -> usize {
    20
}
fn default_sample_rows() -> usize {
    100_000
}
fn default_max_file_mib() -> u64 {
    1024
}
fn default_max_loaded_mib() -> u64 {
    256
}
fn default_max_empty_columns() -> f64 {
    0.5
}

/// Bump when the same files and parameters would give different rows.
const VERSION: u32 = 1;

/// The schema of a profile dataset.
pub(crate) fn schema() -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    let column = Fields::from(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("data_type", DataType::Utf8, false),
        Field::new("null_count", DataType::UInt64, false),
        Field::new("unique_count", DataType::UInt64, true),
        Field::new("min", DataType::Utf8, true),
        Field::new("max", DataType::Utf8, true),
        Field::new("unique_values", list(DataType::Utf8), false),
    ]);
    schema_with_lineage(vec![
        Field::new("path", DataType::Utf8, false),
        Field::new("format", DataType::Utf8, false),
        Field::new("table", DataType::Utf8, false),
        Field::new("description", DataType::Utf8, true),
        Field::new("row_count", DataType::UInt64, false),
        Field::new("column_count", DataType::UInt64, false),
        Field::new("column_names", list(DataType::Utf8), false),
        Field::new("columns", list(DataType::Struct(column)), false),
        Field::new("head", DataType::Utf8, false),
        Field::new("ddl", DataType::Utf8, true),
        Field::new("sampled", DataType::Boolean, false),
    ])
}

impl Profile {
    /// Every file the patterns match, each once, in pattern then path order, as
    /// `(as written relative to the pipeline, resolved path)`.
    fn matched_files(&self, cx: &CheckCx) -> Vec<(String, PathBuf)> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for pattern in &self.paths {
            for path in expand(cx, pattern).unwrap_or_default() {
                if seen.insert(path.clone()) {
                    let shown = path.strip_prefix(&cx.base_dir).unwrap_or(&path).display().to_string();
                    out.push((shown, path));
                }
            }
        }
        out
    }

    /// The parameters that shape one file's profile: what the row cache key includes, so that
    /// adding a pattern or changing `parallelism` reuses every file already profiled.
    fn per_file_params(&self) -> Profile {
        Profile { paths: Vec::new(), parallelism: None, ..self.clone() }
    }

    fn keeps(&self, rows: u64) -> bool {
        (self.min_rows..=self.max_rows).contains(&rows)
    }
}

/// One profiled table as later stages read it (the columns they use).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProfiledTable {
    pub row_id: String,
    pub path: String,
    pub format: String,
    pub table: String,
    #[serde(default)]
    pub description: Option<String>,
    pub row_count: u64,
    pub column_count: u64,
    pub columns: Vec<ColumnProfile>,
    pub head: String,
    #[serde(default)]
    pub ddl: Option<String>,
}

/// The `ProfiledTable` columns that stages reading a profile need.
const PROFILE_COLUMNS: &[&str] = &["path", "format", "table", "row_count", "column_count", "columns", "head"];

/// Checks that a stage of `kind` reads exactly one input of `ProfiledTable` rows.
pub(crate) fn check_profile_input(kind: &str, inputs: &[InputSchema]) -> Result<(), Vec<Problem>> {
    let [input] = inputs else {
        return Err(vec![
            Problem::new(
                "inputs",
                format!("a `{kind}` stage reads exactly one `profile` stage, got {} inputs", inputs.len()),
            )
            .help("write `inputs = [\"files\"]` where `files` is a profile stage"),
        ]);
    };
    PROFILED_TABLE.check(input, PROFILE_COLUMNS).map_err(|p| vec![p])
}

/// Reads every profiled table of `input`.
pub(crate) fn read_profiles(input: &Input) -> Result<Vec<ProfiledTable>> {
    PROFILED_TABLE.read(input)
}

fn shown_dir(dir: &Path) -> String {
    if dir.as_os_str().is_empty() { ".".into() } else { dir.display().to_string() }
}

impl Plain for Profile {
    fn problems(&self, cx: &CheckCx) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.paths.is_empty() {
            problems.push(
                Problem::new("paths", "`paths` is empty")
                    .help("list files or glob patterns, e.g. `paths = [\"data/*.csv\"]`"),
            );
        }
        for (i, pattern) in self.paths.iter().enumerate() {
            match expand(cx, pattern) {
                Err(e) => problems
                    .push(Problem::new(&format!("paths.{i}"), format!("`{pattern}` is not a valid glob pattern: {e}"))),
                Ok(found) if found.is_empty() => {
                    problems.push(Problem::new(&format!("paths.{i}"), format!("`{pattern}` matches no file")).help(
                        format!("paths are relative to the pipeline file's folder `{}`", shown_dir(&cx.base_dir)),
                    ))
                }
                Ok(_) => {}
            }
        }
        if self.min_rows > self.max_rows {
            problems.push(Problem::new(
                "min_rows",
                format!("`min_rows` ({}) is over `max_rows` ({})", self.min_rows, self.max_rows),
            ));
        }
        if !(0.0..=1.0).contains(&self.max_empty_columns) {
            problems.push(Problem::new(
                "max_empty_columns",
                format!("`max_empty_columns` must be between 0 and 1, got {}", self.max_empty_columns),
            ));
        }
        if self.parallelism == Some(0) {
            problems.push(Problem::new("parallelism", "`parallelism` must be at least 1, got 0"));
        }
        problems
    }
}

#[async_trait]
impl Stage for Profile {
    fn version(&self) -> u32 {
        VERSION
    }

    fn files(&self, cx: &CheckCx) -> Vec<FileDep> {
        self.matched_files(cx).into_iter().map(|(_, p)| FileDep::Stat(p)).collect()
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        if !inputs.is_empty() {
            return Err(vec![
                Problem::new("inputs", "a `profile` stage reads files, not other stages")
                    .help("remove `inputs` and list files in `paths`"),
            ]);
        }
        Ok(schema())
    }

    async fn run(&self, cx: &StageCx, _inputs: &[Input]) -> Result<Output> {
        let files = self.matched_files(&cx.pipeline);
        let bar = progress::bar(&cx.name, files.len() as u64);
        let parallelism =
            self.parallelism.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
        let namespace = format!("profile/{VERSION}");
        let params = self.per_file_params();
        let results: Vec<Result<(Vec<TableOutcome>, bool)>> = stream::iter(0..files.len())
            .map(|i| {
                let (namespace, bar, params, (shown, path)) = (&namespace, &bar, &params, &files[i]);
                async move {
                    let state = std::fs::metadata(path).map(|m| (m.len(), m.modified().ok())).ok();
                    let key = CacheKey::new(namespace, &(shown, format!("{state:?}"), params))?;
                    let result = cx
                        .cache
                        .get_or_compute(&key, namespace, || async { Ok(self.profile_file(shown, path).await) })
                        .await;
                    bar.inc(1);
                    result
                }
            })
            .buffered(parallelism)
            .collect()
            .await;
        bar.finish_and_clear();

        let mut output = Output::default();
        let mut rows = Vec::new();
        let mut counters = BTreeMap::from([("files".to_string(), files.len() as u64)]);
        for result in results {
            let (outcomes, hit) = result?;
            *counters.entry(if hit { "cache_hits" } else { "computed" }.to_string()).or_default() += 1;
            for outcome in outcomes {
                *counters.entry("tables".to_string()).or_default() += 1;
                match outcome {
                    TableOutcome::Profiled(p) => rows.push(*p),
                    TableOutcome::Rejected(r) => output.rejections.push(r),
                }
            }
        }
        counters.insert("profiled".into(), rows.len() as u64);
        counters.insert("rejected".into(), output.rejections.len() as u64);
        output.counters = counters;
        output.batches = vec![to_batch(&schema(), &rows).map_err(|e| Error::stage(&cx.name, e))?];
        Ok(output)
    }
}
