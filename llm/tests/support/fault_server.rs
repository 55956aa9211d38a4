//! A local OpenAI-compatible chat server for tests, bound to 127.0.0.1, that injects faults at a
//! configured rate: 429 with Retry-After, 500, replies slower than the client's timeout,
//! truncated JSON and malformed content. It counts every request it receives, per prompt.
//!
//! Replies are deterministic: the content is `reply(prompt)` for the last user message, so a
//! test can check every row got the answer to its own question.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which faults to inject, and how often.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Share of requests that get a fault, 0 to 1.
    pub rate: f64,
    /// Seconds announced in Retry-After on 429s.
    pub retry_after_s: u32,
    /// How long a "slow" reply waits before answering.
    pub slow: Duration,
    /// Fixed latency of every normal reply.
    pub latency: Duration,
    /// Seed of the fault sequence.
    pub seed: u64,
    /// Inject only these kinds of fault, `|`-separated, in equal shares (`429`, `500`,
    /// `slow`, `truncated`, `malformed`; `429|500` for throttles and server errors).
    pub only: Option<&'static str>,
    /// A scripted teacher: the reply to a whole conversation (its messages), instead of
    /// [`reply`] to its first user message.
    pub teacher: Option<fn(&[serde_json::Value]) -> String>,
    /// A scripted endpoint that reads the whole request (model, messages, seed): the reply's
    /// content. Takes precedence over `teacher`.
    pub respond: Option<fn(&serde_json::Value) -> String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            rate: 0.0,
            retry_after_s: 0,
            slow: Duration::from_secs(2),
            latency: Duration::ZERO,
            seed: 1,
            only: None,
            teacher: None,
            respond: None,
        }
    }
}

/// What the server saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests per conversation (the whole message list).
    pub per_prompt: Mutex<HashMap<String, usize>>,
    /// Normal (non-fault) replies per conversation.
    pub answered: Mutex<HashMap<String, usize>>,
    /// Faults injected, by kind.
    pub faults: Mutex<HashMap<&'static str, usize>>,
    /// Requests being handled now, and the most at once.
    pub in_flight: AtomicUsize,
    /// The most requests handled at once.
    pub max_in_flight: AtomicUsize,
    /// All requests.
    pub total: AtomicUsize,
    /// The `seed` of each request (`None` when it had none), in arrival order.
    pub seeds: Mutex<Vec<Option<u64>>>,
}

/// The deterministic reply to a prompt: in the judge's format for consistency prompts (the
/// answers agree when their texts are equal, the first is best), a dependent fusion for
/// compose prompts, else synthesis tags.
pub fn reply(prompt: &str) -> String {
    if prompt.contains("<consistent>yes or no</consistent>") {
        let answers: Vec<&str> = prompt
            .lines()
            .filter_map(|l| l.strip_prefix('[').and_then(|l| l.split_once("] ")).map(|(_, a)| a.trim()))
            .collect();
        let same = answers.windows(2).all(|w| w[0] == w[1]);
        let (why, verdict) = if same { ("the answers are equal", "yes") } else { ("the answers differ", "no") };
        return format!("<reasoning>{why}</reasoning><consistent>{verdict}</consistent><best>1</best>");
    }
    if prompt.contains("<uses>") {
        // A compose prompt: a fused question (one per prompt) that says what it takes from the
        // first part.
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        prompt.hash(&mut h);
        return format!(
            "<question>What about the rows the first part selects ({:016x})?</question><uses>the first part's answer selects the rows</uses><description>d</description>",
            h.finish()
        );
    }
    format!("<question>What about {prompt}?</question><description>d:{prompt}</description><type>t</type>")
}

/// A running server.
pub struct FaultServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Seen>,
}

impl FaultServer {
    /// The base URL to put in `[models.x] base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Starts a server on 127.0.0.1 with `faults`, in the current runtime.
    pub async fn start(faults: Faults) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counter = Arc::new(AtomicUsize::new(0));
        let (s, f) = (seen.clone(), Arc::new(faults));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (s, f, counter) = (s.clone(), f.clone(), counter.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &s, &f, &counter).await;
                });
            }
        });
        FaultServer { addr, seen }
    }
}

