//! The `evaluate` stage end to end, through the real `kiln` binary, the real agent loop and the
//! real sandbox, against fake endpoints that follow a script (they fake a served model): an
//! oracle that runs a cell and then answers each item's gold scores 100%; one that answers
//! wrong scores 0% with `wrong` as the failure; one that never answers scores 0% with
//! `turn_limit`. A rerun sends nothing.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::sync::atomic::Ordering;

use fault_server::{FaultServer, Faults, start_in_background};
use serde_json::Value;

/// The user message of a conversation.
fn question(messages: &[Value]) -> String {
    messages.iter().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("").to_string()
}

fn turns(messages: &[Value]) -> usize {
    messages.iter().filter(|m| m["role"] == "assistant").count()
}

const CELL: &str = "<think>Read the table.</think>\n<code>\n```python\nimport pandas as pd\ndf = pd.read_csv('data/sales.csv')\nprint(df.groupby('region')['amount'].sum())\n```\n</code>";

/// Runs one cell, then answers each item's gold.
fn oracle(messages: &[Value]) -> String {
    if turns(messages) == 0 {
        return CELL.into();
    }
    let answer = if question(messages).contains("total of the amount") { "@total[30]" } else { "@top_region[north]" };
    format!("<think>From the output.</think>\n<answer>{answer}</answer>")
}

/// Answers each item with a near miss.
fn wrong(messages: &[Value]) -> String {
    let answer = if question(messages).contains("total of the amount") { "@total[31]" } else { "@top_region[south]" };
    format!("<think>A guess.</think>\n<answer>{answer}</answer>")
}

/// Never answers.
fn silent(_: &[Value]) -> String {
    CELL.into()
}

fn server(teacher: fn(&[Value]) -> String) -> FaultServer {
    start_in_background(Faults { teacher: Some(teacher), ..Default::default() })
}

#[test]
fn an_oracle_scores_everything_a_wrong_model_nothing_and_a_rerun_sends_nothing() {
    let servers = [("oracle", server(oracle)), ("wrong", server(wrong)), ("silent", server(silent))];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fixtures = util::root().join("tests/data/benchmarks/dabench");
    let mut pipeline = "[pipeline]\nname = \"eval\"\noutput_dir = \"OUT\"\n".to_string();
    for (name, server) in &servers {
        pipeline.push_str(&format!(
            "\n[models.{name}]\nbase_url = \"{}\"\nmodel = \"{name}-7b\"\ntemperature = 0.7\ntop_p = 0.95\n\n\
             [stages.{name}]\nkind = \"evaluate\"\nmodel = \"{name}\"\nbenchmark = \"dabench\"\npath = {:?}\nruns = 2\nmax_turns = 2\n",
            server.base_url(),
            fixtures.display().to_string(),
        ));
    }
    std::fs::write(dir.join("eval.toml"), &pipeline).unwrap();
    util::kiln_ok(dir, &["run", "eval.toml"]);

    let out = dir.join("OUT");
    let score = |stage: &str| util::manifest(&out.join(stage)).counters;
    let oracle_counters = score("oracle");
    assert_eq!(oracle_counters["items"], 2);
    assert_eq!((oracle_counters["pass_at_1_ppm"], oracle_counters["pass_at_k_ppm"]), (1_000_000, 1_000_000));
    assert_eq!(oracle_counters["pass_at_1_ppm_easy"], 1_000_000);
    let rows = util::rows(&out.join("oracle"));
    assert_eq!(rows.len(), 4, "2 items x 2 runs");
    assert!(rows.iter().all(|r| r["correct"] == true && r["turns"] == 2), "{rows:?}");

    assert_eq!((score("wrong")["pass_at_1_ppm"], score("wrong")["pass_at_k_ppm"]), (0, 0));
    let wrong_rows = util::rows(&out.join("wrong"));
    assert!(wrong_rows.iter().all(|r| r["failure"] == "wrong"), "{wrong_rows:?}");
    assert!(wrong_rows.iter().any(|r| r["reason"] == "@total[31] is not [30]"), "{wrong_rows:?}");

    assert_eq!(score("silent")["pass_at_k_ppm"], 0);
    let silent_rows = util::rows(&out.join("silent"));
    assert!(silent_rows.iter().all(|r| r["failure"] == "turn_limit" && r.get("answer").is_none()), "{silent_rows:?}");

    let report = std::fs::read_to_string(out.join("oracle.report.md")).unwrap();
    assert!(report.contains("2 items, 2 runs each: pass@1 100.0%, pass@2 100.0%."), "{report}");

    let sent: Vec<usize> = servers.iter().map(|(_, s)| s.seen.total.load(Ordering::SeqCst)).collect();
    assert!(sent.iter().all(|&n| n > 0));
    util::kiln_ok(dir, &["run", "eval.toml"]);
    let again: Vec<usize> = servers.iter().map(|(_, s)| s.seen.total.load(Ordering::SeqCst)).collect();
    assert_eq!(sent, again, "a rerun with the same models sends nothing");

    // A changed model setting reruns only that model's evaluation, from the turn cache where
    // the requests are the same.
    std::fs::write(dir.join("eval.toml"), pipeline.replacen("runs = 2", "runs = 3", 1)).unwrap();
    util::kiln_ok(dir, &["run", "eval.toml"]);
    assert_eq!(util::rows(&out.join("oracle")).len(), 6);
}
