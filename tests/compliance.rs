//! One compliance test for every stage kind: a pipeline using them all, run twice from scratch
//! (fresh output folders and row caches) against the same deterministic local server, gives
//! byte-identical datasets with the same row ids, and every rejection has a reason and detail.
//! (Trajectories also record the wall-clock time of each turn; everything else in them must be
//! identical.)

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::collections::BTreeSet;

use fault_server::{Faults, start_in_background};

#[test]
fn every_kind_gives_identical_datasets_on_independent_runs() {
    let server = start_in_background(Faults::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    std::fs::write(
        dir.join("questions.jsonl"),
        "{\"question\": \"How many plots?\"}\n{\"question\": \"Which taxa?\"}\n",
    )
    .unwrap();
    let pipeline = format!(
        r#"
[pipeline]
name = "all"
output_dir = "OUT"
seed = 3

[models.fake]
base_url = "{}"
model = "m"

[stages.files]
kind = "profile"
paths = ["data/*.csv", "data/*.xlsx", "data/*.sqlite", "data/*.db"]

[stages.small]
kind = "sql"
inputs = ["files"]
query = "SELECT * FROM files WHERE row_count < 100"

[stages.easy]
kind = "programmatic"
inputs = ["small"]

[stages.queries]
kind = "synthesize"
inputs = ["small"]
model = "fake"
per_table = 2

[stages.hard]
kind = "compose"
inputs = ["easy", "small"]
model = "fake"
depth = 2

[stages.mine]
kind = "load"
paths = ["questions.jsonl"]

[stages.answers]
kind = "generate"
inputs = ["mine"]
model = "fake"
prompt = "{{{{ question }}}}"
tags = ["description"]

[stages.agent]
kind = "trajectories"
inputs = ["easy"]
scripted = true

[stages.formed]
kind = "format_filter"
inputs = ["agent"]

[stages.short]
kind = "length_filter"
inputs = ["formed"]

[stages.clean]
kind = "language_filter"
inputs = ["short"]

[stages.judged]
kind = "judge"
inputs = ["clean"]

[stages.unique]
kind = "dedup"
inputs = ["judged"]

[stages.card]
kind = "card"
inputs = ["unique"]
path = "card.md"
title = "compliance"

[stages.sft]
kind = "export"
inputs = ["unique"]
format = "sharegpt"
path = "sft.json"

[stages.out]
kind = "export"
inputs = ["hard"]
path = "hard.jsonl"
"#,
        server.base_url()
    );
    for out in ["run1", "run2"] {
        std::fs::write(dir.join("p.toml"), pipeline.replace("OUT", out)).unwrap();
        let printed = util::kiln_ok(dir, &["run", "p.toml"]);
        assert_eq!(printed.matches(": ran,").count(), 16, "{printed}");
    }
    let kinds: BTreeSet<String> = util::kiln_ok(dir, &["kinds"])
        .lines()
        .filter(|l| !l.starts_with(' ') && l.contains(": "))
        .map(|l| l.split(':').next().unwrap().to_string())
        .collect();
    let used: BTreeSet<String> = [
        "profile",
        "sql",
        "programmatic",
        "synthesize",
        "compose",
        "load",
        "generate",
        "trajectories",
        "format_filter",
        "length_filter",
        "language_filter",
        "judge",
        "dedup",
        "card",
        "export",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // `train_sft` is tested in tests/train.rs, `train_rl` in tests/rl.rs and `evaluate` in
    // tests/evaluate.rs: their rows hold wall-clock times (training throughput, seconds per
    // run), and a model checkpoint does not fit this byte-for-byte comparison.
    let elsewhere = ["every stage also takes", "train_sft", "train_rl", "evaluate"];
    assert_eq!(
        kinds.into_iter().filter(|k| !elsewhere.contains(&k.as_str())).collect::<BTreeSet<_>>(),
        used,
        "the test covers every kind"
    );

    for stage in [
        "files", "small", "easy", "queries", "hard", "mine", "answers", "agent", "judged", "unique", "card", "sft",
        "out",
    ] {
        let (a, b) = (util::manifest(&dir.join("run1").join(stage)), util::manifest(&dir.join("run2").join(stage)));
        assert!(a.row_count > 0, "{stage} produced rows");
        if ["agent", "judged", "unique"].contains(&stage) {
            let untimed = |run: &str| {
                let mut rows = util::rows(&dir.join(run).join(stage));
                for r in &mut rows {
                    for step in r["steps"].as_array_mut().unwrap() {
                        step["teacher_ms"] = 0.into();
                        step["exec_ms"] = 0.into();
                    }
                }
                rows
            };
            assert_eq!(untimed("run1"), untimed("run2"), "{stage}: independent runs give the same trajectories");
        } else {
            assert_eq!(a.content_hash, b.content_hash, "{stage}: independent runs give byte-identical rows");
        }
        let ids: Vec<_> = util::rows(&dir.join("run1").join(stage)).iter().map(|r| r["row_id"].clone()).collect();
        let unique: BTreeSet<String> = ids.iter().map(|v| v.to_string()).collect();
        assert_eq!(unique.len(), ids.len(), "{stage}: row ids are unique");
    }
    for r in util::rows(&dir.join("run1/_rejections")) {
        assert!(!r["reason"].as_str().unwrap().is_empty() && !r["detail"].as_str().unwrap().is_empty(), "{r:?}");
    }
    assert_eq!(
        std::fs::read(dir.join("run1/hard.jsonl")).unwrap(),
        std::fs::read(dir.join("run2/hard.jsonl")).unwrap()
    );
}
