//! Engine throughput with an LLM in the loop: `recipes/throughput.toml` (load N questions, one
//! generate request each, export) against a local OpenAI-compatible endpoint started in-process
//! (127.0.0.1) with a fixed latency. For 20,000 and 200,000 rows, clean and with 5%, 20% and 50%
//! faults (half 429 with `Retry-After: 1` at once, half 500 after the latency): rows/s, kiln's
//! peak memory (its own, per run), rows lost and rows paid for twice; against a baseline
//! measured in the same run: the same requests sent by the bare client (no engine, no cache, no
//! datasets). The concurrency limit over time of the 20,000-row runs is drawn as an SVG.
//! `cargo bench --bench throughput`; `cargo test --benches` runs a small smoke version.
//! `KILN_BENCH_ROWS=20000 KILN_BENCH_FAULTS=0.2` measure one size and one fault rate;
//! `KILN_BENCH_WRAP` runs each `kiln` under a profiler (see [`launch`]).

#[path = "../llm/tests/support/fault_server.rs"]
mod fault_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_server::{Faults, start_in_background};
use futures::stream::{self, StreamExt};
use kiln_llm::{Client, Message, ModelConfig};

/// One `kiln` run: its exit code, peak resident memory (MiB) and stderr.
struct Run {
    code: Option<i32>,
    peak_mib: f64,
    stderr: String,
}

/// Set (to the `kiln` binary) when this program runs as the launcher of one `kiln` run.
const LAUNCHER: &str = "KILN_BENCH_LAUNCHER";

/// Runs `kiln args` in `dir` with `log` as `KILN_LOG`, measuring its own peak memory.
///
/// A child's `ru_maxrss` includes the resident size of the process that spawned it at the moment
/// of `exec` (Linux records the replaced image's high-water mark), and this bench holds the fault
/// server's books and the bare client's answers. So `kiln` is started by a fresh copy of this
/// program (a few MiB, see [`launch`]), whose `wait4` then gives `kiln`'s own peak.
fn kiln(dir: &Path, args: &[&str], log: &str) -> Run {
    let launcher = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .current_dir(dir)
        .env(LAUNCHER, env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&launcher.stdout);
    let mut fields = report.split_whitespace();
    let peak_kib: f64 = fields.next().and_then(|v| v.parse().ok()).expect("the launcher reports kiln's peak");
    let code = fields.next().and_then(|v| v.parse().ok());
    Run { code, peak_mib: peak_kib / 1024.0, stderr: String::from_utf8_lossy(&launcher.stderr).into_owned() }
}

/// The launcher: runs `kiln` with this program's arguments (its stderr passed through), reaps it
/// with `wait4` and prints its peak resident memory (KiB) and exit code on stdout.
// The child is reaped by `wait4`, which also gives its own resource usage.
#[allow(clippy::zombie_processes)]
fn launch(kiln: &std::ffi::OsStr) -> ! {
    // KILN_BENCH_WRAP="heaptrack -o /tmp/kiln" runs each `kiln` under a profiler (or any command
    // that execs its arguments): where the memory goes, not how much (the wrapper counts too).
    let mut command = match std::env::var("KILN_BENCH_WRAP") {
        Ok(wrapper) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("{wrapper} \"$@\"")).arg("sh").arg(kiln);
            c
        }
        Err(_) => Command::new(kiln),
    };
    let child = command.args(std::env::args_os().skip(1)).stdout(Stdio::null()).spawn().unwrap();
    let (mut status, mut usage): (libc::c_int, libc::rusage) = (0, unsafe { std::mem::zeroed() });
    // SAFETY: wait4 reaps our own child and writes into the two values we pass.
    unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    println!("{} {}", usage.ru_maxrss, code.map_or("signal".to_string(), |c| c.to_string()));
    std::process::exit(0)
}

