//! Named host tensors in Hugging Face layout, and the bridge between them and a [`Decoder`]:
//! building a decoder from safetensors or GGUF weights, and saving one back as HF safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::model::{Attention, Block, Decoder, Dense, Mlp, Precision, RmsNorm};

/// A tensor on the host, row-major, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Transposes a 2-D tensor (HF `[out, in]` to kiln's `[in, out]` and back).
    pub fn transposed(&self) -> HostTensor {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut data = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        HostTensor { shape: vec![cols, rows], data }
    }

    fn to_param<const D: usize>(&self, device: &Device) -> Param<Tensor<D>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(self.data.clone(), self.shape.clone()), device))
    }

    /// Copies a device tensor to the host.
    pub fn from_tensor<const D: usize>(tensor: &Tensor<D>) -> HostTensor {
        let data = tensor.to_data().convert::<f32>();
        HostTensor { shape: tensor.dims().to_vec(), data: data.try_into_vec::<f32>().expect("f32 data") }
    }
}

/// Weights by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`, ...).
pub type WeightMap = HashMap<String, HostTensor>;

/// Where a model's weights come from, for error messages.
struct Source<'a> {
    path: &'a Path,
    weights: WeightMap,
}

impl Source<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let tensor = self.weights.remove(name).ok_or_else(|| {
            TrainError::invalid(self.path, format!("tensor `{name}` is missing: is this a Llama/Qwen2 checkpoint?"))
        })?;
        if tensor.shape != shape {
            return Err(TrainError::invalid(
                self.path,
                format!("tensor `{name}` has shape {:?}, the config implies {shape:?}", tensor.shape),
            ));
        }
        Ok(tensor)
    }

    fn dense(&mut self, prefix: &str, inp: usize, out: usize, bias: bool, device: &Device) -> Result<Dense> {
        let weight = self.take(&format!("{prefix}.weight"), &[out, inp])?.transposed().to_param(device);
        let bias = match bias {
            true => Some(self.take(&format!("{prefix}.bias"), &[out])?.to_param(device)),
            false => None,
        };
        Ok(Dense { weight, bias, lora: None, precision: Precision::F32 })
    }

    fn norm(&mut self, name: &str, dim: usize, eps: f64, device: &Device) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.take(name, &[dim])?.to_param(device), eps })
    }
}

/// Builds a decoder from HF-named weights, checking every shape against `config`.
pub fn build_decoder(config: &ModelConfig, weights: WeightMap, path: &Path, device: &Device) -> Result<Decoder> {
    let mut src = Source { path, weights };
    let (d, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let kv = config.kv_heads() * config.head_dim();
    let eps = config.rms_norm_eps;
    let embed = src.take("model.embed_tokens.weight", &[v, d])?.to_param(device);
    let mut blocks = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let bias = config.qkv_bias();
        blocks.push(Block {
            attn_norm: src.norm(&format!("{p}.input_layernorm.weight"), d, eps, device)?,
            attn: Attention {
                q: src.dense(&format!("{p}.self_attn.q_proj"), d, d, bias, device)?,
                k: src.dense(&format!("{p}.self_attn.k_proj"), d, kv, bias, device)?,
                v: src.dense(&format!("{p}.self_attn.v_proj"), d, kv, bias, device)?,
                o: src.dense(&format!("{p}.self_attn.o_proj"), d, d, false, device)?,
                heads: config.num_attention_heads,
                kv_heads: config.kv_heads(),
            },
            mlp_norm: src.norm(&format!("{p}.post_attention_layernorm.weight"), d, eps, device)?,
            mlp: Mlp {
                gate: src.dense(&format!("{p}.mlp.gate_proj"), d, f, false, device)?,
                up: src.dense(&format!("{p}.mlp.up_proj"), d, f, false, device)?,
                down: src.dense(&format!("{p}.mlp.down_proj"), f, d, false, device)?,
            },
        });
    }
    let norm = src.norm("model.norm.weight", d, eps, device)?;
    let head = match config.tie_word_embeddings {
        true => None,
        false => Some(src.dense("lm_head", d, v, false, device)?),
    };
    // Some tied checkpoints also store lm_head.weight; anything else left over is unexpected.
    src.weights.remove("lm_head.weight");
    src.weights.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    if let Some(extra) = src.weights.keys().min() {
        return Err(TrainError::invalid(path, format!("unexpected tensor `{extra}`: not a Llama/Qwen2 checkpoint")));
    }
    Ok(Decoder { embed, blocks, norm, head, precision: Precision::F32 })
}

