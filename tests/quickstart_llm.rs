//! The quickstart-with-LLM recipe end to end: SmolLM2-135M served by `kiln serve` is the teacher
//! and the judge. A model this small writes mostly unusable trajectories; the run must still
//! finish, account for every trajectory as a row or a rejection with a reason, and rerun from
//! its caches without calling the model again.

mod util;

#[test]
fn quickstart_with_a_local_model_runs_end_to_end() {
    let server = util::LocalModel::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let recipe = std::fs::read_to_string(util::root().join("recipes/quickstart_llm.toml")).unwrap();
    assert!(recipe.contains("http://127.0.0.1:8000/v1"));
    std::fs::write(dir.join("q.toml"), recipe.replace("http://127.0.0.1:8000/v1", &server.url)).unwrap();

    let summary = util::kiln_ok(dir, &["run", "q.toml"]);
    let out = dir.join("outputs/quickstart_llm");
    let questions = util::rows(&out.join("handful")).len();
    assert!(questions > 0, "{summary}");
    let trajectories = util::rows(&out.join("trajectories"));
    let manifest = util::manifest(&out.join("trajectories"));
    assert_eq!(trajectories.len() + manifest.rejected as usize, 2 * questions, "{summary}");
    assert!(manifest.counters["completion_tokens"] > 0, "the server's usage is recorded");
    for row in &trajectories {
        let messages = row["messages"].as_array().expect("messages");
        assert!(
            messages.iter().any(|m| m["role"] == "assistant" && m["content"].as_str().is_some_and(|c| !c.is_empty()))
        );
    }
    // Whatever the filters and the judge drop is in the ledger with its rule: every input row
    // of each is kept or named there.
    assert!(!trajectories.is_empty(), "the served model wrote trajectories: {summary}");
    let ledger = util::rows(&out.join("_rejections"));
    assert!(ledger.iter().all(|r| !r["reason"].as_str().unwrap().is_empty()));
    for (input, stage) in
        [("trajectories", "well_formed"), ("well_formed", "short"), ("short", "clean"), ("open", "judged")]
    {
        let kept: Vec<String> =
            util::rows(&out.join(stage)).iter().map(|r| r["row_id"].as_str().unwrap().to_string()).collect();
        let dropped: Vec<&str> =
            ledger.iter().filter(|r| r["stage"] == stage).map(|r| r["row_id"].as_str().unwrap()).collect();
        for row in util::rows(&out.join(input)) {
            let id = row["row_id"].as_str().unwrap();
            assert!(kept.iter().any(|k| k == id) || dropped.contains(&id), "{stage}: row {id} of {input} vanished");
        }
    }
    assert!(dir.join("outputs/quickstart_llm/export/README.md").is_file());

    // Everything paid for is cached: a rerun finds every stage fresh and sends nothing.
    drop(server);
    let status = util::kiln_ok(dir, &["status", "q.toml"]);
    assert!(!status.contains("stale"), "{status}");
}
