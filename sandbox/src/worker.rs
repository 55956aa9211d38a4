//! One persistent Python worker and the JSON-lines exchange with it.
//!
//! kiln sends `{"code", "timeout", "cap"}`; the worker runs the cell and answers `done` with
//! its captured output and the last traceback line. During a cell it may ask for the SQL tools
//! (`db_info`, `sql`), which kiln serves. Anything else on the pipe, a line over the size cap,
//! the pipe closing, or the hard timeout ends the worker: its process group is killed and the
//! next cell starts a fresh one.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;

use crate::Error;
use crate::isolation::{Sandbox, WorkerSpec, pipe as os_pipe};
use crate::sql_tools::SqlTools;

/// The longest protocol line kiln accepts from a worker (its output is capped well below).
const MAX_LINE: u64 = 4 << 20;
/// How much of the worker's stderr is kept for diagnostics.
const STDERR_KEPT: usize = 4096;

/// How a cell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellStatus {
    /// It ran to the end.
    Ok,
    /// It raised an exception (reported in `error`).
    Error,
    /// The soft timeout interrupted it; the worker and its variables survive.
    Timeout,
    /// The hard timeout killed the worker; its state is lost.
    Killed,
    /// The worker died or broke the protocol during the cell; its state is lost.
    Crashed,
}

/// The result of running one cell.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cell {
    /// How it ended.
    pub status: CellStatus,
    /// Captured stdout and stderr (already capped by the worker: head, marker, tail).
    pub output: String,
    /// Characters the cell printed in all.
    pub output_chars: u64,
    /// The error: last traceback line, or what happened to the worker.
    pub error: Option<String>,
    /// Wall time of the cell.
    pub elapsed_ms: f64,
}

impl Cell {
    /// True when the worker's variables are gone after this cell.
    pub fn state_lost(&self) -> bool {
        matches!(self.status, CellStatus::Killed | CellStatus::Crashed)
    }

    /// The observation the agent reads: output and error, cut to `head` + `tail` characters
    /// around a marker, or a hint to print when there was nothing to show. The flag says
    /// whether anything was cut.
    pub fn observation(&self, head: usize, tail: usize) -> (String, bool) {
        let mut text = self.output.trim_end().to_string();
        if let Some(error) = &self.error {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(error);
        }
        if self.state_lost() {
            text.push_str(
                "\nThe Python process was restarted: every variable and import is gone; load the data again.",
            );
        }
        if text.trim().is_empty() {
            return ("[The code ran without output. Use print() to show the values you need.]".into(), false);
        }
        let cut_by_worker = (self.output.chars().count() as u64) < self.output_chars;
        let chars: Vec<char> = text.chars().collect();
        if chars.len() <= head + tail {
            return (text, cut_by_worker);
        }
        let omitted = chars.len() - head - tail;
        let head: String = chars[..head].iter().collect();
        let tail: String = chars[chars.len() - tail..].iter().collect();
        (format!("{head}\n... [{omitted} characters omitted] ...\n{tail}"), true)
    }
}

/// A message from the worker.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum FromWorker {
    Ready {},
    Done { id: String, status: String, output: String, output_chars: u64, error: Option<String> },
    DbInfo {},
    Sql { sql: String, output_path: String },
}

/// A running worker process.
struct Live {
    child: tokio::process::Child,
    pgid: i32,
    requests: pipe::Sender,
    replies: BufReader<pipe::Receiver>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // SAFETY: signalling the worker's own process group (it called setsid).
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
    }
}

/// Why an exchange with the worker ended early.
enum Broken {
    /// The worker is gone or misbehaved; the text says how.
    Worker(String),
    /// The hard timeout passed.
    Timeout,
    /// The scratch folder went over its quota; the text says how far.
    Quota(String),
}

/// A persistent Python worker for one trajectory.
pub struct Worker {
    sandbox: Arc<Sandbox>,
    spec: WorkerSpec,
    sql: Option<SqlTools>,
    live: Option<Live>,
    /// Workers started so far (1 plus restarts).
    starts: u32,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("spec", &self.spec).field("starts", &self.starts).finish()
    }
}

