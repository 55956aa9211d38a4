//! The sandbox's limits. Defaults are the reference recipe's (RECIPE section 5): about 1 GB of
//! address space, a 20 s cell, observations cut to 1,024 + 1,024 characters.

use serde::{Deserialize, Serialize};

/// Resource limits of one worker and its cells, settable as pipeline parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Address-space limit of the worker, in MiB (RLIMIT_AS): a larger allocation raises
    /// `MemoryError` in the cell.
    pub memory_mb: u64,
    /// Soft per-cell timeout in seconds: the cell is interrupted (SIGALRM) and its variables kept.
    pub cell_timeout_s: f64,
    /// Hard per-cell timeout in seconds: the whole worker process group is killed, and the next
    /// cell gets a fresh worker.
    pub hard_timeout_s: f64,
    /// Largest file the worker may write, in MiB (RLIMIT_FSIZE).
    pub file_size_mb: u64,
    /// Open files per worker (RLIMIT_NOFILE).
    pub open_files: u64,
    /// Characters of output the worker keeps per cell (head and tail each); kiln cuts again to
    /// `observation_head` + `observation_tail`.
    pub capture_chars: usize,
    /// Characters kept from the start of a long observation.
    pub observation_head: usize,
    /// Characters kept from the end of a long observation.
    pub observation_tail: usize,
    /// Most rows `execute_sql` writes.
    pub sql_max_rows: usize,
    /// Longest time one SQL statement may run, in seconds.
    pub sql_timeout_s: f64,
    /// Longest wait for a new worker to import pandas and report ready, in seconds.
    pub start_timeout_s: f64,
    /// Most bytes (in MiB, as allocated on disk) the scratch folder of one trajectory may hold:
    /// past it the worker is stopped, the folder emptied, and the observation says why.
    pub scratch_mb: u64,
    /// Most files and folders the scratch folder of one trajectory may hold (same enforcement).
    pub scratch_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mb: 1024,
            cell_timeout_s: 20.0,
            hard_timeout_s: 30.0,
            file_size_mb: 64,
            open_files: 256,
            capture_chars: 16 * 1024,
            observation_head: 1024,
            observation_tail: 1024,
            sql_max_rows: 10_000,
            sql_timeout_s: 10.0,
            start_timeout_s: 60.0,
            scratch_mb: 256,
            scratch_files: 2000,
        }
    }
}

impl Limits {
    /// Problems with the values, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.memory_mb < 256 {
            out.push((
                "memory_mb",
                format!("`memory_mb` must be at least 256 (pandas needs it), got {}", self.memory_mb),
            ));
        }
        if !positive(self.cell_timeout_s) {
            out.push(("cell_timeout_s", format!("`cell_timeout_s` must be positive, got {}", self.cell_timeout_s)));
        }
        if !positive(self.hard_timeout_s - self.cell_timeout_s) {
            out.push((
                "hard_timeout_s",
                format!(
                    "`hard_timeout_s` ({}) must be longer than `cell_timeout_s` ({}), so the soft timeout can act first",
                    self.hard_timeout_s, self.cell_timeout_s
                ),
            ));
        }
        if self.open_files < 32 {
            out.push(("open_files", format!("`open_files` must be at least 32, got {}", self.open_files)));
        }
        if self.scratch_mb < self.file_size_mb {
            out.push((
                "scratch_mb",
                format!(
                    "`scratch_mb` ({}) must be at least `file_size_mb` ({}), the largest single file",
                    self.scratch_mb, self.file_size_mb
                ),
            ));
        }
        if self.scratch_files < 10 {
            out.push(("scratch_files", format!("`scratch_files` must be at least 10, got {}", self.scratch_files)));
        }
        if !positive(self.sql_timeout_s) {
            out.push(("sql_timeout_s", format!("`sql_timeout_s` must be positive, got {}", self.sql_timeout_s)));
        }
        if !positive(self.start_timeout_s) {
            out.push(("start_timeout_s", format!("`start_timeout_s` must be positive, got {}", self.start_timeout_s)));
        }
        for (key, value) in
            [("memory_mb", self.memory_mb), ("file_size_mb", self.file_size_mb), ("scratch_mb", self.scratch_mb)]
        {
            if value > MAX_MB {
                out.push((key, format!("`{key}` must be at most {MAX_MB} (1 TiB), got {value}")));
            }
        }
        for (key, value) in [
            ("file_size_mb", self.file_size_mb),
            ("sql_max_rows", self.sql_max_rows as u64),
            ("capture_chars", self.capture_chars as u64),
        ] {
            if value == 0 {
                out.push((key, format!("`{key}` must be at least 1, got 0")));
            }
        }
        out
    }
}

/// The largest size in MiB a limit may name (1 TiB).
const MAX_MB: u64 = 1 << 20;

/// True for a finite number above zero (false for NaN and infinity).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}
