//! The [`Stage`] trait every stage kind implements, and what the executor hands it.
//!
//! A stage kind has two sides, as vector's components do. Its [`Config`] is the parameters as
//! written in `[stages.<name>]` (deserialized with `deny_unknown_fields`); [`Config::build`]
//! checks them against the pipeline and resolves them once (templates, taxonomy, model settings,
//! defaults) into the [`Stage`] that runs. Kinds with nothing to resolve implement [`Plain`]
//! and run their checked parameters as they are.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use crate::budget::Budget;
use crate::cache::RowCache;
use crate::error::Result;
use crate::store;

/// A kind's parameters, as written: what [`crate::registry::Kind::of`] deserializes.
pub trait Config: std::fmt::Debug + Send + Sync + 'static {
    /// Checks the parameters against the pipeline, pushing every problem (at its key) to
    /// `problems`, and resolves them into the stage that runs: templates and taxonomy loaded,
    /// model settings read, defaults applied. Called once per run, before any schema is
    /// checked. Returns the stage whenever it could be built, also with problems (its inputs
    /// are then still checked, so that one `kiln check` reports everything); the plan runs
    /// only when no stage has any.
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>>;
}

/// Parameters that run as they are: nothing to resolve, so the built stage is the checked
/// parameters themselves. Implementing it implements [`Config`].
pub trait Plain: Stage + Clone + 'static {
    /// Every problem of the parameters, at its key (none by default).
    fn problems(&self, _cx: &CheckCx) -> Vec<Problem> {
        Vec::new()
    }
}

impl<T: Plain> Config for T {
    fn build(&self, cx: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
        problems.extend(self.problems(cx));
        Some(Box::new(self.clone()))
    }
}

/// One kind of stage, built by its [`Config`]. Only `output_schema` and `run` are required.
#[async_trait]
pub trait Stage: Debug + Send + Sync {
    /// Implementation version: bump it when the same parameters would now give different rows,
    /// so that cached outputs are invalidated.
    fn version(&self) -> u32 {
        1
    }

    /// True when the output depends on the pipeline seed, which then joins the fingerprint.
    fn seeded(&self) -> bool {
        false
    }

    /// Names of the `[models]` tables the stage calls: their settings are part of the stage
    /// fingerprint, so changing a model (or its temperature) reruns the stages that use it.
    fn models(&self) -> Vec<String> {
        Vec::new()
    }

    /// Files the output depends on; they are part of the stage fingerprint.
    fn files(&self, _cx: &CheckCx) -> Vec<FileDep> {
        Vec::new()
    }

    /// Checks the inputs' schemas and returns the output schema, which must start with the
    /// lineage columns of [`crate::rows::lineage_fields`].
    async fn output_schema(&self, cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>>;

    /// Produces the stage's rows (and rejections) from its inputs.
    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output>;

    /// What running would cost in LLM requests, without sending any (for `kiln run
    /// --dry-run`). `None` for stages that call no model.
    async fn estimate(&self, _cx: &StageCx, _inputs: &[Input]) -> Result<Option<Estimate>> {
        Ok(None)
    }
}

/// What validation (and a running stage) knows about the pipeline.
#[derive(Debug, Clone, Default)]
pub struct CheckCx {
    /// Folder of the pipeline file: relative paths in parameters resolve against it.
    pub base_dir: PathBuf,
    /// The pipeline's own taxonomy folder (`[pipeline] taxonomy`), resolved; `None` for the
    /// built-in taxonomy.
    pub taxonomy: Option<PathBuf>,
    /// The pipeline's own templates folder (`[pipeline] templates`), resolved.
    pub templates: Option<PathBuf>,
    /// The `[models.<name>]` tables, as JSON (`null` when there are none).
    pub models: serde_json::Value,
    /// Where the run writes its datasets.
    pub output_dir: PathBuf,
    /// The names of the pipeline's stages (each a dataset folder in `output_dir`).
    pub stages: Vec<String>,
}

impl CheckCx {
    /// Resolves a path written in the pipeline file.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        self.base_dir.join(path)
    }
}

/// A file a stage's output depends on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileDep {
    /// Small files (templates, taxonomy): fingerprinted by content.
    Contents(PathBuf),
    /// Data files: fingerprinted by size and modification time, so checks stay fast.
    Stat(PathBuf),
    /// Files compiled into kiln (the built-in taxonomy and templates): a name and the
    /// contents.
    Builtin(String, &'static str),
}

/// A problem with a stage's parameters, located by its key path inside the stage table
/// (e.g. `["paths", "1"]`); an empty path points at the stage name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path inside `[stages.<name>]`.
    pub at: Vec<String>,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
}

impl Problem {
    /// A problem at `at` (a dotted key path such as `paths.1`, or `""` for the stage itself).
    pub fn new(at: &str, message: impl std::fmt::Display) -> Self {
        let at = at.split('.').filter(|s| !s.is_empty()).map(str::to_string).collect();
        Problem { at, message: message.to_string(), help: None }
    }

