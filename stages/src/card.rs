//! `card`: the dataset card, a Markdown report written next to the exports, with SVG plots
//! (plotters) it references.
//!
//! It describes its input (the final trajectories): counts by category, file format,
//! difficulty and number of turns; answer and trajectory length distributions (tokens, by the
//! approximation of `filters::tokens`); the funnel of every upstream stage (rows out, rows
//! rejected, the top rejection reasons); the tokens and cost spent upstream; and the pipeline
//! fingerprint (a hash of the upstream stages' kinds, versions, parameters and files). Plots: category bars, a turns
//! histogram and the funnel. Nothing in it depends on the clock, so an unchanged pipeline
//! gives a byte-identical card.
//!
//! ```toml
//! [stages.card]
//! kind = "card"
//! inputs = ["unique"]
//! path = "export/README.md"   # relative to the output folder
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch, to_json_rows};
use kiln_pipeline::stage::{CheckCx, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use kiln_pipeline::store::{Manifest, REJECTIONS, read_manifest};
use kiln_pipeline::{Error, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::families::{Row, TRAJECTORY, Turns};
use crate::filters::tokens::approximate;

/// Parameters of a `card` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Card {
    /// The Markdown file, relative to the output folder. Default: `card/README.md`.
    #[serde(default = "default_path")]
    pub path: String,
    /// The dataset's title. Default: the pipeline folder's name.
    #[serde(default)]
    pub title: Option<String>,
}

fn default_path() -> String {
    "card/README.md".into()
}

#[derive(Debug, Serialize)]
struct Written {
    row_id: String,
    parent_ids: Vec<String>,
    path: String,
    plots: Vec<String>,
    blake3: String,
}

fn schema() -> SchemaRef {
    let list = DataType::List(std::sync::Arc::new(Field::new("item", DataType::Utf8, false)));
    schema_with_lineage(vec![
        Field::new("path", DataType::Utf8, false),
        Field::new("plots", list, false),
        Field::new("blake3", DataType::Utf8, false),
    ])
}

/// Upstream stages of `stage`, inputs first, from the manifests in `out`.
fn upstream(out: &Path, stage: &str) -> Vec<Manifest> {
    let mut order: Vec<Manifest> = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(out: &Path, stage: &str, seen: &mut BTreeSet<String>, order: &mut Vec<Manifest>) {
        if !seen.insert(stage.to_string()) {
            return;
        }
        let Ok(Some(m)) = read_manifest(&out.join(stage)) else { return };
        for input in m.input_fingerprints.keys() {
            visit(out, input, seen, order);
        }
        order.push(m);
    }
    visit(out, stage, &mut seen, &mut order);
    order
}

/// A stage's rejections counted by reason, most frequent first.
fn top_reasons(out: &Path, stage: &str) -> Vec<(String, usize)> {
    let Ok(file) = std::fs::File::open(out.join(stage).join(REJECTIONS)) else { return Vec::new() };
    let Ok(reader) = ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build()) else { return Vec::new() };
    let batches: Vec<_> = reader.filter_map(|b| b.ok()).collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for row in to_json_rows(&batches).unwrap_or_default() {
        if let Ok(r) = serde_json::from_value::<kiln_pipeline::stage::Rejection>(Value::Object(row)) {
            *counts.entry(r.reason).or_default() += 1;
        }
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// A trajectory as the card describes it.
type Described = Row<Description>;

/// The columns of a trajectory the card reads.
#[derive(Debug, serde::Deserialize)]
struct Description {
    #[serde(flatten)]
    turns: Turns,
    category: Option<String>,
    format: String,
    difficulty: Option<u32>,
    #[serde(rename = "turns")]
    turn_count: u32,
}

/// Counts of each value of `key(row)`, sorted by value.
fn count_by(rows: &[Described], key: impl Fn(&Described) -> String) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(key(r)).or_default() += 1;
    }
    m
}

/// min / median / p90 / max of `xs`.
fn spread(mut xs: Vec<usize>) -> String {
    if xs.is_empty() {
        return "no rows".into();
    }
    xs.sort_unstable();
    let at = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize];
    format!("min {}, median {}, p90 {}, max {}", xs[0], at(0.5), at(0.9), xs[xs.len() - 1])
}

fn table(out: &mut String, header: &str, counts: &BTreeMap<String, usize>) {
    let _ = writeln!(out, "| {header} | rows |\n| --- | ---: |");
    for (k, n) in counts {
        let _ = writeln!(out, "| {k} | {n} |");
    }
    out.push('\n');
}

