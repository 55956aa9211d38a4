//! The `train_sft` stage kind: fine-tunes a model on its input stage's trajectories (the rows'
//! `messages`), with the same settings as `kiln train`. Its dataset is the per-step metrics; the
//! checkpoints, `metrics.csv`, `loss.svg` and the fine-tuned model go to `output_dir` (default:
//! `<output folder>/<stage>.train/<settings hash>/`, so a run with other settings never touches
//! an earlier one's checkpoints). A killed run resumes from its last checkpoint.

use std::path::PathBuf;

use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch, to_json_rows};
use kiln_pipeline::stage::{CheckCx, FileDep, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::sft::data::Record;
use crate::sft::{RunPaths, SftConfig, train};

/// The `train_sft` kind, for the registry: it lives here, not in kiln-stages, which stays free
/// of burn; the binary adds it with [`kiln_pipeline::registry::Registry::with`].
pub fn kind() -> kiln_pipeline::registry::Kind {
    kiln_pipeline::registry::Kind::of::<TrainSft>(
        "train_sft",
        "fine-tunes a model on the input trajectories (assistant-only loss, full or LoRA); rows are per-step metrics",
    )
}

/// The stage: an [`SftConfig`] without `data` (the input stage is the data).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TrainSft(pub SftConfig);

#[derive(Serialize)]
struct MetricRow {
    row_id: String,
    parent_ids: Vec<String>,
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens: u64,
    tokens_per_s: f64,
}

fn schema() -> SchemaRef {
    let f = |name: &str, t: DataType| Field::new(name, t, false);
    schema_with_lineage(vec![
        f("step", DataType::UInt64),
        f("loss", DataType::Float64),
        f("lr", DataType::Float64),
        f("grad_norm", DataType::Float64),
        f("tokens", DataType::UInt64),
        f("tokens_per_s", DataType::Float64),
    ])
}

impl TrainSft {
    fn output_dir(&self, cx: &StageCx) -> PathBuf {
        match &self.0.output_dir {
            Some(dir) => cx.pipeline.resolve(dir),
            None => {
                let settings = row_id(&[], crate::sft::run_key(&self.0).as_bytes());
                cx.pipeline.output_dir.join(format!("{}.train", cx.name)).join(&settings[..12])
            }
        }
    }
}

/// The files of the model at `model` (a `.gguf` file, or a Hugging Face directory's config,
/// weights and tokenizer) that a training stage's output depends on.
pub(crate) fn model_files(cx: &CheckCx, model: &std::path::Path) -> Vec<FileDep> {
    let model = cx.resolve(model);
    let files = if model.is_dir() {
        ["config.json", "model.safetensors", "tokenizer.json"].iter().map(|f| model.join(f)).collect()
    } else {
        vec![model]
    };
    files.into_iter().filter(|f| f.exists()).map(FileDep::Stat).collect()
}

impl Plain for TrainSft {
    fn problems(&self, cx: &CheckCx) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.0.data.is_some() {
            problems.push(
                Problem::new("data", "a `train_sft` stage trains on its input stage")
                    .help("remove `data`, or use `kiln train` to train on a file"),
            );
        }
        problems.extend(self.0.problems(&cx.base_dir));
        problems
    }
}

#[async_trait]
impl Stage for TrainSft {
    fn files(&self, cx: &CheckCx) -> Vec<FileDep> {
        model_files(cx, &self.0.model)
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        let [input] = inputs else {
            return Err(vec![Problem::new("inputs", format!("`train_sft` trains on one stage, got {}", inputs.len()))]);
        };
        if input.schema.field_with_name("messages").is_err() {
            return Err(vec![
                Problem::new("inputs", format!("`{}` has no `messages` column", input.name))
                    .help("train on trajectories (after the filters and the judge)"),
            ]);
        }
        Ok(schema())
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let rows = to_json_rows(&inputs[0].read()?)?;
        let records = rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                serde_json::from_value::<Record>(serde_json::Value::Object(row)).map_err(|e| {
                    Error::stage(&cx.name, format!("row {} of `{}` is not a conversation: {e}", i + 1, inputs[0].name))
                })
            })
            .collect::<Result<Vec<Record>>>()?;
        let output_dir = self.output_dir(cx);
        std::fs::create_dir_all(&output_dir).map_err(|e| Error::io(&output_dir, e))?;
        // The input as a sharegpt file: the trainer reads one format, and a rerun after a kill
        // writes the same bytes, so the checkpoint is recognised and resumed.
        let data = output_dir.join("data.json");
        let text = serde_json::to_string(&records).map_err(|e| Error::stage(&cx.name, e))?;
        std::fs::write(&data, text).map_err(|e| Error::io(&data, e))?;
        let model = cx.pipeline.resolve(&self.0.model);
        let config = self.0.clone();
        let name = cx.name.clone();
        let report = tokio::task::spawn_blocking(move || {
            let paths = RunPaths { model: crate::fetch::resolve_model(&model)?, data, output_dir };
            let device = crate::default_device();
            if let Some(note) = crate::kernels::first_step_note(&device) {
                tracing::info!(stage = %name, "{note}");
            }
            train(&config, &paths, &device, |m, total| {
                tracing::info!(stage = %name, step = m.step, total, loss = m.loss, tokens_per_s = m.tokens_per_s, "step");
            })
        })
        .await
        .map_err(|e| Error::stage(&cx.name, e))?
        .map_err(|e| Error::stage(&cx.name, e))?;
        let metrics: Vec<MetricRow> = report
            .metrics
            .iter()
            .map(|m| MetricRow {
                row_id: row_id(&[], format!("{}\0{}", cx.name, m.step).as_bytes()),
                parent_ids: Vec::new(),
                step: m.step,
                loss: m.loss,
                lr: m.lr,
                grad_norm: m.grad_norm,
                tokens: m.tokens as u64,
                tokens_per_s: m.tokens_per_s,
            })
            .collect();
        let mut output = Output { batches: vec![to_batch(&schema(), &metrics)?], ..Default::default() };
        output.counters.insert("examples".into(), report.examples as u64);
        output.counters.insert("skipped_examples".into(), report.skipped as u64);
        output.counters.insert("resumed_from_step".into(), report.resumed_from);
        Ok(output)
    }
}