/// Starts a server on its own thread and runtime, for tests that run `kiln` as a process.
pub fn start_in_background(faults: Faults) -> FaultServer {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let server = FaultServer::start(faults).await;
            tx.send((server.addr, server.seen.clone())).unwrap();
            std::future::pending::<()>().await;
        });
    });
    let (addr, seen) = rx.recv().unwrap();
    FaultServer { addr, seen }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

async fn serve(mut stream: TcpStream, seen: &Seen, faults: &Faults, counter: &AtomicUsize) -> std::io::Result<()> {
    loop {
        // Read one request: headers, then Content-Length bytes of body.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let header_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < header_end + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: serde_json::Value = serde_json::from_slice(&buf[header_end..header_end + length]).unwrap_or_default();
        // Replies answer the first user message; requests are counted per whole conversation.
        let prompt = body["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
            .to_string();
        let conversation = body["messages"].to_string();
        let n = body["n"].as_u64().unwrap_or(1) as usize;

        seen.total.fetch_add(1, Ordering::SeqCst);
        seen.seeds.lock().unwrap().push(body["seed"].as_u64());
        *seen.per_prompt.lock().unwrap().entry(conversation.clone()).or_default() += 1;
        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        seen.max_in_flight.fetch_max(now, Ordering::SeqCst);

        let k = counter.fetch_add(1, Ordering::SeqCst) as u64;
        let r = mix(faults.seed ^ k.wrapping_mul(0x9e3779b97f4a7c15));
        let fault = if ((r % 10_000) as f64) < faults.rate * 10_000.0 {
            let kinds: Vec<&'static str> =
                faults.only.unwrap_or("429|500|slow|truncated|malformed").split('|').collect();
            Some(kinds[(r / 10_000 % kinds.len() as u64) as usize])
        } else {
            None
        };
        if let Some(kind) = fault {
            *seen.faults.lock().unwrap().entry(kind).or_default() += 1;
        }
        let ok_body = |content: &str| {
            let choices: Vec<serde_json::Value> = (0..n)
                .map(|i| serde_json::json!({"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}))
                .collect();
            serde_json::json!({"id": "x", "object": "chat.completion", "choices": choices, "usage": {"prompt_tokens": prompt.len() as u64 / 4 + 10, "completion_tokens": 20 * n as u64}}).to_string()
        };
        let response = match fault {
            Some("429") => format!(
                "HTTP/1.1 429 Too Many Requests\r\nretry-after: {}\r\ncontent-length: 0\r\n\r\n",
                faults.retry_after_s
            ),
            Some("500") => {
                // A server error comes after the work was (partly) done.
                tokio::time::sleep(faults.latency).await;
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\noops!".to_string()
            }
            Some("slow") => {
                // The client gives up before this answers: it no longer counts as in flight.
                seen.in_flight.fetch_sub(1, Ordering::SeqCst);
                tokio::time::sleep(faults.slow).await;
                seen.in_flight.fetch_add(1, Ordering::SeqCst);
                let b = ok_body(&reply(&prompt));
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len())
            }
            Some("truncated") => {
                let b = ok_body(&reply(&prompt));
                let cut = &b[..b.len() / 2];
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{cut}",
                    cut.len()
                )
            }
            Some(_) => {
                let b = ok_body("Sure! Here is a question without any tags.");
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len())
            }
            None => {
                tokio::time::sleep(faults.latency).await;
                *seen.answered.lock().unwrap().entry(conversation.clone()).or_default() += 1;
                let messages = body["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
                let content = match (faults.respond, faults.teacher) {
                    (Some(respond), _) => respond(&body),
                    (None, Some(teacher)) => teacher(messages),
                    (None, None) => reply(&prompt),
                };
                let b = ok_body(&content);
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len())
            }
        };
        seen.in_flight.fetch_sub(1, Ordering::SeqCst);
        stream.write_all(response.as_bytes()).await?;
    }
}
