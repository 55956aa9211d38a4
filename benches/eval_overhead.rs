//! What an evaluation costs beyond the model: `kiln run` of an `evaluate` stage over N DABench
//! items (one run each, one at a time) against a scripted oracle endpoint with no latency (it
//! fakes a served model: one code cell, then the gold answer). Reports wall time per item, the
//! model and sandbox time the rows record, and kiln's own per-item overhead (the difference,
//! with the fixed start-up cost measured by a one-item run in the same session taken out).
//! Baseline, measured in the same run: starting the sandbox's Python and importing pandas and
//! numpy (what each item's fresh, isolated worker does), which the rows do not count.
//! Goal (issue 19): kiln's overhead beyond that under 50 ms per item.
//! `cargo bench --bench eval_overhead`; `cargo test --benches` runs a small smoke version.

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use fault_server::{Faults, start_in_background};
use serde_json::Value;

fn oracle(messages: &[Value]) -> String {
    if messages.iter().filter(|m| m["role"] == "assistant").count() == 0 {
        return "<think>Sum it.</think>\n<code>\n```python\nimport pandas as pd\nprint(pd.read_csv('data/sales.csv')['amount'].sum())\n```\n</code>".into();
    }
    "<think>From the output.</think>\n<answer>@total[30]</answer>".into()
}

/// A DABench folder of `n` items over one table, and a pipeline evaluating it one item at a time.
fn project(dir: &Path, base_url: &str, n: usize) {
    let bench = dir.join("bench");
    std::fs::create_dir_all(bench.join("da-dev-tables")).unwrap();
    std::fs::write(bench.join("da-dev-tables/sales.csv"), "region,amount\nnorth,10\nsouth,5\nnorth,15\n").unwrap();
    let (mut questions, mut labels) = (String::new(), String::new());
    for i in 0..n {
        let q = serde_json::json!({"id": i, "question": format!("What is the total of the amount column? (#{i})"),
            "constraints": "", "format": "@total[value]", "file_name": "sales.csv", "level": "easy"});
        questions.push_str(&format!("{q}\n"));
        labels.push_str(&format!("{}\n", serde_json::json!({"id": i, "common_answers": [["total", "30"]]})));
    }
    std::fs::write(bench.join("da-dev-questions.jsonl"), questions).unwrap();
    std::fs::write(bench.join("da-dev-labels.jsonl"), labels).unwrap();
    let pipeline = format!(
        "[pipeline]\nname = \"b\"\noutput_dir = \"out\"\n\n[models.oracle]\nbase_url = \"{base_url}\"\nmodel = \"oracle\"\n\n\
         [stages.eval]\nkind = \"evaluate\"\nmodel = \"oracle\"\nbenchmark = \"dabench\"\npath = \"bench\"\nruns = 1\nmax_turns = 2\nparallel = 1\n"
    );
    std::fs::write(dir.join("eval.toml"), pipeline).unwrap();
}

/// Wall seconds of `kiln run`, and the model and sandbox seconds its rows record.
fn run(base_url: &str, n: usize) -> (f64, f64) {
    let tmp = tempfile::tempdir().unwrap();
    project(tmp.path(), base_url, n);
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "eval.toml"])
        .current_dir(tmp.path())
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let wall = start.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "sql",
            "eval.toml",
            "SELECT count(*) AS n, sum(seconds) AS s, min(CAST(correct AS INT)) AS ok FROM eval",
            "--format",
            "json",
        ])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&rows.stdout);
    let row: Value = serde_json::from_str(text.lines().next().unwrap_or("{}")).unwrap();
    assert_eq!((row["n"].as_u64(), row["ok"].as_i64()), (Some(n as u64), Some(1)), "every item scored right: {text}");
    (wall, row["s"].as_f64().unwrap())
}

/// Seconds to start the sandbox's Python and import pandas and numpy, the mean of `n` tries.
fn python_start(n: usize) -> f64 {
    let setup = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("setup").output().unwrap();
    let text = String::from_utf8_lossy(&setup.stdout).to_string();
    let dir = text.lines().find_map(|l| l.strip_prefix("python environment: ")).expect("kiln setup names the env");
    let python = Path::new(dir.trim()).join("bin/python");
    let start = Instant::now();
    for _ in 0..n {
        let ok = Command::new(&python).args(["-c", "import pandas, numpy"]).status().unwrap();
        assert!(ok.success());
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 100 } else { 5 };
    let server = start_in_background(Faults { teacher: Some(oracle), ..Faults::default() });
    let (one_wall, one_inner) = run(&server.base_url(), 1);
    let (wall, inner) = run(&server.base_url(), n);
    let fixed = one_wall - one_inner;
    let per_item = (wall - inner - fixed) / (n - 1) as f64;
    let python = python_start(if full { 10 } else { 2 });
    println!(
        "eval overhead, {n} DABench items, 2 turns and 1 sandbox cell each, one at a time: {:.1} ms wall per item, {:.1} ms of it model + sandbox cells; beyond those {:.1} ms per item, of which a fresh worker's Python start and pandas import (baseline, bare) {:.1} ms, kiln's own {:.1} ms (goal < 50 ms); start-up {:.2} s",
        wall / n as f64 * 1e3,
        inner / n as f64 * 1e3,
        per_item * 1e3,
        python * 1e3,
        (per_item - python) * 1e3,
        fixed
    );
}
