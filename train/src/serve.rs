//! `kiln serve`: an OpenAI-compatible HTTP server over a local model, so every LLM stage of kiln
//! can run against it. `/v1/chat/completions` (n, stop, temperature, top_p, top_k, seed,
//! max_tokens, usage, vLLM's `ignore_eos`; `stream: true` sends server-sent events as OpenAI does, with
//! `stream_options.include_usage`) and `/v1/models`. Requests are batched continuously on one
//! generation thread: a request that arrives while others generate joins their batch at the
//! next token, and each is answered as soon as it is done. A GGUF model runs on the packed path
//! ([`crate::decode`]: its weights kept as the file's integers, prompts prefilled and tokens
//! decoded there); a model directory on the burn decoder.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use burn::prelude::Device;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::chat::value_from_json;
use crate::config::ModelConfig;
use crate::decode::Engine;
use crate::generate::{Completion, Delta, Request, Running, Sampling};
use crate::gguf::Gguf;
use crate::loader::{LoadedModel, model_name};
use crate::tokenizer::TextCodec;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// Most sequences generated together in one batch.
    pub max_batch: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
}

/// A job's completions, one per requested choice.
type Reply = Result<Vec<Completion>, String>;

struct Job {
    prompt: Vec<u32>,
    n: usize,
    sampling: Sampling,
    reply: oneshot::Sender<Reply>,
    /// For a streamed request: each choice's new text as it is generated (choice index, delta).
    deltas: Option<tokio::sync::mpsc::UnboundedSender<(usize, Delta)>>,
}

/// A model `kiln serve` runs: a GGUF file on the packed decode path (prompts and tokens both;
/// no f32 copy of its weights is made), or a Hugging Face model directory on the burn decoder.
// One per server: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum ServedModel {
    Packed { engine: Engine, codec: TextCodec, path: PathBuf },
    Burn(LoadedModel),
}

impl ServedModel {
    /// Opens `path`: a `.gguf` file on the packed path, else a model directory onto `device`.
    pub fn load(path: &Path, device: &Device) -> crate::error::Result<Self> {
        if !(path.is_file() && path.extension().is_some_and(|e| e == "gguf")) {
            return Ok(ServedModel::Burn(LoadedModel::load(path, device)?));
        }
        let gguf = Gguf::open(path)?;
        let engine = Engine::from_gguf(&gguf, &gguf.config()?)?;
        let mib = engine.bytes() as f64 / (1024.0 * 1024.0);
        tracing::info!("decoding on the packed path (the GGUF's own integers, {mib:.0} MiB of matrices)");
        Ok(ServedModel::Packed { codec: TextCodec::from_gguf(&gguf, path)?, engine, path: path.to_path_buf() })
    }

    /// The model's tokenizer and chat template.
    pub fn codec(&self) -> &TextCodec {
        match self {
            ServedModel::Packed { codec, .. } => codec,
            ServedModel::Burn(model) => &model.codec,
        }
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        match self {
            ServedModel::Packed { engine, .. } => &engine.config,
            ServedModel::Burn(model) => &model.config,
        }
    }

    /// What was loaded, as given.
    pub fn path(&self) -> &Path {
        match self {
            ServedModel::Packed { path, .. } => path,
            ServedModel::Burn(model) => &model.path,
        }
    }

    /// An empty batch on this model.
    fn running(&self) -> Running<'_> {
        match self {
            ServedModel::Packed { engine, codec, .. } => Running::packed(codec, engine),
            ServedModel::Burn(model) => Running::new(model),
        }
    }
}

struct Shared {
    model: Arc<ServedModel>,
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    default_max_tokens: usize,
}

