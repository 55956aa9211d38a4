//! Golden tests of `kiln check` on malformed pipelines: each `tests/pipelines/bad/NAME.toml`
//! must fail with exactly the messages in `NAME.expected` (file:line:col, message, help); and of
//! `kiln train` on malformed training files in `tests/pipelines/bad/train`.
//! Run with `KILN_BLESS=1` to rewrite the expected files after an intended change.

mod util;

#[test]
fn malformed_pipelines_report_every_problem_with_its_position() {
    golden_errors("tests/pipelines/bad", "check", 15);
}

/// `kiln train` files are checked as pipelines are (the same checks as a `train_sft` stage's).
#[test]
fn malformed_training_files_report_every_problem_with_its_position() {
    golden_errors("tests/pipelines/bad/train", "train", 4);
}

/// Runs `kiln COMMAND NAME.toml` on every `NAME.toml` of `folder` (at least `min` of them): each
/// must exit with 2 and print exactly `NAME.expected` on stderr (rewritten with `KILN_BLESS=1`).
fn golden_errors(folder: &str, command: &str, min: usize) {
    let dir = util::root().join(folder);
    let bless = std::env::var_os("KILN_BLESS").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= min, "at least {min} malformed files in {folder}, found {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_str().unwrap();
        let out = util::kiln_err(&dir, &[command, name]);
        assert_eq!(out.status.code(), Some(2), "{name}: config errors exit with 2");
        let got = util::text(&out.stderr);
        let expected_path = case.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failures.push(format!("--- {name}: expected\n{expected}--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{} case(s) differ (KILN_BLESS=1 rewrites):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn the_recipes_check_clean() {
    let out = util::kiln_ok(&util::root(), &["check", "recipes/quickstart.toml"]);
    assert_eq!(out, "recipes/quickstart.toml: ok, 12 stages\n");
    let out = util::kiln_ok(&util::root(), &["check", "recipes/throughput.toml"]);
    assert_eq!(out, "recipes/throughput.toml: ok, 3 stages\n");
    let out = util::kiln_ok(&util::root(), &["check", "recipes/eval.toml"]);
    assert_eq!(out, "recipes/eval.toml: ok, 2 stages\n");
}

/// A huge file of bad stages prints its first problems and counts the rest.
#[test]
fn the_output_of_a_huge_bad_file_is_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut text = String::from("[pipeline]\nname = \"big\"\n");
    for i in 0..5000 {
        text.push_str(&format!("[stages.s{i}]\nkind = \"nope\"\n"));
    }
    std::fs::write(tmp.path().join("big.toml"), text).unwrap();
    let err = util::text(&util::kiln_err(tmp.path(), &["check", "big.toml"]).stderr);
    assert_eq!(err.matches("unknown stage kind `nope`").count(), 100, "the first 100 problems");
    assert!(
        err.ends_with("... and 4900 more, not shown (fix the first ones and check again)\n5000 errors found\n"),
        "{err}"
    );
}

/// Pipelines whose stages hand each other the row families they need check clean.
#[test]
fn good_pipelines_check_clean() {
    let dir = util::root().join("tests/pipelines/good");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let out = util::kiln_ok(&dir, &["check", &name]);
        assert!(out.starts_with(&format!("{name}: ok")), "{out}");
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn every_kind_is_listed_with_its_parameters() {
    let out = util::kiln_ok(&util::root(), &["kinds"]);
    for kind in ["compose", "export", "generate", "load", "profile", "programmatic", "sql", "synthesize"] {
        assert!(
            out.contains(&format!("\n{kind}: ")) || out.starts_with(&format!("{kind}: ")),
            "{kind} missing:\n{out}"
        );
    }
    assert!(out.contains("parameters: paths, min_rows, max_rows"), "{out}");
}