/// The decoder's weights by HF name and layout, LoRA adapters merged into their projections.
pub fn export_weights(decoder: &Decoder) -> WeightMap {
    let mut out = WeightMap::new();
    let mut dense = |name: String, layer: &Dense| {
        let mut weight = layer.weight.val();
        if let Some(lora) = &layer.lora {
            weight = weight + lora.a.val().matmul(lora.b.val()).mul_scalar(lora.scale);
        }
        out.insert(format!("{name}.weight"), HostTensor::from_tensor(&weight).transposed());
        if let Some(bias) = &layer.bias {
            out.insert(format!("{name}.bias"), HostTensor::from_tensor(&bias.val()));
        }
    };
    for (i, block) in decoder.blocks.iter().enumerate() {
        let p = format!("model.layers.{i}");
        dense(format!("{p}.self_attn.q_proj"), &block.attn.q);
        dense(format!("{p}.self_attn.k_proj"), &block.attn.k);
        dense(format!("{p}.self_attn.v_proj"), &block.attn.v);
        dense(format!("{p}.self_attn.o_proj"), &block.attn.o);
        dense(format!("{p}.mlp.gate_proj"), &block.mlp.gate);
        dense(format!("{p}.mlp.up_proj"), &block.mlp.up);
        dense(format!("{p}.mlp.down_proj"), &block.mlp.down);
    }
    if let Some(head) = &decoder.head {
        dense("lm_head".into(), head);
    }
    out.insert("model.embed_tokens.weight".into(), HostTensor::from_tensor(&decoder.embed.val()));
    out.insert("model.norm.weight".into(), HostTensor::from_tensor(&decoder.norm.weight.val()));
    for (i, block) in decoder.blocks.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.insert(format!("{p}.input_layernorm.weight"), HostTensor::from_tensor(&block.attn_norm.weight.val()));
        let post = HostTensor::from_tensor(&block.mlp_norm.weight.val());
        out.insert(format!("{p}.post_attention_layernorm.weight"), post);
    }
    out
}

/// Reads a safetensors file, or a directory holding `model.safetensors` or a sharded
/// `model.safetensors.index.json`, converting F32/F16/BF16 to f32.
pub fn read_safetensors(path: &Path) -> Result<WeightMap> {
    let files = safetensors_files(path)?;
    let mut weights = WeightMap::new();
    for file in files {
        let handle = std::fs::File::open(&file).map_err(|e| TrainError::io(&file, e))?;
        // SAFETY: the file is opened read-only and only read while mapped.
        let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| TrainError::io(&file, e))?;
        let tensors = SafeTensors::deserialize(&map)
            .map_err(|e| TrainError::invalid(&file, format!("not a safetensors file: {e}")))?;
        for (name, view) in tensors.tensors() {
            let data = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                TrainError::invalid(&file, format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))
            })?;
            weights.insert(name, HostTensor { shape: view.shape().to_vec(), data });
        }
    }
    Ok(weights)
}

fn safetensors_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = path.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| {
        TrainError::invalid(path, "no model.safetensors or model.safetensors.index.json in this directory")
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::invalid(&index, format!("not JSON: {e}")))?;
    let map = json["weight_map"].as_object().ok_or_else(|| TrainError::invalid(&index, "no `weight_map` object"))?;
    let mut files: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| path.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    Some(match dtype {
        Dtype::F32 => words(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => words(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => words(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// Storage precision for saved weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

/// Writes weights as one safetensors file (names sorted, so the bytes are deterministic).
pub fn write_safetensors(weights: &WeightMap, dtype: SaveDtype, path: &Path) -> Result<()> {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let encoded: Vec<(String, Vec<u8>, Vec<usize>)> = names
        .into_iter()
        .map(|name| {
            let t = &weights[name];
            let bytes = match dtype {
                SaveDtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                SaveDtype::Bf16 => t.data.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            };
            (name.clone(), bytes, t.shape.clone())
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = encoded
        .iter()
        .map(|(name, bytes, shape)| {
            let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes).expect("consistent view");
            (name.clone(), view)
        })
        .collect();
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| TrainError::invalid(path, format!("cannot write safetensors: {e}")))
}

/// Random weights for `config` (normal, std 0.02, norms at 1), the initialisation of
/// transformers' Llama/Qwen2: for tests and benchmarks of shapes without a checkpoint.
pub fn random_weights(config: &ModelConfig, seed: u64) -> WeightMap {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut normal = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller.
                let (u, v) = (rng.f64().max(1e-12), rng.f64());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * 0.02) as f32
            })
            .collect()
    };
    let (d, f, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let kv = config.kv_heads() * config.head_dim();
    let mut out = WeightMap::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        out.insert(name, HostTensor { shape, data });
    };
    put("model.embed_tokens.weight".into(), vec![v, d], normal(v * d));
    put("model.norm.weight".into(), vec![d], vec![1.0; d]);
    if !config.tie_word_embeddings {
        put("lm_head.weight".into(), vec![v, d], normal(v * d));
    }
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", d, d),
            ("self_attn.k_proj", kv, d),
            ("self_attn.v_proj", kv, d),
            ("self_attn.o_proj", d, d),
            ("mlp.gate_proj", f, d),
            ("mlp.up_proj", f, d),
            ("mlp.down_proj", d, f),
        ] {
            put(format!("{p}.{name}.weight"), vec![rows, cols], normal(rows * cols));
            if config.qkv_bias() && matches!(name, "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj") {
                put(format!("{p}.{name}.bias"), vec![rows], vec![0.0; rows]);
            }
        }
        put(format!("{p}.input_layernorm.weight"), vec![d], vec![1.0; d]);
        put(format!("{p}.post_attention_layernorm.weight"), vec![d], vec![1.0; d]);
    }
    out
}
