//! Crash safety: a run killed with SIGKILL at several points of a per-row stage, then rerun,
//! ends with exactly the dataset of an uninterrupted run, without repeating finished work. It
//! profiles the corpus subset kept in the repository (tests/data/corpus: 57 files).

mod util;

use std::path::Path;

fn pipeline(corpus: &Path) -> String {
    let patterns: Vec<String> =
        ["csv", "xlsx", "sqlite", "db"].iter().map(|e| format!("\"{}/**/*.{e}\"", corpus.display())).collect();
    format!(
        "[pipeline]\nname = \"crash\"\noutput_dir = \"out\"\n\n[stages.files]\nkind = \"profile\"\nparallelism = 1\npaths = [{}]\n",
        patterns.join(", ")
    )
}

/// Entries in the row cache of `out`, or 0 before it exists.
fn cached(out: &Path) -> u64 {
    let path = out.join("_cache.sqlite");
    let Ok(conn) = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM rows", [], |r| r.get(0)).unwrap_or(0)
}

/// Starts `kiln run` and SIGKILLs it once the cache holds `k` entries. Returns whether the
/// process was killed (rather than finishing first) and the entries at that moment.
fn run_and_kill_at(dir: &Path, k: u64) -> (bool, u64) {
    let killed = util::run_and_kill_when(dir, &["run", "p.toml"], || cached(&dir.join("out")) >= k);
    (killed, cached(&dir.join("out")))
}

#[test]
fn killed_runs_resume_without_duplicates_or_repeated_work() {
    let corpus = util::test_corpus();
    let reference = tempfile::tempdir().unwrap();
    std::fs::write(reference.path().join("p.toml"), pipeline(&corpus)).unwrap();
    util::kiln_ok(reference.path(), &["run", "p.toml"]);
    let expected = util::rows(&reference.path().join("out/files"));
    let expected_ledger = util::rows(&reference.path().join("out/_rejections"));
    let files = util::manifest(&reference.path().join("out/files")).counters["files"];
    assert!(files > 30, "the corpus has enough files to interrupt: {files}");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("p.toml"), pipeline(&corpus)).unwrap();
    let mut kills = 0;
    let mut last = 0;
    // Early, twice in the middle, and once every file is done (while the dataset is written).
    for k in [1, files / 3, 2 * files / 3, files] {
        let (killed, entries) = run_and_kill_at(dir, k);
        assert!(entries >= last, "finished work is never lost: {entries} < {last}");
        last = entries;
        kills += killed as u32;
        if killed && entries < files {
            assert!(util::rows_if_finished(&dir.join("out/files")).is_none(), "a killed stage has no dataset");
        }
    }
    assert!(kills >= 3, "the test must actually interrupt runs ({kills} kills)");

    let before = cached(&dir.join("out"));
    util::kiln_ok(dir, &["run", "p.toml"]);
    let manifest = util::manifest(&dir.join("out/files"));
    assert_eq!(manifest.counters.get("cache_hits").copied().unwrap_or(0), before, "every finished file is reused");
    assert_eq!(
        manifest.counters.get("computed").copied().unwrap_or(0),
        files - before,
        "only unfinished files are profiled"
    );
    assert_eq!(cached(&dir.join("out")), files, "one cache entry per file, no duplicates");

    let got = util::rows(&dir.join("out/files"));
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the resumed dataset equals the uninterrupted one");
    assert!(util::rows(&dir.join("out/_rejections")) == expected_ledger, "the same rejections, once each");
    let mut ids: Vec<String> = got.iter().map(|r| r["row_id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "no duplicate rows");
}
