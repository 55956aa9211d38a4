//! `evaluate`: models as the agent on benchmark items, scored by the graders
//! ([`crate::graders`]), with exactly the `trajectories` protocol, sandbox and tools (the agent
//! loop of [`crate::agent`], not a copy).
//!
//! Each item runs `runs` times (pass@k's k; each run its own sample and its own seed, from the
//! model's seed or else the pipeline's), at most `max_turns` turns, temperature and top-p from the model table (the
//! recipe's evaluation: 3 runs, 0.7, 0.95, 10 turns). Every (model, item, run) is cached like
//! any trajectory, every model turn as it returns: a killed evaluation resumes, and a rerun
//! with the same model sends nothing. The item's gold answer never reaches the model. A model
//! is known by its `model` name and settings (as every cached LLM request is), not by its
//! `base_url`: give each checkpoint you evaluate its own name. `models = [...]` evaluates
//! several side by side.
//!
//! Open answers (DiscoveryBench hypotheses, TableBench's descriptive questions) are graded by
//! an LLM judge, `judge = "<model>"`, with the recipe's rule (same finding, numbers within
//! 3%); without one they are skipped, and the report says how many.
//!
//! Rows: one per (model, item, run): the answer, whether it is correct, the grader and its
//! reason (the judge's reasoning for open answers), BIRD's stricter execution match for result
//! tables, the failure mode (`no_answer`, `format`, `turn_limit`, `sandbox_error`, `wrong`), turns,
//! tokens and seconds. Counters: `pass_at_1_ppm` (the mean over runs of the share of items
//! right, in millionths) and `pass_at_k_ppm` (the share of items right in any run), and both
//! per group (`pass_at_1_ppm_<group>`), each prefixed by `<model>.` when there are several. A
//! Markdown report and an SVG chart, `<stage>.report.md` and `<stage>.report.svg` in the output
//! folder, have the same numbers per model and group, with counts and failure modes.
//!
//! ```toml
//! [stages.eval]
//! kind = "evaluate"
//! model = "served"               # the model evaluated, a [models] table (or models = [...])
//! benchmark = "dabench"          # qrdata, tablebench, bird, discoverybench, dacode, or rl
//! path = "benchmarks/dabench"    # the benchmark's folder (tablebench, rl: its file)
//! runs = 3
//! max_turns = 10
//! judge = "judge"                # grades open answers (optional)
//! ```

mod judge;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use kiln_pipeline::cache::CacheKey;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch};
use kiln_pipeline::stage::{
    CheckCx, Config, Estimate, FileDep, Input, InputSchema, Output, Problem, Rejection, Stage, StageCx,
};
use kiln_pipeline::{Error, Result, executor};
use serde::{Deserialize, Serialize};

use crate::agent::{self, About, AgentSetup, Keys, Task, TeacherSpec, Trajectory};
use crate::benchmarks::{Benchmark, Item, query_csv};
use crate::graders::{Gold, execution_match, grade};

pub use report::pass_rates;

crate::with_agent_keys! {
    /// Parameters of an `evaluate` stage.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Evaluate {
        /// The model evaluated: a `[models.<name>]` table. This or `models` is required.
        #[serde(default)]
        pub model: Option<String>,
        /// Several models evaluated side by side, each a `[models.<name>]` table.
        #[serde(default)]
        pub models: Vec<String>,
        /// The benchmark's format. Required.
        pub benchmark: Benchmark,
        /// The benchmark's folder (TableBench, `rl`: its file), relative to the pipeline file.
        /// Required.
        pub path: PathBuf,
        /// Runs per item (pass@k's k). Default: 3.
        #[serde(default = "default_runs")]
        pub runs: u32,
        /// Evaluate only the first `limit` items. Default: every item.
        #[serde(default)]
        pub limit: Option<usize>,
        /// The model that grades open answers, a `[models.<name>]` table. Default: none (open
        /// items are skipped).
        #[serde(default)]
        pub judge: Option<String>,
        /// The judge's prompt template. Default: `judge_answer.j2`.
        #[serde(default = "default_judge_template")]
        pub judge_template: String,
    }
}

