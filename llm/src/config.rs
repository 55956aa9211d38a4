//! `[models.<name>]`: one OpenAI-compatible model endpoint and how kiln may use it.

use serde::{Deserialize, Serialize};

/// A model as declared in a pipeline file.
///
/// ```toml
/// [models.teacher]
/// base_url = "https://api.deepseek.com/v1"
/// api_key_env = "DEEPSEEK_API_KEY"   # the name of the variable, never the key
/// model = "deepseek-chat"
/// temperature = 0.7
/// max_concurrency = 32
/// price_per_mtok_prompt = 0.27
/// price_per_mtok_completion = 1.10
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Base URL of the API, up to and including `/v1`. Required.
    pub base_url: String,
    /// Name of the environment variable holding the API key; none for local servers.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Model name sent in each request. Required.
    pub model: String,
    /// Sampling temperature. Default: the server's.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling. Default: the server's.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Most tokens per completion. Default: the server's.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Stop sequences. Default: none.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Sampling seed sent to the server. Default: none.
    #[serde(default)]
    pub seed: Option<u64>,
    /// The server returns several choices per request (`n`), as OpenAI and vLLM do: the samples
    /// of one row are then asked in one request. Default: false (one request per sample).
    #[serde(default)]
    pub supports_n: bool,
    /// Most requests in flight; the client lowers its limit once per window of throttles
    /// (429/503) and grows it back by one per success up to this (see `limiter`). Default: 16.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Most requests started per minute. Default: unlimited.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Most tokens (prompt estimate plus `max_tokens`) per minute. Default: unlimited.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// Seconds before one request is abandoned and retried. Default: 120.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Retries after the first attempt, for 429, 5xx, timeouts, broken connections and replies
    /// that are not valid JSON. Default: 6.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First backoff delay in seconds (with jitter), at most 30: it grows by itself per retry
    /// while failures are scattered, and doubles per retry while most requests fail. Default: 0.5.
    #[serde(default = "default_backoff_s")]
    pub backoff_s: f64,
    /// USD per million prompt tokens, for cost accounting. Default: 0.
    #[serde(default)]
    pub price_per_mtok_prompt: f64,
    /// USD per million completion tokens. Default: 0.
    #[serde(default)]
    pub price_per_mtok_completion: f64,
}

/// The largest `max_tokens` accepted: far above any model's context.
pub const MAX_TOKENS_CAP: u32 = 1_000_000;
/// The largest `max_concurrency` accepted.
pub const MAX_CONCURRENCY_CAP: usize = 100_000;
/// The largest `max_retries` accepted.
pub const MAX_RETRIES_CAP: u32 = 100;

fn default_max_concurrency() -> usize {
    16
}
fn default_timeout_s() -> f64 {
    120.0
}
fn default_max_retries() -> u32 {
    6
}
fn default_backoff_s() -> f64 {
    0.5
}

impl ModelConfig {
    /// Problems with the values, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            out.push(("base_url", format!("`base_url` must start with http:// or https://, got `{}`", self.base_url)));
        }
        if self.max_concurrency == 0 {
            out.push(("max_concurrency", "`max_concurrency` must be at least 1, got 0".to_string()));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            out.push(("timeout_s", format!("`timeout_s` must be a number of seconds above 0, got {}", self.timeout_s)));
        }
        if !(self.backoff_s.is_finite() && self.backoff_s >= 0.0) {
            out.push((
                "backoff_s",
                format!("`backoff_s` must be a number of seconds, 0 or more, got {}", self.backoff_s),
            ));
        }
        if let Some(t) = self.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            out.push(("temperature", format!("`temperature` must be between 0 and 2, got {t}")));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            out.push(("top_p", format!("`top_p` must be above 0 and at most 1, got {p}")));
        }
        if let Some(n) = self.max_tokens.filter(|n| !(1..=MAX_TOKENS_CAP).contains(n)) {
            out.push(("max_tokens", format!("`max_tokens` must be between 1 and {MAX_TOKENS_CAP}, got {n}")));
        }
        if self.max_concurrency > MAX_CONCURRENCY_CAP {
            out.push((
                "max_concurrency",
                format!("`max_concurrency` must be at most {MAX_CONCURRENCY_CAP}, got {}", self.max_concurrency),
            ));
        }
        if self.max_retries > MAX_RETRIES_CAP {
            out.push((
                "max_retries",
                format!("`max_retries` must be at most {MAX_RETRIES_CAP}, got {}", self.max_retries),
            ));
        }
        for (key, rate) in
            [("requests_per_minute", self.requests_per_minute), ("tokens_per_minute", self.tokens_per_minute)]
        {
            if rate == Some(0) {
                out.push((key, format!("`{key}` must be at least 1 (leave it out for no limit), got 0")));
            }
        }
        for (key, price) in [
            ("price_per_mtok_prompt", self.price_per_mtok_prompt),
            ("price_per_mtok_completion", self.price_per_mtok_completion),
        ] {
            if !(price.is_finite() && price >= 0.0) {
                out.push((key, format!("`{key}` must be a price in USD, 0 or more, got {price}")));
            }
        }
        out
    }

    /// The full request body for `messages` with `n` choices: what is sent, and what the row
    /// cache keys on. The API key is never part of it.
    pub fn request_body(&self, messages: &[crate::Message], n: u32) -> serde_json::Value {
        let mut body = serde_json::json!({ "model": self.model, "messages": messages });
        let mut set = |k: &str, v: serde_json::Value| {
            if !v.is_null() {
                body[k] = v;
            }
        };
        set("temperature", serde_json::json!(self.temperature));
        set("top_p", serde_json::json!(self.top_p));
        set("max_tokens", serde_json::json!(self.max_tokens));
        set("seed", serde_json::json!(self.seed));
        if !self.stop.is_empty() {
            set("stop", serde_json::json!(self.stop));
        }
        if n > 1 {
            set("n", serde_json::json!(n));
        }
        body
    }

    /// Cost in USD of `prompt` and `completion` tokens.
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.price_per_mtok_prompt + completion as f64 * self.price_per_mtok_completion) / 1e6
    }
}
