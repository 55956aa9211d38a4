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

    /// The shapes the benchmarks compare kiln and PyTorch on: `qwen2.5-0.5b`; `small`, its
    /// proportions at a tenth of the width (for CPUs); `tiny` (smoke tests). The same names and
    /// numbers are in `train/scripts/bench_sft_torch.py`.
    ///
    /// # Panics
    /// On another name.
    pub fn bench_shape(name: &str) -> ModelConfig {
        let base = ModelConfig {
            architectures: vec!["Qwen2ForCausalLM".into()],
            model_type: "qwen2".into(),
            vocab_size: 151_936,
            hidden_size: 896,
            intermediate_size: 4864,
            num_hidden_layers: 24,
            num_attention_heads: 14,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 32_768,
            tie_word_embeddings: true,
            attention_bias: Some(true),
            bos_token_id: None,
            eos_token_id: None,
            hidden_act: "silu".into(),
            rope_scaling: None,
        };
        let narrow = |vocab, width, ffn, layers, heads| ModelConfig {
            vocab_size: vocab,
            hidden_size: width,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(2),
            ..base.clone()
        };
        match name {
            "qwen2.5-0.5b" => base,
            "small" => narrow(8192, 256, 1024, 4, 4),
            "tiny" => narrow(512, 64, 128, 2, 4),
            other => panic!("unknown shape {other} (qwen2.5-0.5b, small, tiny)"),
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
