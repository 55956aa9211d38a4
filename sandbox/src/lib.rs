//! kiln's sandbox: persistent, isolated Python workers for agent trajectories, and the
//! read-only SQL tools of SQLite tasks.
//!
//! One [`Worker`] per trajectory keeps a warm interpreter (pandas and numpy imported once),
//! so variables survive between turns and a turn costs milliseconds instead of a fresh
//! process re-running the whole history (the reference implementation's approach). Workers
//! are confined by [`Sandbox`] (bubblewrap, or Landlock + seccomp + rlimits), limited by
//! [`Limits`], and recover from anything the code does: a cell that hangs is interrupted, a
//! worker that dies or must be killed is replaced, and the observation says that state was
//! lost.

mod isolation;
mod limits;
pub mod python_env;
pub mod scratch;
mod seccomp;
pub mod sql_tools;
mod worker;

pub use isolation::{DataFile, Isolation, Sandbox, WorkerSpec};
pub use limits::Limits;
pub use python_env::PythonEnv;
pub use worker::{Cell, CellStatus, Worker};

use std::path::{Path, PathBuf};

/// What can go wrong in the sandbox itself (not in the code it runs: that is a [`Cell`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Python environment could not be created or used.
    #[error("python environment: {0}")]
    Setup(String),
    /// A worker could not be started.
    #[error("sandbox: {0}")]
    Spawn(String),
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
}
