//! `synthesize` against a local fault-injecting OpenAI-compatible server (127.0.0.1): with 20%
//! faults over 500 requests every row ends done or rejected with a reason, none lost, none
//! duplicated; reruns and runs killed with SIGKILL never send a completed request again.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fault_server::{FaultServer, Faults, start_in_background};

/// Five copies of the sample files (50 tables), 10 categories each: 500 requests.
fn setup(dir: &Path, server: &FaultServer, concurrency: usize) {
    for i in 0..5 {
        let copy = dir.join(format!("copy{i}"));
        util::copy_sample_data(&copy);
    }
    let pipeline = format!(
        r#"
[pipeline]
name = "synth"
output_dir = "out"

[models.fake]
base_url = "{}"
model = "test-model"
max_concurrency = {concurrency}
timeout_s = 2
max_retries = 10
backoff_s = 0.01

[stages.files]
kind = "profile"
paths = ["copy*/data/*.csv", "copy*/data/*.xlsx", "copy*/data/*.sqlite", "copy*/data/*.db"]

[stages.queries]
kind = "synthesize"
inputs = ["files"]
model = "fake"
per_table = 10
"#,
        server.base_url()
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
}

fn answered_twice(server: &FaultServer) -> usize {
    server.seen.answered.lock().unwrap().values().filter(|&&n| n > 1).count()
}

#[test]
fn every_row_is_done_or_rejected_despite_faults_and_nothing_is_paid_twice() {
    let server =
        start_in_background(Faults { rate: 0.2, slow: Duration::from_millis(3000), seed: 11, ..Faults::default() });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, &server, 16);
    let out = util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(out.contains("queries: ran"), "{out}");

    let manifest = util::manifest(&dir.join("out/queries"));
    assert_eq!(manifest.counters["requested"], 500);
    let rows = util::rows(&dir.join("out/queries"));
    let rejected: Vec<_> =
        util::rows(&dir.join("out/_rejections")).into_iter().filter(|r| r["stage"] == "queries").collect();
    assert_eq!(rows.len() + rejected.len(), 500, "every row done or rejected");
    assert!(rows.len() >= 480, "retries rescue almost every row: {}", rows.len());
    for r in &rejected {
        assert!(["unparseable", "llm_failed"].contains(&r["reason"].as_str().unwrap()), "{r:?}");
    }
    let mut ids: Vec<&str> = rows.iter().chain(&rejected).map(|r| r["row_id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 500, "no duplicates");
    assert!(rows.iter().all(|r| r["question"].as_str().unwrap().starts_with("What about ")));
    assert!(manifest.counters["llm_retries"] > 50 && manifest.counters["llm_throttled"] > 0, "{:?}", manifest.counters);
    assert_eq!(answered_twice(&server), 0, "no completed request sent twice");

    // A rerun sends nothing; a forced rerun is answered from the row cache.
    let sent = server.seen.total.load(Ordering::SeqCst);
    assert!(util::kiln_ok(dir, &["run", "p.toml"]).contains("queries: fresh"));
    util::kiln_ok(dir, &["run", "p.toml", "--force"]);
    let resent = server.seen.total.load(Ordering::SeqCst) - sent;
    assert!(resent <= 3 * rejected.len() * 11, "only failed rows are retried, sent {resent}");
    assert_eq!(answered_twice(&server), 0);
    assert!(util::rows(&dir.join("out/queries")).len() >= rows.len());
}

#[test]
fn a_killed_synthesis_resumes_without_resending_finished_requests() {
    let server = start_in_background(Faults { latency: Duration::from_millis(20), ..Faults::default() });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, &server, 4);
    let answered = || server.seen.answered.lock().unwrap().values().sum::<usize>();
    for kill_at in [60, 250] {
        util::run_and_kill_when(dir, &["run", "p.toml"], || answered() >= kill_at);
    }
    util::kiln_ok(dir, &["run", "p.toml"]);
    assert_eq!(util::rows(&dir.join("out/queries")).len(), 500);
    // Only requests in flight at a kill (at most the concurrency, per kill) may be sent again.
    assert!(answered_twice(&server) <= 2 * 4, "{} prompts answered twice", answered_twice(&server));
    assert_eq!(server.seen.per_prompt.lock().unwrap().len(), 500);
    let manifest = util::manifest(&dir.join("out/queries"));
    assert!(
        manifest.counters["llm_cache_hits"] >= 250 - 2 * 4,
        "finished requests come from the cache: {:?}",
        manifest.counters
    );
}

#[test]
fn a_spent_budget_stops_the_run_and_a_higher_cap_resumes_it() {
    let server = start_in_background(Faults::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, &server, 2);
    let text = std::fs::read_to_string(dir.join("p.toml")).unwrap();
    // The server bills about 1,400 prompt + 20 completion tokens per request at $1 per Mtok.
    let capped = text
        .replace("output_dir = \"out\"", "output_dir = \"out\"\nmax_cost_usd = 0.05")
        .replace("backoff_s = 0.01", "backoff_s = 0.01\nprice_per_mtok_prompt = 1.0\nprice_per_mtok_completion = 1.0");
    std::fs::write(dir.join("p.toml"), &capped).unwrap();
    let out = util::kiln_err(dir, &["run", "p.toml"]);
    let stderr = util::text(&out.stderr);
    assert!(stderr.contains("cost budget is spent") && stderr.contains("raise the cap and rerun"), "{stderr}");
    let paid = server.seen.total.load(Ordering::SeqCst);
    assert!((30..=60).contains(&paid), "stopped near the cap: {paid} requests");
    assert!(util::rows_if_finished(&dir.join("out/queries")).is_none(), "no partial dataset passes for a finished one");

    // A stage cap works the same way.
    let stage_capped =
        capped.replace("max_cost_usd = 0.05", "").replace("per_table = 10", "per_table = 10\nmax_tokens = 100000");
    std::fs::write(dir.join("p.toml"), &stage_capped).unwrap();
    let stderr = util::text(&util::kiln_err(dir, &["run", "p.toml"]).stderr);
    assert!(stderr.contains("the stage's token budget is spent"), "{stderr}");

    std::fs::write(dir.join("p.toml"), capped.replace("max_cost_usd = 0.05", "max_cost_usd = 10.0")).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);
    assert_eq!(util::rows(&dir.join("out/queries")).len(), 500);
    assert_eq!(server.seen.total.load(Ordering::SeqCst), 500, "the paid requests were not sent again");
}

