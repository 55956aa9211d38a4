//! The agent loop (RECIPE section 5), one implementation for every caller: the `trajectories`
//! stage, judge rescue, and evaluation and RL rollouts.
//!
//! The teacher gets the protocol's system prompt (a template, by default
//! `templates/trajectory_system.j2`) with the category's procedural knowledge from the taxonomy,
//! then the question and where its data is; each `<code>` turn runs in the trajectory's own
//! persistent, isolated Python worker (`kiln-sandbox`), and the observation comes back as an
//! `<interpreter>` turn, until an `<answer>` or `max_turns`. SQLite tasks get `get_db_info()`
//! and `execute_sql()` instead of the file, and keep their result CSV.
//!
//! [`AgentSettings`] is what a stage writes (teacher, turn limit, template, sandbox limits,
//! isolation, parallelism). [`AgentSettings::build`] checks and resolves it once, when the
//! embedding stage is built, into an [`AgentSetup`]: the teacher's model settings, the template
//! and taxonomy loaded. [`AgentSetup::start`] starts it for a run into an [`Agent`]: the
//! teacher's client, the sandbox probed. [`Agent::sample`]
//! runs [`Task`]s to [`Trajectory`] records. Every model turn is cached as it returns and every
//! finished trajectory is cached whole, so a rerun (also after kill -9) replays finished
//! trajectories without the sandbox, and unfinished ones replay their cached model turns.

pub mod keys;
pub mod protocol;
mod scripted;
mod task;
mod trajectory;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use kiln_llm::{Client, Message};
use kiln_pipeline::cache::CacheKey;
use kiln_pipeline::rows::row_id;
use kiln_pipeline::stage::{CheckCx, Estimate, FileDep, Problem, Rejection, StageCx};
use kiln_pipeline::{Error, Result, progress};
use kiln_sandbox::{Cell, DataFile, Isolation, Limits, PythonEnv, Sandbox, Worker, WorkerSpec};
use serde::Serialize;

use crate::StageError;
use crate::llm_rows::{Model, REORDER_WINDOW, RowRequest, cached_sample, estimate_rows, sample_seed};
use crate::reorder::Reorder;
use crate::taxonomy::Taxonomy;
use crate::templates::{Templates, check_template};
use protocol::{Action, STOP, close_turn, corrective, interpreter, parse_action};
use scripted::Script;
pub use task::{About, Task};
pub use trajectory::{Step, Trajectory, schema};

/// Variables the system prompt template receives.
pub const VARIABLES: &[&str] = &["sql", "data_dir", "files", "max_turns", "procedure", "category"];
/// The system prompt template used unless a stage names another.
pub const DEFAULT_TEMPLATE: &str = "trajectory_system.j2";
/// Bump when the same tasks would now give other trajectories (4: each sample of a seeded
/// model gets its own seed; unseeded turns stay cached, so nothing is paid again). Samples after
/// the first of an unseeded model now get seeds from the pipeline's too, without a bump: their
/// turns cached unseeded are still found ([`cached_sample`]), so finished work stays as it was.
pub const VERSION: u32 = 4;
/// The `trajectories` stage's version, which joins its fingerprint: bump it when the kept
/// records change while the cached work stays valid (5: the kept system prompt is the one the
/// model gets at inference, without the category's procedure).
pub const STAGE_VERSION: u32 = 5;
/// Most bytes of a result CSV kept in a trajectory.
const RESULT_CSV_BYTES: usize = 64 * 1024;

/// Who writes the assistant turns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TeacherSpec {
    /// A `[models.<name>]` table, generation stopped at `</code>`/`</answer>`.
    Model(String),
    /// The offline scripted solver of `programmatic` questions: it inspects the data, runs
    /// pandas code equivalent to the solving query and answers from the real output.
    Scripted,
    /// A model in this process (an RL policy in training), given when the agent starts
    /// ([`AgentSetup::start_with_policy`]). It reads the inference prompt (no procedure) and
    /// nothing it writes is cached: the policy changes between calls.
    Policy,
}

/// A model that writes assistant turns in this process, such as the policy RL trains.
#[async_trait::async_trait]
pub trait Policy: Send + Sync {
    /// The name kept in each trajectory's `teacher`.
    fn name(&self) -> String;
    /// The next assistant turn after `messages`, sampled with `seed`, generation stopped at the
    /// protocol's [`STOP`] strings. `Err` says why no turn came (the trajectory is rejected).
    async fn turn(&self, messages: &[Message], seed: u64) -> std::result::Result<PolicyTurn, String>;
}

