//! `evaluate`: a model as the agent on benchmark items, scored by the graders
//! ([`crate::graders`]), with exactly the `trajectories` protocol, sandbox and tools (the agent
//! loop of [`crate::agent`], not a copy).
//!
//! Each item runs `runs` times (pass@k's k; each run its own sample, and its own seed when the
//! model has one), at most `max_turns` turns, temperature and top-p from the model table (the
//! recipe's evaluation: 3 runs, 0.7, 0.95, 10 turns). Every (item, run) is cached like any
//! trajectory, every model turn as it returns: a killed evaluation resumes, and a rerun with
//! the same model sends nothing. The item's gold answer never reaches the model. A model is
//! known by its `model` name and settings (as every cached LLM request is), not by its
//! `base_url`: give each checkpoint you evaluate its own name.
//!
//! Rows: one per (item, run): the answer, whether it is correct and why (the grader's reason),
//! the failure mode (`no_answer`, `turn_limit`, `sandbox_error`, `wrong`), turns, tokens and
//! seconds. Counters: `pass_at_1_ppm` (the mean over runs of the share of items right, in
//! millionths) and `pass_at_k_ppm` (the share of items right in any run), and both per group
//! (`pass_at_1_ppm_<group>`). A Markdown report, `<stage>.report.md` in the output folder,
//! has the same numbers per group with counts and the failure modes.
//!
//! ```toml
//! [stages.eval]
//! kind = "evaluate"
//! model = "served"               # the model evaluated, a [models] table
//! benchmark = "dabench"          # or "qrdata", or "rl" (a kiln `rl` export: path = its file)
//! path = "benchmarks/dabench"    # the benchmark's folder, in its published layout
//! runs = 3
//! max_turns = 10
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch};
use kiln_pipeline::stage::{CheckCx, Config, Estimate, FileDep, Input, InputSchema, Output, Problem, Stage, StageCx};
use kiln_pipeline::{Result, executor};
use serde::{Deserialize, Serialize};

use crate::agent::{self, About, AgentSetup, Keys, Task, TeacherSpec, Trajectory};
use crate::benchmarks::{Benchmark, Item};
use crate::graders::grade;

crate::with_agent_keys! {
    /// Parameters of an `evaluate` stage.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Evaluate {
        /// The model evaluated: a `[models.<name>]` table. Required.
        pub model: String,
        /// The benchmark's format. Required.
        pub benchmark: Benchmark,
        /// The benchmark's folder, relative to the pipeline file. Required.
        pub path: PathBuf,
        /// Runs per item (pass@k's k). Default: 3.
        #[serde(default = "default_runs")]
        pub runs: u32,
        /// Evaluate only the first `limit` items. Default: every item.
        #[serde(default)]
        pub limit: Option<usize>,
    }
}

fn default_runs() -> u32 {
    3
}

/// One output row: one run of one item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scored {
    /// Stable id of (benchmark, item, run).
    pub row_id: String,
    /// Empty: items come from files.
    pub parent_ids: Vec<String>,
    /// The benchmark format.
    pub benchmark: String,
    /// The item's id in the benchmark.
    pub item: String,
    /// The item's group (level, question type).
    pub group: String,
    /// Which run.
    pub run: u32,
    /// The model's final answer, if it gave one.
    pub answer: Option<String>,
    /// The answer is right.
    pub correct: bool,
    /// The grader's reason.
    pub reason: String,
    /// Why the run failed, if it did: `no_answer`, `turn_limit`, `sandbox_error` or `wrong`.
    pub failure: Option<String>,
    /// Assistant turns taken.
    pub turns: u32,
    /// Tokens the model read.
    pub prompt_tokens: u64,
    /// Tokens the model wrote.
    pub completion_tokens: u64,
    /// Seconds spent in the model and the sandbox.
    pub seconds: f64,
}

