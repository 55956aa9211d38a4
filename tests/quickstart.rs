//! The README's main job: the offline quickstart recipe runs from a fresh checkout and gives
//! the datasets it promises.

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

    assert!(util::kiln_ok(dir, &["run", "recipes/quickstart.toml"]).contains("files: fresh"));
}