/// One turn a [`Policy`] wrote.
#[derive(Debug, Clone, Default)]
pub struct PolicyTurn {
    /// The turn's text (the stop string may be missing: it is put back).
    pub text: String,
    /// Tokens the policy read.
    pub prompt_tokens: u64,
    /// Tokens it wrote.
    pub completion_tokens: u64,
}

/// How the agent runs.
#[derive(Debug, Clone, Serialize)]
pub struct AgentSettings {
    /// Who writes the assistant turns.
    pub teacher: TeacherSpec,
    /// Most assistant turns per trajectory.
    pub max_turns: u32,
    /// The system prompt template.
    pub template: String,
    /// Sandbox limits (memory, timeouts, output, SQL and scratch caps).
    pub sandbox: Limits,
    /// Isolation; `None` for the first that works here.
    pub isolation: Option<Isolation>,
    /// Trajectories in progress at once (each holds a Python worker); `None` for the model's
    /// `max_concurrency`, or twice the CPU count when scripted.
    pub parallel: Option<usize>,
}

/// Where an embedding stage writes the agent's settings, for locating problems.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// Prefix of the agent's keys in the stage table (`""`, or `"rescue."`).
    pub prefix: &'a str,
    /// The key naming the teacher model (`model`, or `rescue.teacher`).
    pub teacher: &'a str,
    /// The stage kind, for hints.
    pub kind: &'a str,
}

impl AgentSettings {
    /// Checks the settings (every problem into `problems`, at the keys where the stage writes
    /// them) and resolves them: the teacher's model settings read, the template and taxonomy
    /// loaded. `None` when one of those could not be.
    pub fn build(&self, cx: &CheckCx, keys: Keys<'_>, problems: &mut Vec<Problem>) -> Option<AgentSetup> {
        let at = |key: &str| format!("{}{key}", keys.prefix);
        let teacher = match &self.teacher {
            TeacherSpec::Scripted | TeacherSpec::Policy => Ok(None),
            TeacherSpec::Model(name) => match Model::resolve(cx, name) {
                Ok(mut model) => {
                    model.config.stop = STOP.iter().map(|s| s.to_string()).collect();
                    Ok(Some(model))
                }
                Err(mut p) => {
                    p.at = keys.teacher.split('.').map(str::to_string).collect();
                    problems.push(p);
                    Err(())
                }
            },
        };
        if self.max_turns == 0 {
            problems.push(Problem::new(&at("max_turns"), "`max_turns` must be at least 1"));
        }
        if self.parallel == Some(0) {
            problems.push(Problem::new(&at("parallel"), "`parallel` must be at least 1"));
        }
        for (key, message) in self.sandbox.problems() {
            problems.push(Problem::new(&at(&format!("sandbox.{key}")), message));
        }
        let templates = match check_template(cx, &self.template, VARIABLES, keys.kind) {
            Err(mut p) => {
                p.at = at("template").split('.').map(str::to_string).collect();
                problems.push(p);
                None
            }
            Ok(t) => Some(t),
        };
        let taxonomy = Taxonomy::load(cx.taxonomy.as_deref()).map_err(|e| problems.push(Problem::new("", e))).ok();
        Some(AgentSetup {
            settings: self.clone(),
            teacher: teacher.ok()?,
            templates: templates?,
            taxonomy: taxonomy?,
            seed_every_sample: false,
        })
    }
}

/// [`AgentSettings`] resolved once, when the stage is built: the teacher's model settings
/// (generation stopped at the end of a turn), the template and the taxonomy.
#[derive(Debug)]
pub struct AgentSetup {
    settings: AgentSettings,
    /// The teacher model; `None` for the scripted teacher.
    teacher: Option<Model>,
    templates: Templates,
    taxonomy: Taxonomy,
    /// Every sample gets a seed, from the pipeline's when the model has none.
    seed_every_sample: bool,
}

impl AgentSetup {
    /// Gives every sample its own seed (the model's seed, else the pipeline's, plus the sample
    /// number), also for a model without a seed: runs that are reproducible and distinct.
    pub fn seeding_every_sample(mut self) -> Self {
        self.seed_every_sample = true;
        self
    }