/// The schema of [`Scored`] rows.
pub fn schema() -> SchemaRef {
    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    let maybe = |n: &str| Field::new(n, DataType::Utf8, true);
    schema_with_lineage(vec![
        text("benchmark"),
        text("item"),
        text("group"),
        Field::new("run", DataType::UInt32, false),
        maybe("answer"),
        Field::new("correct", DataType::Boolean, false),
        text("reason"),
        maybe("failure"),
        Field::new("turns", DataType::UInt32, false),
        Field::new("prompt_tokens", DataType::UInt64, false),
        Field::new("completion_tokens", DataType::UInt64, false),
        Field::new("seconds", DataType::Float64, false),
    ])
}

impl Config for Evaluate {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        if self.runs == 0 {
            problems.push(Problem::new("runs", "`runs` must be at least 1"));
        }
        if self.limit == Some(0) {
            problems.push(Problem::new("limit", "`limit` must be at least 1").help("remove it to evaluate every item"));
        }
        let dir = cx.resolve(&self.path);
        let items = match self.benchmark.load(&dir, &cx.base_dir) {
            Ok(items) => Some(items),
            Err(e) => {
                let help = format!(
                    "`path` is the benchmark's folder in its published layout (for `rl`, the export's Parquet file), relative to `{}`",
                    cx.base_dir.display()
                );
                problems.push(Problem::new("path", e).help(help));
                None
            }
        };
        let keys = Keys { prefix: "", teacher: "model", kind: "evaluate" };
        let agent = self.agent_settings(TeacherSpec::Model(self.model.clone())).build(cx, keys, problems)?;
        let mut items = items?;
        items.truncate(self.limit.unwrap_or(usize::MAX));
        Some(Box::new(Evaluating { params: self.clone(), dir, items, agent }))
    }
}

/// A built `evaluate` stage: its items loaded, its agent resolved.
#[derive(Debug)]
struct Evaluating {
    params: Evaluate,
    /// The benchmark's folder, resolved.
    dir: PathBuf,
    items: Vec<Item>,
    agent: AgentSetup,
}

/// The task the agent gets for `item`: its question and first data file, never its gold.
fn task(benchmark: Benchmark, item: &Item) -> Task {
    let file = item.files.first().cloned().unwrap_or_default();
    let format = file.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    let question = match &item.context {
        Some(context) => format!("{}\n\nAbout the data: {context}", item.question),
        None => item.question.clone(),
    };
    Task {
        parent: row_id(&[], format!("{benchmark:?}\0{}", item.id).as_bytes()),
        about: About {
            question,
            category: None,
            table: item
                .table
                .clone()
                .unwrap_or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
            path: file.to_string_lossy().into_owned(),
            format,
            gold_answer: None,
            difficulty: None,
        },
        params: serde_json::Value::Null,
        query: None,
        critique: None,
    }
}

impl Evaluating {
    /// The row of run `run` of `item`, from its trajectory.
    fn score(&self, item: &Item, run: u32, t: &Trajectory) -> Scored {
        let benchmark = format!("{:?}", self.params.benchmark).to_lowercase();
        let (correct, reason, failure) = match &t.final_answer {
            Some(answer) => {
                let g = grade(answer, t.result_csv.as_deref(), &item.gold);
                let failure = (!g.correct).then(|| "wrong".to_string());
                (g.correct, g.reason, failure)
            }
            None => {
                let crashed = t
                    .steps
                    .last()
                    .and_then(|s| s.status.as_deref())
                    .is_some_and(|s| matches!(s, "crashed" | "killed" | "timeout"));
                let failure = match (crashed, t.end_reason.as_str()) {
                    (true, _) => "sandbox_error",
                    (false, "max_turns") => "turn_limit",
                    _ => "no_answer",
                };
                (false, format!("no final answer ({})", t.end_reason), Some(failure.to_string()))
            }
        };
        let ms: f64 = t.steps.iter().map(|s| s.teacher_ms + s.exec_ms).sum();
        Scored {
            row_id: row_id(&[], format!("eval\0{benchmark}\0{}\0{run}", item.id).as_bytes()),
            parent_ids: Vec::new(),
            benchmark,
            item: item.id.clone(),
            group: item.group.clone(),
            run,
            answer: t.final_answer.clone(),
            correct,
            reason,
            failure,
            turns: t.turns,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            seconds: ms / 1e3,
        }
    }
}

