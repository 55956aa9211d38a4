//! Engine throughput with an LLM in the loop: `recipes/throughput.toml` (load N questions, one
//! generate request each) against a local OpenAI-compatible endpoint with a fixed latency.
//! Reports rows/s and kiln's peak memory, against a baseline measured in the same run: the
//! same N requests sent by the bare client (no engine, no cache, no datasets).
//! Then the same rows against endpoints that throttle (429 with Retry-After: 1) or fail (500)
//! 20% of requests: rows/s, and that no row is lost or paid for twice.
//! `cargo bench --bench throughput`; `cargo test --benches` runs a small smoke version.

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_server::{Faults, start_in_background};
use futures::stream::{self, StreamExt};
use kiln_llm::{Client, Message, ModelConfig};

/// Peak resident memory of finished child processes, in MiB.
fn children_peak_mib() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 5000 } else { 200 };
    let latency = Duration::from_millis(5);
    let server = start_in_background(Faults { latency, ..Faults::default() });

    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let seeds: Vec<String> = std::fs::read_to_string(root.join("recipes/data/throughput_questions.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let mut v: serde_json::Value = serde_json::from_str(&seeds[i % seeds.len()]).unwrap();
            v["question"] = format!("{} (#{i})", v["question"].as_str().unwrap()).into();
            v.to_string()
        })
        .collect();
    std::fs::write(dir.join("data/throughput_questions.jsonl"), lines.join("\n")).unwrap();
    let recipe = std::fs::read_to_string(root.join("recipes/throughput.toml")).unwrap();
    let recipe = recipe
        .replace("http://127.0.0.1:8080/v1", &server.base_url())
        .replace("[pipeline]\n", "[pipeline]\noutput_dir = \"out\"\n");
    std::fs::write(dir.join("throughput.toml"), recipe).unwrap();

    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "throughput.toml"])
        .current_dir(dir)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let engine = start.elapsed();
    let exported = std::fs::read_to_string(dir.join("out/answers.jsonl")).unwrap();
    assert_eq!(exported.lines().count(), n, "every answer exported");
    let peak = children_peak_mib();
    let cached_start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "throughput.toml", "--force"])
        .current_dir(dir)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success());
    let cached = cached_start.elapsed();

    // Baseline: the bare client, same concurrency, same endpoint, fresh prompts.
    let config: ModelConfig =
        toml::from_str(&format!("base_url = \"{}\"\nmodel = \"local\"\nmax_concurrency = 64\n", server.base_url()))
            .unwrap();
    let client = Arc::new(Client::new("local", config).unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bare = runtime.block_on(async {
        let start = Instant::now();
        stream::iter(0..n)
            .map(|i| {
                let client = client.clone();
                async move {
                    client
                        .complete(&client.request_body(&[Message::new("user", format!("baseline {i}"))], 1))
                        .await
                        .unwrap()
                }
            })
            .buffer_unordered(128)
            .collect::<Vec<_>>()
            .await;
        start.elapsed()
    });
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let mut faulted = Vec::new();
    for (kind, retry_after_s) in [("429", 1), ("500", 0)] {
        let server =
            start_in_background(Faults { latency, rate: 0.2, only: Some(kind), retry_after_s, ..Faults::default() });
        let recipe = std::fs::read_to_string(dir.join("throughput.toml")).unwrap();
        let fdir = dir.join(format!("faults-{kind}"));
        std::fs::create_dir_all(fdir.join("data")).unwrap();
        std::fs::copy(dir.join("data/throughput_questions.jsonl"), fdir.join("data/throughput_questions.jsonl"))
            .unwrap();
        let base = recipe.lines().find(|l| l.starts_with("base_url")).unwrap().to_string();
        std::fs::write(
            fdir.join("throughput.toml"),
            recipe.replace(&base, &format!("base_url = \"{}\"", server.base_url())),
        )
        .unwrap();
        let start = Instant::now();
        let run = || {
            Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["run", "throughput.toml"])
                .current_dir(&fdir)
                .env("KILN_LOG", "warn")
                .output()
                .unwrap()
        };
        let mut out = run();
        // Exit 3: rows failed past every retry; the plain rerun the message names finishes them.
        let mut reruns = 0;
        while out.status.code() == Some(3) && reruns < 3 {
            out = run();
            reruns += 1;
        }
        let took = start.elapsed();
        let exported = std::fs::read_to_string(fdir.join("out/answers.jsonl")).unwrap_or_default().lines().count();
        let twice = server.seen.answered.lock().unwrap().values().filter(|&&k| k > 1).count();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        faulted.push(format!(
            "20% {kind}: {:.0} rows/s, {} lost, {twice} paid twice, {reruns} reruns",
            rate(took),
            n - exported
        ));
    }
    println!(
        "throughput, {n} rows, endpoint latency {} ms: kiln {:.0} rows/s, bare client {:.0} requests/s (kiln/bare = {:.2}); forced rerun from the row cache {:.0} rows/s; kiln peak RSS {:.0} MiB; {}",
        latency.as_millis(),
        rate(engine),
        rate(bare),
        rate(engine) / rate(bare),
        rate(cached),
        peak,
        faulted.join("; ")
    );
}