fn default_runs() -> u32 {
    3
}

fn default_judge_template() -> String {
    "judge_answer.j2".into()
}

/// One output row: one run of one item by one model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scored {
    /// Stable id of (model, benchmark, item, run).
    pub row_id: String,
    /// Empty: items come from files.
    pub parent_ids: Vec<String>,
    /// The model evaluated (its `[models]` table).
    pub model: String,
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
    /// The grader: `value`, `named`, `choice`, `parts`, `fields`, `table` or `judge`.
    pub grader: String,
    /// The grader's reason (the judge's reasoning).
    pub reason: String,
    /// BIRD's execution match (the same multiset of rows), for result tables.
    pub strict: Option<bool>,
    /// Why the run failed, if it did: `no_answer`, `format`, `turn_limit`, `sandbox_error`,
    /// `wrong`, or `unjudged` (the judge's reply never parsed).
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
        text("model"),
        text("benchmark"),
        text("item"),
        text("group"),
        Field::new("run", DataType::UInt32, false),
        maybe("answer"),
        Field::new("correct", DataType::Boolean, false),
        text("grader"),
        text("reason"),
        Field::new("strict", DataType::Boolean, true),
        maybe("failure"),
        Field::new("turns", DataType::UInt32, false),
        Field::new("prompt_tokens", DataType::UInt64, false),
        Field::new("completion_tokens", DataType::UInt64, false),
        Field::new("seconds", DataType::Float64, false),
    ])
}

/// The grader's name for `gold`.
fn grader(gold: &Gold) -> &'static str {
    match gold {
        Gold::Value { .. } => "value",
        Gold::Named(_) => "named",
        Gold::Choice { .. } => "choice",
        Gold::Parts { .. } => "parts",
        Gold::Fields { .. } => "fields",
        Gold::Open { .. } => "judge",
        Gold::Table { .. } => "table",
    }
}

impl Config for Evaluate {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        if self.limit == Some(0) {
            problems.push(Problem::new("limit", "`limit` must be at least 1").help("remove it to evaluate every item"));
        }
        let (names, key): (Vec<String>, &str) = match (&self.model, self.models.is_empty()) {
            (Some(m), true) => (vec![m.clone()], "model"),
            (None, false) => (self.models.clone(), "models"),
            (Some(_), false) => {
                problems.push(Problem::new("models", "give `model` or `models`, not both"));
                return None;
            }
            (None, true) => {
                problems
                    .push(Problem::new("model", "`model` is required").help("name the `[models]` table to evaluate"));
                return None;
            }
        };
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = names.iter().find(|n| !seen.insert(*n)) {
            problems.push(Problem::new("models", format!("`{twice}` is listed twice")));
        }
        let dir = cx.resolve(&self.path);
        let loaded = match self.benchmark.load(&dir, &cx.base_dir) {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                let help = format!(
                    "`path` is the benchmark's folder in its published layout (for `tablebench` and `rl`, the file), relative to `{}`",
                    cx.base_dir.display()
                );
                problems.push(Problem::new("path", e).help(help));
                None
            }
        };
        let judge = self.judge.as_ref().and_then(|m| judge::Judge::build(cx, m, &self.judge_template, problems));
        let mut agents = Vec::new();
        for name in &names {
            let keys = Keys { prefix: "", teacher: key, kind: "evaluate" };
            let agent = self.agent_settings(TeacherSpec::Model(name.clone())).build(cx, keys, problems);
            let teacher = agent.as_ref().and_then(|a| a.teacher());
            for p in crate::llm_rows::sample_problems("runs", self.runs, teacher) {
                if !problems.iter().any(|q| q.message == p.message) {
                    problems.push(p);
                }
            }
            agents.push((name.clone(), agent?.seeding_every_sample()));
        }
        let mut loaded = loaded?;
        if self.judge.is_some() && judge.is_none() {
            return None;
        }
        if judge.is_none() {
            let open = loaded.items.iter().filter(|i| matches!(i.gold, Gold::Open { .. })).count();
            if open > 0 {
                loaded.items.retain(|i| !matches!(i.gold, Gold::Open { .. }));
                loaded.skipped.insert("open answers: set `judge` to grade them".into(), open);
            }
        }
        loaded.items.truncate(self.limit.unwrap_or(usize::MAX));
        Some(Box::new(Evaluating {
            params: self.clone(),
            dir,
            items: loaded.items,
            skipped: loaded.skipped,
            agents,
            judge,
        }))
    }
}

