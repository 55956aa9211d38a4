//! The `train_rl` stage kind: RL from an SFT model on an `rl` export (its input, an `export`
//! stage of format `rl`, or the file in `data`). Its dataset is the per-step metrics; the
//! checkpoints, `metrics.csv`, `rl.svg` and the trained model go to `output_dir` (default:
//! `<output folder>/<stage>.train/<settings hash>/`). A killed run resumes from its last
//! checkpoint at the same step.

use std::path::PathBuf;

use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch, to_json_rows};
use kiln_pipeline::stage::{CheckCx, Config, FileDep, Input, InputSchema, Output, Problem, Stage, StageCx};
use kiln_pipeline::{Error, Result};
use kiln_stages::agent::{AgentSetup, Keys, TeacherSpec};
use kiln_stages::benchmarks::Benchmark;

use super::{RlConfig, RlPaths, train_rl};

/// The `train_rl` kind, for the registry (beside `train_sft`, outside kiln-stages).
pub fn kind() -> kiln_pipeline::registry::Kind {
    kiln_pipeline::registry::Kind::of::<RlConfig>(
        "train_rl",
        "RL (DAPO mixed with SFT on the expert trajectories) on an `rl` export, rollouts through the agent loop; rows are per-step metrics",
    )
}

/// A built `train_rl` stage: its agent resolved.
#[derive(Debug)]
struct TrainRl {
    config: RlConfig,
    agent: AgentSetup,
}

impl Config for RlConfig {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        problems.extend(self.problems(&cx.base_dir));
        if let Some(data) = &self.data
            && let Err(e) = Benchmark::Rl.load(&cx.resolve(data), &cx.base_dir)
        {
            problems
                .push(Problem::new("data", e).help("give the Parquet file of an `export` stage with format = \"rl\""));
        }
        let keys = Keys { prefix: "", teacher: "model", kind: "train_rl" };
        let agent = self.agent_settings(TeacherSpec::Policy).build(cx, keys, problems)?;
        Some(Box::new(TrainRl { config: self.clone(), agent }))
    }
}

const COUNTS: &[&str] =
    &["step", "trajectories", "prompts", "groups_kept", "groups_dropped", "sampling_rounds", "masked"];

fn schema() -> SchemaRef {
    let fields = super::metrics::COLUMNS
        .iter()
        .map(|c| Field::new(*c, if COUNTS.contains(c) { DataType::UInt64 } else { DataType::Float64 }, false))
        .collect();
    schema_with_lineage(fields)
}

impl TrainRl {
    fn output_dir(&self, cx: &StageCx) -> PathBuf {
        match &self.config.output_dir {
            Some(dir) => cx.pipeline.resolve(dir),
            None => {
                let settings = row_id(&[], self.config.run_key().as_bytes());
                cx.pipeline.output_dir.join(format!("{}.train", cx.name)).join(&settings[..12])
            }
        }
    }

    /// The `rl` export to train on: `data`, or the file the input `export` stage wrote.
    fn data(&self, cx: &StageCx, inputs: &[Input]) -> Result<PathBuf> {
        if let Some(data) = &self.config.data {
            return Ok(cx.pipeline.resolve(data));
        }
        let rows = to_json_rows(&inputs[0].read()?)?;
        let rl = rows.iter().find(|r| r.get("format").and_then(|f| f.as_str()) == Some("rl"));
        match rl.and_then(|r| r.get("path")).and_then(|p| p.as_str()) {
            Some(path) => Ok(cx.pipeline.resolve(path)),
            None => Err(Error::stage(
                &cx.name,
                format!("`{}` wrote no `rl` export: give an `export` stage with format = \"rl\"", inputs[0].name),
            )),
        }
    }
}

#[async_trait]
impl Stage for TrainRl {
    fn seeded(&self) -> bool {
        true
    }

    fn files(&self, cx: &CheckCx) -> Vec<FileDep> {
        let mut deps = crate::stage::model_files(cx, &self.config.model);
        let data = self.config.data.iter().map(|d| cx.resolve(d)).filter(|d| d.exists());
        deps.extend(data.map(FileDep::Stat));
        deps.extend(self.agent.files());
        deps
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        match (inputs, &self.config.data) {
            ([], Some(_)) => Ok(schema()),
            ([], None) => Err(vec![Problem::new("inputs", "`train_rl` needs prompts").help(
                "give `inputs = [\"<an export stage with format = \\\"rl\\\">\"]` or `data = \"<rl export file>\"`",
            )]),
            ([_], Some(_)) => Err(vec![Problem::new("data", "give `data` or an input stage, not both")]),
            ([input], None) if input.schema.field_with_name("format").is_err() => Err(vec![
                Problem::new("inputs", format!("`{}` is not an `export` stage", input.name))
                    .help("train on an `export` stage with format = \"rl\""),
            ]),
            ([_], None) => Ok(schema()),
            (_, _) => {
                Err(vec![Problem::new("inputs", format!("`train_rl` trains on one stage, got {}", inputs.len()))])
            }
        }
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let data = self.data(cx, inputs)?;
        let items = Benchmark::Rl.load(&data, &cx.pipeline.base_dir).map_err(|e| Error::stage(&cx.name, e))?.items;
        let tasks: Vec<_> = items.iter().map(|i| kiln_stages::evaluate::task(&cx.pipeline, Benchmark::Rl, i)).collect();
        let model = cx.pipeline.resolve(&self.config.model);
        let model = tokio::task::block_in_place(|| crate::fetch::resolve_model(&model))
            .map_err(|e| Error::stage(&cx.name, e))?;
        let paths = RlPaths { model, output_dir: self.output_dir(cx) };
        let name = cx.name.clone();
        let report = train_rl(&self.config, &paths, &items, &tasks, &self.agent, cx, |m, total| {
            tracing::info!(
                stage = %name, step = m.step, total, reward = m.reward_mean, accuracy = m.accuracy, g = m.g,
                dropped = m.groups_dropped, "step"
            );
        })
        .await?;
        let rows: Vec<serde_json::Value> = report
            .metrics
            .iter()
            .map(|m| {
                let mut row = serde_json::to_value(m).expect("metrics serialise");
                row["row_id"] = row_id(&[], format!("{}\0{}", cx.name, m.step).as_bytes()).into();
                row["parent_ids"] = serde_json::json!([]);
                row
            })
            .collect();
        let mut output = Output { batches: vec![to_batch(&schema(), &rows)?], ..Default::default() };
        output.counters.insert("prompts".into(), report.prompts as u64);
        output.counters.insert("resumed_from_step".into(), report.resumed_from);
        output.counters.insert("steps".into(), report.steps);
        Ok(output)
    }
}
