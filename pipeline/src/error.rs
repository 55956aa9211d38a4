//! Errors of the engine: one enum with a variant per phase, and source diagnostics.
//!
//! Configuration problems are collected as [`Diagnostic`]s (file, line, column, message, help) so
//! that `kiln check` reports every problem at once; everything after validation is an [`Error`].

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Result type of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An engine error, by phase. Library code returns these; the binary prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file is invalid; every problem found is listed.
    #[error("{0}")]
    Config(Diagnostics),
    /// A stage failed while running.
    #[error("stage `{stage}` failed: {source}")]
    Stage {
        /// Name of the stage.
        stage: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A dataset could not be read or written.
    #[error("dataset {}: {message}", path.display())]
    Dataset {
        /// The dataset folder or file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The row cache's database is damaged.
    #[error(
        "the row cache {} is damaged ({source}): move it aside (`mv {0} {0}.damaged`) and run again; the finished datasets are kept, and only rows not in them yet are paid for again",
        path.display()
    )]
    CacheDamaged {
        /// The cache database.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The row cache failed.
    #[error("row cache {}: {source}", path.display())]
    Cache {
        /// The cache database.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The user asked for something that cannot be done (unknown stage, missing output...).
    #[error("{0}")]
    Usage(String),
    /// A broken invariant inside kiln.
    #[error("internal error (this is a kiln bug, please report it): {0}")]
    Internal(String),
}

impl Error {
    /// Wraps any error as a failure of `stage`.
    pub fn stage(stage: &str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Stage { stage: stage.to_string(), source: source.into() }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// A dataset error about `path`.
    pub fn dataset(path: impl AsRef<Path>, message: impl fmt::Display) -> Self {
        Error::Dataset { path: path.as_ref().to_path_buf(), message: message.to_string() }
    }
}

/// One problem in a pipeline file, located by line and column.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// The pipeline file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong, naming the key and the bad value.
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: error: {}", self.file.display(), self.line, self.column, self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

/// A sorted, deduplicated list of diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Sorts by position and drops exact duplicates.
    pub fn normalize(mut self) -> Self {
        self.0.sort();
        self.0.dedup();
        self
    }
}

/// The most problems printed for one file; the rest are counted.
pub const SHOWN_DIAGNOSTICS: usize = 100;

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().take(SHOWN_DIAGNOSTICS).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        let n = self.0.len();
        if n > SHOWN_DIAGNOSTICS {
            write!(f, "\n... and {} more, not shown (fix the first ones and check again)", n - SHOWN_DIAGNOSTICS)?;
        }
        write!(f, "\n{n} error{} found", if n == 1 { "" } else { "s" })
    }
}

/// Turns byte spans of one source text into line/column diagnostics.
#[derive(Debug, Clone)]
pub struct SourceMap {
    file: PathBuf,
    line_starts: Vec<usize>,
    text: String,
}

impl SourceMap {
    /// Indexes `text`, the contents of `file`.
    pub fn new(file: impl AsRef<Path>, text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        SourceMap { file: file.as_ref().to_path_buf(), line_starts, text: text.to_string() }
    }

    /// The file this map describes.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// A diagnostic at the start of `span`.
    pub fn diagnostic(&self, span: Range<usize>, message: impl Into<String>, help: Option<String>) -> Diagnostic {
        let offset = span.start.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        let column = self.text[start..offset].chars().count() + 1;
        Diagnostic { file: self.file.clone(), line, column, message: message.into(), help }
    }
}

/// Suggests the closest of `candidates` to `name`, if one is close enough to be a typo.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        let map = SourceMap::new("p.toml", "a = 1\nbé = 2\n");
        let d = map.diagnostic(10..11, "bad", None);
        assert_eq!((d.line, d.column), (2, 4));
        assert_eq!(d.to_string(), "p.toml:2:4: error: bad");
    }

    #[test]
    fn suggestions_only_for_near_misses() {
        assert_eq!(did_you_mean("quer", ["query", "paths"]).as_deref(), Some("did you mean `query`?"));
        assert_eq!(did_you_mean("zzz", ["query", "paths"]), None);
    }
}
