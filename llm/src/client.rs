//! The chat-completions client: one per declared model, shared by every stage that uses it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::limiter::{AdaptiveLimit, Budget};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message of `role`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.to_string(), content: content.into() }
    }
}

/// A finished request: one text per choice, and the tokens it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// One text per choice, in order.
    pub texts: Vec<String>,
    /// Why each choice stopped (`stop`, `length`...), when the server says.
    pub finish_reasons: Vec<Option<String>>,
    /// Prompt tokens, as the server counted them.
    pub prompt_tokens: u64,
    /// Completion tokens, as the server counted them.
    pub completion_tokens: u64,
    /// HTTP attempts it took (this run's: not cached with the reply).
    #[serde(skip)]
    pub attempts: u32,
}

/// Why a request failed for good.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The model is misconfigured (missing API key...).
    #[error("model `{model}`: {message}")]
    Config {
        /// Model name in the pipeline.
        model: String,
        /// What is wrong.
        message: String,
    },
    /// The server refused the request in a way retrying cannot fix (400, 401, 404...).
    #[error("model `{model}`: the server refused the request with HTTP {status}: {body}")]
    Refused {
        /// Model name in the pipeline.
        model: String,
        /// HTTP status.
        status: u16,
        /// Start of the reply body.
        body: String,
    },
    /// Every attempt failed with a retryable error.
    #[error("model `{model}`: gave up after {attempts} attempts, last: {last}")]
    Exhausted {
        /// Model name in the pipeline.
        model: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
}

/// Counts of what the client did, for manifests and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// HTTP requests sent (attempts, not logical requests).
    pub sent: AtomicU64,
    /// Attempts that were retried.
    pub retries: AtomicU64,
    /// 429 and 503 replies.
    pub throttled: AtomicU64,
    /// Other 5xx replies.
    pub server_errors: AtomicU64,
    /// Attempts past the timeout.
    pub timeouts: AtomicU64,
    /// Connection failures.
    pub connection_errors: AtomicU64,
    /// 200 replies that were not a valid completion.
    pub bad_replies: AtomicU64,
}

impl Stats {
    /// The counts as `(name, value)` pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("llm_attempts", get(&self.sent)),
            ("llm_retries", get(&self.retries)),
            ("llm_throttled", get(&self.throttled)),
            ("llm_server_errors", get(&self.server_errors)),
            ("llm_timeouts", get(&self.timeouts)),
            ("llm_connection_errors", get(&self.connection_errors)),
            ("llm_bad_replies", get(&self.bad_replies)),
        ]
    }
}

/// A client for one declared model.
#[derive(Debug)]
pub struct Client {
    name: String,
    config: ModelConfig,
    http: reqwest::Client,
    key: Option<String>,
    limit: AdaptiveLimit,
    requests: Option<Budget>,
    tokens: Option<Budget>,
    stats: Stats,
    /// Requests waiting out a backoff before their next attempt.
    backing_off: AtomicUsize,
}

/// The share of recent requests failing above which retries back off exponentially.
const OUTAGE: f64 = 0.75;

/// Counts a request as backing off while it lives (dropped when the wait ends or is cancelled).
struct BackingOff<'a>(&'a AtomicUsize);

impl<'a> BackingOff<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        BackingOff(count)
    }
}

impl Drop for BackingOff<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Outcome of one attempt.
enum Attempt {
    Done(Completion),
    Retry { why: String, after: Option<Duration>, throttled: bool },
    Fatal(LlmError),
}