#[test]
fn a_dry_run_estimates_requests_and_sends_nothing() {
    let server = start_in_background(Faults::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, &server, 8);
    let text = std::fs::read_to_string(dir.join("p.toml")).unwrap();
    let priced = text.replace(
        "backoff_s = 0.01",
        "backoff_s = 0.01\nmax_tokens = 100\nprice_per_mtok_prompt = 1.0\nprice_per_mtok_completion = 2.0",
    );
    std::fs::write(dir.join("p.toml"), &priced).unwrap();

    let out = util::kiln_ok(dir, &["run", "p.toml", "--dry-run"]);
    assert!(
        out.contains("queries: would run (input `files` is stale and runs first) [cost known once files has run]"),
        "{out}"
    );
    util::kiln_ok(dir, &["run", "p.toml", "--only", "files"]);
    let out = util::kiln_ok(dir, &["run", "p.toml", "--dry-run"]);
    assert!(out.contains("queries: would run (no output yet): 500 requests (0 cached)"), "{out}");
    assert!(out.contains("at most 50000 completion tokens"), "{out}");
    assert_eq!(server.seen.total.load(Ordering::SeqCst), 0, "a dry run sends nothing");

    util::kiln_ok(dir, &["run", "p.toml"]);
    std::fs::write(dir.join("p.toml"), priced.replace("per_table = 10", "per_table = 12")).unwrap();
    let out = util::kiln_ok(dir, &["run", "p.toml", "--dry-run"]);
    assert!(out.contains("queries: would run (parameter `per_table` changed): 600 requests (500 cached)"), "{out}");
    assert!(out.contains("total to send: 100 requests"), "{out}");
    assert_eq!(server.seen.total.load(Ordering::SeqCst), 500);
}

#[test]
fn stages_sharing_a_model_share_its_concurrency_limit() {
    let server = start_in_background(Faults { latency: Duration::from_millis(5), ..Faults::default() });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, &server, 2);
    let mut text = std::fs::read_to_string(dir.join("p.toml")).unwrap();
    text.push_str("\n[stages.more]\nkind = \"synthesize\"\ninputs = [\"files\"]\nmodel = \"fake\"\nper_table = 2\nmix = { causal_analysis = 1, impact_analysis = 1 }\n");
    std::fs::write(dir.join("p.toml"), text).unwrap();
    let out = util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(out.contains("queries: ran") && out.contains("more: ran"), "{out}");
    assert!(server.seen.max_in_flight.load(Ordering::SeqCst) <= 2, "one limit for the model across both stages");
    // Where both stages ask the same question of the same table, it is sent once.
    assert_eq!(answered_twice(&server), 0);
    let more = util::manifest(&dir.join("out/more")).counters["requested"] as usize;
    assert!(server.seen.total.load(Ordering::SeqCst) < 500 + more, "shared requests were paid once");
}