    /// The settings as written.
    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    /// The teacher model; `None` for the scripted teacher and a policy.
    pub fn teacher(&self) -> Option<&Model> {
        self.teacher.as_ref()
    }

    /// The template and taxonomy files the trajectories depend on.
    pub fn files(&self) -> Vec<FileDep> {
        let mut files = self.templates.files();
        files.extend(self.taxonomy.files());
        files
    }

    /// Starts the agent for a run of stage `cx`: the teacher's client, and the sandbox (the
    /// managed Python environment created first if needed).
    pub async fn start<'a>(&'a self, cx: &'a StageCx) -> Result<Agent<'a>> {
        let teacher = match (&self.teacher, &self.settings.teacher) {
            (Some(model), _) => Teacher::Model { client: model.client(cx)?, model },
            (None, TeacherSpec::Policy) => {
                return Err(Error::Internal("an agent of a policy starts with `start_with_policy`".into()));
            }
            (None, _) => Teacher::Scripted,
        };
        self.started(cx, teacher).await
    }

    /// Starts the agent for a run of stage `cx` with `policy` writing the turns (settings
    /// built with [`TeacherSpec::Policy`]).
    pub async fn start_with_policy<'a>(&'a self, cx: &'a StageCx, policy: Arc<dyn Policy>) -> Result<Agent<'a>> {
        self.started(cx, Teacher::Policy(policy)).await
    }

    async fn started<'a>(&'a self, cx: &'a StageCx, teacher: Teacher<'a>) -> Result<Agent<'a>> {
        Ok(Agent {
            cx,
            setup: self,
            teacher,
            sandbox: sandbox(cx, self.settings.isolation).await?,
            tally: Tally::default(),
        })
    }

    /// What `n` trajectories of each task would cost in model requests (none for the scripted
    /// teacher), sending nothing: each makes up to `max_turns` requests, of which only the first
    /// is known in advance.
    pub fn estimate(&self, cx: &StageCx, tasks: &[Task], n: u32) -> Result<Option<Estimate>> {
        let Some(model) = &self.teacher else { return Ok(None) };
        let mut requests = Vec::new();
        for task in tasks {
            let messages = self.opening(task).map_err(|e| Error::stage(&cx.name, e))?;
            for sample in 0..n {
                requests.push(RowRequest { row_id: task.parent.clone(), messages: messages.clone(), sample });
            }
        }
        estimate_rows(cx, &model.config, &requests, u64::from(self.settings.max_turns)).map(Some)
    }

    /// The system prompt: the protocol, with the procedures of the task's categories (what the
    /// teacher reads) when `procedure` is set, else without (what a model gets at inference).
    fn system_prompt(&self, task: &Task, procedure: bool) -> Result<String, StageError> {
        let categories: Vec<_> =
            task.categories.iter().filter_map(|c| self.taxonomy.get(c)).filter(|_| procedure).collect();
        let steps: Vec<String> = match categories.as_slice() {
            [one] => one.procedure.clone(),
            many => many.iter().flat_map(|c| c.procedure.iter().map(move |s| format!("{}: {s}", c.name))).collect(),
        };
        let names: Vec<&str> = categories.iter().map(|c| c.name.as_str()).collect();
        let files = if task.is_sql() {
            vec![format!("{} (SQLite; reach it only through the SQL tools)", task.file_name())]
        } else {
            vec![task.file_name()]
        };
        self.templates.render(
            &self.settings.template,
            serde_json::json!({
                "sql": task.is_sql(),
                "data_dir": "data/",
                "files": files,
                "max_turns": self.settings.max_turns,
                "procedure": steps,
                "category": names.join(", then "),
            }),
        )
    }

    /// The first two messages the teacher reads for `task`: the system prompt with the
    /// procedures, and the question (with a rescue's critique).
    fn opening(&self, task: &Task) -> Result<Vec<Message>, StageError> {
        Ok(vec![Message::new("system", self.system_prompt(task, true)?), Message::new("user", task.teacher_prompt())])
    }

    /// The first two messages a kept trajectory holds: what the model trained on it gets at
    /// inference (no procedure, no critique).
    fn kept_opening(&self, task: &Task) -> Result<Vec<Message>, StageError> {
        Ok(vec![Message::new("system", self.system_prompt(task, false)?), Message::new("user", task.prompt())])
    }
}

