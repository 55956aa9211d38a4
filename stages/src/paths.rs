//! Files named in a pipeline: glob patterns resolved against the pipeline file's folder.

use std::path::PathBuf;

use kiln_pipeline::stage::CheckCx;

/// The files `pattern` matches (relative to the pipeline file's folder), sorted.
pub fn expand(cx: &CheckCx, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = cx.resolve(pattern);
    let full = full.to_str().ok_or("the pattern is not valid UTF-8")?;
    let mut paths: Vec<PathBuf> =
        glob::glob(full).map_err(|e| e.to_string())?.filter_map(|p| p.ok()).filter(|p| p.is_file()).collect();
    paths.sort();
    Ok(paths)
}
