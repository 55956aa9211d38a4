//! Errors of the stage kinds' own machinery (templates, taxonomy, tokenizers, rows), each with
//! the file or row it concerns. A running stage wraps them with its name
//! ([`kiln_pipeline::Error::stage`], which keeps them as the source); at `kiln check` they become
//! problems at the key that names the file, with the hint kept.

use std::path::PathBuf;

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is unusable, for the reason given (with the line and
    /// column when the reason has them).
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file (for built-in files, their path in the repository).
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A template is neither in the pipeline's templates folder nor built in.
    #[error("template `{name}` not found{} among the built-in templates", in_dir(dir))]
    TemplateNotFound {
        /// The template's file name.
        name: String,
        /// The pipeline's templates folder, if it has one.
        dir: Option<PathBuf>,
    },
    /// A template failed to render (a variable missing or of the wrong type).
    #[error("template `{name}`: {why}")]
    Render {
        /// The template's name.
        name: String,
        /// What failed.
        why: String,
    },
    /// A row of an input is not a row of the family its consumer reads.
    #[error("row {row} is not a {family} row: {source}")]
    Row {
        /// 1-based row number in the input.
        row: usize,
        /// The family.
        family: &'static str,
        /// What did not match.
        #[source]
        source: serde_json::Error,
    },
    /// A taxonomy that loads file by file is wrong as a whole (empty, a category twice).
    #[error("{0}")]
    Taxonomy(String),
}

fn in_dir(dir: &Option<PathBuf>) -> String {
    dir.as_ref().map(|d| format!(" in `{}` or", d.display())).unwrap_or_default()
}

impl StageError {
    /// `path` holds something unusable, for the reason given.
    pub fn invalid(path: impl Into<PathBuf>, why: impl std::fmt::Display) -> Self {
        StageError::Invalid { path: path.into(), why: why.to_string() }
    }

    /// Reading `path` failed.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StageError::Io { path: path.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_file_and_keep_the_source() {
        let e = StageError::io("t/x.j2", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(e.to_string().starts_with("t/x.j2: "));
        assert!(std::error::Error::source(&e).is_some());
        let missing = StageError::TemplateNotFound { name: "a.j2".into(), dir: Some("tpl".into()) };
        assert_eq!(missing.to_string(), "template `a.j2` not found in `tpl` or among the built-in templates");
    }
}
