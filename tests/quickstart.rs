//! The README's main job: the offline quickstart recipe runs from a fresh checkout and gives
//! the datasets it promises, ending in exports that the `datasets` library reads as
//! LLaMA-Factory and verl would.

mod util;

#[test]
fn the_quickstart_recipe_runs_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("recipes")).unwrap();
    std::fs::copy(util::root().join("recipes/quickstart.toml"), dir.join("recipes/quickstart.toml")).unwrap();
    util::copy_sample_data(&dir.join("recipes"));

    let out = util::kiln_ok(dir, &["run", "recipes/quickstart.toml"]);
    assert!(out.contains("files: ran, 10 rows, 4 rejected"), "{out}");
    assert!(out.contains("small: ran, 9 rows, 0 rejected"), "{out}");
    assert!(out.contains("questions: ran, "), "{out}");
    let questions = util::rows(&dir.join("outputs/quickstart/questions"));
    let categories: std::collections::BTreeSet<&str> =
        questions.iter().map(|q| q["category"].as_str().unwrap()).collect();
    assert!(categories.len() >= 12, "offline questions over at least 12 categories: {categories:?}");
    assert!(questions.iter().all(|q| !q["answer"].as_str().unwrap().is_empty()), "every question has a gold answer");
    let outputs = dir.join("outputs/quickstart");
    let files = util::rows(&outputs.join("files"));
    let formats: std::collections::BTreeSet<&str> = files.iter().map(|r| r["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["csv", "sqlite", "xlsx"].into());
    let sheets: Vec<&str> =
        files.iter().filter(|r| r["format"] == "xlsx").map(|r| r["table"].as_str().unwrap()).collect();
    assert_eq!(sheets, ["species", "plots"], "every sheet of the workbook (the third is too small)");
    let species = files.iter().find(|r| r["path"] == "data/species.csv").unwrap();
    assert!(species["description"].as_str().unwrap().starts_with("Species observed"), "sidecar description");
    assert!(
        species["head"].as_str().unwrap().starts_with(r#"[{"species_id":"AB","genus":"Amphispiza""#),
        "head keeps column order"
    );
    let surveys = files.iter().find(|r| r["path"] == "data/portal_small.sqlite" && r["table"] == "surveys").unwrap();
    assert_eq!(surveys["row_count"], 800);
    assert!(surveys["ddl"].as_str().unwrap().contains("CREATE TABLE plots"), "the DDL of the whole database");
    let weight = surveys["columns"].as_array().unwrap().iter().find(|c| c["name"] == "weight").unwrap();
    assert_eq!(weight["data_type"], "Float64");
    assert!(weight["null_count"].as_u64().unwrap() > 0);

    let judged = util::rows(&outputs.join("judged"));
    assert!(judged.len() * 10 >= questions.len() * 9, "most scripted trajectories pass the filters and the judge");
    let unique = util::rows(&outputs.join("unique"));
    check_exports(&outputs.join("export"), &unique);
    let card = std::fs::read_to_string(outputs.join("export/README.md")).unwrap();
    assert!(card.contains(&format!("{} trajectories over", unique.len())), "{card}");
    for section in [
        "## Funnel",
        "| trajectories | trajectories |",
        "| judged | judge |",
        "![Trajectories per category](readme_categories.svg)",
    ] {
        assert!(card.contains(section), "card lacks {section}:\n{card}");
    }
    for plot in ["readme_categories.svg", "readme_turns.svg", "readme_funnel.svg"] {
        let svg = std::fs::read_to_string(outputs.join("export").join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<rect"), "{plot} is an SVG chart");
    }

    assert!(util::kiln_ok(dir, &["run", "recipes/quickstart.toml"]).contains("files: fresh"));
}

/// Reads the sharegpt export through its dataset_info.json entry, with `datasets`, and checks
/// it as LLaMA-Factory's sharegpt converter does (optional system first, then user and
/// assistant alternating, ending with the assistant); reads the RL Parquet with `datasets` too.
fn check_exports(export: &std::path::Path, judged: &[serde_json::Map<String, serde_json::Value>]) {
    let questions: std::collections::BTreeSet<&str> =
        judged.iter().map(|r| r["parent_ids"][0].as_str().unwrap()).collect();
    let script = format!(
        r#"
import json, os
from datasets import load_dataset
root = {root:?}
info = json.load(open(os.path.join(root, "dataset_info.json")))["kiln_quickstart"]
assert info["formatting"] == "sharegpt", info
tags, column = info["tags"], info["columns"]["messages"]
sft = load_dataset("json", data_files=os.path.join(root, info["file_name"]), split="train")
interpreter_turns = 0
for ex in sft:
    messages = ex[column]
    assert ex["row_id"] and ex["parent_ids"], ex
    if messages[0][tags["role_tag"]] == tags["system_tag"]:
        messages = messages[1:]
    assert len(messages) % 2 == 0, "ends with the assistant"
    for i, m in enumerate(messages):
        want = tags["user_tag"] if i % 2 == 0 else tags["assistant_tag"]
        assert m[tags["role_tag"]] == want, (i, m)
        if i > 0 and i % 2 == 0:
            assert m[tags["content_tag"]].startswith("<interpreter>"), m
            interpreter_turns += 1
    assert "<answer>" in messages[-1][tags["content_tag"]]
rl = load_dataset("parquet", data_files=os.path.join(root, "quickstart_rl.parquet"), split="train")
sql = 0
for ex in rl:
    assert [m["role"] for m in ex["prompt"]] == ["system", "user"], ex["prompt"]
    assert ex["expert_trajectory"][-1]["role"] == "assistant"
    assert ex["gold_answer"] and ex["data_files"] and ex["category"] and ex["difficulty"] == 1
    assert ex["data_source"] == "kiln/quickstart_rl" and ex["ability"] == "data_analysis", ex
    assert ex["extra_info"]["category"] == ex["category"] and ex["extra_info"]["difficulty"] == ex["difficulty"]
    if ex["gold_result_csv"]:
        sql += 1
        # The answering SELECT's rows: a header and the one row holding the answer.
        lines = open(os.path.join(root, ex["gold_result_csv"])).read().splitlines()
        assert len(lines) == 2, lines
        assert ex["reward_model"]["style"] == "result_csv" and ex["reward_model"]["ground_truth"].splitlines() == lines
    else:
        assert ex["reward_model"] == {{"style": "answer", "ground_truth": ex["gold_answer"]}}, ex["reward_model"]
    assert "A workflow that suits" not in ex["prompt"][0]["content"]
print(len(sft), interpreter_turns, len(rl), len(set(rl["row_id"])), sql)
"#,
        root = export.display().to_string()
    );
    let printed = util::run_python(&util::tools_python(), &script);
    let n: Vec<usize> = printed.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(n[0], judged.len(), "one sharegpt record per kept trajectory");
    assert!(n[1] >= 2 * judged.len(), "code turns are answered by interpreter turns");
    assert_eq!((n[2], n[3]), (questions.len(), questions.len()), "one RL row per question");
    assert!(n[4] > 0, "SQL questions carry their gold result CSV");
}
