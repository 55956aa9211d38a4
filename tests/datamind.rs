//! `recipes/datamind.toml` end to end, through the real `kiln`, the real sandbox and real code,
//! against a local endpoint that follows a script (it fakes a remote teacher and judge, on
//! 127.0.0.1): it synthesizes questions on the sample CSV, XLSX and SQLite tables, fuses them,
//! and solves them as an agent whose code runs in the sandbox and whose answers come from what
//! that code printed. Each question carries a case, which decides how its three samples behave:
//!
//! | case     | samples                                             | after the judge    |
//! | -------- | --------------------------------------------------- | ------------------ |
//! | right    | all right                                           | 3 kept             |
//! | split    | sample 1 off by one; all right after the critique   | 3 rescued          |
//! | broken   | sample 1 breaks the protocol                        | 2 kept             |
//! | lonely   | samples 1 and 2 never answer; right after critique  | 3 rescued          |
//! | hopeless | off by the sample number, critique or not           | none               |
//! | verbose  | sample 2 answers at length                          | 2 kept             |
//! | stuck    | no sample answers (and compose refuses to build on) | none               |
//! | garbled  | sample 0 thinks in mojibake                         | 2 kept             |
//!
//! The test derives every stage's count from the cases of the questions written, and checks
//! that no export holds a critique or a procedure, that every dropped row has a reason, and
//! that a rerun sends nothing.

mod util;

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::{Map, Value};

/// The recipe's pipeline seed: sample `s > 0` of a request is sent with seed `SEED + s`.
const SEED: u64 = 42;
const CASES: [&str; 8] = ["right", "split", "broken", "lonely", "hopeless", "verbose", "stuck", "garbled"];

/// The text between `start` and the next `end` after it.
fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    Some(&s[from..from + s[from..].find(end)?])
}

fn case_of(question: &str) -> &str {
    between(question, "(case ", ")").unwrap_or("none")
}

/// The case of a synthesized question: a hash of its file, table and category, spread over
/// `CASES` (the start value is one under which the recipe's 18 questions, with the categories
/// seed 42 samples, cover every case, and SQL tables get split, lonely and hopeless ones).
fn pick_case(key: &str) -> &'static str {
    let mut h = key.bytes().fold(144u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    CASES[(h % CASES.len() as u64) as usize]
}

/// The scripted endpoint: the judge, the question writer, the composer and the agent.
fn endpoint(body: &Value) -> String {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let user = messages.iter().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("");
    if user.contains("<consistent>yes or no</consistent>") {
        return fault_server::reply(user);
    }
    let path = between(user, "File: ", " (").unwrap_or("?");
    let table = between(user, "table `", "`").unwrap_or("?");
    if let Some(category) = between(user, "## Your category: ", "\n") {
        let case = pick_case(&format!("{path}\0{table}\0{category}"));
        return format!(
            "<question>{category}: how many rows does the table `{table}` in {path} hold? (case {case})</question><description>count the rows</description><type>number</type>"
        );
    }
    if user.contains("<uses>") {
        let current = between(user, "## The question so far", "It was built").unwrap_or("");
        let follow_up = user.split("## The follow-up").nth(1).unwrap_or("");
        let seed_category = current.split_once('\n').map(|(_, q)| q).unwrap_or("").split(':').next().unwrap_or("");
        let uses =
            if case_of(current) == "stuck" { "none" } else { "the first step's count sets the rows to consider" };
        return format!(
            "<question>Given the answer to the {} step on `{table}`, how many rows of {path} remain to consider? (case {})</question><uses>{uses}</uses><description>count, then count again</description>",
            seed_category.trim(),
            case_of(follow_up)
        );
    }
    agent_turn(body, &messages)
}