/// A built `evaluate` stage: its items loaded, its agents and judge resolved.
#[derive(Debug)]
struct Evaluating {
    params: Evaluate,
    /// The benchmark's folder (or file), resolved.
    dir: PathBuf,
    items: Vec<Item>,
    skipped: BTreeMap<String, usize>,
    /// One agent per model evaluated, in order.
    agents: Vec<(String, AgentSetup)>,
    judge: Option<judge::Judge>,
}

/// `path` as the pipeline writes it: relative to its folder when inside it, so cache keys do
/// not depend on where the project is checked out.
fn shown(cx: &CheckCx, path: &Path) -> String {
    path.strip_prefix(&cx.base_dir).unwrap_or(path).to_string_lossy().into_owned()
}

/// The task the agent gets for `item`: its question and data files, never its gold.
pub fn task(cx: &CheckCx, benchmark: Benchmark, item: &Item) -> Task {
    let file = item.files.first().cloned().unwrap_or_default();
    let format = file.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    let question = match &item.context {
        Some(context) => format!("{}\n\nAbout the data: {context}", item.question),
        None => item.question.clone(),
    };
    let table = match (&item.table, format.as_str()) {
        (Some(t), _) => t.clone(),
        (None, "sqlite") => String::new(),
        (None, _) => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    Task {
        parent: row_id(&[], format!("{benchmark:?}\0{}", item.id).as_bytes()),
        about: About {
            question,
            category: None,
            table,
            path: shown(cx, &file),
            format,
            gold_answer: None,
            difficulty: None,
        },
        params: serde_json::Value::Null,
        query: None,
        critique: None,
        more_files: item.files.iter().skip(1).map(|f| shown(cx, f)).collect(),
        table_answer: matches!(item.gold, Gold::Table { .. }),
        categories: Vec::new(),
    }
}

/// The failure mode of a run without a final answer: its last cell crashed
/// (`sandbox_error`), its last turn broke the protocol (`format`), its turns ran out while it
/// worked (`turn_limit`), or it stopped (`no_answer`).
fn no_answer(t: &Trajectory) -> &'static str {
    let last = t.steps.last();
    let crashed = last.and_then(|s| s.status.as_deref()).is_some_and(|s| matches!(s, "crashed" | "killed" | "timeout"));
    let invalid = last.is_some_and(|s| s.action == "invalid");
    match (crashed, invalid, t.end_reason.as_str()) {
        (true, _, _) => "sandbox_error",
        (false, true, _) => "format",
        (false, false, "max_turns") => "turn_limit",
        _ => "no_answer",
    }
}

impl Evaluating {
    /// The row of `model`'s run `run` of `item`, from its trajectory (open answers are graded
    /// later, by the judge).
    fn score(&self, model: &str, item: &Item, run: u32, t: &Trajectory) -> Scored {
        let benchmark = self.params.benchmark.name().to_string();
        let (correct, reason, failure, mut strict) = match &t.final_answer {
            Some(answer) => {
                let g = grade(answer, t.result_csv.as_deref(), &item.gold);
                let failure = (!g.correct).then(|| "wrong".to_string());
                (g.correct, g.reason, failure, None)
            }
            None => (false, format!("no final answer ({})", t.end_reason), Some(no_answer(t).to_string()), None),
        };
        if let Gold::Table { csv } = &item.gold {
            strict = Some(t.result_csv.as_deref().is_some_and(|got| execution_match(got, csv)));
        }
        let ms: f64 = t.steps.iter().map(|s| s.teacher_ms + s.exec_ms).sum();
        Scored {
            row_id: row_id(&[], format!("eval\0{model}\0{benchmark}\0{}\0{run}", item.id).as_bytes()),
            parent_ids: Vec::new(),
            model: model.to_string(),
            benchmark,
            item: item.id.clone(),
            group: item.group.clone(),
            run,
            answer: t.final_answer.clone(),
            correct,
            grader: grader(&item.gold).to_string(),
            reason,
            strict,
            failure,
            turns: t.turns,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            seconds: ms / 1e3,
        }
    }

