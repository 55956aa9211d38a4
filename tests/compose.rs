//! `compose` over offline questions, against a local fault-injecting server (127.0.0.1):
//! chains of three questions of distinct categories on one table, fused in two LLM steps.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::collections::BTreeSet;

use fault_server::{Faults, start_in_background};

#[test]
fn chains_fuse_questions_of_distinct_categories_on_one_table() {
    let server = start_in_background(Faults {
        rate: 0.1,
        seed: 5,
        slow: std::time::Duration::from_millis(3000),
        ..Faults::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let pipeline = format!(
        r#"
[pipeline]
name = "compose"
output_dir = "out"

[models.fake]
base_url = "{}"
model = "m"
timeout_s = 2
max_retries = 10
backoff_s = 0.01

[stages.files]
kind = "profile"
paths = ["data/*.csv", "data/*.sqlite"]

[stages.easy]
kind = "programmatic"
inputs = ["files"]

[stages.hard]
kind = "compose"
inputs = ["easy", "files"]
model = "fake"
depth = 3
"#,
        server.base_url()
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    let out = util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(out.contains("hard: ran"), "{out}");

    let easy = util::rows(&dir.join("out/easy"));
    let hard = util::rows(&dir.join("out/hard"));
    let rejected: Vec<_> =
        util::rows(&dir.join("out/_rejections")).into_iter().filter(|r| r["stage"] == "hard").collect();
    assert_eq!(hard.len() + rejected.len(), easy.len(), "one chain per seed question, done or rejected");
    assert!(hard.len() >= easy.len() / 2, "most seeds compose: {} of {}", hard.len(), easy.len());
    for r in &rejected {
        assert!(
            ["not_enough_questions", "unparseable", "llm_failed", "not_dependent"]
                .contains(&r["reason"].as_str().unwrap()),
            "{r:?}"
        );
    }
    for row in &hard {
        assert_eq!(row["depth"], 3);
        // A full Question row: the seed's format and category, the depth as its difficulty.
        let seed = easy.iter().find(|e| e["row_id"] == row["parent_ids"][0]).expect("the seed is an input row");
        assert_eq!((&row["format"], &row["category"]), (&seed["format"], &seed["category"]));
        assert_eq!(row["difficulty"], 3);
        let categories: BTreeSet<&str> =
            row["chain_categories"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert_eq!(categories.len(), 3, "distinct categories: {categories:?}");
        let parents = row["parent_ids"].as_array().unwrap();
        assert_eq!(parents.len(), 3);
        for (i, p) in parents.iter().enumerate() {
            let source = easy.iter().find(|e| &e["row_id"] == p).expect("parents are input rows");
            assert_eq!(source["table"], row["table"], "one table per chain");
            assert_eq!(source["question"], row["chain_questions"][i]);
        }
        assert!(row["question"].as_str().unwrap().starts_with("What about "));
    }
    let ids: BTreeSet<&str> = hard.iter().map(|r| r["row_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), hard.len(), "no duplicates");
    assert!(util::kiln_ok(dir, &["run", "p.toml"]).contains("hard: fresh"));
}