/// Who writes the assistant turns, resolved for a run.
enum Teacher<'a> {
    Model { model: &'a Model, client: Arc<Client> },
    Scripted,
    Policy(Arc<dyn Policy>),
}

impl Teacher<'_> {
    fn name(&self) -> String {
        match self {
            Teacher::Model { model, .. } => model.name.clone(),
            Teacher::Scripted => "scripted".into(),
            Teacher::Policy(policy) => policy.name(),
        }
    }
}

/// Cumulative counters of a run.
#[derive(Debug, Default)]
struct Tally(std::sync::Mutex<BTreeMap<String, u64>>);

impl Tally {
    fn add(&self, name: &str, n: u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(name.into()).or_default() += n;
    }
}

/// The agent, resolved for one run of one stage.
pub struct Agent<'a> {
    cx: &'a StageCx,
    setup: &'a AgentSetup,
    teacher: Teacher<'a>,
    sandbox: Arc<Sandbox>,
    tally: Tally,
}

impl Agent<'_> {
    /// `n` trajectories of each task, in task then sample order, within the parallelism limit.
    /// A trajectory the teacher could not produce is a rejection (not cached: a rerun tries
    /// again); an error stops the whole run.
    pub async fn sample(&self, tasks: &[Task], n: u32) -> Vec<Result<Result<Trajectory, Rejection>>> {
        let mut out = Vec::new();
        let tasks = tasks.iter().cloned().map(Ok);
        let total = tasks.len() as u64 * u64::from(n);
        let finished = self
            .sample_each(tasks, n, total, |r| {
                out.push(Ok(r));
                Ok(())
            })
            .await;
        if let Err(e) = finished {
            out.push(Err(e));
        }
        out
    }

    /// `n` trajectories of each task of `tasks` (read as trajectories free up, so they may come
    /// lazily from a large input), handed to `on_result` in task then sample order. Trajectories
    /// finish in any order (a slow one holds only its own slot, up to [`REORDER_WINDOW`] ahead;
    /// those finished ahead of it wait in a [`Reorder`] buffer). `total` sizes the progress bar.
    pub async fn sample_each(
        &self,
        tasks: impl Iterator<Item = Result<Task>>,
        n: u32,
        total: u64,
        mut on_result: impl FnMut(Result<Trajectory, Rejection>) -> Result<()>,
    ) -> Result<()> {
        let parallel = self.setup.settings.parallel.unwrap_or(match &self.teacher {
            Teacher::Model { model, .. } => model.config.max_concurrency.max(1),
            Teacher::Scripted | Teacher::Policy(_) => {
                2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
            }
        });
        let bar = progress::bar(&self.cx.name, total);
        let mut jobs = tasks.flat_map(|task| match task {
            Ok(task) => {
                let task = Arc::new(task);
                (0..n).map(|s| Ok((task.clone(), s))).collect::<Vec<_>>()
            }
            Err(e) => vec![Err(e)],
        });
        let mut running = FuturesUnordered::new();
        // Trajectories finished ahead of an earlier one (long conversations): past a thousand,
        // on disk.
        let mut done: Reorder<(), Result<Trajectory, Rejection>> = Reorder::new(self.cx.cache.dir());
        let (mut started, mut failure) = (0usize, None);
        loop {
            while failure.is_none() && running.len() < parallel && started - done.next() < REORDER_WINDOW {
                let Some(job) = jobs.next() else { break };
                let (task, sample) = job?;
                let at = started;
                started += 1;
                running.push(async move { (at, self.trajectory(&task, sample).await) });
            }
            let Some((at, result)) = running.next().await else { break };
            bar.inc(1);
            match result {
                Ok(result) => done.put(at, (), result)?,
                // An error of the stage itself ends it once the trajectories in flight are back
                // and cached: their teacher calls and sandbox runs are paid for.
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
            while failure.is_none()
                && let Some(((), result)) = done.pop()?
            {
                on_result(result)?;
            }
        }
        bar.finish_and_clear();
        failure.map_or(Ok(()), Err)
    }

    /// The isolation the sandbox uses.
    pub fn isolation(&self) -> Isolation {
        self.sandbox.mode()
    }

    /// The teacher's cost of `prompt` and `completion` tokens in USD (`None` when scripted).
    pub fn cost(&self, prompt: u64, completion: u64) -> Option<f64> {
        match &self.teacher {
            Teacher::Model { model, .. } => Some(model.config.cost(prompt, completion)),
            Teacher::Scripted | Teacher::Policy(_) => None,
        }
    }

    /// Counters of what the run did (sandbox cells, cache hits...).
    pub fn counters(self) -> BTreeMap<String, u64> {
        self.tally.0.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// One trajectory from the cache, or run now and cached. `Err(rejection)` when it could
    /// not be produced (the teacher failed): not cached, so a rerun tries again.
    async fn trajectory(&self, task: &Task, sample: u32) -> Result<Result<Trajectory, Rejection>> {
        let id = match &task.critique {
            None => row_id(&[&task.parent], format!("trajectory {sample}").as_bytes()),
            Some((round, _)) => row_id(&[&task.parent], format!("rescue {round} trajectory {sample}").as_bytes()),
        };
        let reject = |reason: &str, detail: String| Rejection { row_id: id.clone(), reason: reason.into(), detail };
        let (opening, kept) = match self.setup.opening(task).and_then(|o| Ok((o, self.setup.kept_opening(task)?))) {
            Ok(m) => m,
            Err(e) => return Ok(Err(reject("template_failed", e.to_string()))),
        };
        // A policy is asked as it will be at inference, and its work is never cached.
        let policy = matches!(self.teacher, Teacher::Policy(_));
        let opening = if policy { kept.clone() } else { opening };
        let teacher_system = Some(opening[0].content.clone()).filter(|s| *s != kept[0].content);
        let script = match &self.teacher {
            Teacher::Scripted => {
                let category = task.about.category.as_deref().unwrap_or("");
                let shown = format!("data/{}", task.file_name());
                match scripted::script(
                    category,
                    &task.params,
                    task.query.as_deref(),
                    &task.about.format,
                    &shown,
                    &task.about.table,
                ) {
                    Some(s) => Some(s),
                    None => {
                        let why = format!("no script for category `{category}` on {} files", task.about.format);
                        return Ok(Err(reject("not_scriptable", why)));
                    }
                }
            }
            Teacher::Model { .. } | Teacher::Policy(_) => None,
        };
        let teacher_id = match &self.teacher {
            Teacher::Model { model, .. } => model.config.request_body(&[], 1),
            Teacher::Scripted => serde_json::json!({ "scripted": &script }),
            Teacher::Policy(p) => serde_json::json!({ "policy": p.name() }),
        };
        let settings = &self.setup.settings;
        let key = CacheKey::new(
            &format!("trajectory/{VERSION}"),
            &(
                &teacher_id,
                &opening,
                sample,
                settings.max_turns,
                &settings.sandbox,
                &task.about.path,
                &task.about.table,
            ),
        )?;
        if let Some(mut hit) = self.cx.cache.get::<Trajectory>(&key)?.filter(|_| !policy) {
            self.tally.add("trajectories_cached", 1);
            // Trajectories cached before the kept prompt lost its procedure get it out now.
            hit.messages.splice(..2.min(hit.messages.len()), kept);
            return Ok(Ok(Trajectory { row_id: id, teacher_system, ..hit }));
        }
        // The kept trajectory opens as the model will be asked at inference; the teacher also
        // reads the procedures and a rescue's critique.
        let mut t =
            Trajectory::opening(id.clone(), task.parent.clone(), task.about.clone(), sample, self.teacher.name(), kept);
        t.teacher_system = teacher_system;
        let scratch = self.cx.pipeline.output_dir.join("_scratch").join(&self.cx.name).join(&id);
        let outcome = self.run_turns(&opening, sample, script.as_ref(), &scratch, task, &mut t).await;
        let _ = std::fs::remove_dir_all(&scratch);
        let _ = std::fs::remove_dir_all(scratch.with_file_name(format!("{id}.data")));
        match outcome? {
            Err(why) => Ok(Err(reject("teacher_failed", why))),
            Ok(()) => {
                self.tally.add(&format!("ended_{}", t.end_reason), 1);
                if !policy {
                    self.cx.cache.put(&key, "trajectory", &t)?;
                }
                Ok(Ok(t))
            }
        }
    }

    /// The turn loop; the teacher reads `opening` in place of the kept first two messages.
    /// `Ok(Err(why))` when the model could not be reached.
    async fn run_turns(
        &self,
        opening: &[Message],
        sample: u32,
        script: Option<&Script>,
        scratch: &Path,
        task: &Task,
        t: &mut Trajectory,
    ) -> Result<Result<(), String>> {
        let _ = std::fs::remove_dir_all(scratch);
        let spec = self.worker_spec(task, scratch);
        let mut worker: Option<Worker> = None;
        let (mut cells, mut last_output, mut last_failed) = (0usize, None::<String>, false);
        for _ in 0..self.setup.settings.max_turns {
            let asked = Instant::now();
            let text = match (&self.teacher, script) {
                (Teacher::Scripted, Some(script)) => match script.turn(cells, last_output.as_deref(), last_failed) {
                    Some(turn) => turn,
                    None => {
                        t.end_reason = "teacher_gave_up".into();
                        break;
                    }
                },
                (Teacher::Model { client, model }, _) => {
                    let view: Vec<Message> = opening.iter().chain(&t.messages[opening.len()..]).cloned().collect();
                    let body = model.config.request_body(&view, 1);
                    // Each sample its own seed: the same seed (or none, on a deterministic
                    // endpoint) would make the samples one sample repeated.
                    let seed = sample_seed(&model.config, self.cx.seed, sample, self.setup.seed_every_sample);
                    match cached_sample(self.cx, client, &body, seed, sample).await {
                        Ok((completion, hit)) => {
                            self.tally.add("llm_cache_hits", hit as u64);
                            t.prompt_tokens += completion.prompt_tokens;
                            t.completion_tokens += completion.completion_tokens;
                            close_turn(completion.texts.first().map(String::as_str).unwrap_or(""))
                        }
                        Err(Error::Stage { source, .. }) => return Ok(Err(source.to_string())),
                        Err(e) => return Err(e),
                    }
                }
                (Teacher::Policy(policy), _) => {
                    let view: Vec<Message> = opening.iter().chain(&t.messages[opening.len()..]).cloned().collect();
                    let seed = turn_seed(self.cx.seed, &task.parent, sample, t.turns);
                    match policy.turn(&view, seed).await {
                        Ok(turn) => {
                            t.prompt_tokens += turn.prompt_tokens;
                            t.completion_tokens += turn.completion_tokens;
                            close_turn(&turn.text)
                        }
                        Err(why) => return Ok(Err(why)),
                    }
                }
                (Teacher::Scripted, None) => return Ok(Err("no script".into())),
            };
            let teacher_ms = asked.elapsed().as_secs_f64() * 1e3;
            t.turns += 1;
            let action = parse_action(&text);
            t.messages.push(Message::new("assistant", text));
            match action {
                Action::Answer(answer) => {
                    t.steps.push(Step {
                        action: "answer".into(),
                        status: None,
                        teacher_ms,
                        exec_ms: 0.0,
                        truncated: false,
                    });
                    t.result_csv = result_csv(scratch, &answer).filter(|_| task.is_sql() || task.table_answer);
                    t.final_answer = Some(answer);
                    t.end_reason = "answer".into();
                    break;
                }
                Action::Invalid(why) => {
                    self.tally.add("invalid_turns", 1);
                    t.steps.push(Step {
                        action: "invalid".into(),
                        status: None,
                        teacher_ms,
                        exec_ms: 0.0,
                        truncated: false,
                    });
                    t.messages.push(Message::new("user", interpreter(&corrective(&why))));
                }
                Action::Code(code) => {
                    let worker = match &mut worker {
                        Some(w) => w,
                        None => worker.insert(
                            Worker::start(self.sandbox.clone(), spec.clone())
                                .await
                                .map_err(|e| Error::stage(&self.cx.name, e))?,
                        ),
                    };
                    let cell: Cell = worker.run(&code).await.map_err(|e| Error::stage(&self.cx.name, e))?;
                    cells += 1;
                    self.tally.add("cells", 1);
                    self.tally.add(&format!("cells_{}", status_name(&cell)), 1);
                    let limits = &self.setup.settings.sandbox;
                    let (observation, truncated) = cell.observation(limits.observation_head, limits.observation_tail);
                    t.worker_restarts += cell.state_lost() as u32;
                    last_failed = cell.error.is_some();
                    last_output = Some(cell.output.clone());
                    t.steps.push(Step {
                        action: "code".into(),
                        status: Some(status_name(&cell).into()),
                        teacher_ms,
                        exec_ms: cell.elapsed_ms,
                        truncated,
                    });
                    t.messages.push(Message::new("user", interpreter(&observation)));
                }
            }
        }
        if let Some(w) = &worker {
            self.tally.add("workers_started", u64::from(w.starts()));
        }
        Ok(Ok(()))
    }

    fn worker_spec(&self, task: &Task, scratch: &Path) -> WorkerSpec {
        let path = self.cx.pipeline.resolve(&task.about.path);
        let (data, database) = if task.is_sql() {
            (Vec::new(), Some(path))
        } else {
            (vec![DataFile { name: task.file_name(), path }], None)
        };
        let more =
            task.more_files.iter().map(|f| DataFile { name: task::file_name(f), path: self.cx.pipeline.resolve(f) });
        let data = data.into_iter().chain(more).collect();
        WorkerSpec { scratch: scratch.to_path_buf(), data, database, limits: self.setup.settings.sandbox.clone() }
    }
}

/// The seed of turn `turn` of sample `sample` of the task `parent`: every turn of every
/// rollout its own, the same on a rerun.
fn turn_seed(pipeline_seed: u64, parent: &str, sample: u32, turn: u32) -> u64 {
    let hash = blake3::hash(format!("{pipeline_seed}\0{parent}\0{sample}\0{turn}").as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn status_name(cell: &Cell) -> &'static str {
    match cell.status {
        kiln_sandbox::CellStatus::Ok => "ok",
        kiln_sandbox::CellStatus::Error => "error",
        kiln_sandbox::CellStatus::Timeout => "timeout",
        kiln_sandbox::CellStatus::Killed => "killed",
        kiln_sandbox::CellStatus::Crashed => "crashed",
    }
}

/// The CSV named in `answer` (the last one that is a regular file of the scratch folder), capped.
/// It is opened without following links (a cell could link a host file there).
fn result_csv(scratch: &Path, answer: &str) -> Option<String> {
    let bytes = answer
        .split(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\'' | '(' | ')' | ',' | '[' | ']'))
        .map(|w| w.trim_end_matches(['.', ':', ';']))
        .filter(|w| w.ends_with(".csv"))
        .filter_map(|w| kiln_sandbox::scratch::read_file(scratch, w.trim_start_matches("./"), RESULT_CSV_BYTES).ok())
        .next_back()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The run's sandbox (probed once per run and isolation), with the managed Python environment
/// created first if needed.
async fn sandbox(cx: &StageCx, isolation: Option<Isolation>) -> Result<Arc<Sandbox>> {
    let shared = cx.shared.clone();
    let name = cx.name.clone();
    let key = format!("sandbox\0{isolation:?}");
    tokio::task::spawn_blocking(move || {
        shared.get_or_try_insert(&key, || Sandbox::new(PythonEnv::ensure()?, isolation))
    })
    .await
    .map_err(|e| Error::Internal(format!("sandbox start-up: {e}")))?
    .map_err(|e| Error::stage(&name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_csv_is_the_last_regular_file_the_answer_names() {
        let scratch = tempfile::tempdir().unwrap();
        std::fs::write(scratch.path().join("a.csv"), "x\n1\n").unwrap();
        std::fs::create_dir(scratch.path().join("out")).unwrap();
        std::fs::write(scratch.path().join("out/b.csv"), "y\n2\n").unwrap();
        let csv = |answer: &str| result_csv(scratch.path(), answer);
        assert_eq!(csv("Saved to `a.csv`.").as_deref(), Some("x\n1\n"));
        assert_eq!(csv("first a.csv, then ./out/b.csv").as_deref(), Some("y\n2\n"));
        assert_eq!(csv("see missing.csv and a.csv").as_deref(), Some("x\n1\n"), "names that are not files are skipped");
        assert_eq!(csv("no file here"), None);
        assert_eq!(csv("../a.csv"), None, "never outside the scratch folder");
    }

    #[test]
    fn a_linked_result_csv_is_not_read() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.csv"), "secret\n").unwrap();
        let scratch = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.csv"), scratch.path().join("r.csv")).unwrap();
        assert_eq!(result_csv(scratch.path(), "r.csv"), None);
    }
}