    /// The items ready to run: inline tables written as CSV files under
    /// `<output>/_benchmarks/<stage>/`, gold queries run (cached by query and database). An
    /// item whose gold query fails is rejected, with the database's error.
    fn prepare(&self, cx: &StageCx, rejections: &mut Vec<Rejection>) -> Result<Vec<Item>> {
        let tables = cx.pipeline.output_dir.join("_benchmarks").join(&cx.name);
        let mut ready = Vec::new();
        for item in &self.items {
            let mut item = item.clone();
            if let Some(csv) = item.inline_csv.take() {
                let name: String =
                    item.id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
                let path = tables.join(format!("{name}.csv"));
                if std::fs::read_to_string(&path).ok().as_deref() != Some(csv.as_str()) {
                    std::fs::create_dir_all(&tables).map_err(|e| Error::io(&tables, e))?;
                    crate::export::write_atomic(&path, |w| w.write_all(csv.as_bytes()))?;
                }
                item.files.insert(0, path);
            }
            if let Some(sql) = item.gold_sql.take() {
                let db = item.files[0].clone();
                let stat = std::fs::metadata(&db).map_err(|e| Error::io(&db, e))?;
                let modified = stat.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                let key = CacheKey::new("benchmark-gold/1", &(&sql, shown(&cx.pipeline, &db), stat.len(), modified))?;
                let csv = match cx.cache.get::<String>(&key)? {
                    Some(csv) => csv,
                    None => match query_csv(&db, &sql) {
                        Ok(csv) => {
                            cx.cache.put(&key, "benchmark-gold/1", &csv)?;
                            csv
                        }
                        Err(e) => {
                            rejections.push(Rejection {
                                row_id: item.id.clone(),
                                reason: "gold_failed".into(),
                                detail: e.to_string(),
                            });
                            continue;
                        }
                    },
                };
                item.gold = Gold::Table { csv };
            }
            ready.push(item);
        }
        Ok(ready)
    }

