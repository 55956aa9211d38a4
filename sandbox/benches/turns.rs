//! Warm worker against the reference approach, measured in one run (`cargo bench -p
//! kiln-sandbox`; `cargo test --benches` runs one short pass as a smoke test).
//!
//! A trajectory is a sequence of pandas turns on a 20,000-row CSV. kiln runs each turn in the
//! trajectory's persistent worker. The reference implementation (RECIPE section 5) starts a
//! fresh Python process every turn and re-runs the whole code history in it; it is measured
//! twice: sandboxed the same way as kiln (fair isolation), and as a bare `python -c` (no
//! isolation at all, its most favourable case). Reported: p50/p95 per turn and the ratios,
//! then sandbox executions per second (small cells on one warm worker, and on one worker per
//! core at once).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_sandbox::{DataFile, Limits, PythonEnv, Sandbox, Worker, WorkerSpec};

const TURNS: &[&str] = &[
    "df = pd.read_csv('data/sales.csv')\nprint(df.shape)",
    "print(df.head())",
    "print(df.groupby('city')['amount'].mean())",
    "df['ratio'] = df['amount'] / df['qty']\nprint(df['ratio'].describe())",
    "print(df.groupby('city')['amount'].sum().nlargest(3))",
    "print(df[df['qty'] > 5].shape)",
    "print(df.corr(numeric_only=True))",
    "print(round(df['amount'].std(), 4))",
];

fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    xs.sort();
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn spec(dir: &Path, name: &str) -> WorkerSpec {
    WorkerSpec {
        scratch: dir.join(name),
        data: vec![DataFile { name: "sales.csv".into(), path: dir.join("sales.csv") }],
        database: None,
        limits: Limits::default(),
    }
}

fn write_data(dir: &Path) {
    let mut csv = String::from("city,amount,qty\n");
    let cities = ["Lyon", "Nantes", "Paris", "Lille", "Brest", "Nice"];
    for i in 0..20_000u64 {
        csv.push_str(&format!("{},{}.{},{}\n", cities[(i * 7 % 6) as usize], i * 37 % 1000, i % 100, 1 + i % 9));
    }
    std::fs::write(dir.join("sales.csv"), csv).unwrap();
}

fn summary(name: &str, mut xs: Vec<Duration>) -> (Duration, Duration) {
    let (p50, p95) = (percentile(&mut xs, 0.5), percentile(&mut xs, 0.95));
    println!("{name:<44} p50 {:>9.2} ms   p95 {:>9.2} ms   ({} turns)", ms(p50), ms(p95), xs.len());
    (p50, p95)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (trajectories, turns) = if full { (5, TURNS.len()) } else { (1, 4) };
    let env = PythonEnv::ensure().expect("the managed Python environment");
    let sandbox = Arc::new(Sandbox::new(env.clone(), None).expect("an isolation mode"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_data(dir);
    println!("isolation: {}; {trajectories} trajectories of {turns} pandas turns", sandbox.mode());

    let mut warm = Vec::new();
    for t in 0..trajectories {
        let mut worker = Worker::start(sandbox.clone(), spec(dir, &format!("warm{t}"))).await.unwrap();
        for code in &TURNS[..turns] {
            let start = Instant::now();
            let cell = worker.run(code).await.unwrap();
            warm.push(start.elapsed());
            assert!(cell.error.is_none(), "{cell:?}");
        }
    }

    let mut fresh = Vec::new();
    for t in 0..trajectories {
        for k in 1..=turns {
            let history = TURNS[..k].join("\n");
            let start = Instant::now();
            let mut worker = Worker::start(sandbox.clone(), spec(dir, &format!("fresh{t}-{k}"))).await.unwrap();
            let cell = worker.run(&history).await.unwrap();
            fresh.push(start.elapsed());
            assert!(cell.error.is_none(), "{cell:?}");
        }
    }

    // The bare reference reads `data/sales.csv` relative to its own folder.
    let bare_dir = dir.join("bare");
    std::fs::create_dir_all(bare_dir.join("data")).unwrap();
    std::fs::copy(dir.join("sales.csv"), bare_dir.join("data/sales.csv")).unwrap();
    let mut bare = Vec::new();
    for _ in 0..trajectories {
        for k in 1..=turns {
            let program = format!("import pandas as pd\nimport numpy as np\n{}", TURNS[..k].join("\n"));
            let start = Instant::now();
            let out = std::process::Command::new(&env.python)
                .arg("-c")
                .arg(&program)
                .current_dir(&bare_dir)
                .env("OPENBLAS_NUM_THREADS", "1")
                .output()
                .unwrap();
            bare.push(start.elapsed());
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let (w50, w95) = summary("kiln: warm worker", warm);
    let (f50, f95) = summary("reference: fresh sandboxed process + history", fresh);
    let (b50, b95) = summary("reference: bare python -c + history", bare);
    println!("speed-up vs sandboxed reference: p50 {:.0}x, p95 {:.0}x", ms(f50) / ms(w50), ms(f95) / ms(w95));
    println!("speed-up vs bare reference:      p50 {:.0}x, p95 {:.0}x", ms(b50) / ms(w50), ms(b95) / ms(w95));

    // Executions per second: small cells, one worker, then one worker per core at once.
    let window = Duration::from_secs(if full { 3 } else { 1 });
    let mut worker = Worker::start(sandbox.clone(), spec(dir, "rate")).await.unwrap();
    worker.run("s = pd.Series(range(100))").await.unwrap();
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < window {
        worker.run("x = s.sum()\nprint(x)").await.unwrap();
        n += 1;
    }
    println!("executions/s, one warm worker:  {:.0}", n as f64 / start.elapsed().as_secs_f64());
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(2);
    let mut handles = Vec::new();
    for c in 0..cores {
        let (sandbox, spec) = (sandbox.clone(), spec(dir, &format!("rate{c}")));
        handles.push(tokio::spawn(async move {
            let mut worker = Worker::start(sandbox, spec).await.unwrap();
            worker.run("s = pd.Series(range(100))").await.unwrap();
            let (start, mut n) = (Instant::now(), 0u64);
            while start.elapsed() < window {
                worker.run("x = s.sum()\nprint(x)").await.unwrap();
                n += 1;
            }
            n as f64 / start.elapsed().as_secs_f64()
        }));
    }
    let mut total = 0.0;
    for h in handles {
        total += h.await.unwrap();
    }
    println!("executions/s, {cores} warm workers:  {total:.0}");
}
