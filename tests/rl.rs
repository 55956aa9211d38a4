//! `train_rl` on a toy verifiable task: small arithmetic questions about a table ("a = 1 and
//! b = 2: what is a + b?"), answered in one turn. The four questions share one answer, so a
//! tiny policy (2 layers, SmolLM2's tokenizer, random weights) has one thing to learn from the
//! reward within a CI-sized run. It is first taught the format by SFT on answers drawn at random
//! from 1-4 (a quarter right); RL with the real rewards then raises its mean reward well above
//! where it started, and the same run with the rewards shuffled across trajectories does not.
//! A run killed after a checkpoint and rerun gives the same metrics as one never killed.

mod util;

use std::path::Path;

use util::tiny_model;

/// The system prompt, as the template renders it.
const SYSTEM: &str = "Reply with <think>a short thought</think> and then <answer>the value</answer>.";

/// Question `q`: the table's `a` and `b` always add up to 3.
fn question(q: u32) -> String {
    format!("In t.csv, a = {q} and b = {}. What is a + b?", 3 - q)
}

fn user(q: u32) -> String {
    format!("{}\n\nData: `data/t.csv` (CSV).", question(q))
}

fn turn(answer: u32) -> String {
    format!("<think>read a</think>\n<answer>{answer}</answer>")
}

fn messages(q: u32, answer: u32) -> serde_json::Value {
    serde_json::json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user(q)},
        {"role": "assistant", "content": turn(answer)},
    ])
}

/// SFT of the tiny model on `warm.json` into `warm/model` (`epochs` sets the schedule's length,
/// `steps` where it stops).
fn warm_start(dir: &Path, max_len: u32, batch: u32, epochs: u32, steps: u32) {
    let settings = format!(
        "model = \"tiny\"\ndata = \"warm.json\"\noutput_dir = \"warm\"\nmax_len = {max_len}\nbatch_size = {batch}\nepochs = {epochs}\nmax_steps = {steps}\nlr = 1e-2\nwarmup_ratio = 0.05\nsave_every = {steps}\n"
    );
    std::fs::write(dir.join("warm.toml"), settings).unwrap();
    util::kiln_ok(dir, &["train", "warm.toml"]);
}

