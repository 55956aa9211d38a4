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
    // Whatever the filters and the judge drop is in the ledger with its rule.
    let ledger = util::rows(&out.join("_rejections"));
    for stage in ["well_formed", "short", "clean", "judged"] {
        let kept = util::rows(&out.join(stage)).len();
        let dropped: Vec<_> = ledger.iter().filter(|r| r["stage"] == stage).collect();
        assert!(dropped.iter().all(|r| !r["reason"].as_str().unwrap().is_empty()));
        assert!(kept + dropped.len() > 0 || stage != "well_formed", "{stage}: {summary}");
    }
    assert!(dir.join("outputs/quickstart_llm/export/README.md").is_file());

    // Everything paid for is cached: a rerun finds every stage fresh and sends nothing.
    drop(server);
    let status = util::kiln_ok(dir, &["status", "q.toml"]);
    assert!(!status.contains("stale"), "{status}");
}
