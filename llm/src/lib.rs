//! kiln's LLM layer: an OpenAI-compatible chat-completions client per declared model.
//!
//! The key decision: every limit lives in the client, not in the stages. Requests in flight are
//! capped by an adaptive limit that tells load from noise ([`limiter`]), optional requests- and
//! tokens-per-minute budgets pace the starts, and retries back off with jitter (exponentially
//! only while nearly all requests fail), honouring `Retry-After`. Stages only build request
//! bodies and go through the row cache, so a finished request is never paid for twice.
#![deny(missing_docs)]

pub mod client;
pub mod config;
pub mod limiter;

pub use client::{Client, Completion, LlmError, Message};
pub use config::ModelConfig;
