//! Outputs you can trust (issue 15), through the real `kiln` binary: a damaged, truncated or
//! deleted part is noticed and the stage rebuilt; an export deleted or edited after the run is
//! written again; temporary files of a killed run are removed at the next run (and only
//! those); a damaged row cache is named with what to do, and is not needed when every stage is
//! fresh.

mod util;

use std::path::Path;

const PIPELINE: &str = r#"
[pipeline]
name = "trust"
output_dir = "out"

[stages.rows]
kind = "load"
paths = ["rows.jsonl"]

[stages.big]
kind = "sql"
inputs = ["rows"]
query = "SELECT * FROM rows WHERE n > 1"

[stages.out]
kind = "export"
inputs = ["big"]
format = "jsonl"
path = "exported/big.jsonl"

[stages.files]
kind = "profile"
paths = ["rows.csv"]
"#;

fn project() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let rows: String = (0..50).map(|n| format!("{{\"n\": {n}, \"name\": \"row {n}\"}}\n")).collect();
    std::fs::write(tmp.path().join("rows.jsonl"), rows).unwrap();
    let csv: String = (0..50).map(|n| format!("{n},row {n}\n")).collect();
    std::fs::write(tmp.path().join("rows.csv"), format!("n,name\n{csv}")).unwrap();
    std::fs::write(tmp.path().join("p.toml"), PIPELINE).unwrap();
    util::kiln_ok(tmp.path(), &["run", "p.toml"]);
    tmp
}

fn status(dir: &Path, args: &[&str]) -> String {
    util::kiln_ok(dir, &[&["status", "p.toml"], args].concat())
}

fn part(dir: &Path) -> std::path::PathBuf {
    dir.join("out/big/part-00000.parquet")
}

/// Sets `path`'s modification time to `reference`'s.
fn same_mtime(path: &Path, reference: &Path) {
    let ok = std::process::Command::new("touch").arg("-r").arg(reference).arg(path).status().unwrap();
    assert!(ok.success());
}

#[test]
fn a_damaged_part_is_noticed_and_rebuilt() {
    let tmp = project();
    let dir = tmp.path();
    let original = std::fs::read(part(dir)).unwrap();
    std::fs::copy(part(dir), dir.join("mtime-ref")).unwrap();
    same_mtime(&dir.join("mtime-ref"), &part(dir));

    // Same size, one byte changed, modification time restored: only --verify sees it.
    let mut damaged = original.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0xff;
    std::fs::write(part(dir), &damaged).unwrap();
    same_mtime(&part(dir), &dir.join("mtime-ref"));
    assert!(status(dir, &[]).contains("big: fresh"));
    let verified = status(dir, &["--verify"]);
    assert!(
        verified
            .contains("big: stale (its output is damaged (`big/part-00000.parquet` was changed after it was written)"),
        "{verified}"
    );
    let ran = util::kiln_ok(dir, &["run", "p.toml", "--verify"]);
    assert!(
        ran.contains("big: ran") && ran.contains("out: fresh"),
        "an identical rebuild leaves the downstream fresh: {ran}"
    );
    assert_eq!(std::fs::read(part(dir)).unwrap(), original, "rebuilt byte for byte");

    // A changed modification time makes a plain status hash the file.
    std::fs::write(part(dir), &damaged).unwrap();
    assert!(status(dir, &[]).contains("`big/part-00000.parquet` was changed after it was written"));
    util::kiln_ok(dir, &["run", "p.toml"]);

    std::fs::write(part(dir), &original[..original.len() / 2]).unwrap();
    let truncated = status(dir, &[]);
    assert!(
        truncated.contains(&format!("has {} bytes, {} were written", original.len() / 2, original.len())),
        "{truncated}"
    );
    util::kiln_ok(dir, &["run", "p.toml"]);

    std::fs::remove_file(part(dir)).unwrap();
    assert!(status(dir, &[]).contains("`big/part-00000.parquet` is missing"));
    util::kiln_ok(dir, &["run", "p.toml"]);
    assert_eq!(std::fs::read(part(dir)).unwrap(), original);
    let rows = util::kiln_ok(dir, &["sql", "p.toml", "SELECT count(*) AS n FROM big", "--format", "json"]);
    assert!(rows.contains("\"n\":48"), "{rows}");
}

