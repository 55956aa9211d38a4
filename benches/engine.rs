//! Benchmarks of the engine, run with `cargo bench` (`cargo test --benches` runs one quick
//! iteration of each, as a smoke test).
//!
//! - no-op rerun: `kiln run` of a pipeline whose four stages hold 12,000 rows each, when nothing
//!   changed, against the first full run of the same pipeline (must stay under 1 second);
//! - profiling throughput: tables per second of the `profile` stage over the shared corpus
//!   (`$KILN_CORPUS`; the subset in tests/data/corpus when it is absent), cold (no row cache)
//!   against warm (every file a row-cache hit, as after a crash or a `--force`).
//!
//! Ratios are against baselines measured in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn kiln(dir: &Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("KILN_LOG", "warn")
        .output()
        .expect("kiln runs");
    assert!(out.status.success(), "kiln {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    start.elapsed()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn noop_rerun(iterations: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pipeline = r#"
[pipeline]
name = "bench"
output_dir = "out"

[stages.gen]
kind = "sql"
query = "SELECT value AS n, concat('row ', CAST(value AS VARCHAR)) AS label FROM generate_series(1, 12000)"

[stages.a]
kind = "sql"
inputs = ["gen"]
query = "SELECT * FROM gen WHERE n > 0"

[stages.b]
kind = "sql"
inputs = ["a"]
query = "SELECT * FROM a ORDER BY n"

[stages.c]
kind = "sql"
inputs = ["b"]
query = "SELECT * FROM b WHERE label <> ''"
"#;
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    let full = kiln(dir, &["run", "p.toml"]);
    let noop = median((0..iterations).map(|_| kiln(dir, &["run", "p.toml"])).collect());
    let status = median((0..iterations).map(|_| kiln(dir, &["status", "p.toml"])).collect());
    println!(
        "no-op rerun (4 stages x 12,000 rows): {:.1} ms median of {iterations}; first run {:.1} ms; full/no-op = {:.1}x; status {:.1} ms",
        ms(noop),
        ms(full),
        full.as_secs_f64() / noop.as_secs_f64(),
        ms(status)
    );
    assert!(noop < Duration::from_secs(1), "a no-op run must finish in under 1 second, took {noop:?}");
}

fn profiling(iterations: usize) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // The whole shared corpus when present (`$KILN_CORPUS`, else ../shared/corpus), else the
    // subset kept in the repository.
    let corpus = std::env::var_os("KILN_CORPUS").map(PathBuf::from).unwrap_or_else(|| root.join("../shared/corpus"));
    let corpus = if corpus.is_dir() {
        corpus.canonicalize().unwrap()
    } else {
        println!("profiling: no shared corpus, using the subset in tests/data/corpus");
        root.join("tests/data/corpus")
    };
    let patterns: Vec<String> =
        ["csv", "xlsx", "sqlite", "db"].iter().map(|e| format!("\"{}/**/*.{e}\"", corpus.display())).collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pipeline = format!(
        "[pipeline]\nname = \"bench\"\noutput_dir = \"out\"\n\n[stages.files]\nkind = \"profile\"\npaths = [{}]\n",
        patterns.join(", ")
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    let mut cold = Vec::new();
    for _ in 0..iterations {
        let _ = std::fs::remove_dir_all(dir.join("out"));
        cold.push(kiln(dir, &["run", "p.toml"]));
    }
    let warm = median((0..iterations).map(|_| kiln(dir, &["run", "p.toml", "--force"])).collect());
    let cold = median(cold);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/files/manifest.json")).unwrap()).unwrap();
    let tables = manifest["counters"]["tables"].as_u64().unwrap_or(0) as f64;
    println!(
        "profiling {tables} tables: cold {:.1} tables/s ({:.0} ms), warm row cache {:.1} tables/s ({:.0} ms); warm/cold = {:.1}x",
        tables / cold.as_secs_f64(),
        ms(cold),
        tables / warm.as_secs_f64(),
        ms(warm),
        cold.as_secs_f64() / warm.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: one quick iteration then.
    let iterations = if std::env::args().any(|a| a == "--bench") { 10 } else { 1 };
    noop_rerun(iterations);
    profiling(iterations.min(3));
}
