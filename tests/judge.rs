//! The `judge` stage: gold checks on programmatic trajectories, and the self-consistency call
//! for questions without a gold answer, against the fault-injecting server (20% faults; its
//! judge replies say answers agree exactly when their texts are equal). Wrong and inconsistent
//! answers go to the ledger with reasons; a rerun sends no request again. A rescue that
//! succeeds keeps the new trajectories without the critique the teacher read.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

fn pipeline(base_url: &str, mode: &str) -> String {
    format!(
        r#"
[pipeline]
name = "j"
output_dir = "OUT"

[models.judge]
base_url = "{base_url}"
model = "m"
max_retries = 8
backoff_s = 0.01
timeout_s = 2

[stages.files]
kind = "profile"
paths = ["data/*.csv"]
min_rows = 20
max_rows = 1000

[stages.questions]
kind = "programmatic"
inputs = ["files"]
categories = ["counting", "aggregation", "ranking"]

[stages.trajectories]
kind = "trajectories"
inputs = ["questions"]
scripted = true

# Two samples per question without gold answers; the counting ones disagree, and one
# aggregation answer is made wrong for the gold check.
[stages.pairs]
kind = "sql"
inputs = ["trajectories"]
query = """
SELECT * REPLACE (CAST(NULL AS VARCHAR) AS gold_answer) FROM trajectories
UNION ALL
SELECT * REPLACE (CAST(NULL AS VARCHAR) AS gold_answer, CAST(1 AS INT UNSIGNED) AS sample,
                  concat(row_id, '-b') AS row_id,
                  CASE WHEN category = 'counting' THEN '999' ELSE final_answer END AS final_answer)
FROM trajectories
"""

[stages.consistent]
kind = "judge"
inputs = ["pairs"]
model = "judge"
mode = "{mode}"

# Rescue: the inconsistent questions go back to a teacher with the critique. This teacher
# (the fault server) writes garbage, so no new trajectory passes the format check.
[stages.rescued]
kind = "judge"
inputs = ["pairs"]
model = "judge"
mode = "{mode}"
rescue = {{ teacher = "judge", rounds = 2, max_turns = 2 }}

[stages.wrong]
kind = "sql"
inputs = ["trajectories"]
query = "SELECT * REPLACE (CASE WHEN category = 'aggregation' THEN '-123456' ELSE final_answer END AS final_answer) FROM trajectories"

[stages.gold]
kind = "judge"
inputs = ["wrong"]
"#
    )
}

fn rejections(dir: &std::path::Path, stage: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    util::rows(&dir.join("OUT/_rejections")).into_iter().filter(|r| r["stage"] == stage).collect()
}

#[test]
fn judge_keeps_agreeing_answers_and_rejects_the_rest_with_reasons() {
    let server = fault_server::start_in_background(fault_server::Faults { rate: 0.2, ..Default::default() });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    std::fs::write(dir.join("p.toml"), pipeline(&server.base_url(), "keep_all_consistent")).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);

    let questions = util::rows(&dir.join("OUT/questions"));
    let categories: BTreeMap<String, String> = questions
        .iter()
        .map(|q| (q["row_id"].as_str().unwrap().to_string(), q["category"].as_str().unwrap().to_string()))
        .collect();
    let category_of =
        |r: &serde_json::Map<String, serde_json::Value>| categories[r["parent_ids"][0].as_str().unwrap()].clone();

    // Self-consistency: counting questions disagree and are dropped; the others keep both
    // samples, with the agreed answer as their gold answer.
    let kept = util::rows(&dir.join("OUT/consistent"));
    assert!(!kept.is_empty());
    assert!(kept.iter().all(|r| category_of(r) != "counting"), "inconsistent questions are dropped");
    assert!(kept.iter().all(|r| r["gold_answer"] == r["final_answer"] && r["judge_verdict"] == "consistent"));
    let per_question = kept.iter().fold(BTreeMap::<String, usize>::new(), |mut m, r| {
        *m.entry(r["parent_ids"][0].to_string()).or_default() += 1;
        m
    });
    assert!(per_question.values().all(|n| *n == 2), "keep_all_consistent keeps both samples");
    let dropped = rejections(dir, "consistent");
    let counting = questions.iter().filter(|q| q["category"] == "counting").count();
    assert_eq!(dropped.len(), 2 * counting);
    assert!(
        dropped.iter().all(
            |r| r["reason"] == "judge:inconsistent" && r["detail"].as_str().unwrap().contains("the answers differ")
        )
    );
    let judged = questions.len() as usize;
    let sent = server.seen.total.load(Ordering::SeqCst);
    assert!(sent >= judged, "one judge request per question, plus retries");

    // Rescue ran two rounds for each counting question, sampling two trajectories each time
    // with the critique in the question; none was well formed, so nothing changed.
    let m = util::manifest(&dir.join("OUT/rescued"));
    assert_eq!(m.counters["rescue_attempts"], 2 * counting as u64, "{:?}", m.counters);
    assert_eq!(m.counters["rescue_dropped_format_turn"], 2 * 2 * counting as u64, "{:?}", m.counters);
    let refused: Vec<_> =
        rejections(dir, "rescued").into_iter().filter(|r| r["reason"] == "judge:rescue_format:turn").collect();
    assert_eq!(refused.len(), 2 * 2 * counting, "each refused rescue trajectory is in the ledger with its rule");
    assert!(!m.counters.contains_key("rescued"));
    assert_eq!(util::rows(&dir.join("OUT/rescued")).len(), kept.len());
    let critique_sent =
        server.seen.per_prompt.lock().unwrap().keys().any(|p| p.contains("A reviewer said: the answers differ"));
    assert!(critique_sent, "the judge's reasoning reached the teacher");

    // Gold check: wrong aggregation answers are rejected, the rest kept with their verdict.
    let gold = util::rows(&dir.join("OUT/gold"));
    assert!(gold.iter().all(|r| category_of(r) != "aggregation" && r["judge_verdict"] == "gold_match"));
    let wrong = rejections(dir, "gold");
    assert!(!wrong.is_empty() && wrong.iter().all(|r| r["reason"] == "judge:wrong_answer"));
    assert!(wrong[0]["detail"].as_str().unwrap().contains("-123456"));

    // A forced rerun finds every judge reply in the cache; keep_best keeps one per question.
    util::kiln_ok(dir, &["run", "p.toml", "--force"]);
    assert_eq!(server.seen.total.load(Ordering::SeqCst), sent, "nothing is sent twice");
    std::fs::write(dir.join("p.toml"), pipeline(&server.base_url(), "keep_best")).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);
    assert_eq!(server.seen.total.load(Ordering::SeqCst), sent, "the mode changes the selection, not the calls");
    let best = util::rows(&dir.join("OUT/consistent"));
    let ids: BTreeSet<String> = best.iter().map(|r| r["parent_ids"][0].to_string()).collect();
    assert_eq!((best.len(), ids.len()), (per_question.len(), per_question.len()));
    assert!(best.iter().all(|r| r["sample"] == 0), "the judge's best is the first");
}

