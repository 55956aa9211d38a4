//! `trajectories`: knowledge-augmented trajectory sampling (RECIPE section 5): `n` independent
//! runs of the agent loop ([`crate::agent`]) per input question, each a row. It reads one or
//! more stages of questions (say, synthesized and composed ones), in the order listed.
//!
//! The teacher is a model (`model = "<name>"`) or, offline, the scripted solver for
//! `programmatic` questions (`scripted = true`). Every finished trajectory is cached whole, and
//! every model turn as it returns: a killed run resumes without redoing either.
//!
//! ```toml
//! [stages.trajectories]
//! kind = "trajectories"
//! inputs = ["queries", "hard"]   # stages of Question rows
//! model = "teacher"        # or: scripted = true
//! n = 3                    # default 3 (1 when scripted)
//! max_turns = 10
//! sandbox = { memory_mb = 1024, cell_timeout_s = 20 }   # any field of the sandbox limits
//! ```

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use kiln_pipeline::rows::to_batch;
use kiln_pipeline::stage::{CheckCx, Config, Estimate, FileDep, Input, InputSchema, Output, Problem, Stage, StageCx};
use kiln_pipeline::{Result, executor};
use serde::{Deserialize, Serialize};

use crate::agent::{self, AgentSetup, Keys, Task, TeacherSpec};
use crate::families::{QUESTION, Question, Row};

crate::with_agent_keys! {
    /// Parameters of a `trajectories` stage.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Trajectories {
        /// The teacher: a `[models.<name>]` table. Exactly one of `model` and `scripted`.
        #[serde(default)]
        pub model: Option<String>,
        /// Solve `programmatic` questions offline with the scripted teacher.
        #[serde(default)]
        pub scripted: bool,
        /// Trajectories per question. Default: 3 with a model, 1 when scripted (it is
        /// deterministic).
        #[serde(default)]
        pub n: Option<u32>,
    }
}

/// The `Question` columns a model teacher needs (the scripted one also needs `category`).
const REQUIRED: &[&str] = &["question", "path", "format", "table"];

impl Config for Trajectories {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        match (&self.model, self.scripted) {
            (Some(_), true) => problems.push(
                Problem::new("scripted", "`model` and `scripted = true` exclude each other")
                    .help("keep `model` for a model teacher, or `scripted = true` for offline programmatic questions"),
            ),
            (None, false) => problems.push(Problem::new("", "a `trajectories` stage needs a teacher").help(
                "set `model = \"<name of a [models] table>\"`, or `scripted = true` for `programmatic` questions",
            )),
            _ => {}
        }
        let n = self.n.unwrap_or(if self.scripted { 1 } else { 3 });
        if self.scripted && n > 1 {
            problems.push(
                Problem::new("n", "scripted trajectories are deterministic: `n` above 1 would repeat them")
                    .help("remove `n`, or use a model teacher"),
            );
        }
        let keys = Keys { prefix: "", teacher: "model", kind: "trajectories" };
        let teacher = match &self.model {
            Some(name) => TeacherSpec::Model(name.clone()),
            None => TeacherSpec::Scripted,
        };
        let agent = self.agent_settings(teacher).build(cx, keys, problems);
        problems.extend(crate::llm_rows::sample_problems("n", n, agent.as_ref().and_then(|a| a.teacher())));
        match agent {
            Some(agent) => Some(Box::new(Sampling { agent, n, scripted: self.scripted })),
            None => None,
        }
    }
}

/// A built `trajectories` stage.
#[derive(Debug)]
struct Sampling {
    agent: AgentSetup,
    /// Trajectories per question.
    n: u32,
    scripted: bool,
}

/// The questions of `input` as tasks, read one record batch at a time.
fn tasks_of(input: &Input) -> Result<impl Iterator<Item = Result<Task>> + Send + use<>> {
    let name = input.name.clone();
    Ok(input.batches()?.flat_map(move |batch| match batch.and_then(|b| QUESTION.rows::<Row<Question>>(&name, &[b])) {
        Ok(rows) => rows.into_iter().map(|r| Ok(Task::from_question(r))).collect::<Vec<_>>(),
        Err(e) => vec![Err(e)],
    }))
}

/// Trajectories handed to the dataset at once.
const OUTPUT_BATCH: usize = 256;

#[async_trait]
impl Stage for Sampling {
    fn models(&self) -> Vec<String> {
        self.agent.teacher().into_iter().map(|m| m.name.clone()).collect()
    }

    fn version(&self) -> u32 {
        agent::STAGE_VERSION
    }

    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        self.agent.files()
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        if inputs.is_empty() {
            return Err(vec![Problem::new("inputs", "a `trajectories` stage reads one or more stages of questions")]);
        }
        let needed: &[&str] =
            if self.scripted { &["question", "path", "format", "table", "category"] } else { REQUIRED };
        let mut problems = Vec::new();
        for input in inputs {
            if let Err(p) = QUESTION.check(input, needed) {
                problems.push(p);
            } else if self.scripted && input.schema.field_with_name("params").is_err() {
                problems.push(
                    Problem::new("inputs", format!("`{}` ({}) lacks the column params", input.name, input.kind))
                        .help("scripted trajectories solve `programmatic` questions, which have it"),
                );
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(agent::schema())
    }

    async fn estimate(&self, cx: &StageCx, inputs: &[Input]) -> Result<Option<Estimate>> {
        let tasks: Vec<Task> =
            inputs.iter().map(tasks_of).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect::<Result<_>>()?;
        self.agent.estimate(cx, &tasks, self.n)
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let agent = self.agent.start(cx).await?;
        let schema = agent::schema();
        let tasks = inputs.iter().map(tasks_of).collect::<Result<Vec<_>>>()?;
        let total: u64 = inputs.iter().filter_map(Input::row_count).sum::<u64>() * u64::from(self.n);
        let mut out = Output::default();
        let (mut ready, mut kept, mut retryable, mut prompt, mut completion) = (Vec::new(), 0u64, 0u64, 0u64, 0u64);
        agent
            .sample_each(tasks.into_iter().flatten(), self.n, total, |result| {
                match result {
                    Ok(t) => {
                        (prompt, completion, kept) =
                            (prompt + t.prompt_tokens, completion + t.completion_tokens, kept + 1);
                        ready.push(t);
                    }
                    Err(rejection) => {
                        retryable += u64::from(rejection.reason == "teacher_failed");
                        out.rejections.push(rejection);
                    }
                }
                if ready.len() >= OUTPUT_BATCH {
                    cx.emit(to_batch(&schema, &std::mem::take(&mut ready))?)?;
                }
                Ok(())
            })
            .await?;
        let cost = agent.cost(prompt, completion);
        let isolation = format!("isolation_{}", agent.isolation());
        let mut counters = agent.counters();
        counters.insert("trajectories".into(), kept);
        counters.insert(isolation, 1);
        if retryable > 0 {
            counters.insert(executor::RETRYABLE.into(), retryable);
        }
        counters.insert("prompt_tokens".into(), prompt);
        counters.insert("completion_tokens".into(), completion);
        if let Some(cost) = cost {
            counters.insert("cost_micro_usd".into(), (cost * 1e6).round() as u64);
        }
        out.counters = counters;
        out.batches = vec![to_batch(&schema, &ready)?];
        Ok(out)
    }
}
