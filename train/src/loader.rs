//! Opening a model by path: a Hugging Face directory (config.json, safetensors, tokenizer files)
//! or a single GGUF file.

use std::path::{Path, PathBuf};

use burn::prelude::Device;

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::gguf::Gguf;
use crate::model::Decoder;
use crate::tokenizer::TextCodec;
use crate::weights::{build_decoder, read_safetensors};

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

    /// The name clients use for this model (file or directory name without extension).
    pub fn name(&self) -> String {
        self.path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    }
}
