//! Shared by the sandbox tests: one sandbox per isolation mode that works on this machine,
//! and a task folder with a small data file. (Each test file uses part of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use kiln_sandbox::{Cell, DataFile, Isolation, Limits, PythonEnv, Sandbox, Worker, WorkerSpec};

/// Every isolation mode that starts here (the tests run each case in each of them). CI
/// installs bubblewrap, and its kernel has Landlock, so both run there.
pub fn sandboxes() -> Vec<Arc<Sandbox>> {
    static ALL: OnceLock<Vec<Arc<Sandbox>>> = OnceLock::new();
    ALL.get_or_init(|| {
        let env = PythonEnv::ensure().expect("the managed Python environment");
        let found: Vec<Arc<Sandbox>> = [Isolation::Bubblewrap, Isolation::Landlock]
            .into_iter()
            .filter_map(|mode| match Sandbox::new(env.clone(), Some(mode)) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    eprintln!("isolation {mode} is not available here: {e}");
                    None
                }
            })
            .collect();
        assert!(!found.is_empty(), "no isolation mode works on this machine");
        found
    })
    .clone()
}

/// Limits short enough for tests.
pub fn test_limits() -> Limits {
    Limits {
        cell_timeout_s: 1.5,
        hard_timeout_s: 4.0,
        sql_timeout_s: 1.0,
        scratch_mb: 128,
        scratch_files: 500,
        ..Limits::default()
    }
}

/// A task: its folder (holding the scratch folder and, outside it, the data), and a worker.
pub struct Task {
    pub dir: tempfile::TempDir,
    pub worker: Worker,
}

pub const CSV: &str = "city,sales\nLyon,3\nNantes,5\nLyon,4\n";

impl Task {
    pub async fn start(sandbox: Arc<Sandbox>, database: Option<PathBuf>) -> Task {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("input");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("sales.csv"), CSV).unwrap();
        let spec = WorkerSpec {
            scratch: dir.path().join("scratch"),
            data: vec![DataFile { name: "sales.csv".into(), path: data.join("sales.csv") }],
            database,
            limits: test_limits(),
        };
        let worker = Worker::start(sandbox, spec).await.expect("worker starts");
        Task { dir, worker }
    }

    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    pub fn data_file(&self) -> PathBuf {
        self.dir.path().join("input").join("sales.csv")
    }

    pub async fn run(&mut self, code: &str) -> Cell {
        self.worker.run(code).await.expect("the sandbox keeps working")
    }
}

/// `path` exists on the host.
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