/// A folder with the recipe (aimed at `base_url`) and `n` questions.
fn workspace(root: &Path, parent: &Path, name: &str, n: usize, base_url: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let seeds: Vec<String> = std::fs::read_to_string(root.join("recipes/data/throughput_questions.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let mut v: serde_json::Value = serde_json::from_str(&seeds[i % seeds.len()]).unwrap();
            v["question"] = format!("{} (#{i})", v["question"].as_str().unwrap()).into();
            v.to_string()
        })
        .collect();
    std::fs::write(dir.join("data/throughput_questions.jsonl"), lines.join("\n")).unwrap();
    let recipe = std::fs::read_to_string(root.join("recipes/throughput.toml")).unwrap();
    let recipe = recipe
        .replace("http://127.0.0.1:8080/v1", base_url)
        .replace("[pipeline]\n", "[pipeline]\noutput_dir = \"out\"\n");
    std::fs::write(dir.join("throughput.toml"), recipe).unwrap();
    dir
}

/// The limit over time, from the limiter's trace lines: (ms, limit).
fn limit_trace(stderr: &str) -> Vec<(f64, f64)> {
    let field = |line: &str, name: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.trim_matches('"').parse().ok())
    };
    stderr.lines().filter_map(|l| Some((field(l, "t_ms=")?, field(l, "limit=")?))).collect()
}

/// An SVG line chart of the limit over time, one line per run.
fn limit_svg(series: &[(String, Vec<(f64, f64)>)], max_limit: f64) -> String {
    let (w, h, left, bottom) = (720.0, 300.0, 50.0, 30.0);
    let t_max = series.iter().flat_map(|(_, s)| s.iter().map(|p| p.0)).fold(1.0, f64::max);
    let x = |t: f64| left + (w - left - 10.0) * t / t_max;
    let y = |l: f64| h - bottom - (h - bottom - 10.0) * l / max_limit;
    let colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"10\" x2=\"{left}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <text x=\"{2}\" y=\"{3}\" text-anchor=\"middle\">seconds ({4:.1} s shown)</text>\n\
         <text x=\"12\" y=\"{5}\" transform=\"rotate(-90 12 {5})\" text-anchor=\"middle\">concurrency limit (max {max_limit})</text>\n",
        h - bottom,
        w - 10.0,
        (w + left) / 2.0,
        h - 8.0,
        t_max / 1000.0,
        (h - bottom) / 2.0,
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        // A step line: the limit holds until its next change.
        let mut path = format!("{:.1},{:.1}", x(0.0), y(max_limit));
        let mut last = max_limit;
        for &(t, l) in points {
            path.push_str(&format!(" {:.1},{:.1} {:.1},{:.1}", x(t), y(last), x(t), y(l)));
            last = l;
        }
        path.push_str(&format!(" {:.1},{:.1}", x(t_max), y(last)));
        svg.push_str(&format!("<polyline fill=\"none\" stroke=\"{colour}\" points=\"{path}\"/>\n"));
        svg.push_str(&format!("<text x=\"{:.0}\" y=\"{}\" fill=\"{colour}\">{name}</text>\n", w - 150.0, 20 + 14 * i));
    }
    svg.push_str("</svg>\n");
    svg
}

