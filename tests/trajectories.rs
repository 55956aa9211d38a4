//! The `trajectories` stage end to end, through the real `kiln` binary and the real sandbox:
//! scripted (offline) trajectories on the shared corpus (skipped when absent) agree with the gold answers and obey
//! the turn protocol; a SIGKILL mid-stage loses no finished trajectory; a model teacher that
//! writes garbage behind a faulty endpoint gives sensible rows, and a rerun sends nothing; a
//! hostile teacher cannot get a host file into the dataset through a linked result CSV.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;

use kiln_stages::agent::protocol::{Action, parse_action};
use serde_json::{Map, Value};

type Row = Map<String, Value>;

/// The messages of a trajectory row, as (role, content).
fn messages(row: &Row) -> Vec<(String, String)> {
    row["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_string(), m["content"].as_str().unwrap().to_string()))
        .collect()
}

/// The protocol, checked turn by turn: system, user, then assistant turns each answered by an
/// `<interpreter>` user turn, except a final answer, which ends the conversation.
fn assert_protocol(row: &Row, allow_invalid: bool) {
    let m = messages(row);
    assert_eq!((m[0].0.as_str(), m[1].0.as_str()), ("system", "user"), "{row:?}");
    let mut answered = false;
    for (i, (role, content)) in m.iter().enumerate().skip(2) {
        assert!(!answered, "nothing may follow the answer: {row:?}");
        if (i - 2) % 2 == 0 {
            assert_eq!(role, "assistant");
            match parse_action(content) {
                Action::Answer(_) => answered = true,
                Action::Code(_) => {}
                Action::Invalid(why) => assert!(allow_invalid, "invalid turn ({why}): {content}"),
            }
        } else {
            assert_eq!(role, "user");
            assert!(content.starts_with("<interpreter>\n") && content.ends_with("\n</interpreter>"), "{content}");
        }
    }
    assert_eq!(answered, row["end_reason"] == "answer", "{row:?}");
    assert_eq!(row["turns"].as_u64().unwrap() as usize, (m.len() - 1) / 2, "{row:?}");
}

/// `answer` agrees with `gold`: numbers within 0.01% (or 1e-6), text case-insensitively.
fn agrees(answer: &str, gold: &str) -> bool {
    let answer = answer.split(" (result saved in").next().unwrap_or(answer).trim();
    match (answer.parse::<f64>(), gold.parse::<f64>()) {
        (Ok(a), Ok(g)) => (a - g).abs() <= 1e-6_f64.max(g.abs() * 1e-4),
        _ => answer.eq_ignore_ascii_case(gold.trim()),
    }
}

#[test]
fn scripted_trajectories_on_the_corpus_answer_from_real_output() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(corpus) = util::corpus("trajectories::scripted_trajectories_on_the_corpus_answer_from_real_output") else {
        return;
    };
    let pipeline = format!(
        r#"
[pipeline]
name = "corpus-trajectories"
output_dir = "OUT"

[stages.files]
kind = "profile"
paths = ["{c}/csv/tablebench/0*.csv", "{c}/csv/tablebench/1*.csv", "{c}/xlsx/sheetcopilot/[A-E]*.xlsx", "{c}/sqlite/chinook/*.sqlite", "{c}/sqlite/swc_survey/*.db"]
min_rows = 5

[stages.some]
kind = "sql"
inputs = ["files"]
query = """
(SELECT * FROM files WHERE format = 'csv' AND row_count < 5000 ORDER BY path LIMIT 5)
UNION ALL (SELECT * FROM files WHERE format = 'xlsx' AND row_count < 5000 ORDER BY path, "table" LIMIT 5)
UNION ALL (SELECT * FROM files WHERE format = 'sqlite' AND row_count < 5000 ORDER BY path, "table" LIMIT 5)
"""

[stages.questions]
kind = "programmatic"
inputs = ["some"]
categories = ["aggregation", "counting", "ranking", "statistical_analysis", "time_based_calculation", "comprehensive_data_preprocessing"]

[stages.trajectories]
kind = "trajectories"
inputs = ["questions"]
scripted = true
sandbox = {{ cell_timeout_s = 20, hard_timeout_s = 30 }}
"#,
        c = corpus.display()
    );
    std::fs::write(tmp.path().join("p.toml"), pipeline).unwrap();
    util::kiln_ok(tmp.path(), &["run", "p.toml"]);

    let out = tmp.path().join("OUT");
    let questions = util::rows(&out.join("questions"));
    let rows = util::rows(&out.join("trajectories"));
    assert!(rows.len() >= 20, "only {} trajectories", rows.len());
    assert_eq!(rows.len() + util::manifest(&out.join("trajectories")).rejected as usize, questions.len());
    let ids: BTreeSet<&str> = rows.iter().map(|r| r["row_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), rows.len(), "row ids are unique");

    let mut formats = BTreeSet::new();
    let mut wrong = Vec::new();
    for row in &rows {
        assert_protocol(row, false);
        assert_eq!(row["end_reason"], "answer", "{row:?}");
        let (answer, gold) = (row["final_answer"].as_str().unwrap(), row["gold_answer"].as_str().unwrap());
        if !agrees(answer, gold) {
            wrong.push(format!("{} {}: {answer} vs gold {gold}", row["path"], row["category"]));
        }
        let format = row["format"].as_str().unwrap().to_string();
        if format == "sqlite" {
            // The result CSV is the answering SELECT's: a header and the one row that answers,
            // whose first cell is the answer (not a dump of the table analysed).
            let csv = row["result_csv"].as_str().expect("SQL tasks keep their result CSV");
            let lines: Vec<&str> = csv.lines().collect();
            assert_eq!(lines.len(), 2, "{} {}: {csv}", row["category"], row["question"]);
            let first = lines[1].split(',').next().unwrap().trim_matches('"');
            assert!(agrees(answer, first), "{}: the CSV's {first:?} is not the answer {answer:?}", row["category"]);
        }
        formats.insert(format);
    }
    assert_eq!(formats, BTreeSet::from(["csv".into(), "sqlite".into(), "xlsx".into()]));
    // pandas and DataFusion may read a few odd cells differently; the rest must agree.
    assert!(
        wrong.len() * 10 <= rows.len(),
        "{} of {} disagree with gold:\n{}",
        wrong.len(),
        rows.len(),
        wrong.join("\n")
    );
    let leftovers = std::fs::read_dir(out.join("_scratch/trajectories")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0, "scratch folders are removed after each trajectory");
}

/// Finished trajectories in the row cache of `out`.
fn cached_trajectories(out: &Path) -> u64 {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(out.join("_cache.sqlite"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM rows WHERE namespace = 'trajectory'", [], |r| r.get(0)).unwrap_or(0)
}

const SCRIPTED: &str = r#"
[pipeline]
name = "t"
output_dir = "OUT"

[stages.files]
kind = "profile"
paths = ["data/*.csv", "data/*.xlsx", "data/*.sqlite"]
min_rows = 20
max_rows = 1000

[stages.questions]
kind = "programmatic"
inputs = ["files"]

# The corpus test uses the isolation probed first (bubblewrap where installed): this one
# covers the Landlock fallback end to end.
[stages.trajectories]
kind = "trajectories"
inputs = ["questions"]
scripted = true
parallel = 2
isolation = "landlock"
"#;

/// What identifies a trajectory's content (timings aside).
fn content(rows: &[Row]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = rows
        .iter()
        .map(|r| (r["row_id"].to_string(), r["messages"].to_string(), r["final_answer"].to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn kill_during_trajectories_then_rerun_keeps_finished_ones() {
    let reference = tempfile::tempdir().unwrap();
    util::copy_sample_data(reference.path());
    std::fs::write(reference.path().join("p.toml"), SCRIPTED).unwrap();
    util::kiln_ok(reference.path(), &["run", "p.toml"]);
    let expected = util::rows(&reference.path().join("OUT/trajectories"));
    let reasons: Vec<&Value> = expected.iter().map(|r| &r["end_reason"]).collect();
    assert!(expected.len() >= 20 && reasons.iter().all(|r| *r == "answer"), "{} rows: {reasons:?}", expected.len());
    let m = util::manifest(&reference.path().join("OUT/trajectories"));
    assert_eq!(m.counters.get("isolation_landlock"), Some(&1));

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    std::fs::write(dir.join("p.toml"), SCRIPTED).unwrap();
    let out = dir.join("OUT");
    let killed = util::run_and_kill_when(dir, &["run", "p.toml"], || cached_trajectories(&out) >= 8);
    assert!(killed, "the run finished before it could be killed");
    let finished_before = cached_trajectories(&out);
    assert!(util::rows_if_finished(&out.join("trajectories")).is_none(), "killed mid-stage");

    util::kiln_ok(dir, &["run", "p.toml"]);
    let m = util::manifest(&out.join("trajectories"));
    let replayed = m.counters.get("trajectories_cached").copied().unwrap_or(0);
    assert!(replayed >= finished_before, "rerun replayed {replayed} of {finished_before} finished trajectories");
    assert_eq!(m.counters["trajectories"], expected.len() as u64);
    let rows = util::rows(&out.join("trajectories"));
    assert_eq!(content(&rows), content(&expected), "same trajectories as an uninterrupted run, no duplicates");
}

#[test]
fn garbage_from_a_faulty_model_gives_rows_with_reasons_and_reruns_send_nothing() {
    let server = fault_server::start_in_background(fault_server::Faults { rate: 0.2, ..Default::default() });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let model = format!(
        "base_url = \"{}\"\nmodel = \"m\"\nmax_retries = 6\nbackoff_s = 0.01\ntimeout_s = 2",
        server.base_url()
    );
    let stages = "[stages.trajectories]\nkind = \"trajectories\"\ninputs = [\"questions\"]\nmodel = \"weak\"\nn = 2\nmax_turns = 3\n";
    let pipeline = model_pipeline(("weak", &model), "data/*.csv", "\"aggregation\", \"counting\"", stages);
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);
    let out = dir.join("OUT");
    let questions = util::rows(&out.join("questions")).len();
    let rows = util::rows(&out.join("trajectories"));
    let m = util::manifest(&out.join("trajectories"));
    assert_eq!(rows.len() + m.rejected as usize, 2 * questions, "every trajectory is a row or a rejection");
    assert!(!rows.is_empty());
    for row in &rows {
        // The server answers every turn with synthesis tags, never a valid action: each turn
        // gets the corrective observation and the trajectory ends at max_turns.
        assert_protocol(row, true);
        assert_eq!(row["end_reason"], "max_turns");
        assert_eq!(row["turns"], 3);
        let m = messages(row);
        assert!(m[3].1.contains("Invalid action: the turn must start with <think>"), "{}", m[3].1);
        assert!(row["prompt_tokens"].as_u64().unwrap() > 0);
    }
    let sent = server.seen.total.load(Ordering::SeqCst);
    util::kiln_ok(dir, &["run", "p.toml", "--force"]);
    let resent = server.seen.total.load(Ordering::SeqCst) - sent;
    // Rejected trajectories (the server failed past the retries) are tried again; finished
    // ones come from the cache whole.
    let rejected = m.rejected as usize;
    assert!(resent <= rejected * 3 * 8, "a forced rerun sent {resent} requests for {rejected} rejected trajectories");
    let again = util::manifest(&out.join("trajectories"));
    assert!(again.counters["trajectories_cached"] >= rows.len() as u64);
}

/// A pipeline with the model table `(name, keys)`, programmatic questions of `categories` on
/// the files `paths` matches (tables of 20 to 1,000 rows), and `stages` after them.
fn model_pipeline((name, keys): (&str, &str), paths: &str, categories: &str, stages: &str) -> String {
    format!(
        "[pipeline]\nname = \"t\"\noutput_dir = \"OUT\"\n\n[models.{name}]\n{keys}\n\n[stages.files]\nkind = \"profile\"\npaths = [\"{paths}\"]\nmin_rows = 20\nmax_rows = 1000\n\n[stages.questions]\nkind = \"programmatic\"\ninputs = [\"files\"]\ncategories = [{categories}]\n\n{stages}"
    )
}

/// The host file the hostile teacher links to (set by the test that uses it).
static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A hostile teacher (issue 12): its first turn links a host file as `result.csv` in the scratch
/// folder; its second answers with that CSV, which kiln reads as the SQL task's result.
fn linking_teacher(messages: &[Value]) -> String {
    let turns = messages.iter().filter(|m| m["role"] == "assistant").count();
    if turns == 0 {
        let secret = SECRET.get().expect("the secret is set");
        format!(
            "<think>Link the file.</think>\n<code>\n```python\nimport os\nos.symlink({secret:?}, 'result.csv')\nprint('linked')\n```\n</code>"
        )
    } else {
        "<think>The result is saved.</think>\n<answer>The answer is in result.csv</answer>".into()
    }
}

#[test]
fn a_linked_result_csv_never_brings_a_host_file_into_the_dataset() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("id_rsa");
    std::fs::write(&secret, "TOPSECRET-KEY,x\n1,2\n").unwrap();
    SECRET.set(secret.display().to_string()).unwrap();
    let server = fault_server::start_in_background(fault_server::Faults {
        teacher: Some(linking_teacher),
        ..Default::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let model = format!("base_url = \"{}\"\nmodel = \"m\"", server.base_url());
    // Under the isolation probed first (bubblewrap where it works), and under Landlock.
    let stages = r#"
[stages.probed]
kind = "trajectories"
inputs = ["questions"]
model = "hostile"
n = 1
max_turns = 3

[stages.landlock]
kind = "trajectories"
inputs = ["questions"]
model = "hostile"
n = 1
max_turns = 3
isolation = "landlock"
"#;
    let pipeline = model_pipeline(("hostile", &model), "data/*.sqlite", "\"counting\"", stages);
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);
    let out = dir.join("OUT");
    for stage in ["probed", "landlock"] {
        let rows = util::rows(&out.join(stage));
        assert!(!rows.is_empty(), "{stage}: no trajectories");
        for row in &rows {
            assert_eq!(row["format"], "sqlite", "{stage}: {row:?}");
            assert_eq!(row["end_reason"], "answer", "{stage}: {row:?}");
            let m = messages(row);
            assert!(m[3].1.contains("linked"), "{stage}: the cell ran: {}", m[3].1);
            assert!(row.get("result_csv").is_none_or(Value::is_null), "{stage}: a linked file was read: {row:?}");
        }
    }
    let everything = ["files", "questions", "probed", "landlock", "_rejections"]
        .iter()
        .flat_map(|stage| util::rows(&out.join(stage)))
        .any(|row| Value::Object(row).to_string().contains("TOPSECRET"));
    assert!(!everything, "the host file's content reached the output folder");
}