/// Horizontal bars of `values` (label, value) as an SVG file.
fn bars(path: &Path, title: &str, values: &[(String, u64)]) -> std::result::Result<(), String> {
    let height = 80 + 26 * values.len().max(1) as u32;
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max = values.iter().map(|v| v.1).max().unwrap_or(1).max(1);
    let labels: Vec<String> = values.iter().map(|v| v.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(230)
        .build_cartesian_2d(0u64..max + max / 10 + 1, (0..values.len()).into_segmented())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(values.len())
        .y_label_formatter(&|s| match s {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, (_, v))| {
            Rectangle::new([(0, SegmentValue::Exact(i)), (*v, SegmentValue::Exact(i + 1))], BLUE.mix(0.6).filled())
        }))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

impl Card {
    fn render(
        &self,
        cx: &StageCx,
        input: &Input,
        rows: &[Described],
        dir: &Path,
        stem: &str,
    ) -> Result<(String, Vec<String>)> {
        let out_dir = &cx.pipeline.output_dir;
        let stages = upstream(out_dir, &input.name);
        let title = self.title.clone().unwrap_or_else(|| {
            out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "kiln dataset".into())
        });
        // The pipeline fingerprint identifies the configuration that made the data: every
        // upstream stage's kind, version, parameters, files and seed (not its inputs' content,
        // which for trajectories includes wall-clock timings).
        let mut fingerprints = blake3::Hasher::new();
        for m in &stages {
            let mut parts = m.parts.clone();
            parts.inputs.clear();
            fingerprints.update(format!("{}\0{}\n", m.stage, parts.fingerprint()).as_bytes());
        }
        let fingerprint = fingerprints.finalize().to_hex()[..32].to_string();
        let questions: BTreeSet<String> = rows.iter().filter_map(|r| r.parent_ids.first().cloned()).collect();

        let mut md = String::new();
        let _ = writeln!(md, "# {title}\n");
        let _ = writeln!(
            md,
            "{} trajectories over {} questions, made by kiln following the DataMind recipe (stage `{}`).\n\nPipeline fingerprint: `{fingerprint}`\n",
            rows.len(),
            questions.len(),
            input.name
        );
        md.push_str("## Contents\n\n");
        let by_category = count_by(rows, |r| r.data.category.clone().unwrap_or_default());
        table(&mut md, "category", &by_category);
        table(&mut md, "file format", &count_by(rows, |r| r.data.format.clone()));
        table(&mut md, "difficulty", &count_by(rows, |r| r.data.difficulty.map(|d| d.to_string()).unwrap_or_default()));
        let turns = count_by(rows, |r| format!("{:>2}", r.data.turn_count));
        table(&mut md, "assistant turns", &turns);
        md.push_str("## Lengths (tokens, approximate)\n\n");
        let answers: Vec<usize> =
            rows.iter().map(|r| approximate(r.data.turns.final_answer.as_deref().unwrap_or(""))).collect();
        let whole: Vec<usize> =
            rows.iter().map(|r| r.data.turns.messages.iter().map(|m| approximate(&m.content)).sum()).collect();
        let _ = writeln!(md, "- final answers: {}\n- whole trajectories: {}\n", spread(answers), spread(whole));

        md.push_str("## Funnel\n\n| stage | kind | rows out | rejected | top rejection reasons |\n| --- | --- | ---: | ---: | --- |\n");
        let (mut prompt, mut completion, mut cost) = (0u64, 0u64, 0u64);
        let mut funnel = Vec::new();
        for m in &stages {
            let reasons: Vec<String> =
                top_reasons(out_dir, &m.stage).into_iter().take(3).map(|(r, n)| format!("{r} ({n})")).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                m.stage,
                m.parts.kind,
                m.row_count,
                m.rejected,
                reasons.join(", ")
            );
            funnel.push((m.stage.clone(), m.row_count));
            prompt += m.counters.get("prompt_tokens").copied().unwrap_or(0);
            completion += m.counters.get("completion_tokens").copied().unwrap_or(0);
            cost += m.counters.get("cost_micro_usd").copied().unwrap_or(0);
        }
        let _ = writeln!(
            md,
            "\n## Spent\n\n{prompt} prompt tokens and {completion} completion tokens; ${:.4} at the configured prices.\n",
            cost as f64 / 1e6
        );

        let plots = [
            (
                format!("{stem}_categories.svg"),
                "Trajectories per category",
                by_category.iter().map(|(k, v)| (k.clone(), *v as u64)).collect::<Vec<_>>(),
            ),
            (
                format!("{stem}_turns.svg"),
                "Trajectories per number of assistant turns",
                turns.iter().map(|(k, v)| (format!("{} turns", k.trim()), *v as u64)).collect(),
            ),
            (format!("{stem}_funnel.svg"), "Rows out of each stage", funnel),
        ];
        md.push_str("## Plots\n\n");
        let mut names = Vec::new();
        for (name, title, values) in plots {
            bars(&dir.join(&name), title, &values).map_err(|e| Error::stage(&cx.name, format!("plot {name}: {e}")))?;
            let _ = writeln!(md, "![{title}]({name})\n");
            names.push(name);
        }
        Ok((md, names))
    }
}

impl Plain for Card {
    fn problems(&self, cx: &CheckCx) -> Vec<Problem> {
        if self.path.trim().is_empty() || !self.path.ends_with(".md") {
            return vec![Problem::new("path", format!("`path` must name a Markdown file, got {:?}", self.path))];
        }
        crate::paths::output_file_problem(cx, "path", &self.path).into_iter().collect()
    }
}

#[async_trait]
impl Stage for Card {
    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        crate::filters::filter_schema("card", inputs, &["messages", "final_answer", "category", "format", "turns"])?;
        Ok(schema())
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let target: PathBuf = cx.pipeline.output_dir.join(&self.path);
        let dir = target.parent().map(Path::to_path_buf).unwrap_or_default();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let stem = target.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default().to_lowercase();
        let rows: Vec<Described> = TRAJECTORY.read(&inputs[0])?;
        let (md, plots) = self.render(cx, &inputs[0], &rows, &dir, &stem)?;
        crate::export::write_atomic(&target, |w| w.write_all(md.as_bytes()))?;
        cx.wrote(&target);
        let hash = blake3::hash(md.as_bytes()).to_hex().to_string();
        let row = Written {
            row_id: row_id(&[], format!("card\0{}\0{hash}", self.path).as_bytes()),
            parent_ids: Vec::new(),
            path: self.path.clone(),
            plots,
            blake3: hash,
        };
        Ok(Output { batches: vec![to_batch(&schema(), &[row])?], ..Default::default() })
    }
}
