//! Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` crate, or one rebuilt from a
//! GGUF file's vocabulary and merges; plus the model's chat template and special tokens.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::chat::ChatTemplate;
use crate::error::{Result, TrainError};
use crate::gguf::{Gguf, Meta};

/// Qwen2's pre-tokenizer split (from its tokenizer.json and llama.cpp's `qwen2` pre-type).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the chat template and stop tokens of its model.
pub struct TextCodec {
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    /// Token ids that end a generation (EOS and the template's end-of-turn token).
    pub stop_ids: Vec<u32>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec").field("stop_ids", &self.stop_ids).finish_non_exhaustive()
    }
}

impl TextCodec {
    /// Token ids of `text`, special tokens in the text recognised, nothing added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| TrainError::Other(format!("tokenizer: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special).map_err(|e| TrainError::Other(format!("tokenizer: {e}")))
    }

    /// Loads `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens) from a
    /// Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path, eos_from_config: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| TrainError::invalid(&path, e.to_string()))?;
        let config_path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| TrainError::io(&config_path, e))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TrainError::invalid(&config_path, e.to_string()))?;
        let token = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string(),
            _ => String::new(),
        };
        let template = config["chat_template"].as_str().ok_or_else(|| {
            TrainError::invalid(&config_path, "no `chat_template`: kiln needs one to render conversations")
        })?;
        Self::assemble(tokenizer, template, &token("bos_token"), &token("eos_token"), eos_from_config, &config_path)
    }

    /// Rebuilds the tokenizer of a GGUF file (`gpt2`-style byte-level BPE) from its vocabulary,
    /// merges and pre-tokenizer name, with its chat template.
    pub fn from_gguf(gguf: &Gguf, path: &Path) -> Result<Self> {
        let invalid = |why: String| TrainError::invalid(path, why);
        let model = gguf.meta("tokenizer.ggml.model").and_then(Meta::as_str).unwrap_or("?");
        if model != "gpt2" {
            return Err(invalid(format!("tokenizer model `{model}` is not supported (kiln rebuilds gpt2-style BPE)")));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let items = gguf.meta(key).and_then(Meta::as_array).ok_or_else(|| invalid(format!("no `{key}`")))?;
            Ok(items.iter().map(|m| m.as_str().unwrap_or_default().to_string()).collect())
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| invalid(format!("cannot build BPE: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let pre = gguf.meta("tokenizer.ggml.pre").and_then(Meta::as_str).unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        match pre {
            // llama.cpp's `smollm`/`starcoder` pre-types: single digits, then GPT-2's split.
            "smollm" | "starcoder" | "refact" => {
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()])));
            }
            "default" | "gpt2" => {
                tokenizer.with_pre_tokenizer(Some(byte_level));
            }
            "qwen2" => {
                let split =
                    Split::new(SplitPattern::Regex(QWEN2_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                        .map_err(|e| invalid(format!("pre-tokenizer: {e}")))?;
                let no_regex = ByteLevel::new(false, true, false);
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), no_regex.into()])));
            }
            other => return Err(invalid(format!("pre-tokenizer `{other}` is not supported (smollm, gpt2, qwen2)"))),
        }
        tokenizer.with_decoder(Some(ByteLevel::default()));
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let types = gguf.meta("tokenizer.ggml.token_type").and_then(Meta::as_array).unwrap_or(&[]);
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| matches!(t.as_int(), Some(3 | 4)))
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
        let id_token = |key: &str| {
            gguf.meta(key).and_then(Meta::as_int).and_then(|i| tokens.get(i as usize)).cloned().unwrap_or_default()
        };
        let template = gguf
            .meta("tokenizer.chat_template")
            .and_then(Meta::as_str)
            .ok_or_else(|| invalid("no `tokenizer.chat_template` in the GGUF metadata".into()))?;
        let eos_id: Vec<u32> =
            gguf.meta("tokenizer.ggml.eos_token_id").and_then(Meta::as_int).map(|i| i as u32).into_iter().collect();
        let (bos, eos) = (id_token("tokenizer.ggml.bos_token_id"), id_token("tokenizer.ggml.eos_token_id"));
        Self::assemble(tokenizer, template, &bos, &eos, &eos_id, path)
    }

    fn assemble(
        tokenizer: Tokenizer,
        template: &str,
        bos: &str,
        eos: &str,
        eos_ids: &[u32],
        path: &Path,
    ) -> Result<Self> {
        let chat = ChatTemplate::new(template, bos, eos)
            .map_err(|e| TrainError::invalid(path, format!("chat template does not compile: {e:#}")))?;
        let mut stop_ids: Vec<u32> = eos_ids.to_vec();
        // End-of-turn markers of the common templates stop generation too.
        for marker in [eos, "<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(id) = tokenizer.token_to_id(marker)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        Ok(TextCodec { tokenizer, chat, stop_ids })
    }
}
