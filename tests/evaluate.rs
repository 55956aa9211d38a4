//! The `evaluate` stage end to end, through the real `kiln` binary, the real agent loop and the
//! real sandbox, against fake endpoints that follow a script (they fake a served model, and an
//! LLM judge): an oracle that runs a cell and then answers each item's gold scores 100%; one
//! that answers wrong scores 0% with `wrong` as the failure; one that never answers scores 0%
//! with `turn_limit`. A rerun sends nothing. TableBench items reach the sandbox as CSV files
//! (the oracle answers from what its cell printed), BIRD items are graded on the result CSV
//! against the gold query's rows, and open answers by the judge.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::sync::atomic::Ordering;

use fault_server::{FaultServer, Faults, start_in_background};
use serde_json::Value;

/// The user message of a conversation.
fn question(messages: &[Value]) -> String {
    messages.iter().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("").to_string()
}

fn turns(messages: &[Value]) -> usize {
    messages.iter().filter(|m| m["role"] == "assistant").count()
}

const CELL: &str = "<think>Read the table.</think>\n<code>\n```python\nimport pandas as pd\ndf = pd.read_csv('data/sales.csv')\nprint(df.groupby('region')['amount'].sum())\n```\n</code>";

/// Runs one cell, then answers each item's gold.
fn oracle(messages: &[Value]) -> String {
    if turns(messages) == 0 {
        return CELL.into();
    }
    let answer = if question(messages).contains("total of the amount") { "@total[30]" } else { "@top_region[north]" };
    format!("<think>From the output.</think>\n<answer>{answer}</answer>")
}

/// Answers each item with a near miss.
fn wrong(messages: &[Value]) -> String {
    let answer = if question(messages).contains("total of the amount") { "@total[31]" } else { "@top_region[south]" };
    format!("<think>A guess.</think>\n<answer>{answer}</answer>")
}

/// Never answers: runs cells until the turns run out.
fn silent(_: &[Value]) -> String {
    CELL.into()
}

/// Never follows the protocol.
fn mute(_: &[Value]) -> String {
    "The total is probably 30.".into()
}

fn server(teacher: fn(&[Value]) -> String) -> FaultServer {
    start_in_background(Faults { teacher: Some(teacher), ..Default::default() })
}