/// The toy project: data, template, the warm-started policy (`warm/model`) and the prompts.
fn toy(dir: &Path) {
    std::fs::write(dir.join("t.csv"), "a,b\n1,2\n").unwrap();
    std::fs::create_dir_all(dir.join("templates")).unwrap();
    std::fs::write(dir.join("templates/toy.j2"), SYSTEM).unwrap();
    tiny_model(&dir.join("tiny"));
    // Every question answered with every digit: the format is learned, the answer is not.
    let warm: Vec<_> =
        (0..4).flat_map(|q| (1..=4).map(move |a| serde_json::json!({"messages": messages(q, a)}))).collect();
    std::fs::write(dir.join("warm.json"), serde_json::to_string(&warm).unwrap()).unwrap();
    warm_start(dir, 256, 16, 200, 60);
    let prompts: Vec<String> = (0..4)
        .map(|q| {
            serde_json::json!({
                "row_id": format!("q{q}"), "question": question(q),
                "gold_answer": "3", "data_files": ["t.csv"], "expert_trajectory": messages(q, 3),
            })
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("rl.jsonl"), prompts.join("\n")).unwrap();
}

fn pipeline(dir: &Path, name: &str, shuffled: bool, steps: u32) {
    let toml = format!(
        r#"[pipeline]
name = "{name}"
templates = "templates"

[stages.rl]
kind = "train_rl"
data = "rl.jsonl"
model = "warm/model"
template = "toy.j2"
max_turns = 1
parallel = 16
group_size = 4
prompts_per_step = 4
micro_batch = 16
max_steps = {steps}
lr = 1e-3
g_start = 0.0
g_end = 0.0
temperature = 1.0
max_new_tokens = 24
max_len = 256
save_every = 5
shuffle_rewards = {shuffled}
"#
    );
    std::fs::write(dir.join(format!("{name}.toml")), toml).unwrap();
}

fn metrics(dir: &Path, name: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    util::rows(&dir.join(format!("outputs/{name}/rl")))
}

fn rewards(rows: &[serde_json::Map<String, serde_json::Value>]) -> Vec<f64> {
    rows.iter().map(|r| r["reward_mean"].as_f64().unwrap()).collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn rl_raises_the_reward_shuffled_rewards_do_not_and_a_killed_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    toy(dir);

    // The real run, killed once its step-10 checkpoint is written, then rerun to the end.
    pipeline(dir, "real", false, 40);
    let checkpoint = || {
        let runs = std::fs::read_dir(dir.join("outputs/real/rl.train")).into_iter().flatten().flatten();
        runs.map(|r| r.path().join("checkpoint/state.json"))
            .any(|s| std::fs::read_to_string(s).is_ok_and(|s| s.contains("\"step\":10")))
    };
    assert!(util::run_and_kill_when(dir, &["run", "real.toml"], checkpoint), "killed before it finished");
    util::kiln_ok(dir, &["run", "real.toml"]);
    let real = metrics(dir, "real");
    assert_eq!(real.len(), 40);
    let manifest = util::manifest(&dir.join("outputs/real/rl"));
    assert_eq!(manifest.counters["resumed_from_step"], 10);

    // Steps 11 and 12 ran after the resume: they match a run never killed (the schedule is
    // flat, so a 12-step run takes the same first steps).
    pipeline(dir, "reference", false, 12);
    util::kiln_ok(dir, &["run", "reference.toml"]);
    let reference = metrics(dir, "reference");
    for (a, b) in reference.iter().zip(&real) {
        for key in ["reward_mean", "accuracy", "entropy", "pg_loss", "grad_norm", "clip_fraction"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "step {}: {key} {x} never killed, {y} resumed",
                a["step"]
            );
        }
    }

    let real = rewards(&real);
    let (start, end) = (mean(&real[..5]), mean(&real[real.len() - 5..]));
    assert!(end > start + 0.25, "the reward rises: {start:.2} -> {end:.2}: {real:?}");

    pipeline(dir, "control", true, 40);
    util::kiln_ok(dir, &["run", "control.toml"]);
    let control = rewards(&metrics(dir, "control"));
    eprintln!("rewards per step, real: {real:.2?}\nshuffled: {control:.2?}");
    let (c_start, c_end) = (mean(&control[..5]), mean(&control[control.len() - 5..]));
    assert!(c_end < c_start + 0.15, "shuffled rewards teach nothing: {c_start:.2} -> {c_end:.2}: {control:?}");
    assert!(c_end < end - 0.2, "the real rewards beat the shuffled ones: {c_end:.2} vs {end:.2}");

    // `kiln train --rl` runs the same stage from a settings file.
    let settings = std::fs::read_to_string(dir.join("real.toml")).unwrap();
    let settings = settings.split("kind = \"train_rl\"\n").nth(1).unwrap().replace("max_steps = 40", "max_steps = 2");
    std::fs::write(dir.join("rl_file.toml"), settings).unwrap();
    let summary = util::kiln_ok(dir, &["train", "--rl", "rl_file.toml"]);
    assert!(summary.contains("mean reward:") && summary.contains("(step 2)"), "{summary}");
    assert!(dir.join("outputs/rl/model/model.safetensors").is_file() && dir.join("outputs/rl/rl.svg").is_file());
    let rollouts = std::fs::read_to_string(dir.join("outputs/rl/rollouts.jsonl")).unwrap();
    let logged = rollouts.lines().filter(|l| l.contains("\"step\":1,")).count() as u64;
    let sampled = metrics(dir, "rl_file")[0]["trajectories"].as_u64().unwrap();
    assert!(logged >= 16 && logged == sampled, "every trajectory is logged: {logged} of {sampled}");
}

#[test]
fn kiln_train_rl_names_every_bad_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("bad.toml"),
        "model = \"smollm2\"\ndata = \"nope.parquet\"\ngroup_size = 1\nclip_dual = 1.1\n",
    )
    .unwrap();
    let out = util::kiln_err(dir, &["train", "--rl", "bad.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2:8: error: `data` = \"nope.parquet\": no such file"), "{err}");
    assert!(
        err.contains("give an `rl` export (an `export` stage with format = \"rl\"), relative to this file"),
        "{err}"
    );
    assert!(err.contains("bad.toml:3:14: error: `group_size` must be between 2 and 1024, got 1"), "{err}");
    assert!(err.contains("bad.toml:4:13: error: `clip_dual` must be greater than 1 + clip_high, got 1.1"), "{err}");
}

