//! Profiles every data file of the shared corpus (`$KILN_CORPUS` or ../shared/corpus; skipped with
//! a line saying so when neither is there) and checks the result
//! against values computed independently with Python's standard library: every table is either
//! profiled or rejected with a reason, row counts match sqlite3 and the csv module, and numeric
//! min/max match.

mod util;

use std::collections::BTreeMap;

/// Independent facts about each data file: its tables, their row counts, numeric min/max.
const FACTS: &str = r#"
import csv, json, sqlite3, sys, zipfile, re, glob, os
root = sys.argv[1]
facts = {}
for path in sorted(glob.glob(root + '/**/*', recursive=True)):
    ext = os.path.splitext(path)[1].lower()
    if ext == '.csv':
        with open(path, newline='', encoding='utf-8', errors='replace') as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        minmax = {}
        for i in range(len(header)):
            values = [r[i] for r in body if i < len(r) and r[i].strip() != '']
            try:
                nums = [float(v) for v in values]
            except ValueError:
                continue
            if nums:
                minmax[i] = [min(nums), max(nums)]
        facts[path] = {'tables': {os.path.splitext(os.path.basename(path))[0]: len(body)}, 'minmax': minmax}
    elif ext == '.json':
        facts[path] = {'tables': {os.path.splitext(os.path.basename(path))[0]: None}}
    elif ext == '.xlsx':
        with zipfile.ZipFile(path) as z:
            sheets = re.findall(r'<(?:\w+:)?sheet [^>]*name="([^"]*)"', z.read('xl/workbook.xml').decode())
        facts[path] = {'tables': {s: None for s in sheets}}
    elif ext in ('.sqlite', '.db'):
        con = sqlite3.connect('file:' + path + '?mode=ro', uri=True)
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        facts[path] = {'tables': {n: con.execute('SELECT count(*) FROM "%s"' % n.replace('"', '""')).fetchone()[0] for n in names}}
print(json.dumps(facts))
"#;

#[test]
fn every_table_of_the_corpus_is_profiled_or_rejected_with_a_reason() {
    let Some(corpus) = util::corpus("corpus::every_table_of_the_corpus_is_profiled_or_rejected_with_a_reason") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let patterns: Vec<String> =
        ["csv", "xlsx", "sqlite", "db", "json"].iter().map(|e| format!("\"{}/**/*.{e}\"", corpus.display())).collect();
    let pipeline = format!(
        "[pipeline]\nname = \"corpus\"\noutput_dir = \"out\"\n\n[stages.files]\nkind = \"profile\"\npaths = [{}]\n",
        patterns.join(", ")
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);

    let script = FACTS.replace("sys.argv[1]", &format!("{:?}", corpus.display().to_string()));
    let facts: BTreeMap<String, serde_json::Value> = serde_json::from_str(&util::python(&script)).unwrap();
    let profiled = util::rows(&dir.join("out/files"));
    let rejected = util::rows(&dir.join("out/_rejections"));

    let expected_tables: usize = facts.values().map(|f| f["tables"].as_object().unwrap().len().max(1)).sum();
    assert_eq!(profiled.len() + rejected.len(), expected_tables, "each table is profiled or rejected, once");
    assert!(profiled.len() > 50, "most small tables are profiled: {}", profiled.len());
    for r in &rejected {
        assert!(!r["reason"].as_str().unwrap().is_empty() && !r["detail"].as_str().unwrap().is_empty());
    }

    for (path, fact) in &facts {
        let tables = fact["tables"].as_object().unwrap();
        let here: Vec<_> = profiled.iter().filter(|r| r["path"] == path.as_str()).collect();
        let refused = rejected.iter().filter(|r| r["detail"].as_str().unwrap().starts_with(path.as_str())).count();
        assert_eq!(here.len() + refused, tables.len().max(1), "{path}: tables {:?}", tables.keys().collect::<Vec<_>>());
        for row in here {
            let table = row["table"].as_str().unwrap();
            assert!(tables.contains_key(table), "{path}: unexpected table {table}");
            if let Some(count) = tables[table].as_u64() {
                assert_eq!(row["row_count"].as_u64(), Some(count), "{path} [{table}] row count");
            }
            let columns = row["columns"].as_array().unwrap();
            assert_eq!(row["column_count"].as_u64(), Some(columns.len() as u64));
            for (i, col) in columns.iter().enumerate() {
                let numeric = matches!(col["data_type"].as_str(), Some("Int64" | "Float64"));
                let Some(range) = fact.get("minmax").and_then(|m| m.get(i.to_string())) else { continue };
                if !numeric || row["sampled"] == true {
                    continue;
                }
                let num = |v: &serde_json::Value| v.as_str().unwrap().parse::<f64>().unwrap();
                let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
                assert!(
                    close(num(&col["min"]), range[0].as_f64().unwrap()),
                    "{path} column {} min: {} vs {}",
                    col["name"],
                    col["min"],
                    range[0]
                );
                assert!(
                    close(num(&col["max"]), range[1].as_f64().unwrap()),
                    "{path} column {} max: {} vs {}",
                    col["name"],
                    col["max"],
                    range[1]
                );
            }
        }
    }

    // Spot checks: the SQLite DDL, the sidecar description, a multi-sheet workbook.
    let chinook: Vec<_> =
        profiled.iter().filter(|r| r["path"].as_str().unwrap().ends_with("Chinook_Sqlite.sqlite")).collect();
    assert!(chinook.iter().all(|r| r["ddl"].as_str().unwrap().contains("CREATE TABLE [Album]")));
    let superstore = rejected.iter().find(|r| r["detail"].as_str().unwrap().contains("Superstore.xlsx")).unwrap();
    assert_eq!(superstore["reason"], "too_many_rows");
    assert!(superstore["detail"].as_str().unwrap().contains("9994 rows"), "{}", superstore["detail"]);
    let described = profiled.iter().filter(|r| r.get("description").is_some_and(|d| d.is_string())).count();
    assert!(described > 0, "README.md beside a file becomes its description");
}
