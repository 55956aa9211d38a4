//! The rule-based filters on real trajectories: scripted ones (well formed) and ones a model
//! behind the fault-injecting server wrote (garbage: every turn breaks the protocol). The
//! format filter keeps exactly the first kind; the length filter counts with a real
//! tokenizer.json when given one.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

/// A small WordLevel tokenizer in the Hugging Face format: whitespace pre-tokenizer, so a
/// text has as many tokens as it has words and punctuation runs.
const TOKENIZER: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null, "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "the": 1}, "unk_token": "[UNK]"}
}"#;

#[test]
fn filters_keep_well_formed_trajectories_and_say_why_they_drop_the_rest() {
    let server = fault_server::start_in_background(fault_server::Faults::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
    let pipeline = format!(
        r#"
[pipeline]
name = "f"
output_dir = "OUT"

[models.weak]
base_url = "{}"
model = "m"

[stages.files]
kind = "profile"
paths = ["data/*.csv", "data/*.sqlite"]
min_rows = 20
max_rows = 1000

[stages.questions]
kind = "programmatic"
inputs = ["files"]
categories = ["counting", "ranking", "comparison"]

[stages.scripted]
kind = "trajectories"
inputs = ["questions"]
scripted = true

[stages.garbage]
kind = "trajectories"
inputs = ["questions"]
model = "weak"
n = 1
max_turns = 2

[stages.both]
kind = "sql"
inputs = ["scripted", "garbage"]
query = "SELECT * FROM scripted UNION ALL SELECT * FROM garbage"

[stages.formed]
kind = "format_filter"
inputs = ["both"]

[stages.short]
kind = "length_filter"
inputs = ["formed"]
tokenizer = "tokenizer.json"
max_answer_tokens = 4
max_turns = 3
"#,
        server.base_url()
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);

    let out = dir.join("OUT");
    let scripted = util::rows(&out.join("scripted"));
    let garbage = util::rows(&out.join("garbage"));
    let formed = util::rows(&out.join("formed"));
    assert!(!garbage.is_empty());
    assert_eq!(formed.len(), scripted.len(), "every scripted trajectory and no garbage one is well formed");
    assert!(formed.iter().all(|r| r["teacher"] == "scripted"));
    let ledger = util::rows(&out.join("_rejections"));
    let of = |stage: &str| ledger.iter().filter(|r| r["stage"] == stage).collect::<Vec<_>>();
    let format = of("formed");
    assert_eq!(format.len(), garbage.len());
    assert!(format.iter().all(|r| r["reason"] == "format_filter:turn"
        && r["detail"].as_str().unwrap().contains("turn 1: the turn must start with <think>")));

    // With the word-level tokenizer, "ranking" answers (one word) pass 4 tokens; SQL answers
    // ("4 (result saved in result.csv)": 9 word-level tokens, where the approximation would
    // say 12) do not; scripted SQL trajectories also have more than 3 turns.
    let short = util::rows(&out.join("short"));
    assert!(!short.is_empty() && short.iter().all(|r| r["format"] != "sqlite"));
    let length = of("short");
    assert!(!length.is_empty());
    for r in &length {
        let reason = r["reason"].as_str().unwrap();
        assert!(reason == "length_filter:answer_tokens" || reason == "length_filter:turns", "{r:?}");
    }
    assert!(length.iter().any(|r| r["detail"].as_str().unwrap().contains("has 9 tokens, over 4")), "{length:?}");
}