impl Client {
    /// A client for model `name`. Reads the API key from the variable named in the config.
    pub fn new(name: &str, config: ModelConfig) -> Result<Self, LlmError> {
        let key = match &config.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| LlmError::Config {
                model: name.to_string(),
                message: format!("the environment variable `{var}` (named by `api_key_env`) is not set"),
            })?),
        };
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| LlmError::Config { model: name.to_string(), message: e.to_string() })?;
        Ok(Client {
            name: name.to_string(),
            limit: AdaptiveLimit::new(config.max_concurrency),
            requests: config.requests_per_minute.map(Budget::new),
            tokens: config.tokens_per_minute.map(Budget::new),
            config,
            http,
            key,
            stats: Stats::default(),
            backing_off: AtomicUsize::new(0),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// What the client has done so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The current concurrency limit.
    pub fn concurrency(&self) -> usize {
        self.limit.limit()
    }

    /// How many requests are waiting out a backoff before their next attempt (they hold no
    /// slot): a caller feeding the client keeps this many more requests going.
    pub fn backing_off(&self) -> usize {
        self.backing_off.load(Ordering::Relaxed)
    }

    /// The full request body for `messages` with `n` choices (see
    /// [`ModelConfig::request_body`]).
    pub fn request_body(&self, messages: &[Message], n: u32) -> serde_json::Value {
        self.config.request_body(messages, n)
    }

    /// Sends `body`, retrying what can be retried, within the model's limits.
    pub async fn complete(&self, body: &serde_json::Value) -> Result<Completion, LlmError> {
        let attempts = self.config.max_retries + 1;
        let mut last = String::new();
        for attempt in 0..attempts {
            if let Some(b) = &self.requests {
                b.take(1.0).await;
            }
            if let Some(b) = &self.tokens {
                let prompt = body["messages"].to_string().len() as f64 / 4.0;
                b.take(prompt + f64::from(self.config.max_tokens.unwrap_or(512))).await;
            }
            let (outcome, seq) = {
                let slot = self.limit.acquire().await;
                (self.attempt(body).await, slot.seq())
            };
            match outcome {
                Attempt::Done(c) => {
                    self.limit.success();
                    return Ok(Completion { attempts: attempt + 1, ..c });
                }
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry { why, after, throttled } => {
                    if throttled {
                        self.limit.throttled(seq, after);
                    } else {
                        self.limit.errored();
                    }
                    last = why;
                    if attempt + 1 < attempts {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        let delay = after.unwrap_or_else(|| self.backoff(attempt));
                        tracing::debug!(model = %self.name, attempt, delay_ms = delay.as_millis() as u64, why = %last, "Retrying request.");
                        let _waiting = BackingOff::new(&self.backing_off);
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        Err(LlmError::Exhausted { model: self.name.clone(), attempts, last })
    }

    /// The wait before retry `attempt + 1`, with jitter in [0.5, 1.5), capped at 30 s: it grows
    /// exponentially while nearly all recent requests fail (an outage: give the server room),
    /// and linearly otherwise (noise, even heavy: while a quarter of requests or more succeed, a
    /// row retried soon most likely succeeds, and a long wait would only stretch the run's tail;
    /// the limiter answers throttles by lowering concurrency).
    fn backoff(&self, attempt: u32) -> Duration {
        let outage = self.limit.failed_share() >= OUTAGE;
        let growth = if outage { 2f64.powi(attempt as i32) } else { f64::from(attempt + 1) };
        Duration::from_secs_f64((self.config.backoff_s * growth).min(30.0) * (0.5 + fastrand::f64()))
    }

    async fn attempt(&self, body: &serde_json::Value) -> Attempt {
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/chat/completions", self.config.base_url.trim_end_matches('/'));
        let mut request = self.http.post(url).json(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let timeout = Duration::from_secs_f64(self.config.timeout_s);
        let sent = tokio::time::timeout(timeout, async {
            let response = request.send().await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok());
            let text = response.text().await?;
            Ok::<_, reqwest::Error>((status, retry_after, text))
        })
        .await;
        let (status, retry_after, text) = match sent {
            Err(_) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                return Attempt::Retry {
                    why: format!("no reply within {} s", self.config.timeout_s),
                    after: None,
                    throttled: false,
                };
            }
            Ok(Err(e)) => {
                self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                return Attempt::Retry { why: format!("connection error: {e}"), after: None, throttled: false };
            }
            Ok(Ok(reply)) => reply,
        };
        let code = status.as_u16();
        if code == 429 || code == 503 {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            let after = retry_after.map(|s| Duration::from_secs_f64(s.clamp(0.0, 300.0)));
            return Attempt::Retry { why: format!("HTTP {code} (overloaded)"), after, throttled: true };
        }
        if status.is_server_error() {
            self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
            return Attempt::Retry { why: format!("HTTP {code}"), after: None, throttled: false };
        }
        if !status.is_success() {
            let body: String = text.chars().take(300).collect();
            return Attempt::Fatal(LlmError::Refused { model: self.name.clone(), status: code, body });
        }
        match parse_completion(&text) {
            Ok(c) => Attempt::Done(c),
            Err(why) => {
                self.stats.bad_replies.fetch_add(1, Ordering::Relaxed);
                Attempt::Retry { why, after: None, throttled: false }
            }
        }
    }
}

/// Reads an OpenAI chat-completions reply.
fn parse_completion(text: &str) -> Result<Completion, String> {
    #[derive(Deserialize)]
    struct Reply {
        choices: Vec<Choice>,
        #[serde(default)]
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: ReplyMessage,
        #[serde(default)]
        finish_reason: Option<String>,
    }
    #[derive(Deserialize)]
    struct ReplyMessage {
        content: Option<String>,
    }
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: u64,
        completion_tokens: u64,
    }
    let reply: Reply = serde_json::from_str(text).map_err(|e| format!("the reply is not a chat completion: {e}"))?;
    if reply.choices.is_empty() {
        return Err("the reply has no choices".into());
    }
    let usage = reply.usage.unwrap_or(Usage { prompt_tokens: 0, completion_tokens: 0 });
    Ok(Completion {
        texts: reply.choices.iter().map(|c| c.message.content.clone().unwrap_or_default()).collect(),
        finish_reasons: reply.choices.iter().map(|c| c.finish_reason.clone()).collect(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        attempts: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_and_truncated_ones_do_not() {
        let ok = r#"{"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let c = parse_completion(ok).unwrap();
        assert_eq!((c.texts[0].as_str(), c.prompt_tokens, c.completion_tokens), ("hi", 3, 1));
        assert!(parse_completion(&ok[..40]).is_err());
        assert!(parse_completion(r#"{"choices":[]}"#).is_err());
    }
}
