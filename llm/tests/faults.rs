//! The client against a local fault-injecting server: 500 requests with 20% faults all finish,
//! each with its own answer, within the concurrency limit, with the retries the faults demand.

#[path = "support/fault_server.rs"]
mod fault_server;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fault_server::{FaultServer, Faults, reply};
use kiln_llm::{Client, Message, ModelConfig};

fn config(base_url: String) -> ModelConfig {
    toml::from_str(&format!(
        "base_url = \"{base_url}\"\nmodel = \"m\"\nmax_concurrency = 8\ntimeout_s = 1.5\nmax_retries = 10\nbackoff_s = 0.01\n"
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_finishes_despite_twenty_percent_faults() {
    let server = FaultServer::start(Faults { rate: 0.2, slow: Duration::from_secs(3), ..Faults::default() }).await;
    let client = Arc::new(Client::new("m", config(server.base_url())).unwrap());
    let mut tasks = Vec::new();
    for i in 0..500 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let body = client.request_body(&[Message::new("user", format!("q{i}"))], 1);
            (i, client.complete(&body).await)
        }));
    }
    for t in tasks {
        let (i, result) = t.await.unwrap();
        let completion = result.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        // A malformed (tagless) reply is a valid completion for the client: parsing is the
        // stage's job. Everything else must be this prompt's own answer.
        let text = &completion.texts[0];
        assert!(text == &reply(&format!("q{i}")) || !text.contains('<'), "request {i} got {text}");
    }
    let seen = &server.seen;
    let faults = seen.faults.lock().unwrap().clone();
    for kind in ["429", "500", "slow", "truncated", "malformed"] {
        assert!(faults.get(kind).copied().unwrap_or(0) > 5, "each fault kind injected: {faults:?}");
    }
    let stats: std::collections::HashMap<_, _> = client.stats().snapshot().into_iter().collect();
    let retryable = faults["429"] + faults["500"] + faults["slow"] + faults["truncated"];
    assert_eq!(stats["llm_retries"] as usize, retryable, "one retry per retryable fault: {stats:?}");
    assert_eq!(stats["llm_throttled"] as usize, faults["429"]);
    assert_eq!(stats["llm_server_errors"] as usize, faults["500"]);
    assert_eq!(stats["llm_timeouts"] as usize, faults["slow"]);
    assert_eq!(stats["llm_bad_replies"] as usize, faults["truncated"]);
    assert_eq!(seen.total.load(Ordering::SeqCst), 500 + retryable, "no request sent more than needed");
    assert!(seen.max_in_flight.load(Ordering::SeqCst) <= 8, "never more than max_concurrency in flight");
    assert!(client.concurrency() >= 1);
}

#[tokio::test]
async fn retry_after_is_honoured_and_a_missing_key_is_reported() {
    // Every request throttled, announcing 1 s: two attempts take at least a second.
    let server =
        FaultServer::start(Faults { rate: 1.0, retry_after_s: 1, only: Some("429"), ..Faults::default() }).await;
    let mut cfg = config(server.base_url());
    cfg.max_retries = 1;
    let client = Client::new("m", cfg).unwrap();
    let body = client.request_body(&[Message::new("user", "x")], 1);
    let start = Instant::now();
    // While it waits out the Retry-After, the request counts as backing off (it holds no slot).
    let (result, during) = tokio::join!(client.complete(&body), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.backing_off()
    });
    let err = result.unwrap_err();
    assert_eq!((during, client.backing_off()), (1, 0), "one request backing off during the wait, none after");
    assert!(err.to_string().contains("gave up after 2 attempts, last: HTTP 429"), "{err}");
    assert_eq!(server.seen.faults.lock().unwrap()["429"], 2);
    assert!(start.elapsed() >= Duration::from_secs(1), "waited as Retry-After said");
    assert_eq!(client.concurrency(), 6, "lowered twice from 8, gently: two throttles are not yet an overload");

    // A key variable that is not set is a configuration error, before any request.
    let missing = ModelConfig { api_key_env: Some("KILN_TEST_UNSET_VARIABLE".into()), ..config(server.base_url()) };
    let err = Client::new("m", missing).unwrap_err();
    assert!(err.to_string().contains("KILN_TEST_UNSET_VARIABLE"), "{err}");
}