#[test]
fn an_oracle_scores_everything_a_wrong_model_nothing_and_a_rerun_sends_nothing() {
    let servers =
        [("oracle", server(oracle)), ("wrong", server(wrong)), ("silent", server(silent)), ("mute", server(mute))];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fixtures = util::root().join("recipes/data/benchmarks/dabench");
    let mut pipeline = "[pipeline]\nname = \"eval\"\noutput_dir = \"OUT\"\n".to_string();
    for (name, server) in &servers {
        pipeline.push_str(&format!(
            "\n[models.{name}]\nbase_url = \"{}\"\nmodel = \"{name}-7b\"\ntemperature = 0.7\ntop_p = 0.95\n",
            server.base_url(),
        ));
    }
    for (stage, models) in [("side", r#"models = ["oracle", "wrong"]"#), ("silent", r#"models = ["silent", "mute"]"#)] {
        pipeline.push_str(&format!(
            "\n[stages.{stage}]\nkind = \"evaluate\"\n{models}\nbenchmark = \"dabench\"\npath = {:?}\nruns = 2\nmax_turns = 2\n",
            fixtures.display().to_string(),
        ));
    }
    std::fs::write(dir.join("eval.toml"), &pipeline).unwrap();
    util::kiln_ok(dir, &["run", "eval.toml"]);

    let out = dir.join("OUT");
    let side = util::manifest(&out.join("side")).counters;
    assert_eq!(side["oracle.items"], 2);
    assert_eq!((side["oracle.pass_at_1_ppm"], side["oracle.pass_at_k_ppm"]), (1_000_000, 1_000_000));
    assert_eq!(side["oracle.pass_at_1_ppm_easy"], 1_000_000);
    assert_eq!((side["wrong.pass_at_1_ppm"], side["wrong.pass_at_k_ppm"]), (0, 0));
    let rows = util::rows(&out.join("side"));
    assert_eq!(rows.len(), 8, "2 models x 2 items x 2 runs");
    let of = |model: &str| rows.iter().filter(|r| r["model"] == model).cloned().collect::<Vec<_>>();
    assert!(of("oracle").iter().all(|r| r["correct"] == true && r["turns"] == 2 && r["grader"] == "named"), "{rows:?}");
    assert!(of("wrong").iter().all(|r| r["failure"] == "wrong"), "{rows:?}");
    assert!(of("wrong").iter().any(|r| r["reason"] == "@total[31] is not [30]"), "{rows:?}");

    let silent = util::manifest(&out.join("silent")).counters;
    assert_eq!((silent["silent.items"], silent["silent.pass_at_k_ppm"], silent["mute.pass_at_k_ppm"]), (2, 0, 0));
    let silent_rows = util::rows(&out.join("silent"));
    for r in &silent_rows {
        let failure = if r["model"] == "silent" { "turn_limit" } else { "format" };
        assert!(r["failure"] == failure && r.get("answer").is_none(), "{r:?}");
    }

    let report = std::fs::read_to_string(out.join("side.report.md")).unwrap();
    assert!(report.contains("| oracle | 2 | 100.0% | 100.0% |\n| wrong | 2 | 0.0% | 0.0% |"), "{report}");
    assert!(report.contains("| wrong | 0 | 4 |"), "failures side by side: {report}");
    let chart = std::fs::read_to_string(out.join("side.report.svg")).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains(">oracle</text>"), "{chart}");

    let sent: Vec<usize> = servers.iter().map(|(_, s)| s.seen.total.load(Ordering::SeqCst)).collect();
    assert!(sent.iter().all(|&n| n > 0));
    let printed = util::kiln_ok(dir, &["eval", "eval.toml"]);
    assert!(printed.contains("side: fresh") && printed.contains("# Evaluation on dabench"), "{printed}");
    assert!(printed.contains("| oracle | 2 | 100.0% | 100.0% |") && printed.contains("full report: "), "{printed}");
    let again: Vec<usize> = servers.iter().map(|(_, s)| s.seen.total.load(Ordering::SeqCst)).collect();
    assert_eq!(sent, again, "a rerun with the same models sends nothing");

    // A changed model setting reruns only that model's evaluation, from the turn cache where
    // the requests are the same.
    std::fs::write(dir.join("eval.toml"), pipeline.replacen("runs = 2", "runs = 3", 1)).unwrap();
    util::kiln_ok(dir, &["run", "eval.toml"]);
    assert_eq!(util::rows(&out.join("side")).len(), 12);

    std::fs::write(
        dir.join("none.toml"),
        "[pipeline]\nname = \"none\"\n[stages.x]\nkind = \"load\"\npaths = [\"x.jsonl\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("x.jsonl"), "{\"a\": 1}\n").unwrap();
    let err = util::text(&util::kiln_err(dir, &["eval", "none.toml"]).stderr);
    assert!(err.contains("none.toml has no `evaluate` stage"), "{err}");
}

/// The number in the last interpreter output of a conversation.
fn printed_number(messages: &[Value]) -> String {
    let last = messages.iter().rev().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("");
    let output = last.trim_start_matches("<interpreter>").trim_end_matches("</interpreter>");
    output.split_whitespace().rfind(|w| w.parse::<f64>().is_ok()).unwrap_or("none").to_string()
}

fn cell(code: &str) -> String {
    format!("<think>Look at the data.</think>\n<code>\n```python\n{code}\n```\n</code>")
}

/// Answers TableBench and BIRD items from what its cells print and write; `extra` adds a
/// column to its SQL result (which the recipe's table rule accepts and BIRD's does not).
fn tables_oracle(messages: &[Value], extra: bool) -> String {
    let q = question(messages);
    let first = turns(messages) == 0;
    let sql = if q.contains("total amount per region") {
        "SELECT region, SUM(amount) AS total FROM sales GROUP BY region"
    } else {
        "SELECT region FROM sales ORDER BY amount DESC LIMIT 1"
    };
    let sql = if extra { sql.replacen("SELECT region", "SELECT region, 1 AS extra", 1) } else { sql.to_string() };
    let answer = if q.contains("total amount over all rows") {
        if first {
            return cell("import pandas as pd\nprint(pd.read_csv('data/tb-sum.csv')['amount'].sum())");
        }
        printed_number(messages)
    } else if q.contains("correlation between week and sales") {
        if first {
            return cell(
                "import pandas as pd\ndf = pd.read_csv('data/tb-corr.csv')\nprint(round(df['week'].corr(df['sales']), 2))",
            );
        }
        format!("Strong positive correlation, {}", printed_number(messages))
    } else if q.contains("compute the total amount per region and save it") {
        if first {
            return cell(
                "import pandas as pd\ndf = pd.read_csv('data/sales.csv')\ndf.groupby('region', as_index=False)['amount'].sum().rename(columns={'amount': 'total'}).to_csv('result.csv', index=False)",
            );
        }
        "Saved to result.csv".to_string()
    } else if q.contains("Which region has the largest total amount in sales.csv") {
        if first {
            return cell(
                "import pandas as pd\nprint(pd.read_csv('data/sales.csv').groupby('region')['amount'].sum().max())",
            );
        }
        format!("{{\"region\": [\"north\"], \"total\": [{}]}}", printed_number(messages))
    } else if q.contains("describe what the table shows") {
        if first {
            return cell("print(open('data/tb-describe.csv').read())");
        }
        "Sales amounts by region; north has the largest total.".to_string()
    } else {
        if first {
            return cell(&format!("df = execute_sql(sql={sql:?}, output_path='result.csv')\nprint(df)"));
        }
        "The rows are in result.csv".to_string()
    };
    format!("<think>From the output.</think>\n<answer>{answer}</answer>")
}

fn exact(messages: &[Value]) -> String {
    tables_oracle(messages, false)
}

fn extra_column(messages: &[Value]) -> String {
    tables_oracle(messages, true)
}

/// The LLM judge: an answer is right when it names the north region.
fn judge(messages: &[Value]) -> String {
    let prompt = question(messages);
    let answer = prompt.split("Answer to grade:").nth(1).unwrap_or("");
    let yes = answer.to_lowercase().contains("north");
    format!(
        "<reasoning>{}</reasoning><correct>{}</correct>",
        if yes { "names north" } else { "misses north" },
        if yes { "yes" } else { "no" }
    )
}

#[test]
fn tablebench_and_bird_items_run_in_the_sandbox_and_open_answers_go_to_the_judge() {
    let servers = [("exact", server(exact)), ("extra", server(extra_column)), ("judge", server(judge))];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = util::root().join("recipes/data/benchmarks");
    let bird = dir.join("bird");
    std::fs::create_dir_all(bird.join("dev_databases/shop")).unwrap();
    std::fs::copy(data.join("bird/dev.json"), bird.join("dev.json")).unwrap();
    let db = rusqlite::Connection::open(bird.join("dev_databases/shop/shop.sqlite")).unwrap();
    db.execute_batch(&std::fs::read_to_string(data.join("bird/shop.sql")).unwrap()).unwrap();
    let tables = data.join("tablebench/tablebench.jsonl").display().to_string();
    let dacode = data.join("dacode").display().to_string();
    let mut pipeline = "[pipeline]\nname = \"eval\"\noutput_dir = \"OUT\"\n".to_string();
    for (name, server) in &servers {
        pipeline.push_str(&format!("\n[models.{name}]\nbase_url = \"{}\"\nmodel = \"{name}\"\n", server.base_url()));
    }
    pipeline.push_str(&format!(
        "\n[stages.tables]\nkind = \"evaluate\"\nmodel = \"exact\"\nbenchmark = \"tablebench\"\npath = {tables:?}\nruns = 1\nmax_turns = 3\njudge = \"judge\"\n\
         \n[stages.unjudged]\nkind = \"evaluate\"\nmodel = \"exact\"\nbenchmark = \"tablebench\"\npath = {tables:?}\nruns = 1\nmax_turns = 3\n\
         \n[stages.sql]\nkind = \"evaluate\"\nmodels = [\"exact\", \"extra\"]\nbenchmark = \"bird\"\npath = \"bird\"\nruns = 1\nmax_turns = 3\n\
         \n[stages.dacode]\nkind = \"evaluate\"\nmodel = \"exact\"\nbenchmark = \"dacode\"\npath = {dacode:?}\nruns = 1\nmax_turns = 3\n"
    ));
    std::fs::write(dir.join("eval.toml"), &pipeline).unwrap();
    util::kiln_ok(dir, &["run", "eval.toml"]);
    let out = dir.join("OUT");

    let rows = util::rows(&out.join("tables"));
    assert_eq!(rows.len(), 3, "the chart item is skipped: {rows:?}");
    assert!(rows.iter().all(|r| r["correct"] == true), "{rows:?}");
    let sum = rows.iter().find(|r| r["item"] == "tb-sum").unwrap();
    assert_eq!((sum["answer"].as_str(), sum["grader"].as_str()), (Some("30"), Some("parts")), "read from the sandbox");
    let describe = rows.iter().find(|r| r["item"] == "tb-describe").unwrap();
    assert_eq!((describe["grader"].as_str(), describe["reason"].as_str()), (Some("judge"), Some("names north")));
    assert!(out.join("_benchmarks/tables/tb-sum.csv").is_file());
    let report = std::fs::read_to_string(out.join("tables.report.md")).unwrap();
    assert!(report.contains("- skipped: 1 items, ChartGeneration (as in the recipe)"), "{report}");
    let unjudged = std::fs::read_to_string(out.join("unjudged.report.md")).unwrap();
    assert!(unjudged.contains("- skipped: 1 items, open answers: set `judge` to grade them"), "{unjudged}");
    assert_eq!(util::manifest(&out.join("unjudged")).counters["items"], 2);

    let sql = util::rows(&out.join("sql"));
    assert_eq!(sql.len(), 4);
    for r in &sql {
        let strict = r["model"] == "exact";
        assert!(r["correct"] == true && r["grader"] == "table" && r["strict"] == strict, "{r:?}");
    }
    let counters = util::manifest(&out.join("sql")).counters;
    assert_eq!(
        (counters["exact.execution_match_at_1_ppm"], counters["extra.execution_match_at_1_ppm"]),
        (1_000_000, 0)
    );
    let report = std::fs::read_to_string(out.join("sql.report.md")).unwrap();
    assert!(report.contains("| extra | 2 | 100.0% | 100.0% | 0.0% |"), "{report}");

    // DA-Code: a result table written by a CSV task, and named values; the chart is skipped.
    let rows = util::rows(&out.join("dacode"));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["correct"] == true), "{rows:?}");
    let graders: Vec<&str> = rows.iter().map(|r| r["grader"].as_str().unwrap()).collect();
    assert_eq!(graders, ["table", "fields"]);
    let report = std::fs::read_to_string(out.join("dacode.report.md")).unwrap();
    assert!(report.contains("- skipped: 1 items, graded by compare_image"), "{report}");
}
