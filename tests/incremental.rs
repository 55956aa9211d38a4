//! Incremental reruns: only what changed runs, `status` says why, byte-identical outputs do not
//! invalidate downstream stages, and `--only`, `--from`, `--force` do what they say.

mod util;

use std::path::Path;

const PIPELINE: &str = r#"
[pipeline]
name = "incremental"
output_dir = "out"

[stages.files]
kind = "profile"
paths = ["data/*.csv", "data/*.xlsx", "data/*.sqlite", "data/*.db"]

[stages.mid]
kind = "sql"
inputs = ["files"]
query = "SELECT * FROM files WHERE row_count < 500"

[stages.last]
kind = "sql"
inputs = ["mid"]
query = "SELECT format, count(*) AS tables FROM mid GROUP BY format ORDER BY format"

[stages.side]
kind = "sql"
inputs = ["files"]
query = "SELECT path, \"table\" FROM files ORDER BY path, \"table\""
"#;

/// Runs the pipeline and returns the stages that ran, in order.
fn run(dir: &Path, extra: &[&str]) -> Vec<String> {
    let out = util::kiln_ok(dir, &[&["run", "p.toml"], extra].concat());
    out.lines().filter(|l| l.contains(": ran,")).map(|l| l.split(':').next().unwrap().to_string()).collect()
}

fn status(dir: &Path) -> Vec<String> {
    util::kiln_ok(dir, &["status", "p.toml"]).lines().map(str::to_string).collect()
}

fn set_query(dir: &Path, from: &str, to: &str) {
    let path = dir.join("p.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from));
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

#[test]
fn only_changed_stages_and_their_downstream_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    std::fs::write(dir.join("p.toml"), PIPELINE).unwrap();

    assert_eq!(run(dir, &[]), ["files", "mid", "last", "side"]);
    assert_eq!(run(dir, &[]), Vec::<String>::new(), "touching nothing runs nothing");
    assert_eq!(status(dir), ["files: fresh", "mid: fresh", "last: fresh", "side: fresh"]);

    // A parameter of the middle stage: that stage and its downstream.
    set_query(dir, "row_count < 500", "row_count < 100");
    assert_eq!(
        status(dir),
        [
            "files: fresh",
            "mid: stale (parameter `query` changed)",
            "last: stale (input `mid` is stale and runs first)",
            "side: fresh"
        ]
    );
    let before = util::manifest(&dir.join("out/last")).content_hash;
    assert_eq!(run(dir, &[]), ["mid", "last"]);
    assert_ne!(before, util::manifest(&dir.join("out/last")).content_hash);

    // An equivalent query: `mid` reruns, its rows come out byte-identical, `last` stays fresh.
    set_query(dir, "row_count < 100", "row_count <= 99");
    assert_eq!(run(dir, &[]), ["mid"]);

    assert_eq!(run(dir, &["--only", "last"]), ["last"]);
    assert_eq!(run(dir, &["--from", "mid"]), ["mid", "last"]);
    let hashes =
        |dir: &Path| ["files", "mid", "last", "side"].map(|s| util::manifest(&dir.join("out").join(s)).content_hash);
    let first = hashes(dir);
    assert_eq!(run(dir, &["--force"]), ["files", "mid", "last", "side"]);
    assert_eq!(hashes(dir), first, "forced reruns give byte-identical datasets");

    // A data file changes: `files` reruns, and so does everything reading its changed rows.
    let plots = dir.join("data/plots.csv");
    let mut text = std::fs::read_to_string(&plots).unwrap();
    text.push_str("25,Control\n");
    std::fs::write(&plots, text).unwrap();
    assert_eq!(status(dir)[0], "files: stale (file `data/plots.csv` changed)");
    assert_eq!(run(dir, &[]), ["files", "mid", "last", "side"]);

    // A new file matching a pattern.
    std::fs::copy(dir.join("data/species.csv"), dir.join("data/species_copy.csv")).unwrap();
    assert_eq!(status(dir)[0], "files: stale (file `data/species_copy.csv` added)");
    assert_eq!(run(dir, &[]), ["files", "mid", "last", "side"]);
    let counters = util::manifest(&dir.join("out/files")).counters;
    assert_eq!((counters["computed"], counters["cache_hits"]), (1, 7), "only the new file is profiled");
    assert_eq!(run(dir, &[]), Vec::<String>::new());
}

#[test]
fn a_missing_output_is_rebuilt_and_half_written_folders_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    std::fs::write(dir.join("p.toml"), PIPELINE).unwrap();
    run(dir, &[]);

    // A stage folder without a manifest (as a crash mid-write would leave) is not finished.
    std::fs::remove_file(dir.join("out/side/manifest.json")).unwrap();
    std::fs::create_dir_all(dir.join("out/.tmp-mid-12345")).unwrap();
    assert_eq!(status(dir)[3], "side: stale (no output yet)");
    assert_eq!(run(dir, &[]), ["side"]);
    assert!(!dir.join("out/.tmp-mid-12345").exists(), "leftovers of killed runs are cleaned");

    let ids: Vec<_> = util::rows(&dir.join("out/files")).iter().map(|r| r["row_id"].clone()).collect();
    let kept: Vec<_> = util::rows(&dir.join("out/mid")).iter().map(|r| r["row_id"].clone()).collect();
    assert!(kept.iter().all(|id| ids.contains(id)), "a filter keeps row ids");
    let mut unique = ids.clone();
    unique.sort_by_key(|v| v.to_string());
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "row ids are unique");
}

#[test]
fn show_and_sql_read_datasets_and_the_ledger() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    std::fs::write(dir.join("p.toml"), PIPELINE).unwrap();
    run(dir, &[]);

    let json = util::kiln_ok(dir, &["show", "p.toml", "files", "--limit", "2", "--format", "json"]);
    assert_eq!(json.lines().count(), 2);
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["path"], "data/plots.csv");
    assert_eq!(first["row_count"], 24);

    let out = util::kiln_ok(
        dir,
        &["sql", "p.toml", "SELECT reason, count(*) AS n FROM _rejections GROUP BY reason", "--format", "json"],
    );
    assert_eq!(out.trim(), r#"{"reason":"too_few_rows","n":4}"#);
    let out = util::kiln_ok(
        dir,
        &["sql", "p.toml", "SELECT count(*) AS n FROM files f JOIN mid m ON f.row_id = m.row_id", "--format", "json"],
    );
    assert_eq!(out.trim(), r#"{"n":9}"#);

    let err = util::kiln_err(dir, &["show", "p.toml", "flies"]);
    assert!(util::text(&err.stderr).contains("no stage named `flies`"), "{}", util::text(&err.stderr));
    let err = util::kiln_err(dir, &["sql", "p.toml", "DROP TABLE files"]);
    assert!(
        util::text(&err.stderr).contains("not allowed") || util::text(&err.stderr).contains("DDL"),
        "{}",
        util::text(&err.stderr)
    );
}
