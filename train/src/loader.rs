//! Opening a model by path: a Hugging Face directory (config.json, safetensors, tokenizer files)
//! or a single GGUF file.

use std::path::{Path, PathBuf};

use burn::prelude::Device;

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::gguf::Gguf;
use crate::model::Decoder;
use crate::tokenizer::TextCodec;
use crate::weights::{SaveDtype, build_decoder, export_weights, read_safetensors, write_safetensors};

/// A model ready to run: shape, weights on a device, tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub decoder: Decoder,
    pub codec: TextCodec,
    /// What was loaded, as given.
    pub path: PathBuf,
}

impl LoadedModel {
    /// Loads `path` (a `.gguf` file or a Hugging Face model directory) onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(TrainError::invalid(path, "no such file or directory: give a .gguf file or a model directory"));
        }
        let is_gguf = path.is_file() && path.extension().is_some_and(|e| e == "gguf");
        let (config, weights, codec) = if is_gguf {
            let gguf = Gguf::open(path)?;
            let config = gguf.config()?;
            let weights = gguf.weights(&config)?;
            (config, weights, TextCodec::from_gguf(&gguf, path)?)
        } else {
            let config = ModelConfig::from_hf_file(&path.join("config.json"))?;
            let codec = TextCodec::from_hf_dir(path, &config.eos_ids())?;
            (config, read_safetensors(path)?, codec)
        };
        let decoder = build_decoder(&config, weights, path, device)?;
        Ok(LoadedModel { config, decoder, codec, path: path.to_path_buf() })
    }

    /// Writes a Hugging Face model directory (config.json, model.safetensors with LoRA adapters
    /// merged, tokenizer.json, tokenizer_config.json with the chat template) that kiln and
    /// transformers both load.
    pub fn save_hf(&self, decoder: &Decoder, dir: &Path, dtype: SaveDtype) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))
        };
        let mut config = self.config.clone();
        config.attention_bias = Some(config.qkv_bias());
        write("config.json", serde_json::to_string_pretty(&config).expect("config serialises"))?;
        write_safetensors(&export_weights(decoder), dtype, &dir.join("model.safetensors"))?;
        let tokenizer = dir.join("tokenizer.json");
        self.codec.tokenizer.save(&tokenizer, true).map_err(|e| TrainError::invalid(&tokenizer, e.to_string()))?;
        let chat = &self.codec.chat;
        let tokenizer_config = serde_json::json!({
            "chat_template": chat.source,
            "bos_token": chat.bos_token,
            "eos_token": chat.eos_token,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        write("tokenizer_config.json", serde_json::to_string_pretty(&tokenizer_config).expect("json"))
    }

    /// The name clients use for this model (file or directory name without extension).
    pub fn name(&self) -> String {
        model_name(&self.path)
    }
}

/// The name clients use for the model at `path` (file or directory name without extension).
pub fn model_name(path: &Path) -> String {
    path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}