/// pass@1 (the mean over runs of the share of items right) and pass@k (the share of items right
/// in any run) of `rows`, with the number of items.
pub fn pass_rates(rows: &[&Scored]) -> (f64, f64, usize) {
    let mut items: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for r in rows {
        let e = items.entry(&r.item).or_default();
        e.0 += 1;
        e.1 += u32::from(r.correct);
    }
    if items.is_empty() {
        return (0.0, 0.0, 0);
    }
    let n = items.len() as f64;
    let pass1 = items.values().map(|(runs, right)| f64::from(*right) / f64::from(*runs)).sum::<f64>() / n;
    let passk = items.values().filter(|(_, right)| *right > 0).count() as f64 / n;
    (pass1, passk, items.len())
}

/// `rows` by their item's group.
fn by_group(rows: &[Scored]) -> BTreeMap<&str, Vec<&Scored>> {
    let mut groups: BTreeMap<&str, Vec<&Scored>> = BTreeMap::new();
    for r in rows {
        groups.entry(&r.group).or_default().push(r);
    }
    groups
}

/// The Markdown report: pass rates overall and per group, and the failure modes.
fn report(model: &str, benchmark: &str, runs: u32, rows: &[Scored]) -> String {
    let all: Vec<&Scored> = rows.iter().collect();
    let (p1, pk, n) = pass_rates(&all);
    let mut md = format!("# Evaluation of `{model}` on {benchmark}\n\n");
    let _ = writeln!(md, "{n} items, {runs} runs each: pass@1 {:.1}%, pass@{runs} {:.1}%.\n", p1 * 100.0, pk * 100.0);
    md.push_str("| group | items | pass@1 | pass@k |\n| --- | ---: | ---: | ---: |\n");
    for (group, rows) in &by_group(rows) {
        let (p1, pk, n) = pass_rates(rows);
        let _ = writeln!(md, "| {group} | {n} | {:.1}% | {:.1}% |", p1 * 100.0, pk * 100.0);
    }
    md.push_str("\n## Failures\n\n| failure | runs |\n| --- | ---: |\n");
    let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
    for f in rows.iter().filter_map(|r| r.failure.as_deref()) {
        *failures.entry(f).or_default() += 1;
    }
    for (f, n) in failures {
        let _ = writeln!(md, "| {f} | {n} |");
    }
    md
}

fn ppm(x: f64) -> u64 {
    (x * 1e6).round() as u64
}

#[async_trait]
impl Stage for Evaluating {
    fn models(&self) -> Vec<String> {
        vec![self.params.model.clone()]
    }