fn main() {
    if let Some(kiln) = std::env::var_os(LAUNCHER) {
        launch(&kiln);
    }
    let full = std::env::args().any(|a| a == "--bench");
    // KILN_BENCH_ROWS=20000 measures one size only.
    let chosen: Option<usize> = std::env::var("KILN_BENCH_ROWS").ok().and_then(|v| v.parse().ok());
    let sizes: &[usize] = match chosen {
        Some(ref n) if full => std::slice::from_ref(n),
        _ if full => &[20_000, 200_000],
        _ => &[200],
    };
    // KILN_BENCH_FAULTS=0.2 measures one fault rate only.
    let chosen_rate: Option<f64> = std::env::var("KILN_BENCH_FAULTS").ok().and_then(|v| v.parse().ok());
    let rates: &[f64] = match chosen_rate {
        Some(ref r) if full => std::slice::from_ref(r),
        _ if full => &[0.05, 0.2, 0.5],
        _ => &[0.2],
    };
    let latency = Duration::from_millis(50);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let recipe = std::fs::read_to_string(root.join("recipes/throughput.toml")).unwrap();
    let max_concurrency: f64 = recipe
        .lines()
        .find_map(|l| l.strip_prefix("max_concurrency = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(64.0);
    let mut lines = Vec::new();
    let mut series = Vec::new();
    for &n in sizes {
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        // Clean, and the bare client on the same endpoint.
        let server = start_in_background(Faults { latency, ..Faults::default() });
        let dir = workspace(&root, tmp.path(), &format!("clean-{n}"), n, &server.base_url());
        let start = Instant::now();
        let run = kiln(&dir, &["run", "throughput.toml"], "warn");
        let took = start.elapsed();
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let exported = std::fs::read_to_string(dir.join("out/answers.jsonl")).unwrap().lines().count();
        assert_eq!(exported, n, "every answer exported");
        let config: ModelConfig = toml::from_str(&format!(
            "base_url = \"{}\"\nmodel = \"local\"\nmax_concurrency = {max_concurrency}\n",
            server.base_url()
        ))
        .unwrap();
        let client = Arc::new(Client::new("local", config).unwrap());
        let bare = tokio::runtime::Runtime::new().unwrap().block_on(async {
            let start = Instant::now();
            stream::iter(0..n)
                .map(|i| {
                    let client = client.clone();
                    async move {
                        let body = client.request_body(&[Message::new("user", format!("baseline {i}"))], 1);
                        client.complete(&body).await.unwrap()
                    }
                })
                .buffer_unordered(4 * max_concurrency as usize)
                .collect::<Vec<_>>()
                .await;
            start.elapsed()
        });
        say(
            &mut lines,
            format!(
                "{n} rows, clean: kiln {:.0} rows/s, {:.0} MiB peak; bare client {:.0} requests/s (kiln/bare = {:.2})",
                rate(took),
                run.peak_mib,
                rate(bare),
                rate(took) / rate(bare)
            ),
        );
        for &share in rates {
            let server = start_in_background(Faults {
                latency,
                rate: share,
                only: Some("429|500"),
                retry_after_s: 1,
                ..Faults::default()
            });
            let name = format!("faults-{}-{n}", (share * 100.0) as u32);
            let dir = workspace(&root, tmp.path(), &name, n, &server.base_url());
            let start = Instant::now();
            let mut run = kiln(&dir, &["run", "throughput.toml"], "warn,kiln_llm::limit=debug");
            // Exit 3: rows failed past every retry; the plain rerun the message names finishes them.
            let mut reruns = 0;
            let mut peak = run.peak_mib;
            let mut retried = retried_rows(&dir);
            let trace = limit_trace(&run.stderr);
            while run.code == Some(3) && reruns < 3 {
                run = kiln(&dir, &["run", "throughput.toml"], "warn");
                peak = peak.max(run.peak_mib);
                retried += retried_rows(&dir);
                reruns += 1;
            }
            let took = start.elapsed();
            assert_eq!(run.code, Some(0), "{}", run.stderr);
            let exported = std::fs::read_to_string(dir.join("out/answers.jsonl")).unwrap_or_default().lines().count();
            let twice = server.seen.answered.lock().unwrap().values().filter(|&&k| k > 1).count();
            say(
                &mut lines,
                format!(
                    "{n} rows, {:.0}% faults: {:.1} s, {:.0} rows/s, {peak:.0} MiB peak, {} lost, {twice} paid twice, {retried} rows retried, {reruns} reruns",
                    share * 100.0,
                    took.as_secs_f64(),
                    rate(took),
                    n - exported
                ),
            );
            if n == sizes[0] {
                series.push((format!("{:.0}% faults", share * 100.0), trace));
            }
        }
    }
    let svg = root.join("target/bench/throughput_limit.svg");
    std::fs::create_dir_all(svg.parent().unwrap()).unwrap();
    std::fs::write(&svg, limit_svg(&series, max_concurrency)).unwrap();
    println!("throughput, endpoint latency {} ms, max_concurrency {max_concurrency}:", latency.as_millis());
    for line in lines {
        println!("  {line}");
    }
    println!("  the limit over time of the {}-row runs: {}", sizes[0], svg.display());
}

/// The rows the last run of `dir` sent more than once (its manifest's try counters).
fn retried_rows(dir: &Path) -> u64 {
    let Ok(bytes) = std::fs::read(dir.join("out/answers/manifest.json")) else { return 0 };
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    manifest["counters"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("row_tries_") && *k != "row_tries_1")
        .map(|(_, v)| v.as_u64().unwrap())
        .sum()
}

/// Records a result line, and shows it at once on stderr (a long bench shows its progress).
fn say(lines: &mut Vec<String>, line: String) {
    eprintln!("{line}");
    lines.push(line);
}
