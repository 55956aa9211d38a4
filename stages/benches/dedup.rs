//! MinHash + LSH dedup throughput (`cargo bench -p kiln-stages --bench dedup`; `cargo test
//! --benches` runs a small pass as a smoke test): documents per second on one core and on
//! every core, in one run, over synthetic questions of 15 to 30 words with 5% planted
//! near-duplicates.

use std::time::Instant;

use kiln_stages::dedup::near_duplicates;

fn questions(n: usize) -> Vec<String> {
    let words: Vec<String> = (0..3000).map(|i| format!("w{i}")).collect();
    let mut state: u64 = 42;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out: Vec<String> = Vec::with_capacity(n);
    while out.len() < n {
        if out.len() % 20 == 19 {
            let copy = format!("{} again", out[out.len() - 1]);
            out.push(copy);
            continue;
        }
        let len = 15 + (next() % 16) as usize;
        out.push((0..len).map(|_| words[(next() % 3000) as usize].as_str()).collect::<Vec<_>>().join(" "));
    }
    out
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let docs = questions(if full { 100_000 } else { 2_000 });
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let start = Instant::now();
    let found = one.install(|| near_duplicates(&docs, 0.9, 3, 128)).iter().filter(|d| d.is_some()).count();
    let single = docs.len() as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let again = near_duplicates(&docs, 0.9, 3, 128).iter().filter(|d| d.is_some()).count();
    let all = docs.len() as f64 / start.elapsed().as_secs_f64();
    assert_eq!(found, again);
    println!("dedup of {} docs ({found} near-duplicates found)", docs.len());
    println!("one core:       {single:>10.0} docs/s");
    println!(
        "{cores} cores:       {all:>10.0} docs/s ({:.0} docs/s per core, {:.2}x the single core)",
        all / cores as f64,
        all / single
    );
}