/// One turn of the agent: code that counts the table's rows (off by `d` for a wrong sample),
/// then an answer from the number the code printed.
fn agent_turn(body: &Value, messages: &[Value]) -> String {
    let user = messages[1]["content"].as_str().unwrap_or("");
    let sample = body["seed"].as_u64().map_or(0, |s| s - SEED);
    let critiqued = user.contains("A reviewer said");
    let case = case_of(user);
    let turns = messages.iter().filter(|m| m["role"] == "assistant").count();
    let data = user.split("Data: ").nth(1).unwrap_or("");
    let off = match case {
        "split" if sample == 1 && !critiqued => 1,
        "hopeless" => sample,
        _ => 0,
    };
    let never_answers = match case {
        "stuck" => true,
        "lonely" => sample > 0 && !critiqued,
        _ => false,
    };
    if case == "broken" && sample == 1 {
        return "I think the table has about 24 rows.".into();
    }
    let think = if case == "garbled" && sample == 0 {
        "Je vais lire la tablÃ© et compter les lignÃ©s."
    } else {
        "I count the rows."
    };
    let sql = data.contains("SQLite database");
    if turns == 0 || never_answers {
        let code = if sql {
            let table = between(data, "table `", "`").unwrap_or("?");
            format!(
                "r = execute_sql(sql='SELECT COUNT(*) + {off} AS n FROM \"{table}\"', output_path='result.csv')\nprint(r.iloc[0, 0])"
            )
        } else if let Some(sheet) = between(data, "sheet `", "`") {
            let file = between(data, "`", "`").unwrap_or("?");
            format!("import pandas as pd\ndf = pd.read_excel('{file}', sheet_name='{sheet}')\nprint(len(df) + {off})")
        } else {
            let file = between(data, "`", "`").unwrap_or("?");
            format!("import pandas as pd\ndf = pd.read_csv('{file}')\nprint(len(df) + {off})")
        };
        return format!("<think>{think}</think>\n<code>\n```python\n{code}\n```\n</code>");
    }
    let seen = messages.last().and_then(|m| m["content"].as_str()).unwrap_or("");
    let n = seen.split_whitespace().find(|w| w.parse::<i64>().is_ok()).unwrap_or("?");
    let mut answer = if sql { format!("{n} (the result is in result.csv)") } else { n.to_string() };
    if case == "verbose" && sample == 2 {
        answer.push_str(&" I read the table, counted its rows and checked the count twice.".repeat(120));
    }
    format!("<think>{think} The code printed {n}.</think>\n<answer>{answer}</answer>")
}

type Row = Map<String, Value>;

fn ledger(out: &std::path::Path, stage: &str) -> Vec<Row> {
    util::rows(&out.join("_rejections")).into_iter().filter(|r| r["stage"] == stage).collect()
}

/// Trajectories per question of each case: (sampled, after format, after length, after
/// language, kept by the judge).
fn expected(case: &str) -> [usize; 5] {
    match case {
        "right" => [3, 3, 3, 3, 3],
        "split" => [3, 3, 3, 3, 3],
        "broken" => [3, 2, 2, 2, 2],
        "lonely" => [3, 1, 1, 1, 3],
        "hopeless" => [3, 3, 3, 3, 0],
        "verbose" => [3, 3, 2, 2, 2],
        "stuck" => [3, 0, 0, 0, 0],
        "garbled" => [3, 3, 3, 2, 2],
        other => panic!("no case {other}"),
    }
}

