//! `synthesize` and `trajectories` against a real model: SmolLM2-135M served by `kiln serve`, or
//! the local endpoint in `KILN_TEST_LLM_URL` (e.g. `http://127.0.0.1:8080/v1` for llama-server,
//! with `KILN_TEST_LLM_MODEL`). Only loopback addresses are accepted.

mod util;

/// The endpoint, the model name, and the server process when the test started one.
fn local_model() -> (String, String, Option<util::LocalModel>) {
    let Ok(url) = std::env::var("KILN_TEST_LLM_URL") else {
        let server = util::LocalModel::start();
        return (server.url.clone(), util::LocalModel::NAME.into(), Some(server));
    };
    let host = url.split("://").nth(1).unwrap_or("").split(['/', ':']).next().unwrap_or("");
    assert!(
        ["127.0.0.1", "localhost", "[", ""].contains(&host) || url.contains("[::1]"),
        "tests only talk to loopback, got {url}"
    );
    (url, std::env::var("KILN_TEST_LLM_MODEL").unwrap_or_else(|_| "local".into()), None)
}

/// The `[pipeline]` and `[models.real]` tables of both tests.
fn header(url: &str, model: &str, max_tokens: u32, max_concurrency: u32) -> String {
    format!(
        r#"
[pipeline]
name = "real"
output_dir = "out"

[models.real]
base_url = "{url}"
model = "{model}"
temperature = 0.7
max_tokens = {max_tokens}
max_concurrency = {max_concurrency}
timeout_s = 300
"#
    )
}

#[test]
fn synthesize_against_a_real_local_model() {
    let (url, model, _server) = local_model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let pipeline = format!(
        r#"{}
[stages.files]
kind = "profile"
paths = ["data/species.csv"]

[stages.queries]
kind = "synthesize"
inputs = ["files"]
model = "real"
per_table = 2
"#,
        header(&url, &model, 192, 1)
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);
    let rows = util::rows(&dir.join("out/queries"));
    let rejected = util::rows(&dir.join("out/_rejections")).into_iter().filter(|r| r["stage"] == "queries").count();
    assert_eq!(rows.len() + rejected, 2, "every request done or rejected with a reason");
    assert!(rows.iter().all(|r| !r["question"].as_str().unwrap().is_empty()));
    assert!(rows.iter().all(|r| r["prompt_tokens"].as_u64().unwrap() > 0), "the server's token counts are recorded");
}

#[test]
fn trajectories_against_a_real_local_model() {
    let (url, model, _server) = local_model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    util::copy_sample_data(dir);
    let pipeline = format!(
        r#"{}
[stages.files]
kind = "profile"
paths = ["data/plots.csv", "data/*.sqlite"]
max_rows = 1000

[stages.questions]
kind = "programmatic"
inputs = ["files"]
categories = ["counting", "aggregation"]

# One question: a 135M model on a 2-core CPU writes 10 to 20 tokens a second.
[stages.few]
kind = "sql"
inputs = ["questions"]
query = "SELECT * FROM questions ORDER BY row_id LIMIT 1"

[stages.trajectories]
kind = "trajectories"
inputs = ["few"]
model = "real"
n = 2
max_turns = 4

[stages.formed]
kind = "format_filter"
inputs = ["trajectories"]

# Without gold answers, so the model judges consistency (and rescues once).
[stages.open]
kind = "sql"
inputs = ["formed"]
query = "SELECT * REPLACE (CAST(NULL AS VARCHAR) AS gold_answer) FROM formed"

[stages.judged]
kind = "judge"
inputs = ["open"]
model = "real"
rescue = {{ teacher = "real", rounds = 1, max_turns = 4 }}
"#,
        header(&url, &model, 192, 2)
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    util::kiln_ok(dir, &["run", "p.toml"]);
    let questions = util::rows(&dir.join("out/few")).len();
    let rows = util::rows(&dir.join("out/trajectories"));
    let rejected = util::manifest(&dir.join("out/trajectories")).rejected as usize;
    assert_eq!(rows.len() + rejected, 2 * questions, "every trajectory is a row or a rejection");
    for row in &rows {
        let turns = row["turns"].as_u64().unwrap();
        assert!((1..=4).contains(&turns), "{row:?}");
        let reason = row["end_reason"].as_str().unwrap();
        assert!(["answer", "max_turns"].contains(&reason), "{row:?}");
        // Null columns are left out of the JSON rows.
        assert_eq!(reason == "answer", row.get("final_answer").is_some_and(|a| a.is_string()), "{row:?}");
    }
    let formed = util::rows(&dir.join("out/formed")).len();
    let judged = util::rows(&dir.join("out/judged")).len();
    let dropped = util::rows(&dir.join("out/_rejections")).into_iter().filter(|r| r["stage"] == "judged").count();
    assert!(judged + dropped >= formed, "every well-formed trajectory is kept or dropped with a reason");
}

/// `evaluate` with a real model: every item gets a verdict and a reason, whatever the score.
#[test]
fn evaluate_a_real_local_model() {
    let (url, model, _server) = local_model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let samples = util::root().join("recipes/data/benchmarks/dabench");
    let pipeline = format!(
        r#"{}
[stages.eval]
kind = "evaluate"
model = "real"
benchmark = "dabench"
path = {:?}
runs = 1
max_turns = 2
"#,
        header(&url, &model, 160, 2),
        samples.display().to_string()
    );
    std::fs::write(dir.join("p.toml"), pipeline).unwrap();
    let printed = util::kiln_ok(dir, &["eval", "p.toml"]);
    assert!(printed.contains("| real | 2 |"), "{printed}");
    let rows = util::rows(&dir.join("out/eval"));
    assert_eq!(rows.len(), 2, "one row per item: {rows:?}");
    for r in &rows {
        assert!(!r["reason"].as_str().unwrap().is_empty(), "{r:?}");
        let failure = r.get("failure").and_then(|f| f.as_str());
        assert!(
            (r["correct"] == true && failure.is_none())
                || ["wrong", "no_answer", "format", "turn_limit", "sandbox_error"].contains(&failure.unwrap_or("")),
            "{r:?}"
        );
    }
}