/// Serves `model` until the process ends; `ready` receives the bound address (port 0 picks one).
pub async fn serve(
    model: ServedModel,
    options: ServeOptions,
    ready: Option<oneshot::Sender<SocketAddr>>,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<Job>();
    let model = Arc::new(model);
    let shared = Arc::new(Shared {
        model: model.clone(),
        jobs: std::sync::Mutex::new(tx),
        default_max_tokens: options.default_max_tokens,
    });
    let max_batch = options.max_batch.max(1);
    std::thread::Builder::new().name("kiln-generate".into()).spawn(move || generation_loop(&model, rx, max_batch))?;
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(options.addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!("serving on http://{addr}/v1");
    if let Some(ready) = ready {
        let _ = ready.send(addr);
    }
    axum::serve(listener, app).await
}

/// Continuous batching: between two decode steps, waiting jobs join the running batch while it
/// has room for all their choices (up to `max_batch` rows; a job larger than that runs alone),
/// and each job is answered as soon as its last choice finishes.
fn generation_loop(model: &ServedModel, rx: mpsc::Receiver<Job>, max_batch: usize) {
    let fresh = || model.running();
    let mut running = fresh();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    // Jobs in the batch, by id: the job, its choices finished so far, and how many are left.
    let mut active: HashMap<usize, (Job, Vec<Option<Completion>>, usize)> = HashMap::new();
    // Each row's job and choice, by row key.
    let mut owners: HashMap<usize, (usize, usize)> = HashMap::new();
    let (mut next_job, mut next_row) = (0usize, 0usize);
    loop {
        if running.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        waiting.extend(rx.try_iter());
        let mut joining = Vec::new();
        while let Some(job) = waiting.front() {
            let rows = running.len() + joining.len();
            if rows > 0 && rows + job.n > max_batch {
                break;
            }
            let job = waiting.pop_front().expect("a waiting job");
            for i in 0..job.n {
                let sampling = Sampling { seed: job.sampling.seed.wrapping_add(i as u64), ..job.sampling.clone() };
                joining.push((next_row, Request { prompt: job.prompt.clone(), sampling }));
                owners.insert(next_row, (next_job, i));
                next_row += 1;
            }
            let n = job.n;
            active.insert(next_job, (job, vec![None; n], n));
            next_job += 1;
        }
        running.join(joining);
        let mut stream = |delta: Delta| {
            let (j, choice) = owners[&delta.row];
            if let Some(deltas) = &active[&j].0.deltas {
                let _ = deltas.send((choice, delta));
            }
        };
        match running.step(&mut stream) {
            Ok(finished) => {
                for (row, completion) in finished {
                    let (j, choice) = owners.remove(&row).expect("a row has an owner");
                    let (_, slots, left) = active.get_mut(&j).expect("its job is active");
                    slots[choice] = Some(completion);
                    *left -= 1;
                    if *left == 0 {
                        let (job, slots, _) = active.remove(&j).expect("its job is active");
                        let completions: Vec<Completion> = slots.into_iter().flatten().collect();
                        let tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
                        tracing::info!(choices = job.n, tokens, rows = running.len(), "request done");
                        let _ = job.reply.send(Ok(completions));
                    }
                }
            }
            Err(e) => {
                for (_, (job, _, _)) in active.drain() {
                    let _ = job.reply.send(Err(e.to_string()));
                }
                owners.clear();
                running = fresh();
            }
        }
    }
}

async fn models(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": model_name(shared.model.path()), "object": "model", "created": 0, "owned_by": "kiln"}],
    }))
}

/// The fields kiln reads; others (logprobs, tools...) are ignored as OpenAI-compatible servers do.
#[derive(Deserialize)]
struct ChatRequest {
    messages: Box<serde_json::value::RawValue>,
    #[serde(default)]
    tools: Option<Box<serde_json::value::RawValue>>,
    #[serde(default = "one")]
    n: usize,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default, alias = "max_completion_tokens")]
    max_tokens: Option<usize>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    /// vLLM's and llama.cpp's extension: generate past end-of-turn tokens.
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// `stream_options`: `include_usage` adds a last chunk with the token counts.
#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn one() -> usize {
    1
}

/// `stop` is a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