#[test]
fn the_datamind_recipe_runs_end_to_end_and_lets_no_bad_data_through() {
    let server =
        fault_server::start_in_background(fault_server::Faults { respond: Some(endpoint), ..Default::default() });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let recipe = std::fs::read_to_string(util::root().join("recipes/datamind.toml")).unwrap();
    assert!(recipe.contains(&format!("seed = {SEED}")));
    // Beside the recipe's exports, one that keeps the teacher's system prompt on purpose.
    let recipe = recipe.replace("http://127.0.0.1:8000/v1", &server.base_url())
        + "\n[stages.hints]\nkind = \"export\"\ninputs = [\"unique\"]\nformat = \"sharegpt\"\npath = \"export/hints.json\"\nkeep_procedure = true\n";
    std::fs::write(dir.join("datamind.toml"), recipe).unwrap();
    let summary = util::kiln_ok(dir, &["run", "datamind.toml"]);
    let out = dir.join("outputs/datamind");
    let rows = |stage: &str| util::rows(&out.join(stage));

    // Questions: two per profiled table (9 tables: CSV, XLSX sheets, SQLite tables), and one
    // fusion per seed, except those compose refused to build on.
    let tables = rows("files");
    let queries = rows("queries");
    assert_eq!(queries.len(), 2 * tables.len(), "{summary}");
    let formats: std::collections::BTreeSet<&str> = queries.iter().map(|q| q["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["csv", "sqlite", "xlsx"].into());
    let stuck_seeds = queries.iter().filter(|q| case_of(q["question"].as_str().unwrap()) == "stuck").count();
    let hard = rows("hard");
    assert_eq!(hard.len(), queries.len() - stuck_seeds, "{summary}");
    let refused = ledger(&out, "hard");
    assert_eq!(refused.len(), stuck_seeds);
    assert!(refused.iter().all(|r| r["reason"] == "not_dependent"), "{refused:?}");
    for h in &hard {
        assert_eq!((h["difficulty"].as_u64(), h["chain_categories"].as_array().unwrap().len()), (Some(2), 2));
    }

    // Every stage's count follows from the cases.
    let questions: Vec<&Row> = queries.iter().chain(&hard).collect();
    let mut cases: BTreeMap<&str, usize> = BTreeMap::new();
    for q in &questions {
        *cases.entry(case_of(q["question"].as_str().unwrap())).or_default() += 1;
    }
    assert_eq!(cases.len(), CASES.len(), "every case is exercised: {cases:?}");
    let total = |i: usize| cases.iter().map(|(c, n)| n * expected(c)[i]).sum::<usize>();
    let stages = ["trajectories", "well_formed", "short", "clean", "judged"];
    for (i, stage) in stages.iter().enumerate() {
        assert_eq!(rows(stage).len(), total(i), "{stage}: {cases:?}\n{summary}");
    }
    let judged = rows("judged");
    let count = |verdict: &str| judged.iter().filter(|r| r["judge_verdict"] == verdict).count();
    assert_eq!(count("rescued"), 3 * (cases["split"] + cases["lonely"]));
    let m = util::manifest(&out.join("judged"));
    assert_eq!(m.counters["rescued"], (cases["split"] + cases["lonely"]) as u64, "{:?}", m.counters);
    assert_eq!(rows("unique").len(), judged.len(), "no two questions are alike");

    // Every row dropped on the way is in the ledger with its reason.
    for (stage, input) in [("well_formed", "trajectories"), ("short", "well_formed"), ("clean", "short")] {
        let dropped = ledger(&out, stage);
        assert_eq!(rows(input).len(), rows(stage).len() + dropped.len(), "{stage}");
    }
    let kept_ids: std::collections::BTreeSet<&str> = judged.iter().map(|r| r["row_id"].as_str().unwrap()).collect();
    let judge_ledger = ledger(&out, "judged");
    for row in rows("clean") {
        let id = row["row_id"].as_str().unwrap();
        assert!(kept_ids.contains(id) || judge_ledger.iter().any(|r| r["row_id"] == id), "{id} vanished");
    }
    let reasons = |stage: &str, reason: &str| ledger(&out, stage).iter().filter(|r| r["reason"] == reason).count();
    assert_eq!(reasons("judged", "judge:inconsistent"), 3 * cases["hopeless"]);
    assert_eq!(reasons("judged", "judge:superseded"), 3 * cases["split"] + cases["lonely"]);
    assert_eq!(reasons("short", "length_filter:answer_tokens"), cases["verbose"]);
    for r in util::rows(&out.join("_rejections")) {
        assert!(!r["reason"].as_str().unwrap().is_empty() && !r["detail"].as_str().unwrap().is_empty(), "{r:?}");
    }

    // The teacher read procedures (a composed question's, of its whole chain) and critiques;
    // no exported record holds either.
    let seen: Vec<String> = server.seen.per_prompt.lock().unwrap().keys().cloned().collect();
    assert!(seen.iter().any(|c| c.contains("A workflow that suits this kind of question")));
    assert!(seen.iter().any(|c| c.contains("A workflow that suits this kind of question") && c.contains(", then ")));
    assert!(seen.iter().any(|c| c.contains("A reviewer said")));
    let sft = std::fs::read_to_string(out.join("export/datamind_sft.json")).unwrap();
    let records: Vec<Value> = serde_json::from_str(&sft).unwrap();
    assert_eq!(records.len(), judged.len());
    for banned in ["A reviewer said", "A workflow that suits", "critique"] {
        assert!(!sft.contains(banned), "the SFT export holds {banned:?}");
    }
    let hints = std::fs::read_to_string(out.join("export/hints.json")).unwrap();
    assert!(hints.contains("A workflow that suits"), "keep_procedure exports the teacher's system prompt");
    assert!(!hints.contains("A reviewer said"), "never the critique");
    let script = format!(
        r#"
import json, pyarrow.parquet as pq
t = pq.read_table({rl:?}).to_pylist()
text = json.dumps(t)
print(json.dumps({{"rows": len(t), "critique": "A reviewer said" in text, "procedure": "A workflow that suits" in text,
  "verl": all(r["data_source"] == "kiln/datamind_rl" and r["ability"] == "data_analysis"
              and r["reward_model"]["ground_truth"] and r["prompt"][0]["role"] == "system" for r in t),
  "sql_gold_tables": sum(1 for r in t if r["reward_model"]["style"] == "result_csv")}}))
"#,
        rl = out.join("export/datamind_rl.parquet").display().to_string()
    );
    let rl: Value = serde_json::from_str(util::run_python(&util::tools_python(), &script).trim()).unwrap();
    let kept_questions: std::collections::BTreeSet<&str> =
        judged.iter().map(|r| r["parent_ids"][0].as_str().unwrap()).collect();
    assert_eq!(rl["rows"], kept_questions.len());
    assert_eq!(
        (&rl["critique"], &rl["procedure"], &rl["verl"]),
        (&Value::Bool(false), &Value::Bool(false), &Value::Bool(true))
    );
    assert!(rl["sql_gold_tables"].as_u64().unwrap() > 0, "SQL questions are rewarded on their result tables");

    // Everything was paid for once: a rerun finds every stage fresh and sends nothing.
    let sent = server.seen.total.load(Ordering::SeqCst);
    let again = util::kiln_ok(dir, &["run", "datamind.toml", "--force"]);
    assert_eq!(server.seen.total.load(Ordering::SeqCst), sent, "{again}");
    assert_eq!(rows("judged").len(), judged.len());
}