    /// Adds a hint.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// A problem met while running (not at `kiln check`) becomes an error that keeps its hint.
impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match &self.help {
            Some(help) => write!(f, " ({help})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Problem {}

/// The schema of one input, as validation sees it.
#[derive(Debug, Clone)]
pub struct InputSchema {
    /// Name of the upstream stage.
    pub name: String,
    /// Its kind (for messages naming where a column should have come from).
    pub kind: String,
    /// Its output schema.
    pub schema: SchemaRef,
}

/// The finished dataset of an upstream stage.
#[derive(Debug, Clone)]
pub struct Input {
    /// Name of the upstream stage.
    pub name: String,
    /// Its dataset folder.
    pub dir: PathBuf,
    /// Its schema.
    pub schema: SchemaRef,
}

impl Input {
    /// Reads every row of the dataset.
    pub fn read(&self) -> Result<Vec<RecordBatch>> {
        store::read_dataset(&self.dir)
    }

    /// The dataset's row count, from its manifest.
    pub fn row_count(&self) -> Option<u64> {
        store::read_manifest(&self.dir).ok().flatten().map(|m| m.row_count)
    }

    /// The rows of the dataset one record batch at a time, reading one part file at a time:
    /// for stages whose memory must not grow with their input.
    pub fn batches(&self) -> Result<impl Iterator<Item = Result<RecordBatch>> + Send + use<>> {
        store::dataset_batches(&self.dir)
    }
}

/// Where a running stage's rows go as it produces them ([`StageCx::emit`]): the dataset's part
/// writer when the executor runs the stage; nowhere in a context made for an estimate.
#[derive(Debug, Default)]
pub struct Sink(std::sync::Mutex<Option<store::PartWriter>>);

impl Sink {
    /// A sink writing into `parts`.
    pub fn parts(parts: store::PartWriter) -> Self {
        Sink(std::sync::Mutex::new(Some(parts)))
    }

    fn push(&self, batch: RecordBatch) -> Result<()> {
        match &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(parts) => parts.push(batch),
            None => Err(crate::Error::Internal("rows emitted by a stage that is not running".into())),
        }
    }

    /// The part writer, once the stage is done.
    pub fn into_parts(self) -> Option<store::PartWriter> {
        self.0.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a running stage can use.
#[derive(Debug, Clone)]
pub struct StageCx {
    /// Name of the stage.
    pub name: String,
    /// The pipeline's folders (as validation saw them).
    pub pipeline: CheckCx,
    /// The pipeline seed.
    pub seed: u64,
    /// Row-level cache for expensive per-row work.
    pub cache: Arc<RowCache>,
    /// What the run may still spend on LLM requests.
    pub budget: Arc<Budget>,
    /// Resources shared by every stage of the run (such as one client per model, so that a
    /// model's concurrency limit holds across stages).
    pub shared: Arc<Shared>,
    /// Files the stage wrote outside its dataset folder (exports, reports), recorded with
    /// [`StageCx::wrote`]: the manifest lists them, and a later run re-creates them when they
    /// are missing or changed.
    pub written: Arc<std::sync::Mutex<Vec<PathBuf>>>,
    /// Where rows emitted while the stage runs go ([`StageCx::emit`]).
    pub sink: Arc<Sink>,
}

impl StageCx {
    /// Hands rows of the output to the dataset now, in output order, before the rows of the
    /// returned [`Output`]: a stage that emits as it goes holds only what is in flight.
    pub fn emit(&self, batch: RecordBatch) -> Result<()> {
        self.sink.push(batch)
    }

    /// Records that the stage wrote `path` (outside its dataset folder).
    pub fn wrote(&self, path: &Path) {
        self.written.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
    }
}

/// Run-wide resources, created on first use and keyed by name.
#[derive(Debug, Default)]
pub struct Shared(std::sync::Mutex<std::collections::HashMap<String, Arc<dyn std::any::Any + Send + Sync>>>);

impl Shared {
    /// The resource under `key`, created with `make` the first time. Fails if `make` fails or
    /// a resource of another type is stored under `key`.
    pub fn get_or_try_insert<T: Send + Sync + 'static, E>(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = map.get(key).and_then(|v| v.clone().downcast::<T>().ok()) {
            return Ok(found);
        }
        let made = Arc::new(make()?);
        map.insert(key.to_string(), made.clone());
        Ok(made)
    }
}

/// A row a stage refused, with why. It goes to the rejection ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    /// Id of the rejected row (or of the item that would have been one).
    pub row_id: String,
    /// Short machine-readable reason, e.g. `too_few_rows`.
    pub reason: String,
    /// Human-readable detail naming the file and values.
    pub detail: String,
}

/// The LLM cost of running a stage, estimated without sending anything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Estimate {
    /// Requests the stage would make.
    pub requests: u64,
    /// Of those, requests already in the row cache (free).
    pub cached: u64,
    /// Prompt tokens of the requests to send (about 4 characters a token).
    pub prompt_tokens: u64,
    /// Completion tokens at most (`max_tokens` per request, 512 when unset).
    pub completion_tokens: u64,
    /// Cost in USD of those tokens at the model's prices.
    pub cost_usd: f64,
    /// True when later steps depend on earlier replies, so only a rough count is possible.
    pub approximate: bool,
}

impl Estimate {
    /// The estimate of doing both `self` and `other`.
    pub fn plus(&self, other: &Estimate) -> Estimate {
        Estimate {
            requests: self.requests + other.requests,
            cached: self.cached + other.cached,
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            cost_usd: self.cost_usd + other.cost_usd,
            approximate: self.approximate || other.approximate,
        }
    }
}

/// What a stage produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Rows, in a deterministic order, matching the declared output schema.
    pub batches: Vec<RecordBatch>,
    /// Rows refused, with reasons.
    pub rejections: Vec<Rejection>,
    /// Named counts written to the manifest (cache hits, items computed...).
    pub counters: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_met_while_running_keeps_its_hint() {
        let problem = Problem::new("model", "unknown model `techer`").help("did you mean `teacher`?");
        let e = crate::Error::stage("queries", problem);
        assert_eq!(e.to_string(), "stage `queries` failed: unknown model `techer` (did you mean `teacher`?)");
        assert_eq!(Problem::new("", "plain").to_string(), "plain");
    }
}