#[test]
fn rollouts_run_the_policys_code_in_the_sandbox_and_earn_their_own_gold() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("templates")).unwrap();
    std::fs::write(dir.join("templates/toy.j2"), SYSTEM).unwrap();
    tiny_model(&dir.join("tiny"));
    // Question q is about its own table t<q>.csv, whose a + b is q + 1: each has its own gold.
    let user = |q: u32| format!("What is a + b in t{q}.csv?\n\nData: `data/t{q}.csv` (CSV).");
    let code = |q: u32| {
        format!(
            "<think>read it</think>\n<code>\n```python\nimport pandas as pd\nprint(pd.read_csv('data/t{q}.csv').sum(axis=1)[0])\n```\n</code>"
        )
    };
    let expert = |q: u32| {
        serde_json::json!([
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user(q)},
            {"role": "assistant", "content": code(q)},
            {"role": "user", "content": format!("<interpreter>\n{}\n</interpreter>", q + 1)},
            {"role": "assistant", "content": turn(q + 1)},
        ])
    };
    for q in 0..4 {
        std::fs::write(dir.join(format!("t{q}.csv")), format!("a,b\n{q},1\n")).unwrap();
    }
    let warm: Vec<_> = (0..4).map(|q| serde_json::json!({"messages": expert(q)})).collect();
    std::fs::write(dir.join("warm.json"), serde_json::to_string(&warm).unwrap()).unwrap();
    warm_start(dir, 512, 4, 400, 120);
    let prompts: Vec<String> = (0..4)
        .map(|q| {
            let row = serde_json::json!({"row_id": format!("q{q}"), "question": format!("What is a + b in t{q}.csv?"),
                "gold_answer": (q + 1).to_string(), "data_files": [format!("t{q}.csv")], "expert_trajectory": expert(q)});
            row.to_string()
        })
        .collect();
    std::fs::write(dir.join("rl.jsonl"), prompts.join("\n")).unwrap();
    std::fs::write(
        dir.join("rl.toml"),
        "data = \"rl.jsonl\"\nmodel = \"warm/model\"\ntemplate = \"toy.j2\"\nmax_turns = 3\ngroup_size = 2\nprompts_per_step = 4\nmax_steps = 2\nsampling_rounds = 1\nmax_new_tokens = 64\nmax_len = 512\nlr = 1e-3\ntemperature = 0.5\nlora = { rank = 4 }\n",
    )
    .unwrap();
    util::kiln_ok(dir, &["train", "--rl", "rl.toml"]);
    let rollouts: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("outputs/rl/rollouts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rollouts.len(), 16, "2 steps of 4 prompts x 2 trajectories");
    // The sandbox ran the policy's code on the real files and answered in interpreter turns.
    let output = |r: &serde_json::Value| {
        r["turns"].as_array().into_iter().flatten().any(|m| {
            let text = m["content"].as_str().unwrap_or("");
            text.starts_with("<interpreter>\n") && text[14..15].chars().all(|c| c.is_ascii_digit())
        })
    };
    let ran = rollouts.iter().filter(|r| output(r)).count();
    assert!(ran >= 8, "most rollouts ran code: {ran} of 16\n{rollouts:#?}");
    // Every reward is earned against the rollout's own item's gold.
    for r in &rollouts {
        let gold = r["item"].as_str().unwrap()[1..].parse::<u32>().unwrap() + 1;
        let right = r["answer"].as_str().is_some_and(|a| a.trim() == gold.to_string());
        assert_eq!(r["reward"].as_f64().unwrap() == 1.0, right, "{r:#}");
    }
    let metrics = util::rows(&dir.join("outputs/rl/rl"));
    assert!(metrics.iter().all(|m| m["sandbox_s"].as_f64().unwrap() > 0.0), "{metrics:?}");
    assert!(metrics.iter().all(|m| m["g"].as_f64().unwrap() > 0.0 && m["sft_loss"].as_f64().unwrap() > 0.0));
    assert!(dir.join("outputs/rl/model/model.safetensors").is_file(), "LoRA merged into a full model");
}
