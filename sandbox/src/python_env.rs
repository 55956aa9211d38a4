//! The managed Python environment: a venv with pinned pandas, numpy, scipy, scikit-learn and
//! openpyxl, created on first use (or by `kiln setup`) and reused afterwards.
//!
//! It lives in `$KILN_PYTHON_ENV` when set, otherwise in `$XDG_CACHE_HOME/kiln` (or
//! `~/.cache/kiln`) under a name that hashes the pins, so changing a pin makes a new one. It
//! counts as ready only once a marker is written after a complete install; concurrent setups
//! (two runs, parallel tests) serialize on a lock file.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// The pinned packages every worker can import.
pub const REQUIREMENTS: &[&str] =
    &["pandas==2.2.3", "numpy==2.1.3", "scipy==1.14.1", "scikit-learn==1.5.2", "openpyxl==3.1.5"];

const MARKER: &str = ".kiln-ready";

/// A ready venv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonEnv {
    /// The venv folder.
    pub dir: PathBuf,
    /// Its interpreter.
    pub python: PathBuf,
    /// The base installation the venv points into (`sys.base_prefix`): sandboxes must be able
    /// to read it.
    pub base_prefix: PathBuf,
}

fn pins_hash(requirements: &[&str]) -> String {
    blake3::hash(requirements.join("\n").as_bytes()).to_hex()[..12].to_string()
}

/// kiln's folder in the user's cache: `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn kiln_cache_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("kiln")
}

impl PythonEnv {
    /// Where the environment lives unless told otherwise.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("KILN_PYTHON_ENV") {
            return PathBuf::from(dir);
        }
        kiln_cache_dir().join(format!("python-{}", pins_hash(REQUIREMENTS)))
    }

    /// The environment in the default place, created first if needed.
    pub fn ensure() -> Result<Self, Error> {
        Self::setup(&Self::default_dir(), |line| tracing::info!("{line}"))
    }

    /// The environment in `dir`, if it is ready with `requirements`.
    pub fn open(dir: &Path, requirements: &[&str]) -> Result<Option<Self>, Error> {
        match std::fs::read_to_string(dir.join(MARKER)) {
            Ok(m) if m.trim() == pins_hash(requirements) => {}
            _ => return Ok(None),
        }
        let python = dir.join("bin").join("python");
        let out = Command::new(&python)
            .args(["-c", "import sys; print(sys.base_prefix)"])
            .output()
            .map_err(|e| Error::Setup(format!("cannot run {}: {e}", python.display())))?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "{} does not run ({}); delete {} and run `kiln setup` again",
                python.display(),
                out.status,
                dir.display()
            )));
        }
        let base_prefix = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(Some(PythonEnv { dir: dir.to_path_buf(), python, base_prefix }))
    }

    /// Creates the sandbox environment in `dir` (venv + the pinned [`REQUIREMENTS`] from the
    /// package index) unless it is ready already; `log` hears what is being done.
    pub fn setup(dir: &Path, log: impl Fn(&str)) -> Result<Self, Error> {
        Self::setup_with(dir, REQUIREMENTS, log)
    }

    /// Like [`PythonEnv::setup`], with other packages (tools for tests, for instance).
    pub fn setup_with(dir: &Path, requirements: &[&str], log: impl Fn(&str)) -> Result<Self, Error> {
        if let Some(env) = Self::open(dir, requirements)? {
            return Ok(env);
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let _lock = FileLock::acquire(
            &parent.join(format!("{}.lock", dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())),
        )?;
        // Another process may have finished while this one waited for the lock.
        if let Some(env) = Self::open(dir, requirements)? {
            return Ok(env);
        }
        let base = std::env::var_os("KILN_PYTHON").unwrap_or_else(|| "python3".into());
        log(&format!("creating the Python environment in {} (one time, about a minute)", dir.display()));
        let _ = std::fs::remove_dir_all(dir);
        run(Command::new(&base).args(["-m", "venv"]).arg(dir), "python3 -m venv")?;
        log(&format!("installing {}", requirements.join(" ")));
        run(
            Command::new(dir.join("bin").join("python"))
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input"])
                .args(requirements),
            "pip install",
        )?;
        std::fs::write(dir.join(MARKER), pins_hash(requirements)).map_err(|e| Error::io(dir, e))?;
        Self::open(dir, requirements)?
            .ok_or_else(|| Error::Setup(format!("{} is not usable after setup", dir.display())))
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), Error> {
    let out = cmd.output().map_err(|e| Error::Setup(format!("{what}: {e} (is python3 installed?)")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
    Err(Error::Setup(format!("{what} failed ({}):\n{tail}", out.status)))
}

/// An exclusive `flock` on a file, released on drop.
struct FileLock(std::fs::File);

impl FileLock {
    fn acquire(path: &Path) -> Result<Self, Error> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
        Ok(FileLock(file))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking the descriptor locked in `acquire`.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
