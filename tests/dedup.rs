//! `dedup` on real questions: the programmatic questions of the corpus subset kept in the
//! repository (tests/data/corpus), plus planted near-duplicates. Every planted copy is found (and
//! points at its original); no other question is merged as a near-duplicate, and exact merges are
//! only of identical texts.

mod util;

use std::collections::BTreeMap;

#[test]
fn planted_near_duplicates_are_found_without_false_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let corpus = util::test_corpus();
    let questions = format!(
        r#"
[pipeline]
name = "q"
output_dir = "OUT"

[stages.files]
kind = "profile"
paths = ["{c}/csv/tablebench/*.csv", "{c}/sqlite/chinook/*.sqlite", "{c}/xlsx/da_code/*.xlsx"]
min_rows = 5
max_rows = 100000

[stages.questions]
kind = "programmatic"
inputs = ["files"]
"#,
        c = corpus.display()
    );
    std::fs::write(dir.join("q.toml"), questions).unwrap();
    util::kiln_ok(dir, &["run", "q.toml"]);
    let originals: Vec<String> =
        util::rows(&dir.join("OUT/questions")).iter().map(|r| r["question"].as_str().unwrap().to_string()).collect();
    assert!(originals.len() >= 200, "{} corpus questions", originals.len());

    // Plant: every 15th long question again, with a word appended or one repeated.
    let mut lines: Vec<String> = originals.iter().map(|q| serde_json::json!({"question": q}).to_string()).collect();
    let mut planted = BTreeMap::new();
    for (i, q) in originals.iter().enumerate().filter(|(_, q)| q.split_whitespace().count() >= 20).step_by(15) {
        let copy = if i % 2 == 0 { format!("{q} Explain.") } else { format!("Please {q}") };
        lines.push(serde_json::json!({"question": copy}).to_string());
        planted.insert(copy, q.clone());
    }
    assert!(planted.len() >= 8, "{} planted", planted.len());
    std::fs::write(dir.join("all.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(
        dir.join("d.toml"),
        "[pipeline]\nname = \"d\"\noutput_dir = \"D\"\n\n[stages.all]\nkind = \"load\"\npaths = [\"all.jsonl\"]\n\n[stages.unique]\nkind = \"dedup\"\ninputs = [\"all\"]\n",
    )
    .unwrap();
    util::kiln_ok(dir, &["run", "d.toml"]);

    let loaded = util::rows(&dir.join("D/all"));
    let all: BTreeMap<String, String> = loaded
        .iter()
        .map(|r| (r["row_id"].as_str().unwrap().to_string(), r["question"].as_str().unwrap().to_string()))
        .collect();
    let kept: Vec<String> =
        util::rows(&dir.join("D/unique")).iter().map(|r| r["question"].as_str().unwrap().to_string()).collect();
    let rejected: Vec<_> =
        util::rows(&dir.join("D/_rejections")).into_iter().filter(|r| r["stage"] == "unique").collect();
    let normal = |s: &str| kiln_stages::graders::normalize(s);
    let mut near_found = 0;
    for r in &rejected {
        let text = &all[r["row_id"].as_str().unwrap()];
        match r["reason"].as_str().unwrap() {
            "dedup:near" => {
                // A near merge is a planted copy, or an original whose planted copy sorted first.
                let original = planted
                    .get(text)
                    .cloned()
                    .or_else(|| planted.iter().find(|(_, o)| *o == text).map(|(c, _)| c.clone()));
                assert!(original.is_some(), "false near-duplicate merge: {text:?} ({})", r["detail"]);
                near_found += 1;
            }
            "dedup:exact" => {
                assert!(all.values().filter(|q| normal(q) == normal(text)).count() >= 2, "{text:?}");
            }
            other => panic!("unexpected rejection {other}"),
        }
    }
    assert_eq!(near_found, planted.len(), "every planted near-duplicate is found once");
    assert_eq!(kept.len() + rejected.len(), loaded.len());
    for (copy, original) in &planted {
        assert_ne!(kept.contains(copy), kept.contains(original), "exactly one of each planted pair is kept");
    }
}
