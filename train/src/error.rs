//! Errors that name the file and say what to do.

use std::path::{Path, PathBuf};

/// Everything that can go wrong loading, running or training a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    /// An I/O failure on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }

    /// `path` exists but its content is unusable, for the reason given.
    pub fn invalid(path: &Path, why: impl Into<String>) -> Self {
        TrainError::Invalid { path: path.to_path_buf(), why: why.into() }
    }
}

/// Result with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
