//! `export`: writes its input's rows to a file datasets tools read directly. For now one format,
//! `jsonl` (one JSON object per row, columns in order, lineage included); the training formats
//! (LLaMA-Factory sharegpt, RL prompts) come with the filtering stages.
//!
//! The file is written next to a temporary name and renamed into place, so a reader never sees
//! half a file. The stage's own dataset has one row describing the export (path, rows, bytes,
//! BLAKE3 of the file).
//!
//! ```toml
//! [stages.out]
//! kind = "export"
//! inputs = ["answers"]
//! path = "answers.jsonl"   # relative to the output folder
//! ```

use std::io::Write;

use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch};
use kiln_pipeline::stage::{CheckCx, Input, InputSchema, Output, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

/// Parameters of an `export` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// The file to write, relative to the pipeline's output folder. Required.
    pub path: String,
    /// The format: `jsonl`. Default: `jsonl`.
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_format() -> String {
    "jsonl".into()
}

#[derive(Debug, Serialize)]
struct Exported {
    row_id: String,
    parent_ids: Vec<String>,
    path: String,
    format: String,
    rows: u64,
    bytes: u64,
    blake3: String,
}

fn schema() -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    schema_with_lineage(vec![
        text("path"),
        text("format"),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        text("blake3"),
    ])
}

#[async_trait]
impl Stage for Export {
    fn validate(&self, _cx: &CheckCx) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.format != "jsonl" {
            problems.push(
                Problem::new("format", format!("unknown export format `{}`", self.format)).help("supported: jsonl"),
            );
        }
        if self.path.trim().is_empty() {
            problems.push(Problem::new("path", "`path` is empty"));
        }
        problems
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        if inputs.len() != 1 {
            return Err(vec![Problem::new(
                "inputs",
                format!("an `export` stage writes exactly one stage, got {} inputs", inputs.len()),
            )]);
        }
        Ok(schema())
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let target = cx.pipeline.output_dir.join(&self.path);
        let io = |e: std::io::Error| Error::io(&target, e);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = target.with_extension(format!("tmp-{}", std::process::id()));
        let batches = inputs[0].read()?;
        {
            let file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
            let mut writer = arrow::json::LineDelimitedWriter::new(file);
            for b in &batches {
                writer.write(b).map_err(|e| Error::stage(&cx.name, e))?;
            }
            writer.finish().map_err(|e| Error::stage(&cx.name, e))?;
            writer.into_inner().flush().map_err(io)?;
        }
        std::fs::rename(&tmp, &target).map_err(io)?;
        let bytes = std::fs::read(&target).map_err(io)?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let row = Exported {
            row_id: row_id(&[], format!("export\0{}\0{hash}", self.path).as_bytes()),
            parent_ids: Vec::new(),
            path: self.path.clone(),
            format: self.format.clone(),
            rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
            bytes: bytes.len() as u64,
            blake3: hash,
        };
        Ok(Output { batches: vec![to_batch(&schema(), &[row])?], ..Default::default() })
    }
}
