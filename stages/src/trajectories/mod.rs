//! `trajectories`: knowledge-augmented trajectory sampling (RECIPE section 5).
//!
//! For each question, `n` independent trajectories: the teacher gets the protocol's system
//! prompt (`templates/trajectory_system.j2`) with the category's procedural knowledge from the
//! taxonomy, then the question and where its data is; each `<code>` turn runs in the
//! trajectory's own persistent, isolated Python worker (`kiln-sandbox`), and the observation
//! comes back as an `<interpreter>` turn, until an `<answer>` or `max_turns`. SQLite tasks get
//! `get_db_info()` and `execute_sql()` instead of the file, and keep their result CSV.
//!
//! The teacher is a model (`model = "<name>"`, generation stopped at `</code>`/`</answer>`,
//! every request cached as it returns) or, offline, the scripted solver for `programmatic`
//! questions (`scripted = true`), which inspects the data, runs pandas code equivalent to the
//! solving query and answers from the real output.
//!
//! Every finished trajectory is cached whole: a rerun (also after kill -9) replays finished
//! trajectories without the sandbox, and unfinished ones replay their cached model turns.
//!
//! ```toml
//! [stages.trajectories]
//! kind = "trajectories"
//! inputs = ["questions"]
//! model = "teacher"        # or: scripted = true
//! n = 3                    # default 3 (1 when scripted)
//! max_turns = 10
//! sandbox = { memory_mb = 1024, cell_timeout_s = 20 }   # any field of the sandbox limits
//! ```

pub mod protocol;
mod scripted;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::{DataType, Field, Fields, SchemaRef};
use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use kiln_llm::{Client, Message, ModelConfig};
use kiln_pipeline::cache::CacheKey;
use kiln_pipeline::rows::{row_id, schema_with_lineage, to_batch, to_json_rows};
use kiln_pipeline::stage::{
    CheckCx, Estimate, FileDep, Input, InputSchema, Output, Problem, Rejection, Stage, StageCx,
};
use kiln_pipeline::{Error, Result, progress};
use kiln_sandbox::{Cell, DataFile, Isolation, Limits, PythonEnv, Sandbox, Worker, WorkerSpec};
use serde::{Deserialize, Serialize};

use crate::llm_rows::{RowRequest, cached_chat, client, estimate_rows, model_config};
use crate::taxonomy::Taxonomy;
use crate::templates::{Templates, check_template};
use protocol::{Action, STOP, close_turn, corrective, interpreter, parse_action};
use scripted::Script;

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
    /// Trajectories per question. Default: 3 with a model, 1 when scripted (it is deterministic).
    #[serde(default)]
    pub n: Option<u32>,
    /// Most assistant turns per trajectory. Default: 10.
    #[serde(default = "default_max_turns")]
    pub max_turns: u32,
    /// System prompt template. Default: `trajectory_system.j2`.
    #[serde(default = "default_template")]
    pub template: String,
    /// Sandbox limits (memory, timeouts, output and SQL caps). Default: the recipe's.
    #[serde(default)]
    pub sandbox: Limits,
    /// Isolation: `bubblewrap` or `landlock`. Default: the first that works here.
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// Trajectories in progress at once (each holds a Python worker). Default: the model's
    /// `max_concurrency`, or twice the CPU count when scripted.
    #[serde(default)]
    pub parallel: Option<usize>,
}

fn default_max_turns() -> u32 {
    10
}
fn default_template() -> String {
    "trajectory_system.j2".into()
}

/// Variables the system prompt template receives.
const VARIABLES: &[&str] = &["sql", "data_dir", "files", "max_turns", "procedure", "category"];
/// Input columns every question row needs.
const REQUIRED: &[&str] = &["question", "path", "format", "table"];
/// Input columns the scripted teacher needs on top.
const SCRIPTED: &[&str] = &["category", "params"];
/// Bump when the same inputs would now give other trajectories.
const VERSION: u32 = 2;
/// Most bytes of a result CSV kept in the row.
const RESULT_CSV_BYTES: usize = 64 * 1024;

/// One turn's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Step {
    /// What the turn did: `code`, `answer` or `invalid`.
    action: String,
    /// For code turns, how the cell ended (`ok`, `error`, `timeout`, `killed`, `crashed`).
    status: Option<String>,
    /// Milliseconds waiting for the teacher.
    teacher_ms: f64,
    /// Milliseconds running the cell.
    exec_ms: f64,
    /// The observation was cut.
    truncated: bool,
}