fn bad_request(message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": "invalid_request_error"}});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

async fn chat_completions(State(shared): State<Arc<Shared>>, body: String) -> Response {
    let request: ChatRequest = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("request body: {e}")),
    };
    if request.n == 0 || request.n > 64 {
        return bad_request("n must be between 1 and 64");
    }
    // Messages keep their key order, as Python's json.loads would, for the chat template.
    let Ok(messages) = value_from_json(request.messages.get()) else {
        return bad_request("messages must be a JSON array");
    };
    let tools = request.tools.as_ref().and_then(|t| value_from_json(t.get()).ok()).filter(|t| !t.is_none());
    let (reply_tx, reply_rx) = oneshot::channel();
    let sampling = Sampling {
        max_tokens: request.max_tokens.unwrap_or(shared.default_max_tokens),
        temperature: request.temperature.unwrap_or(1.0),
        top_p: request.top_p.unwrap_or(1.0),
        top_k: request.top_k.unwrap_or(0),
        seed: request.seed.unwrap_or_else(|| fastrand::u64(..)),
        stop: match request.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        ignore_eos: request.ignore_eos,
    };
    let codec = shared.model.codec();
    let prompt = match codec.chat.render(&messages, tools.as_ref(), true) {
        Ok(text) => codec.encode(&text),
        Err(e) => return bad_request(format!("chat template: {e:#}")),
    };
    let prompt = match prompt {
        Ok(ids) => ids,
        Err(e) => return bad_request(e.to_string()),
    };
    let (prompt_tokens, context) = (prompt.len(), shared.model.config().max_position_embeddings);
    if prompt_tokens + sampling.max_tokens > context {
        return bad_request(format!(
            "the prompt has {prompt_tokens} tokens and max_tokens is {}: more than the model's context of {context}",
            sampling.max_tokens
        ));
    }
    let (deltas, deltas_rx) = match request.stream {
        true => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let job = Job { prompt, n: request.n, sampling, reply: reply_tx, deltas };
    if shared.jobs.lock().expect("job queue").send(job).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "generation thread stopped").into_response();
    }
    let id = format!("chatcmpl-{:016x}", fastrand::u64(..));
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if let Some(deltas) = deltas_rx {
        let usage = request.stream_options.is_some_and(|o| o.include_usage).then_some(prompt_tokens);
        let chunk = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_name(shared.model.path())});
        return stream_reply(chunk, request.n, deltas, reply_rx, usage);
    }
    let completions = match reply_rx.await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "generation failed").into_response(),
    };
    let completion_tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
    let choices: Vec<serde_json::Value> = completions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish.as_str()})
        })
        .collect();
    Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model_name(shared.model.path()),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// A streamed reply: server-sent events, each a `chat.completion.chunk` (`chunk` holds the id,
/// created time and model): first every choice's role, then each choice's text as it comes,
/// its finish reason in its last chunk, the usage when `usage` holds the prompt's tokens, and
/// `[DONE]`. An error after the stream started is sent as an `error` event.
fn stream_reply(
    chunk: serde_json::Value,
    n: usize,
    mut deltas: tokio::sync::mpsc::UnboundedReceiver<(usize, Delta)>,
    reply: oneshot::Receiver<Reply>,
    usage: Option<usize>,
) -> Response {
    let (events, out) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let with = move |chunk: &serde_json::Value, choices: serde_json::Value| {
        let mut c = chunk.clone();
        c["choices"] = choices;
        Event::default().data(c.to_string())
    };
    tokio::spawn(async move {
        let roles: Vec<_> = (0..n)
            .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}))
            .collect();
        let _ = events.send(with(&chunk, json!(roles)));
        // The generation thread drops the sender when the job is done.
        while let Some((i, delta)) = deltas.recv().await {
            let finish = delta.finish.map(|f| f.as_str());
            let body = if delta.text.is_empty() { json!({}) } else { json!({"content": delta.text}) };
            let _ = events.send(with(&chunk, json!([{"index": i, "delta": body, "finish_reason": finish}])));
        }
        match reply.await {
            Ok(Ok(completions)) => {
                if let Some(prompt_tokens) = usage {
                    let completion_tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
                    let mut last = chunk.clone();
                    last["choices"] = json!([]);
                    last["usage"] = json!({
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    });
                    let _ = events.send(Event::default().data(last.to_string()));
                }
                let _ = events.send(Event::default().data("[DONE]"));
            }
            Ok(Err(e)) => {
                let _ = events.send(Event::default().data(json!({"error": {"message": e}}).to_string()));
            }
            Err(_) => {
                let _ =
                    events.send(Event::default().data(json!({"error": {"message": "generation failed"}}).to_string()));
            }
        }
    });
    let stream = futures::stream::unfold(out, |mut out| async move {
        out.recv().await.map(|event| (Ok::<_, Infallible>(event), out))
    });
    Sse::new(stream).into_response()
}