impl Worker {
    /// Starts a worker for `spec` and waits until it has imported pandas.
    pub async fn start(sandbox: Arc<Sandbox>, mut spec: WorkerSpec) -> Result<Self, Error> {
        // Absolute paths: the worker runs elsewhere, and Landlock mode links to the data files.
        let absolute = |p: &std::path::Path| std::path::absolute(p).map_err(|e| Error::io(p, e));
        spec.scratch = absolute(&spec.scratch)?;
        for file in &mut spec.data {
            file.path = absolute(&file.path)?;
        }
        spec.database = spec.database.as_deref().map(absolute).transpose()?;
        let sql = spec.database.clone().map(SqlTools::new);
        let mut worker = Worker { sandbox, spec, sql, live: None, starts: 0 };
        worker.live = Some(worker.spawn().await?);
        Ok(worker)
    }

    /// How many processes this worker has started (more than 1 after kills and crashes).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    async fn spawn(&mut self) -> Result<Live, Error> {
        let (request_read, request_write) = os_pipe()?;
        let (reply_read, reply_write) = os_pipe()?;
        let runner = include_str!("runner.py");
        let (cmd, _fds) = self.sandbox.command(&self.spec, &["-c", runner], &request_read, &reply_write)?;
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stderr(std::process::Stdio::piped()).kill_on_drop(true);
        let mode = self.sandbox.mode();
        let mut child = cmd.spawn().map_err(|e| Error::Spawn(format!("cannot start a {mode} worker: {e}")))?;
        drop((request_read, reply_write));
        self.starts += 1;
        let pgid = child.id().map(|p| p as i32).unwrap_or(0);
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let kept = stderr.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf).await {
                    let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                    kept.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if kept.len() > 2 * STDERR_KEPT {
                        let cut = kept.len() - STDERR_KEPT;
                        let cut = (cut..kept.len()).find(|&i| kept.is_char_boundary(i)).unwrap_or(kept.len());
                        kept.drain(..cut);
                    }
                }
            });
        }
        let requests = sender(request_write)?;
        let replies = BufReader::new(receiver(reply_read)?);
        let mut live = Live { child, pgid, requests, replies, stderr };
        let timeout = Duration::from_secs_f64(self.spec.limits.start_timeout_s);
        match tokio::time::timeout(timeout, read_message(&mut live.replies)).await {
            Ok(Ok(FromWorker::Ready {})) => Ok(live),
            Ok(Ok(other)) => Err(Error::Spawn(format!("the worker sent {other:?} before it was ready"))),
            Ok(Err(why)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), live.child.wait()).await;
                let stderr = live.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone();
                Err(Error::Spawn(format!("the worker did not start ({why}; {status:?}): {}", stderr.trim())))
            }
            Err(_) => Err(Error::Spawn(format!("the worker was not ready after {timeout:?}"))),
        }
    }

    /// Runs one cell. Failures of the code (exceptions, timeouts, a dead worker) are part of the
    /// returned [`Cell`]; only failing to start a worker is an error.
    pub async fn run(&mut self, code: &str) -> Result<Cell, Error> {
        if self.live.is_none() {
            self.live = Some(self.spawn().await?);
        }
        let started = Instant::now();
        let limits = self.spec.limits.clone();
        let hard = Duration::from_secs_f64(limits.hard_timeout_s);
        let live = self.live.as_mut().expect("started above");
        // The reply must carry this request's id: a reply forged by a cell, or one left over
        // from an earlier cell, is a broken protocol, never the next cell's observation.
        let id = request_id();
        let request = json!({"id": id, "code": code, "timeout": limits.cell_timeout_s, "cap": limits.capture_chars});
        let exchange = exchange(live, &request, self.sql.as_ref(), &self.spec);
        let quota = watch_quota(&self.spec);
        let result = match tokio::time::timeout(hard, async {
            tokio::select! {
                reply = exchange => reply,
                over = quota => Err(Broken::Quota(over)),
            }
        })
        .await
        {
            Ok(Ok(done)) => match over_quota(&self.spec).await {
                Some(over) => Err(Broken::Quota(over)),
                None => Ok(done),
            },
            Ok(broken) => broken,
            Err(_) => Err(Broken::Timeout),
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(FromWorker::Done { id: replied, .. }) if replied != id => Ok(self
                .lose(
                    CellStatus::Crashed,
                    "the worker broke the protocol (a reply to another request)".into(),
                    elapsed_ms,
                )
                .await),
            Ok(FromWorker::Done { status, output, output_chars, error, .. }) => {
                let status = match status.as_str() {
                    "ok" => CellStatus::Ok,
                    "timeout" => CellStatus::Timeout,
                    _ => CellStatus::Error,
                };
                Ok(Cell { status, output, output_chars, error, elapsed_ms })
            }
            Ok(other) => Ok(self
                .lose(CellStatus::Crashed, format!("the worker broke the protocol ({other:?})"), elapsed_ms)
                .await),
            Err(Broken::Timeout) => {
                let why = format!(
                    "TimeoutError: the cell ran longer than {} s and ignored the interruption, so its process was killed",
                    limits.hard_timeout_s
                );
                Ok(self.lose(CellStatus::Killed, why, elapsed_ms).await)
            }
            Err(Broken::Worker(why)) => Ok(self.lose(CellStatus::Crashed, why, elapsed_ms).await),
            Err(Broken::Quota(over)) => {
                let cell = self.lose(CellStatus::Killed, over, elapsed_ms).await;
                empty_scratch(&self.spec.scratch).await;
                Ok(cell)
            }
        }
    }

    /// Ends the current process (killing its group) and describes what happened to it.
    async fn lose(&mut self, status: CellStatus, why: String, elapsed_ms: f64) -> Cell {
        let mut error = why;
        if let Some(mut live) = self.live.take() {
            if status == CellStatus::Crashed {
                // A worker that died on its own is reaped first, so its real cause is reported
                // (not the kill below); one that only broke the protocol is still running.
                if let Ok(Ok(exit)) = tokio::time::timeout(Duration::from_millis(300), live.child.wait()).await {
                    error = format!("{error} ({})", describe_exit(exit));
                }
                tracing::debug!("worker stderr: {}", live.stderr.lock().unwrap_or_else(|e| e.into_inner()).trim());
            }
            // SAFETY: signalling the worker's own process group.
            unsafe { libc::kill(-live.pgid, libc::SIGKILL) };
        }
        Cell { status, output: String::new(), output_chars: 0, error: Some(error), elapsed_ms }
    }
}