/// What a trajectory row says about its question (the columns it carries from its input).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct About {
    question: String,
    category: Option<String>,
    path: String,
    format: String,
    table: String,
    gold_answer: Option<String>,
    difficulty: Option<u32>,
}

/// One output row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Trajectory {
    row_id: String,
    parent_ids: Vec<String>,
    #[serde(flatten)]
    about: About,
    sample: u32,
    teacher: String,
    messages: Vec<Message>,
    final_answer: Option<String>,
    /// `answer`, `max_turns` or `teacher_gave_up` (the scripted teacher after a failed cell).
    end_reason: String,
    turns: u32,
    steps: Vec<Step>,
    /// Workers that died or were killed during the trajectory (state was lost each time).
    worker_restarts: u32,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// SQL tasks: the CSV the answer names, as written by `execute_sql`.
    result_csv: Option<String>,
}

fn schema() -> SchemaRef {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let maybe = |name: &str| Field::new(name, DataType::Utf8, true);
    let message = Fields::from(vec![text("role"), text("content")]);
    let step = Fields::from(vec![
        text("action"),
        maybe("status"),
        Field::new("teacher_ms", DataType::Float64, false),
        Field::new("exec_ms", DataType::Float64, false),
        Field::new("truncated", DataType::Boolean, false),
    ]);
    let list = |name: &str, item: Fields| {
        Field::new(name, DataType::List(Arc::new(Field::new("item", DataType::Struct(item), false))), false)
    };
    schema_with_lineage(vec![
        text("question"),
        maybe("category"),
        text("path"),
        text("format"),
        text("table"),
        maybe("gold_answer"),
        Field::new("difficulty", DataType::UInt32, true),
        Field::new("sample", DataType::UInt32, false),
        text("teacher"),
        list("messages", message),
        maybe("final_answer"),
        text("end_reason"),
        Field::new("turns", DataType::UInt32, false),
        list("steps", step),
        Field::new("worker_restarts", DataType::UInt32, false),
        Field::new("prompt_tokens", DataType::UInt64, false),
        Field::new("completion_tokens", DataType::UInt64, false),
        maybe("result_csv"),
    ])
}

/// One question, as the stage reads it.
#[derive(Debug, Clone)]
pub(crate) struct Task {
    parent: String,
    about: About,
    params: serde_json::Value,
    query: Option<String>,
    /// A rescue round and the judge's critique of the earlier answers (see `judge`).
    critique: Option<(u32, String)>,
}

impl Task {
    fn from_row(row: &serde_json::Map<String, serde_json::Value>) -> Self {
        let text = |k: &str| row.get(k).and_then(|v| v.as_str()).map(str::to_string);
        Task {
            parent: text("row_id").unwrap_or_default(),
            about: About {
                question: text("question").unwrap_or_default(),
                category: text("category"),
                path: text("path").unwrap_or_default(),
                format: text("format").unwrap_or_default(),
                table: text("table").unwrap_or_default(),
                gold_answer: text("answer"),
                difficulty: row.get("difficulty").and_then(|v| v.as_u64()).map(|d| d as u32),
            },
            params: text("params").and_then(|p| serde_json::from_str(&p).ok()).unwrap_or_default(),
            query: text("query"),
            critique: None,
        }
    }

    /// The question a trajectory row answered, to sample it again after `critique`.
    pub(crate) fn again(row: &serde_json::Map<String, serde_json::Value>, round: u32, critique: &str) -> Self {
        let mut task = Task::from_row(row);
        task.parent = row
            .get("parent_ids")
            .and_then(|p| p.get(0))
            .and_then(|p| p.as_str())
            .map(str::to_string)
            .unwrap_or(task.parent);
        task.about.gold_answer = row.get("gold_answer").and_then(|v| v.as_str()).map(str::to_string);
        task.critique = Some((round, critique.to_string()));
        task
    }

    fn is_sql(&self) -> bool {
        self.about.format == "sqlite"
    }

    /// The data file's name inside the sandbox.
    fn file_name(&self) -> String {
        Path::new(&self.about.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "data".into())
    }

    /// The user message: the question and where its data is.
    fn prompt(&self) -> String {
        let name = self.file_name();
        let data = match self.about.format.as_str() {
            "sqlite" => {
                format!(
                    "The SQLite database `{name}`, table `{}`: use get_db_info() and execute_sql().",
                    self.about.table
                )
            }
            "xlsx" => format!("`data/{name}` (Excel workbook), sheet `{}`.", self.about.table),
            other => format!("`data/{name}` ({}).", other.to_uppercase()),
        };
        let mut prompt = format!("{}\n\nData: {data}", self.about.question);
        if let Some((_, critique)) = &self.critique {
            prompt.push_str(&format!(
                "\n\nEarlier attempts at this question gave answers that did not agree. A reviewer said: {critique}\nSolve it again carefully, checking each step against the data."
            ));
        }
        prompt
    }
}

