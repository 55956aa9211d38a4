//! `load` then `generate` against a local OpenAI-compatible server (127.0.0.1): every input row
//! gets `n` samples, tags become columns, lineage points back to the loaded row.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use fault_server::{Faults, reply, start_in_background};

#[test]
fn loaded_questions_are_rewritten_with_n_samples() {
    let server = start_in_background(Faults::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lines: Vec<String> =
        (0..40).map(|i| format!(r#"{{"question": "What is {i} + {i}?", "answer": {}}}"#, 2 * i)).collect();
    std::fs::write(dir.join("questions.jsonl"), lines.join("\n")).unwrap();
    let pipeline = format!(
        r#"
[pipeline]
name = "gen"
output_dir = "out"

[models.local]
base_url = "{}"
model = "m"

[stages.questions]
kind = "load"
paths = ["questions.jsonl"]

[stages.rewrite]
kind = "generate"
inputs = ["questions"]
model = "local"
system = "You rewrite questions."
prompt = "Rewrite as <rewritten>...</rewritten>: {{{{ question }}}} (answer {{{{ answer }}}})"
# The test server replies with <question>, <description> and <type> tags.
tags = ["description"]
n = 2

[stages.export]
kind = "export"
inputs = ["rewrite"]
path = "exports/rewrite.jsonl"
"#,
        server.base_url()
    );
    std::fs::write(dir.join("p.toml"), &pipeline).unwrap();
    let out = util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(out.contains("rewrite: ran, 80 rows, 0 rejected"), "{out}");
    let loaded = util::rows(&dir.join("out/questions"));
    let rows = util::rows(&dir.join("out/rewrite"));
    assert_eq!(loaded.len(), 40);
    for r in &rows {
        let parent = &r["parent_ids"][0];
        let source = loaded.iter().find(|l| &l["row_id"] == parent).expect("lineage to the loaded row");
        let prompt = format!(
            "Rewrite as <rewritten>...</rewritten>: {} (answer {})",
            source["question"].as_str().unwrap(),
            source["answer"]
        );
        let expected = reply(&prompt);
        let description = expected.split("<description>").nth(1).unwrap().split("</description>").next().unwrap();
        assert_eq!(r["description"], description);
        assert_eq!(r["question"], source["question"], "input columns are kept");
    }
    let samples: std::collections::BTreeSet<u64> = rows.iter().map(|r| r["sample"].as_u64().unwrap()).collect();
    assert_eq!(samples, [0, 1].into());
    assert_eq!(
        server.seen.total.load(std::sync::atomic::Ordering::SeqCst),
        80,
        "two requests per row, n samples without `n`"
    );
    // Each further sample is its own request: a seed derived from the pipeline's (0) + sample.
    let seeds = server.seen.seeds.lock().unwrap().clone();
    assert_eq!(seeds.iter().filter(|s| s.is_none()).count(), 40, "the first sample as before");
    assert_eq!(seeds.iter().filter(|s| **s == Some(1)).count(), 40, "{seeds:?}");
    assert!(util::kiln_ok(dir, &["run", "p.toml"]).contains("rewrite: fresh"));

    let exported: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("out/exports/rewrite.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), 80, "the export holds every row");
    assert_eq!(exported[0]["row_id"], rows[0]["row_id"], "in dataset order, lineage included");

    // Changing the model's settings makes the stages that call it stale (and only them),
    // and says why; the new temperature means new requests.
    std::fs::write(dir.join("p.toml"), pipeline.replace("model = \"m\"", "model = \"m\"\ntemperature = 0.3")).unwrap();
    let status = util::kiln_ok(dir, &["status", "p.toml"]);
    assert!(status.contains("questions: fresh"), "{status}");
    assert!(status.contains("rewrite: stale") && status.contains("model `local` changed"), "{status}");
    assert!(util::kiln_ok(dir, &["run", "p.toml"]).contains("rewrite: ran, 80 rows"));
    assert_eq!(server.seen.total.load(std::sync::atomic::Ordering::SeqCst), 160, "the changed requests are sent");
}

#[test]
fn rows_lost_to_a_failing_endpoint_are_retried_by_a_plain_rerun() {
    let server = start_in_background(Faults { rate: 1.0, only: Some("500"), ..Faults::default() });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("q.jsonl"), "{\"question\": \"a\"}\n{\"question\": \"b\"}\n").unwrap();
    let pipeline = format!(
        "[pipeline]\nname = \"g\"\noutput_dir = \"out\"\n\n[models.down]\nbase_url = \"{}\"\nmodel = \"m\"\nmax_retries = 0\n\n[stages.q]\nkind = \"load\"\npaths = [\"q.jsonl\"]\n\n[stages.g]\nkind = \"generate\"\ninputs = [\"q\"]\nmodel = \"down\"\nprompt = \"{{{{ question }}}}\"\n",
        server.base_url()
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    // The run ends, with exit code 3: rows failed that a rerun may produce, and it says how.
    let run = || util::kiln(dir).args(["run", "p.toml"]).output().unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(3), "{}", util::text(&out.stderr));
    assert!(util::text(&out.stdout).contains("g: ran, 0 rows, 2 rejected"));
    let said = util::text(&out.stderr);
    assert!(
        said.contains("2 rows failed on errors that may pass") && said.contains("`kiln run p.toml` retries them"),
        "{said}"
    );
    let sent = server.seen.total.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(sent, 2);
    // Each row's tries and final status are counted; the ledger has the last error.
    let counters = util::manifest(&dir.join("out/g")).counters;
    assert_eq!((counters["rows_llm_failed"], counters["row_tries_1"]), (2, 2), "{counters:?}");
    assert!(!counters.contains_key("rows_ok"), "{counters:?}");
    let ledger = util::rows(&dir.join("out/_rejections"));
    assert!(
        ledger.iter().all(|r| r["reason"] == "llm_failed" && r["detail"].as_str().unwrap().contains("HTTP 500")),
        "{ledger:?}"
    );
    // The endpoint failed: the stage is not done, and says why; running again retries.
    let status = util::kiln_ok(dir, &["status", "p.toml"]);
    assert!(status.contains("q: fresh"), "{status}");
    assert!(status.contains("2 rows failed on errors that may pass"), "{status}");
    assert_eq!(run().status.code(), Some(3), "still failing");
    assert_eq!(server.seen.total.load(std::sync::atomic::Ordering::SeqCst), 4, "the failed rows were sent again");
}

/// With `supports_n`, the samples of a row are one request with `n` choices; each choice is
/// filed as its sample's own reply, so a rerun (or a run without `supports_n`) sends nothing.
#[test]
fn a_server_with_n_gets_one_request_per_row() {
    let server = start_in_background(Faults::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let lines: Vec<String> = (0..10).map(|i| format!(r#"{{"question": "What is {i} + 1?"}}"#)).collect();
    std::fs::write(dir.join("questions.jsonl"), lines.join("\n")).unwrap();
    let pipeline = |supports_n: bool| {
        format!(
            "[pipeline]\nname = \"gen\"\noutput_dir = \"out\"\n\n[models.local]\nbase_url = \"{}\"\nmodel = \"m\"\nsupports_n = {supports_n}\n\n\
             [stages.questions]\nkind = \"load\"\npaths = [\"questions.jsonl\"]\n\n\
             [stages.rewrite]\nkind = \"generate\"\ninputs = [\"questions\"]\nmodel = \"local\"\nprompt = \"{{{{ question }}}}\"\ntags = [\"description\"]\nn = 3\n",
            server.base_url()
        )
    };
    std::fs::write(dir.join("p.toml"), pipeline(true)).unwrap();
    let out = util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(out.contains("rewrite: ran, 30 rows, 0 rejected"), "{out}");
    let sent = || server.seen.total.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(sent(), 10, "one request per row");
    let counters = util::manifest(&dir.join("out/rewrite")).counters;
    assert_eq!(counters["samples_asked_together"], 30);
    let samples: std::collections::BTreeSet<u64> =
        util::rows(&dir.join("out/rewrite")).iter().map(|r| r["sample"].as_u64().unwrap()).collect();
    assert_eq!(samples, [0, 1, 2].into());
    std::fs::write(dir.join("p.toml"), pipeline(false)).unwrap();
    assert!(util::kiln_ok(dir, &["run", "p.toml"]).contains("rewrite: ran, 30 rows"));
    assert_eq!(sent(), 10, "every sample was filed under its own request");
}