/// A fresh random id for one request.
fn request_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom fills the buffer it is given; a short read leaves zeros, still unique
    // enough for matching replies (the id is not a secret: the cell can read it).
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How often the scratch folder is measured while a cell runs.
const QUOTA_POLL: Duration = Duration::from_millis(100);

/// Resolves, with the reason, once the scratch folder is over its quota while the cell runs.
async fn watch_quota(spec: &WorkerSpec) -> String {
    loop {
        tokio::time::sleep(QUOTA_POLL).await;
        if let Some(over) = over_quota(spec).await {
            return over;
        }
    }
}

/// Why the scratch folder is over its quota, or `None` when it is within it.
async fn over_quota(spec: &WorkerSpec) -> Option<String> {
    let (scratch, limits) = (spec.scratch.clone(), spec.limits.clone());
    let (max_bytes, max_files) = (limits.scratch_mb << 20, limits.scratch_files);
    let usage =
        tokio::task::spawn_blocking(move || scratch_usage(&scratch, max_bytes, max_files)).await.unwrap_or_default();
    (usage.bytes > max_bytes || usage.files > max_files).then(|| {
        format!(
            "OSError: the working directory went over its quota ({} MiB and {} files; it held {} MiB in {} files), so the process was stopped and the folder emptied",
            limits.scratch_mb,
            limits.scratch_files,
            usage.bytes >> 20,
            usage.files
        )
    })
}

/// Disk use of a scratch folder.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    /// Bytes allocated on disk.
    bytes: u64,
    /// Files, folders and links.
    files: u64,
}

/// Measures `scratch` without following links, stopping early once past either limit. The
/// data folder (a link, or bubblewrap's mount point) is not the cell's.
fn scratch_usage(scratch: &std::path::Path, max_bytes: u64, max_files: u64) -> Usage {
    use std::os::unix::fs::MetadataExt;
    let mut usage = Usage::default();
    let mut folders = vec![scratch.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            if folder == scratch && entry.file_name() == "data" {
                continue;
            }
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            usage.files += 1;
            usage.bytes += meta.blocks() * 512;
            if meta.is_dir() {
                folders.push(entry.path());
            }
            if usage.bytes > max_bytes || usage.files > max_files {
                return usage;
            }
        }
    }
    usage
}