/// Who writes the assistant turns.
enum Teacher {
    Model { name: String, client: Arc<Client>, config: Box<ModelConfig> },
    Scripted,
}

impl Teacher {
    fn name(&self) -> String {
        match self {
            Teacher::Model { name, .. } => name.clone(),
            Teacher::Scripted => "scripted".into(),
        }
    }
}

/// Cumulative counters of the stage.
#[derive(Debug, Default)]
struct Tally(std::sync::Mutex<BTreeMap<String, u64>>);

impl Tally {
    fn add(&self, name: &str, n: u64) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(name.into()).or_default() += n;
    }
}

impl Trajectories {
    /// The teacher, templates, taxonomy and sandbox every trajectory of a run uses.
    pub(crate) async fn prepare<'a>(&'a self, cx: &'a StageCx) -> Result<Run<'a>> {
        let fail = |e: String| Error::stage(&cx.name, e);
        let teacher = match (&self.model, self.teacher_config(&cx.pipeline).map_err(|p| fail(p.message))?) {
            (Some(name), Some(config)) => {
                Teacher::Model { name: name.clone(), client: client(cx, name)?, config: Box::new(config) }
            }
            _ => Teacher::Scripted,
        };
        Ok(Run {
            cx,
            stage: self,
            teacher,
            templates: Templates::load(cx.pipeline.templates.as_deref(), &[&self.template]).map_err(fail)?,
            taxonomy: Taxonomy::load(cx.pipeline.taxonomy.as_deref()).map_err(fail)?,
            sandbox: sandbox(cx, self.isolation).await?,
            tally: Tally::default(),
        })
    }

    fn n(&self) -> u32 {
        self.n.unwrap_or(if self.scripted { 1 } else { 3 })
    }

    fn teacher_config(&self, cx: &CheckCx) -> Result<Option<ModelConfig>, Problem> {
        let Some(name) = &self.model else { return Ok(None) };
        let mut config = model_config(cx, name)?;
        config.stop = STOP.iter().map(|s| s.to_string()).collect();
        Ok(Some(config))
    }

    fn system_prompt(&self, templates: &Templates, taxonomy: &Taxonomy, task: &Task) -> Result<String, String> {
        let category = task.about.category.as_deref().and_then(|c| taxonomy.get(c));
        let files = if task.is_sql() {
            vec![format!("{} (SQLite; reach it only through the SQL tools)", task.file_name())]
        } else {
            vec![task.file_name()]
        };
        templates.render(
            &self.template,
            serde_json::json!({
                "sql": task.is_sql(),
                "data_dir": "data/",
                "files": files,
                "max_turns": self.max_turns,
                "procedure": category.map(|c| c.procedure.clone()).unwrap_or_default(),
                "category": category.map(|c| c.name.clone()).unwrap_or_default(),
            }),
        )
    }

    fn tasks(&self, input: &Input) -> Result<Vec<Task>> {
        Ok(to_json_rows(&input.read()?)?.iter().map(Task::from_row).collect())
    }

    /// The first two messages of every trajectory of `task`.
    fn opening(&self, templates: &Templates, taxonomy: &Taxonomy, task: &Task) -> Result<Vec<Message>, String> {
        Ok(vec![
            Message::new("system", self.system_prompt(templates, taxonomy, task)?),
            Message::new("user", task.prompt()),
        ])
    }
}

/// What one trajectory run needs, shared by all of them.
pub(crate) struct Run<'a> {
    cx: &'a StageCx,
    stage: &'a Trajectories,
    teacher: Teacher,
    templates: Templates,
    taxonomy: Taxonomy,
    sandbox: Arc<Sandbox>,
    tally: Tally,
}

