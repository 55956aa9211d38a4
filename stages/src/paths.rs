//! Files named in a pipeline: glob patterns resolved against the pipeline file's folder.

use std::path::{Component, Path, PathBuf};

use kiln_pipeline::stage::{CheckCx, Problem};

/// The problem with `path`, a file a stage writes in the output folder (at key `key`), if any:
/// it must stay inside the folder and keep clear of kiln's own files (`_cache.sqlite`,
/// `_rejections/`, `_scratch/`...) and of the stages' dataset folders.
pub fn output_file_problem(cx: &CheckCx, key: &str, path: &str) -> Option<Problem> {
    let p = Path::new(path);
    let first = p.components().next();
    let why = if path.trim().is_empty() {
        "is empty".to_string()
    } else if !p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        format!("{path:?} leaves the output folder")
    } else if let Some(Component::Normal(first)) = first {
        let first = first.to_string_lossy();
        if first.starts_with('_') || first.starts_with('.') {
            format!("{path:?} is among kiln's own files (names starting with `_` or `.`)")
        } else if let Some(stage) = cx.stages.iter().find(|s| **s == first) {
            format!("{path:?} is inside the dataset folder of stage `{stage}`, which kiln rewrites")
        } else {
            return None;
        }
    } else {
        return None;
    };
    Some(
        Problem::new(key, format!("`{key}` {why}"))
            .help("a relative path inside the output folder, e.g. `sft/data.json`"),
    )
}

/// The files `pattern` matches (relative to the pipeline file's folder), sorted.
pub fn expand(cx: &CheckCx, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = cx.resolve(pattern);
    let full = full.to_str().ok_or("the pattern is not valid UTF-8")?;
    let mut paths: Vec<PathBuf> =
        glob::glob(full).map_err(|e| e.to_string())?.filter_map(|p| p.ok()).filter(|p| p.is_file()).collect();
    paths.sort();
    Ok(paths)
}