/// Removes everything the cells wrote to `scratch` after its worker was killed. The kill takes
/// a moment to reach every thread (under bubblewrap, through its PID namespace), so the folder
/// is emptied until it stays empty.
async fn empty_scratch(scratch: &std::path::Path) {
    let scratch = scratch.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        let cells_files =
            || std::fs::read_dir(&scratch).into_iter().flatten().flatten().filter(|e| e.file_name() != "data");
        for _ in 0..40 {
            for entry in cells_files() {
                let path = entry.path();
                // remove_dir_all does not follow links; a link is removed as a file.
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
            std::thread::sleep(Duration::from_millis(25));
            if cells_files().next().is_none() {
                return;
            }
        }
    })
    .await;
}

/// How a worker process ended, in words. bubblewrap reports a child killed by signal N as
/// exit status 128 + N; that is read as the signal too.
fn describe_exit(exit: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    let signal = exit.signal().or_else(|| exit.code().filter(|c| *c > 128 && *c < 160).map(|c| c - 128));
    match (signal, exit.code()) {
        (Some(sig), _) => {
            let name = match sig {
                libc::SIGSEGV => " (SIGSEGV, a segmentation fault)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGFPE => " (SIGFPE)",
                libc::SIGKILL => " (SIGKILL)",
                _ => "",
            };
            format!("the process was killed by signal {sig}{name}")
        }
        (None, Some(code)) => format!("the process exited with status {code}"),
        (None, None) => "the process ended".into(),
    }
}

/// Sends a cell and serves the worker's SQL requests until it is done.
async fn exchange(
    live: &mut Live,
    request: &serde_json::Value,
    sql: Option<&SqlTools>,
    spec: &WorkerSpec,
) -> Result<FromWorker, Broken> {
    write_message(&mut live.requests, request).await?;
    loop {
        let reply = match read_message(&mut live.replies).await.map_err(Broken::Worker)? {
            done @ FromWorker::Done { .. } => return Ok(done),
            FromWorker::DbInfo {} => match sql {
                None => json!({"ok": false, "error": "this task has no database: get_db_info() is for SQLite tasks"}),
                Some(tools) => match tools.ddl() {
                    Ok(ddl) => json!({"ok": true, "ddl": ddl}),
                    Err(e) => json!({"ok": false, "error": e}),
                },
            },
            FromWorker::Sql { sql: statement, output_path } => match sql {
                None => json!({"ok": false, "error": "this task has no database: execute_sql() is for SQLite tasks"}),
                Some(tools) => {
                    let (tools, scratch, limits) = (tools.clone(), spec.scratch.clone(), spec.limits.clone());
                    let ran = tokio::task::spawn_blocking(move || {
                        tools.execute(
                            &statement,
                            &scratch,
                            &output_path,
                            limits.sql_max_rows,
                            Duration::from_secs_f64(limits.sql_timeout_s),
                        )
                    })
                    .await
                    .map_err(|e| Broken::Worker(format!("the SQL tool failed: {e}")))?;
                    match ran {
                        Ok(r) => {
                            json!({"ok": true, "path": r.path, "columns": r.columns, "rows": r.rows, "truncated": r.truncated})
                        }
                        Err(e) => json!({"ok": false, "error": e}),
                    }
                }
            },
            other => return Err(Broken::Worker(format!("unexpected message from the worker: {other:?}"))),
        };
        write_message(&mut live.requests, &reply).await?;
    }
}

async fn write_message(to: &mut pipe::Sender, message: &serde_json::Value) -> Result<(), Broken> {
    let mut line = message.to_string();
    line.push('\n');
    to.write_all(line.as_bytes()).await.map_err(|e| Broken::Worker(format!("the worker stopped reading ({e})")))
}

async fn read_message(from: &mut BufReader<pipe::Receiver>) -> Result<FromWorker, String> {
    let mut line = Vec::new();
    let n = from.take(MAX_LINE).read_until(b'\n', &mut line).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the worker exited".into());
    }
    if line.last() != Some(&b'\n') {
        return Err(format!("the worker sent a message over {MAX_LINE} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("the worker sent something that is not a protocol message ({e})"))
}

fn sender(fd: OwnedFd) -> Result<pipe::Sender, Error> {
    pipe::Sender::from_owned_fd(fd).map_err(|e| Error::Spawn(format!("pipe: {e}")))
}

fn receiver(fd: OwnedFd) -> Result<pipe::Receiver, Error> {
    pipe::Receiver::from_owned_fd(fd).map_err(|e| Error::Spawn(format!("pipe: {e}")))
}
