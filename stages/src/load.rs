//! `load`: rows from JSONL, JSON (an array of objects), CSV or Parquet files; the entry point
//! for users who bring their own questions. Every file matched must have the same format and
//! columns. Each row gets a `row_id` hashed from its values, and no parents.
//!
//! ```toml
//! [stages.questions]
//! kind = "load"
//! paths = ["my_questions/*.jsonl"]
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::dataframe::DataFrame;
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionConfig, SessionContext};
use futures::StreamExt;
use kiln_pipeline::rows::{PARENT_IDS, ROW_ID, lineage_fields, with_content_lineage};
use kiln_pipeline::stage::{CheckCx, FileDep, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::paths::expand;

/// Parameters of a `load` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Files or glob patterns, relative to the pipeline file, all of one format (`.jsonl`,
    /// `.json`, `.csv`, `.parquet`). Required.
    pub paths: Vec<String>,
}

impl Load {
    /// The matched files, sorted, and their common extension.
    fn resolve(&self, cx: &CheckCx) -> Result<(Vec<PathBuf>, String), Problem> {
        let mut files = Vec::new();
        for (i, pattern) in self.paths.iter().enumerate() {
            let found = expand(cx, pattern).map_err(|e| {
                Problem::new(&format!("paths.{i}"), format!("`{pattern}` is not a valid glob pattern: {e}"))
            })?;
            if found.is_empty() {
                return Err(Problem::new(&format!("paths.{i}"), format!("`{pattern}` matches no file"))
                    .help("paths are relative to the pipeline file's folder"));
            }
            files.extend(found);
        }
        files.sort();
        files.dedup();
        let ext = |p: &Path| p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let first = files.first().map(|f| ext(f)).ok_or_else(|| Problem::new("paths", "`paths` is empty"))?;
        if let Some(other) = files.iter().find(|f| ext(f) != first) {
            return Err(Problem::new(
                "paths",
                format!("all files must have one format: `{}` is not .{first}", other.display()),
            ));
        }
        if !["jsonl", "ndjson", "json", "csv", "parquet"].contains(&first.as_str()) {
            return Err(Problem::new("paths", format!("`.{first}` files cannot be loaded"))
                .help("load reads .jsonl, .json, .csv and .parquet files"));
        }
        Ok((files, first))
    }

    async fn frame(&self, cx: &CheckCx) -> Result<DataFrame, Problem> {
        let (files, ext) = self.resolve(cx)?;
        let ctx = reader_context();
        let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        let dotted = format!(".{ext}");
        let df = match ext.as_str() {
            "csv" => ctx.read_csv(paths, CsvReadOptions::new().file_extension(&dotted)).await,
            "parquet" => ctx.read_parquet(paths, ParquetReadOptions::default().file_extension(&dotted)).await,
            "json" => {
                ctx.read_json(paths, JsonReadOptions::default().file_extension(&dotted).newline_delimited(false)).await
            }
            _ => ctx.read_json(paths, JsonReadOptions::default().file_extension(&dotted)).await,
        };
        df.map_err(|e| Problem::new("paths", format!("the files cannot be read as one table: {}", e.strip_backtrace())))
    }
}

/// A DataFusion context that only reads files: a plain scan needs no SQL functions, planners or
/// optimizer rules, and registering them touches much of DataFusion's code (pages that then
/// stay resident for the whole run: about 10 MiB of an LLM stage's peak memory).
fn reader_context() -> SessionContext {
    let state = SessionStateBuilder::new()
        .with_config(SessionConfig::new())
        .with_analyzer_rules(Vec::new())
        .with_optimizer_rules(Vec::new())
        .with_physical_optimizer_rules(Vec::new())
        .build();
    SessionContext::new_with_state(state)
}

/// The lineage columns followed by the files' columns, which must not use the lineage names.
fn output_schema(data: &Schema) -> Result<SchemaRef, Problem> {
    if let Some(reserved) = data.fields().iter().find(|f| f.name() == ROW_ID || f.name() == PARENT_IDS) {
        return Err(Problem::new(
            "paths",
            format!("the files have a column `{}`, which kiln reserves for lineage", reserved.name()),
        )
        .help("rename that column in the files"));
    }
    let fields: Vec<Field> =
        lineage_fields().into_iter().chain(data.fields().iter().map(|f| f.as_ref().clone())).collect();
    Ok(Arc::new(Schema::new(fields)))
}

impl Plain for Load {}

#[async_trait]
impl Stage for Load {
    fn files(&self, cx: &CheckCx) -> Vec<FileDep> {
        self.resolve(cx).map(|(files, _)| files.into_iter().map(FileDep::Stat).collect()).unwrap_or_default()
    }

    async fn output_schema(&self, cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        if !inputs.is_empty() {
            return Err(vec![
                Problem::new("inputs", "a `load` stage reads files, not other stages").help("remove `inputs`"),
            ]);
        }
        let df = self.frame(cx).await.map_err(|p| vec![p])?;
        output_schema(df.schema().as_arrow()).map_err(|p| vec![p])
    }

    async fn run(&self, cx: &StageCx, _inputs: &[Input]) -> Result<Output> {
        let df = self.frame(&cx.pipeline).await.map_err(|p| Error::stage(&cx.name, p))?;
        let schema = output_schema(df.schema().as_arrow()).map_err(|p| Error::stage(&cx.name, p))?;
        // The files' rows in order, a record batch at a time: the partitions (files, or byte
        // ranges of a large file) are read one after another, each batch handed to the dataset
        // as it is read, so memory does not grow with the files.
        let read_error = |e: datafusion::error::DataFusionError| Error::stage(&cx.name, e.strip_backtrace());
        for mut partition in df.execute_stream_partitioned().await.map_err(read_error)? {
            while let Some(batch) = partition.next().await {
                cx.emit(with_content_lineage(&schema, &batch.map_err(read_error)?)?)?;
            }
        }
        Ok(Output::default())
    }
}