#[test]
fn an_export_deleted_or_edited_is_written_again() {
    let tmp = project();
    let dir = tmp.path();
    let file = dir.join("out/exported/big.jsonl");
    let original = std::fs::read_to_string(&file).unwrap();
    assert_eq!(original.lines().count(), 48);

    std::fs::remove_file(&file).unwrap();
    let why = status(dir, &[]);
    assert!(why.contains("out: stale (its output is damaged (`exported/big.jsonl` is missing)"), "{why}");
    assert!(why.contains("big: fresh"), "{why}");
    let ran = util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(ran.contains("out: ran") && ran.contains("big: fresh"), "{ran}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);

    std::fs::write(&file, original.replace("row 7", "row 8")).unwrap();
    assert!(status(dir, &[]).contains("`exported/big.jsonl` was changed after it was written"));
    util::kiln_ok(dir, &["run", "p.toml"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);
    assert!(status(dir, &[]).contains("out: fresh"));
}

#[test]
fn temporary_files_of_a_killed_run_are_removed_and_nothing_else() {
    let tmp = project();
    let dir = tmp.path();
    // A pid above the kernel's largest (4194304) is never a running process.
    let dead = "4194305";
    std::fs::write(dir.join(format!("out/exported/big.tmp-{dead}")), "half an export").unwrap();
    std::fs::create_dir_all(dir.join(format!("out/.tmp-big-{dead}"))).unwrap();
    std::fs::write(dir.join(format!("out/.tmp-big-{dead}/part-00000.parquet")), "half a part").unwrap();
    let alive = std::process::id().to_string();
    std::fs::write(dir.join(format!("out/exported/other.tmp-{alive}")), "a running run's").unwrap();
    std::fs::write(dir.join("out/exported/notes.tmp-draft"), "the user's").unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(!dir.join(format!("out/exported/big.tmp-{dead}")).exists());
    assert!(!dir.join(format!("out/.tmp-big-{dead}")).exists());
    assert!(dir.join(format!("out/exported/other.tmp-{alive}")).exists(), "a running process's file is kept");
    assert!(dir.join("out/exported/notes.tmp-draft").exists(), "not a kiln temporary file");
}

#[test]
fn a_damaged_cache_is_named_and_not_needed_when_all_is_fresh() {
    let tmp = project();
    let dir = tmp.path();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("out/_cache.sqlite{suffix}")));
    }
    std::fs::write(dir.join("out/_cache.sqlite"), vec![0x5a; 16384]).unwrap();
    let ran = util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(ran.contains("files: fresh") && ran.contains("out: fresh"), "{ran}");
    let failed = util::kiln_err(dir, &["run", "p.toml", "--force"]);
    let err = util::text(&failed.stderr);
    assert!(err.contains("_cache.sqlite is damaged") && err.contains("move it aside"), "{err}");
}

/// `load` streams its files a record batch at a time; the rows keep the files' order, also in
/// a file large enough (over DataFusion's 10 MB) to be read as several byte ranges, and across
/// files (in sorted name order).
#[test]
fn loaded_rows_keep_the_files_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pad = "x".repeat(150);
    let line = |n: usize| format!("{{\"n\": {n}, \"text\": \"row {n} {pad}\"}}\n");
    std::fs::write(dir.join("a.jsonl"), (0..70_000).map(line).collect::<String>()).unwrap();
    std::fs::write(dir.join("b.jsonl"), (70_000..70_100).map(line).collect::<String>()).unwrap();
    assert!(std::fs::metadata(dir.join("a.jsonl")).unwrap().len() > 10 << 20);
    std::fs::write(
        dir.join("p.toml"),
        "[pipeline]\nname = \"order\"\noutput_dir = \"out\"\n\n[stages.rows]\nkind = \"load\"\npaths = [\"*.jsonl\"]\n\n\
         [stages.out]\nkind = \"export\"\ninputs = [\"rows\"]\nformat = \"jsonl\"\npath = \"rows.jsonl\"\n",
    )
    .unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);
    let exported = std::fs::read_to_string(dir.join("out/rows.jsonl")).unwrap();
    let order: Vec<u64> = exported
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap())
        .collect();
    assert_eq!(order, (0..70_100).collect::<Vec<u64>>());
}