    /// Grades the open answers of `rows` with the judge.
    async fn judge_open(
        &self,
        cx: &StageCx,
        items: &[Item],
        rows: &mut [Scored],
        counters: &mut BTreeMap<String, u64>,
    ) -> Result<()> {
        let Some(judge) = &self.judge else { return Ok(()) };
        let by_id: BTreeMap<&str, &Item> = items.iter().map(|i| (i.id.as_str(), i)).collect();
        let open: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].answer.is_some() && matches!(by_id[rows[i].item.as_str()].gold, Gold::Open { .. }))
            .collect();
        let asks: Vec<judge::Ask> = open
            .iter()
            .map(|&i| {
                let item = by_id[rows[i].item.as_str()];
                let Gold::Open { reference } = &item.gold else { unreachable!("filtered to open golds") };
                judge::Ask {
                    row_id: &rows[i].row_id,
                    question: &item.question,
                    reference,
                    answer: rows[i].answer.as_deref().unwrap_or_default(),
                }
            })
            .collect();
        let (verdicts, judged) = judge.judge(cx, &asks).await?;
        counters.extend(judged);
        for (i, verdict) in open.into_iter().zip(verdicts) {
            let row = &mut rows[i];
            match verdict {
                Some(v) => {
                    row.correct = v.correct;
                    row.reason = v.reasoning;
                    row.failure = (!v.correct).then(|| "wrong".to_string());
                }
                None => {
                    row.reason = "the judge's reply never parsed".into();
                    row.failure = Some("unjudged".into());
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Stage for Evaluating {
    fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self.agents.iter().map(|(m, _)| m.clone()).collect();
        models.extend(self.judge.as_ref().map(|j| j.model.name.clone()));
        models
    }

    fn version(&self) -> u32 {
        agent::VERSION
    }

    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        let mut files: Vec<FileDep> = self.agents.iter().flat_map(|(_, a)| a.files()).collect();
        files.extend(self.judge.iter().flat_map(|j| j.files()));
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
        let tasks: Vec<Task> = self.items.iter().map(|i| task(&cx.pipeline, self.params.benchmark, i)).collect();
        let mut total: Option<Estimate> = None;
        for (_, agent) in &self.agents {
            if let Some(e) = agent.estimate(cx, &tasks, self.params.runs)? {
                total = Some(match total {
                    Some(t) => t.plus(&e),
                    None => e,
                });
            }
        }
        Ok(total)
    }

    async fn run(&self, cx: &StageCx, _inputs: &[Input]) -> Result<Output> {
        let mut out = Output::default();
        let items = self.prepare(cx, &mut out.rejections)?;
        let tasks: Vec<Task> = items.iter().map(|i| task(&cx.pipeline, self.params.benchmark, i)).collect();
        let mut rows = Vec::new();
        let mut counters = BTreeMap::new();
        let mut retryable = 0;
        let several = self.agents.len() > 1;
        for (model, setup) in &self.agents {
            let agent = setup.start(cx).await?;
            let results = agent.sample(&tasks, self.params.runs).await;
            for (i, result) in results.into_iter().enumerate() {
                let (item, run) = (&items[i / self.params.runs as usize], i as u32 % self.params.runs);
                match result? {
                    Ok(t) => rows.push(self.score(model, item, run, &t)),
                    Err(rejection) => {
                        retryable += u64::from(rejection.reason == "teacher_failed");
                        out.rejections.push(rejection);
                    }
                }
            }
            for (name, n) in agent.counters() {
                let name = if several { format!("{model}.{name}") } else { name };
                *counters.entry(name).or_default() += n;
            }
        }
        self.judge_open(cx, &items, &mut rows, &mut counters).await?;
        let models: Vec<String> = self.agents.iter().map(|(m, _)| m.clone()).collect();
        let about = report::About {
            stage: &cx.name,
            benchmark: self.params.benchmark.name(),
            models: &models,
            runs: self.params.runs,
            skipped: &self.skipped,
        };
        for (ext, text) in [("md", report::markdown(&about, &rows)), ("svg", report::svg(&about, &rows))] {
            let path = cx.pipeline.output_dir.join(format!("{}.report.{ext}", cx.name));
            crate::export::write_atomic(&path, |w| w.write_all(text.as_bytes()))?;
            cx.wrote(&path);
        }
        counters.extend(report::counters(&models, &rows));
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

    #[test]
    fn the_task_never_holds_the_gold() {
        let mut item = Item {
            id: "7".into(),
            question: "How many?".into(),
            context: Some("one row per animal".into()),
            files: vec![PathBuf::from("/b/da-dev-tables/surveys.csv"), PathBuf::from("/b/da-dev-tables/plots.csv")],
            gold: crate::graders::Gold::Named(vec![("n".into(), "42".into())]),
            group: "easy".into(),
            table: None,
            inline_csv: None,
            gold_sql: None,
            expert: Vec::new(),
        };
        let cx = CheckCx { base_dir: PathBuf::from("/b"), ..CheckCx::default() };
        let t = task(&cx, Benchmark::Dabench, &item);
        assert_eq!(t.about.gold_answer, None);
        assert!(!t.teacher_prompt().contains("42"));
        assert_eq!((t.about.format.as_str(), t.file_name().as_str()), ("csv", "surveys.csv"));
        assert_eq!(t.about.path, "da-dev-tables/surveys.csv", "relative to the pipeline's folder");
        assert!(t.prompt().starts_with("How many?\n\nAbout the data: one row per animal"));
        assert!(t.prompt().ends_with("Also: `data/plots.csv`."), "{}", t.prompt());
        item.files = vec![PathBuf::from("/b/dev_databases/shop/shop.sqlite")];
        let t = task(&cx, Benchmark::Bird, &item);
        assert!(t.prompt().contains("The SQLite database `shop.sqlite`: use get_db_info()"), "{}", t.prompt());
    }
}
