//! The decoder's shape, read from a Hugging Face `config.json` or from GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Shape and numerics of a Llama/Qwen2-style decoder.
///
/// Field names follow Hugging Face's `config.json`, so the struct reads one directly and writes one
/// that `transformers` loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `LlamaForCausalLM` or `Qwen2ForCausalLM`.
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    /// `llama` or `qwen2`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: fewer key/value heads than query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// The output head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on the query/key/value projections (Qwen2 has it, Llama does not). Absent in Qwen2's
    /// config.json, where it is implied by the model type.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<EosTokens>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

/// `eos_token_id` is a number or a list of numbers in Hugging Face configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EosTokens {
    One(u32),
    Many(Vec<u32>),
}

fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    4096
}
fn default_act() -> String {
    "silu".into()
}

impl ModelConfig {
    /// Reads and checks a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let config: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| TrainError::invalid(path, format!("not a model config.json: {e}")))?;
        config.check().map_err(|why| TrainError::invalid(path, why))?;
        Ok(config)
    }

    /// Refuses shapes and options this decoder does not implement, saying which.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !matches!(self.model_type.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(format!(
                "model_type `{}` is not supported: kiln runs Llama and Qwen2 decoders",
                self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act `{}` is not supported (only silu)", self.hidden_act));
        }
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            return Err(format!("rope_scaling {scaling} is not supported"));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head dimension {} is odd: rotary embeddings need pairs", self.head_dim()));
        }
        Ok(())
    }

    /// Number of key/value heads (equal to the query heads without grouped-query attention).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    /// End-of-sequence token ids from the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(EosTokens::One(id)) => vec![*id],
            Some(EosTokens::Many(ids)) => ids.clone(),
            None => Vec::new(),
        }
    }

    /// Parameter count (embedding counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.kv_heads() * self.head_dim();
        let bias = if self.qkv_bias() { d + 2 * kv } else { 0 };
        let layer = d * d * 2 + d * kv * 2 + bias + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * layer + d + head
    }
}
