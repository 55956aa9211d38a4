//! The profiler on awkward files: empty, corrupt, ragged, non-UTF-8, unsupported, oversized,
//! sampled, and every supported format. Bad files go to the ledger with a reason; the run goes on.

mod util;

use std::collections::BTreeMap;

#[test]
fn bad_files_are_rejected_with_reasons_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let data = dir.join("data");
    std::fs::write(data.join("empty.csv"), "").unwrap();
    std::fs::write(data.join("header_only.csv"), "a,b\n").unwrap();
    std::fs::write(data.join("corrupt.sqlite"), "this is not a database, just text pretending to be one").unwrap();
    std::fs::write(data.join("corrupt.xlsx"), "PK but not really a zip").unwrap();
    let mut ragged = String::from("a,b\n");
    (0..30).for_each(|i| ragged.push_str(if i == 20 { "1,2,3,4\n" } else { "1,2\n" }));
    std::fs::write(data.join("ragged.csv"), ragged).unwrap();
    let mut latin1 = b"name,n\n".to_vec();
    (0..30)
        .for_each(|i| latin1.extend(format!("caf\u{e9}{i},{i}\n").bytes().map(|b| if b == 0xc3 { b'c' } else { b })));
    latin1.extend([0xe9, b',', b'1', b'\n']);
    std::fs::write(data.join("latin1.csv"), latin1).unwrap();
    std::fs::write(data.join("notes.txt"), "not data").unwrap();
    let records: Vec<String> = (0..25).map(|i| format!(r#"{{"id":{i},"kind":"k{}"}}"#, i % 3)).collect();
    std::fs::write(data.join("records.json"), format!("[{}]", records.join(","))).unwrap();
    std::fs::write(data.join("lines.jsonl"), records.join("\n")).unwrap();
    let tsv: String =
        std::iter::once("x\ty\n".to_string()).chain((0..22).map(|i| format!("{i}\t{}\n", i * 2))).collect();
    std::fs::write(data.join("table.tsv"), tsv).unwrap();

    // A Parquet file, written by kiln itself.
    std::fs::write(
        dir.join("gen.toml"),
        "[pipeline]\nname = \"gen\"\noutput_dir = \"gen\"\n[stages.numbers]\nkind = \"sql\"\nquery = \"SELECT value AS n FROM generate_series(1, 30)\"\n",
    )
    .unwrap();
    util::kiln_ok(dir, &["run", "gen.toml"]);
    std::fs::copy(dir.join("gen/numbers/part-00000.parquet"), data.join("numbers.parquet")).unwrap();

    let pipeline = r#"
[pipeline]
name = "edge"
output_dir = "out"

[stages.files]
kind = "profile"
paths = ["data/*"]

[stages.sampled]
kind = "profile"
paths = ["data/surveys_1977.csv"]
sample_rows = 50

[stages.tiny]
kind = "profile"
paths = ["data/species.csv"]
max_file_mib = 0
"#;
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    let out = util::kiln_ok(dir, &["run", "p.toml"]);
    assert!(out.contains("files: ran"), "{out}");

    let ledger = util::rows(&dir.join("out/_rejections"));
    let reason_of = |file: &str| -> Vec<String> {
        ledger
            .iter()
            .filter(|r| r["detail"].as_str().unwrap().starts_with(&format!("data/{file}")))
            .map(|r| r["reason"].as_str().unwrap().to_string())
            .collect()
    };
    let expected: BTreeMap<&str, &str> = [
        ("empty.csv", "empty"),
        ("header_only.csv", "too_few_rows"),
        ("corrupt.sqlite", "unreadable"),
        ("corrupt.xlsx", "unreadable"),
        ("ragged.csv", "unreadable"),
        ("latin1.csv", "unreadable"),
        ("notes.txt", "unsupported_format"),
        ("SOURCES.md", "unsupported_format"),
    ]
    .into();
    for (file, reason) in &expected {
        assert_eq!(reason_of(file), [reason.to_string()], "{file}: {ledger:?}");
    }
    let tiny: Vec<_> = ledger.iter().filter(|r| r["stage"] == "tiny").collect();
    assert_eq!(tiny.len(), 1);
    assert_eq!(tiny[0]["reason"], "oversized");

    let files = util::rows(&dir.join("out/files"));
    let format_of =
        |file: &str| files.iter().find(|r| r["path"] == format!("data/{file}")).map(|r| r["format"].clone());
    assert_eq!(format_of("records.json"), Some("json".into()));
    assert_eq!(format_of("lines.jsonl"), Some("jsonl".into()));
    assert_eq!(format_of("table.tsv"), Some("tsv".into()));
    assert_eq!(format_of("numbers.parquet"), Some("parquet".into()));
    let numbers = files.iter().find(|r| r["format"] == "parquet").unwrap();
    let n = numbers["columns"].as_array().unwrap().iter().find(|c| c["name"] == "n").unwrap();
    assert_eq!(
        (numbers["row_count"].as_u64(), n["min"].as_str(), n["max"].as_str()),
        (Some(30), Some("1"), Some("30"))
    );
    let kinds = &files.iter().find(|r| r["format"] == "jsonl").unwrap()["columns"][1];
    assert_eq!(kinds["unique_values"], serde_json::json!(["k0", "k1", "k2"]));

    // Statistics over a sample, row counts exact.
    let sampled = util::rows(&dir.join("out/sampled"));
    assert_eq!((sampled[0]["row_count"].as_u64(), &sampled[0]["sampled"]), (Some(400), &serde_json::json!(true)));
    let record_id = &sampled[0]["columns"][0];
    assert_eq!((record_id["min"].as_str(), record_id["max"].as_str()), (Some("1"), Some("50")));
}