impl Run<'_> {
    /// `n` trajectories of each task, in task then sample order, within the parallelism limit.
    pub(crate) async fn sample(&self, tasks: &[Task]) -> Vec<Result<Result<Trajectory, Rejection>>> {
        let parallel = self.stage.parallel.unwrap_or(match &self.teacher {
            Teacher::Model { config, .. } => config.max_concurrency.max(1),
            Teacher::Scripted => 2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        });
        let jobs: Vec<(usize, u32)> = (0..tasks.len()).flat_map(|t| (0..self.stage.n()).map(move |s| (t, s))).collect();
        let bar = progress::bar(&self.cx.name, jobs.len() as u64);
        let results = stream::iter(jobs)
            .map(|(task, sample)| {
                let (bar, task) = (&bar, &tasks[task]);
                async move {
                    let r = self.trajectory(task, sample).await;
                    bar.inc(1);
                    r
                }
            })
            .buffered(parallel)
            .collect()
            .await;
        bar.finish_and_clear();
        results
    }

    /// Counters of what the run did (sandbox cells, cache hits...).
    pub(crate) fn counters(self) -> BTreeMap<String, u64> {
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
        let opening = match self.stage.opening(&self.templates, &self.taxonomy, task) {
            Ok(m) => m,
            Err(e) => return Ok(Err(reject("template_failed", e))),
        };
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
            Teacher::Model { .. } => None,
        };
        let teacher_id = match &self.teacher {
            Teacher::Model { config, .. } => config.request_body(&[], 1),
            Teacher::Scripted => serde_json::json!({ "scripted": &script }),
        };
        let key = CacheKey::new(
            &format!("trajectory/{VERSION}"),
            &(
                &teacher_id,
                &opening,
                sample,
                self.stage.max_turns,
                &self.stage.sandbox,
                &task.about.path,
                &task.about.table,
            ),
        )?;
        if let Some(hit) = self.cx.cache.get::<Trajectory>(&key)? {
            self.tally.add("trajectories_cached", 1);
            return Ok(Ok(Trajectory { row_id: id, ..hit }));
        }
        let mut t = Trajectory {
            row_id: id.clone(),
            parent_ids: vec![task.parent.clone()],
            about: task.about.clone(),
            sample,
            teacher: self.teacher.name(),
            messages: opening,
            final_answer: None,
            end_reason: "max_turns".into(),
            turns: 0,
            steps: Vec::new(),
            worker_restarts: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            result_csv: None,
        };
        let scratch = self.cx.pipeline.output_dir.join("_scratch").join(&self.cx.name).join(&id);
        let outcome = self.run_turns(task, sample, script.as_ref(), &scratch, &mut t).await;
        let _ = std::fs::remove_dir_all(&scratch);
        let _ = std::fs::remove_dir_all(scratch.with_file_name(format!("{id}.data")));
        match outcome? {
            Err(why) => Ok(Err(reject("teacher_failed", why))),
            Ok(()) => {
                self.tally.add(&format!("ended_{}", t.end_reason), 1);
                self.cx.cache.put(&key, "trajectory", &t)?;
                Ok(Ok(t))
            }
        }
    }

    /// The turn loop. `Ok(Err(why))` when the model could not be reached.
    async fn run_turns(
        &self,
        task: &Task,
        sample: u32,
        script: Option<&Script>,
        scratch: &Path,
        t: &mut Trajectory,
    ) -> Result<Result<(), String>> {
        let _ = std::fs::remove_dir_all(scratch);
        let spec = self.worker_spec(task, scratch);
        let mut worker: Option<Worker> = None;
        let (mut cells, mut last_output, mut last_failed) = (0usize, None::<String>, false);
        for _ in 0..self.stage.max_turns {
            let asked = Instant::now();
            let text = match (&self.teacher, script) {
                (Teacher::Scripted, Some(script)) => match script.turn(cells, last_output.as_deref(), last_failed) {
                    Some(turn) => turn,
                    None => {
                        t.end_reason = "teacher_gave_up".into();
                        break;
                    }
                },
                (Teacher::Model { client, config, .. }, _) => {
                    let body = config.request_body(&t.messages, 1);
                    match cached_chat(self.cx, client, &body, sample).await {
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
                    t.result_csv = result_csv(scratch, &answer).filter(|_| task.is_sql());
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
                    let limits = &self.stage.sandbox;
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
        WorkerSpec { scratch: scratch.to_path_buf(), data, database, limits: self.stage.sandbox.clone() }
    }
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

#[async_trait]
impl Stage for Trajectories {
    fn models(&self) -> Vec<String> {
        self.model.iter().cloned().collect()
    }

    fn version(&self) -> u32 {
        VERSION
    }

    fn validate(&self, cx: &CheckCx) -> Vec<Problem> {
        let mut problems = Vec::new();
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
        if let Err(p) = self.teacher_config(cx) {
            problems.push(p);
        }
        if self.n() == 0 {
            problems.push(Problem::new("n", "`n` must be at least 1"));
        }
        if self.scripted && self.n() > 1 {
            problems.push(
                Problem::new("n", "scripted trajectories are deterministic: `n` above 1 would repeat them")
                    .help("remove `n`, or use a model teacher"),
            );
        }
        if self.max_turns == 0 {
            problems.push(Problem::new("max_turns", "`max_turns` must be at least 1"));
        }
        if self.parallel == Some(0) {
            problems.push(Problem::new("parallel", "`parallel` must be at least 1"));
        }
        for (key, message) in self.sandbox.problems() {
            problems.push(Problem::new(&format!("sandbox.{key}"), message));
        }
        problems.extend(check_template(cx, &self.template, VARIABLES, "trajectories"));
        if let Err(e) = Taxonomy::load(cx.taxonomy.as_deref()) {
            problems.push(Problem::new("", e));
        }
        problems
    }

    fn files(&self, cx: &CheckCx) -> Vec<FileDep> {
        let mut files =
            Templates::load(cx.templates.as_deref(), &[&self.template]).map(|t| t.files()).unwrap_or_default();
        files.extend(Taxonomy::load(cx.taxonomy.as_deref()).map(|t| t.files()).unwrap_or_default());
        files
    }

    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        let [input] = inputs else {
            return Err(vec![Problem::new(
                "inputs",
                format!("a `trajectories` stage reads exactly one stage of questions, got {}", inputs.len()),
            )]);
        };
        let needed = REQUIRED.iter().chain(if self.scripted { SCRIPTED } else { &[] });
        let missing: Vec<&str> = needed.filter(|c| input.schema.field_with_name(c).is_err()).copied().collect();
        if !missing.is_empty() {
            let why = if self.scripted { " (scripted trajectories read `programmatic` rows)" } else { "" };
            return Err(vec![
                Problem::new("inputs", format!("`{}` lacks the columns {}{why}", input.name, missing.join(", ")))
                    .help("feed it questions from `programmatic`, `synthesize` or `compose`, which have them"),
            ]);
        }
        Ok(schema())
    }

    async fn estimate(&self, cx: &StageCx, inputs: &[Input]) -> Result<Option<Estimate>> {
        let Some(config) = self.teacher_config(&cx.pipeline).map_err(|p| Error::stage(&cx.name, p.message))? else {
            return Ok(None);
        };
        let templates = Templates::load(cx.pipeline.templates.as_deref(), &[&self.template])
            .map_err(|e| Error::stage(&cx.name, e))?;
        let taxonomy = Taxonomy::load(cx.pipeline.taxonomy.as_deref()).map_err(|e| Error::stage(&cx.name, e))?;
        let mut requests = Vec::new();
        for task in self.tasks(&inputs[0])? {
            let messages = self.opening(&templates, &taxonomy, &task).map_err(|e| Error::stage(&cx.name, e))?;
            for sample in 0..self.n() {
                requests.push(RowRequest { row_id: task.parent.clone(), messages: messages.clone(), sample });
            }
        }
        // Each trajectory makes up to `max_turns` requests; only the first is known in advance.
        estimate_rows(cx, &config, &requests, u64::from(self.max_turns)).map(Some)
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        let tasks = self.tasks(&inputs[0])?;
        let run = self.prepare(cx).await?;
        let results = run.sample(&tasks).await;

        let mut out = Output::default();
        let mut rows = Vec::new();
        let mut retryable = 0;
        for result in results {
            match result? {
                Ok(t) => rows.push(t),
                Err(rejection) => {
                    retryable += u64::from(rejection.reason == "teacher_failed");
                    out.rejections.push(rejection);
                }
            }
        }
        let prompt: u64 = rows.iter().map(|t| t.prompt_tokens).sum();
        let completion: u64 = rows.iter().map(|t| t.completion_tokens).sum();
        let cost = match &run.teacher {
            Teacher::Model { config, .. } => Some(config.cost(prompt, completion)),
            Teacher::Scripted => None,
        };
        let isolation = format!("isolation_{}", run.sandbox.mode());
        let mut counters = run.counters();
        counters.insert("trajectories".into(), rows.len() as u64);
        counters.insert(isolation, 1);
        if retryable > 0 {
            counters.insert(kiln_pipeline::executor::RETRYABLE.into(), retryable);
        }
        counters.insert("prompt_tokens".into(), prompt);
        counters.insert("completion_tokens".into(), completion);
        if let Some(cost) = cost {
            counters.insert("cost_micro_usd".into(), (cost * 1e6).round() as u64);
        }
        out.counters = counters;
        out.batches = vec![to_batch(&schema(), &rows)?];
        Ok(out)
    }
}