    fn version(&self) -> u32 {
        agent::VERSION
    }

    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        let mut files = self.agent.files();
        files.extend(self.params.benchmark.index_files(&self.dir).into_iter().map(FileDep::Contents));
        files.extend(self.items.iter().flat_map(|i| i.files.iter().cloned()).map(FileDep::Stat));
        files.sort();
        files.dedup();
        files
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        if !inputs.is_empty() {
            return Err(vec![
                Problem::new("inputs", "an `evaluate` stage reads its benchmark's files, not other stages")
                    .help("remove `inputs`"),
            ]);
        }
        Ok(schema())
    }

    async fn estimate(&self, cx: &StageCx, _inputs: &[Input]) -> Result<Option<Estimate>> {
        let tasks: Vec<Task> = self.items.iter().map(|i| task(self.params.benchmark, i)).collect();
        self.agent.estimate(cx, &tasks, self.params.runs)
    }

    async fn run(&self, cx: &StageCx, _inputs: &[Input]) -> Result<Output> {
        let tasks: Vec<Task> = self.items.iter().map(|i| task(self.params.benchmark, i)).collect();
        let agent = self.agent.start(cx).await?;
        let results = agent.sample(&tasks, self.params.runs).await;
        let mut out = Output::default();
        let mut rows = Vec::new();
        let mut retryable = 0;
        for (i, result) in results.into_iter().enumerate() {
            let (item, run) = (&self.items[i / self.params.runs as usize], i as u32 % self.params.runs);
            match result? {
                Ok(t) => rows.push(self.score(item, run, &t)),
                Err(rejection) => {
                    retryable += u64::from(rejection.reason == "teacher_failed");
                    out.rejections.push(rejection);
                }
            }
        }
        let benchmark = format!("{:?}", self.params.benchmark).to_lowercase();
        let md = report(&self.params.model, &benchmark, self.params.runs, &rows);
        let path = cx.pipeline.output_dir.join(format!("{}.report.md", cx.name));
        crate::export::write_atomic(&path, |w| w.write_all(md.as_bytes()))?;
        let mut counters = agent.counters();
        let all: Vec<&Scored> = rows.iter().collect();
        let (p1, pk, n) = pass_rates(&all);
        counters.insert("items".into(), n as u64);
        counters.insert("pass_at_1_ppm".into(), ppm(p1));
        counters.insert("pass_at_k_ppm".into(), ppm(pk));
        for (group, rows) in by_group(&rows) {
            let (p1, pk, _) = pass_rates(&rows);
            counters.insert(format!("pass_at_1_ppm_{group}"), ppm(p1));
            counters.insert(format!("pass_at_k_ppm_{group}"), ppm(pk));
        }
        if retryable > 0 {
            counters.insert(executor::RETRYABLE.into(), retryable);
        }
        out.counters = counters;
        out.batches = vec![to_batch(&schema(), &rows)?];
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(item: &str, correct: bool) -> Scored {
        Scored {
            row_id: String::new(),
            parent_ids: Vec::new(),
            benchmark: "dabench".into(),
            item: item.into(),
            group: "easy".into(),
            run: 0,
            answer: None,
            correct,
            reason: String::new(),
            failure: (!correct).then(|| "wrong".into()),
            turns: 1,
            prompt_tokens: 0,
            completion_tokens: 0,
            seconds: 0.0,
        }
    }

    #[test]
    fn pass_at_1_is_the_mean_over_runs_and_pass_at_k_any_run() {
        let rows =
            [row("a", true), row("a", false), row("a", false), row("b", false), row("b", false), row("b", false)];
        let refs: Vec<&Scored> = rows.iter().collect();
        let (p1, pk, n) = pass_rates(&refs);
        assert_eq!(n, 2);
        assert!((p1 - 1.0 / 6.0).abs() < 1e-12, "{p1}");
        assert!((pk - 0.5).abs() < 1e-12);
        assert_eq!(pass_rates(&[]), (0.0, 0.0, 0));
        let md = report("m", "dabench", 3, &rows);
        assert!(md.contains("2 items, 3 runs each: pass@1 16.7%, pass@3 50.0%."), "{md}");
        assert!(md.contains("| wrong | 5 |"), "{md}");
    }

    #[test]
    fn the_task_never_holds_the_gold() {
        let item = Item {
            id: "7".into(),
            question: "How many?".into(),
            context: Some("one row per animal".into()),
            files: vec![PathBuf::from("/b/da-dev-tables/surveys.csv")],
            gold: crate::graders::Gold::Named(vec![("n".into(), "42".into())]),
            group: "easy".into(),
            table: None,
        };
        let t = task(Benchmark::Dabench, &item);
        assert_eq!(t.about.gold_answer, None);
        assert!(!t.teacher_prompt().contains("42"));
        assert_eq!((t.about.format.as_str(), t.file_name().as_str()), ("csv", "surveys.csv"));
        assert!(t.prompt().starts_with("How many?\n\nAbout the data: one row per animal"));
    }
}