/// A teacher that solves every question the same way in two well-formed turns (so its samples
/// agree), and answers judge prompts as the fault server does.
fn agreeing_teacher(messages: &[serde_json::Value]) -> String {
    let first_user = messages.iter().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("");
    if first_user.contains("<consistent>yes or no</consistent>") {
        return fault_server::reply(first_user);
    }
    match messages.iter().filter(|m| m["role"] == "assistant").count() {
        0 => "<think>Compute it.</think>\n<code>\n```python\nprint(7)\n```\n</code>".into(),
        _ => "<think>It printed 7.</think>\n<answer>7</answer>".into(),
    }
}

#[test]
fn a_successful_rescue_keeps_new_trajectories_without_the_critique() {
    let server = fault_server::start_in_background(fault_server::Faults {
        teacher: Some(agreeing_teacher),
        ..Default::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let pipeline = pipeline(&server.base_url(), "keep_all_consistent").replace(
        "rescue = { teacher = \"judge\", rounds = 2, max_turns = 2 }",
        "rescue = { teacher = \"judge\", rounds = 2, max_turns = 3, isolation = \"landlock\", parallel = 2 }",
    );
    assert!(pipeline.contains("parallel = 2"), "the rescue settings were replaced");
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);

    let questions = util::rows(&dir.join("OUT/questions"));
    let counting: BTreeSet<String> = questions
        .iter()
        .filter(|q| q["category"] == "counting")
        .map(|q| q["row_id"].as_str().unwrap().to_string())
        .collect();
    assert!(!counting.is_empty());
    let m = util::manifest(&dir.join("OUT/rescued"));
    assert_eq!(
        m.counters["rescued"],
        counting.len() as u64,
        "every inconsistent question was rescued: {:?}",
        m.counters
    );
    assert_eq!(m.counters.get("rescue_isolation_landlock"), Some(&1), "the rescue's own isolation setting is used");
    let rows = util::rows(&dir.join("OUT/rescued"));
    let rescued: Vec<_> = rows.iter().filter(|r| r["judge_verdict"] == "rescued").collect();
    assert_eq!(rescued.len(), 2 * counting.len(), "both new samples of each rescued question are kept");
    for row in &rescued {
        assert!(counting.contains(row["parent_ids"][0].as_str().unwrap()), "{row:?}");
        assert_eq!(row["final_answer"], "7");
        assert_eq!(row["gold_answer"], "7", "the agreed answer becomes the gold answer");
        let text = row["messages"].to_string();
        assert!(!text.contains("A reviewer said"), "the critique is not kept: {text}");
    }
    let critique_sent =
        server.seen.per_prompt.lock().unwrap().keys().any(|p| p.contains("A reviewer said: the answers differ"));
    assert!(critique_sent, "the judge's reasoning reached the teacher");
}
