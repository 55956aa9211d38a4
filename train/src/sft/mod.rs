//! Supervised fine-tuning on kiln's sharegpt exports: assistant-only loss, AdamW with a cosine
//! schedule and warmup, global-norm clipping, gradient accumulation, full fine-tuning or LoRA,
//! checkpoints (weights and optimizer state) that a killed run resumes from at the same step,
//! per-step metrics in CSV and a loss plot.

pub(crate) mod checkpoint;
pub mod data;
mod metrics;
pub mod optim;
pub mod settings;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::Param;
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backprop::{Memory, accumulate, backward};
use crate::error::{Result, TrainError};
use crate::learned::{Sequence, pack};
use crate::loader::LoadedModel;
use crate::model::{Decoder, Dense, Lora, Precision};
use crate::weights::SaveDtype;
use checkpoint::{load_checkpoint, save_checkpoint};
use data::{length_buckets, load_sharegpt};
use metrics::{open_metrics, plot_loss, read_metrics};
use optim::{AdamWSettings, AdamWState, cosine_lr, global_norm, restore};

/// Everything that defines a fine-tuning run: a `kiln train` file, or a `train_sft` stage's
/// parameters (where the data is the input stage and the output folder defaults to the stage's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// The base model: a `.gguf` file, a Hugging Face directory, or `smollm2`.
    pub model: PathBuf,
    /// A sharegpt JSON export (kiln's `export` stage with `format = "sharegpt"`).
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// Where checkpoints, metrics and the final model go.
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// Tokens per conversation at most (longer ones are cut). Default: 1024.
    #[serde(default = "defaults::max_len")]
    pub max_len: usize,
    /// Conversations per micro-batch. Default: 4.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step. Default: 1.
    #[serde(default = "defaults::one")]
    pub grad_accum: usize,
    /// Passes over the data. Default: 1.
    #[serde(default = "defaults::one")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: the whole schedule).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Peak learning rate. Default: 1e-5 (full), 2e-4 with LoRA.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Share of steps spent warming up. Default: 0.1.
    #[serde(default = "defaults::warmup")]
    pub warmup_ratio: f64,
    /// Decoupled weight decay. Default: 0.
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this. Default: 1.
    #[serde(default = "defaults::clip")]
    pub max_grad_norm: f64,
    /// Seed of data order and LoRA initialisation. Default: 0.
    #[serde(default)]
    pub seed: u64,
    /// Train low-rank adapters instead of every weight.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Save a checkpoint every this many steps. Default: 50.
    #[serde(default = "defaults::save_every")]
    pub save_every: u64,
    /// The matrix products' arithmetic: `"f32"`, or `"bf16"` mixed precision (f32 master
    /// weights, optimizer moments, norms, softmax and loss). Default: `"f32"`.
    #[serde(default, skip_serializing_if = "crate::backprop::is_default")]
    pub precision: Precision,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations
    /// (one more forward pass per step; long sequences fit). Default: false.
    #[serde(default, skip_serializing_if = "crate::backprop::is_default")]
    pub gradient_checkpointing: bool,
    /// Learned tokens whose logits are computed at once (bounds the output head's memory).
    /// Default: 1024.
    #[serde(
        default = "crate::backprop::default_loss_chunk",
        skip_serializing_if = "crate::backprop::is_default_loss_chunk"
    )]
    pub loss_chunk: usize,
}

/// LoRA settings: adapters on every attention and MLP projection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Default: 16.
    #[serde(default = "defaults::rank")]
    pub rank: usize,
    /// Scale numerator (update scaled by alpha / rank). Default: 32.
    #[serde(default = "defaults::alpha")]
    pub alpha: f64,
}

mod defaults {
    pub fn max_len() -> usize {
        1024
    }
    pub fn batch_size() -> usize {
        4
    }
    pub fn one() -> usize {
        1
    }
    pub fn warmup() -> f64 {
        0.1
    }
    pub fn clip() -> f64 {
        1.0
    }
    pub fn save_every() -> u64 {
        50
    }
    pub fn rank() -> usize {
        16
    }
    pub fn alpha() -> f64 {
        32.0
    }
}

/// One logged optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens (padding excluded) in the step.
    pub tokens: usize,
    pub tokens_per_s: f64,
}

/// What a finished run reports.
#[derive(Debug)]
pub struct SftReport {
    pub steps: u64,
    /// The step training resumed from (0 for a fresh run).
    pub resumed_from: u64,
    pub metrics: Vec<StepMetrics>,
    pub examples: usize,
    pub skipped: usize,
    /// The fine-tuned model directory (HF layout).
    pub model_dir: PathBuf,
}

/// Where a run reads and writes: the resolved `data`, `output_dir` and base model.
#[derive(Clone, Debug)]
pub struct RunPaths {
    pub model: PathBuf,
    pub data: PathBuf,
    pub output_dir: PathBuf,
}

/// Runs (or resumes) the fine-tuning described by `config` on `device` (autodiff is added).
/// `progress` is called after every step.
pub fn train(
    config: &SftConfig,
    paths: &RunPaths,
    device: &Device,
    mut progress: impl FnMut(&StepMetrics, u64),
) -> Result<SftReport> {
    let device = device.clone().autodiff();
    let mut base = LoadedModel::load(&paths.model, &device)?;
    let lora = config.lora.clone();
    let (examples, skipped) = load_sharegpt(&paths.data, &base.codec, config.max_len)?;
    if examples.is_empty() {
        return Err(TrainError::invalid(
            &paths.data,
            format!(
                "no conversation has an assistant token within the first max_len = {} tokens ({skipped} skipped): raise max_len",
                config.max_len
            ),
        ));
    }
    let batches_per_epoch: Vec<Vec<Vec<usize>>> = (0..config.epochs.max(1))
        .map(|epoch| length_buckets(&examples, config.batch_size, config.seed.wrapping_add(epoch as u64)))
        .collect();
    let micro: Vec<&Vec<usize>> = batches_per_epoch.iter().flatten().collect();
    let accum = config.grad_accum.max(1);
    let schedule_steps = (micro.len() / accum).max(1) as u64;
    let total = config.max_steps.map_or(schedule_steps, |m| m.min(schedule_steps));
    let warmup = (config.warmup_ratio * schedule_steps as f64).round() as u64;
    let peak = config.lr.unwrap_or(if lora.is_some() { 2e-4 } else { 1e-5 });
    let settings = AdamWSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: config.weight_decay };

    let memory =
        Memory { checkpoint_layers: config.gradient_checkpointing, loss_chunk: config.loss_chunk, ..Memory::default() };
    let mut decoder = std::mem::replace(&mut base.decoder, empty_decoder(&device)).with_precision(config.precision);
    if let Some(l) = &lora {
        decoder = add_lora(decoder.no_grad(), l, config.seed, &device);
    }
    let output_dir = &paths.output_dir;
    std::fs::create_dir_all(output_dir).map_err(|e| TrainError::io(output_dir, e))?;
    let checkpoint_dir = output_dir.join("checkpoint");
    let mut state = AdamWState::default();
    let run = run_key(config);
    let resumed_from = match load_checkpoint(&checkpoint_dir, &run, &device)? {
        Some((params, opt, _)) => {
            decoder = restore(decoder, &params);
            state = opt;
            state.step
        }
        None => 0,
    };
    let metrics_path = output_dir.join("metrics.csv");
    let mut metrics = read_metrics(&metrics_path, resumed_from);
    let mut log = open_metrics(&metrics_path, &metrics)?;

    for step in resumed_from..total {
        let start = Instant::now();
        let window: Vec<&Vec<usize>> = micro[(step as usize) * accum..(step as usize + 1) * accum].to_vec();
        let learned: usize =
            window.iter().flat_map(|b| b.iter()).map(|&i| examples[i].learn[1..].iter().filter(|&&l| l).count()).sum();
        let mut grads = GradientsParams::new();
        let (mut loss_sum, mut tokens) = (0.0, 0);
        for batch in window {
            let rows: Vec<&Sequence> = batch.iter().map(|&i| &examples[i]).collect();
            tokens += rows.iter().map(|r| r.ids.len() - 1).sum::<usize>();
            let nll = |logp: Tensor<1>, _| logp.sum().neg().div_scalar(learned.max(1) as f64);
            let (loss, step_grads) = backward(&decoder, &base.config, &pack(&rows), &device, memory, nll);
            loss_sum += loss;
            grads = accumulate(&decoder, grads, step_grads);
        }
        let norm = global_norm(&decoder, &grads);
        let scale = if norm > config.max_grad_norm { config.max_grad_norm / (norm + 1e-6) } else { 1.0 };
        let lr = cosine_lr(step, warmup, schedule_steps, peak);
        decoder = optim::step(decoder, &mut grads, &mut state, &settings, lr, scale);
        let seconds = start.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: step + 1,
            loss: loss_sum,
            lr,
            grad_norm: norm,
            tokens,
            tokens_per_s: tokens as f64 / seconds,
        };
        writeln!(log, "{},{},{},{},{},{:.1}", m.step, m.loss, m.lr, m.grad_norm, m.tokens, m.tokens_per_s)
            .and_then(|_| log.flush())
            .map_err(|e| TrainError::io(&metrics_path, e))?;
        progress(&m, total);
        metrics.push(m);
        if (step + 1) % config.save_every.max(1) == 0 || step + 1 == total {
            save_checkpoint(&checkpoint_dir, &run, &decoder, &state, serde_json::Value::Null)?;
        }
    }
    let model_dir = output_dir.join("model");
    base.save_hf(&decoder, &model_dir, SaveDtype::F32)?;
    plot_loss(&metrics, &output_dir.join("loss.svg"))?;
    Ok(SftReport { steps: total, resumed_from, metrics, examples: examples.len(), skipped, model_dir })
}

/// A placeholder left in the loaded model while its decoder trains.
pub(crate) fn empty_decoder(device: &Device) -> Decoder {
    let zeros = |n| Param::from_tensor(Tensor::<1>::zeros([n], device));
    Decoder {
        embed: Param::from_tensor(Tensor::zeros([1, 1], device)),
        blocks: Vec::new(),
        norm: crate::model::RmsNorm { weight: zeros(1), eps: 1e-6 },
        head: None,
        precision: crate::model::Precision::F32,
    }
}

/// Adapters on every projection: A random (std 1/rank), B zero, so training starts at the base.
pub(crate) fn add_lora(mut decoder: Decoder, config: &LoraConfig, seed: u64, device: &Device) -> Decoder {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x10_4a);
    let scale = (config.alpha / config.rank as f64) as f32;
    let mut adapt = |dense: &mut Dense| {
        let [inp, out] = dense.shape();
        let r = config.rank;
        let a: Vec<f32> = (0..inp * r).map(|_| (rng.f32() * 2.0 - 1.0) / r as f32).collect();
        dense.lora = Some(Lora {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [inp, r]), device).require_grad()),
            b: Param::from_tensor(Tensor::zeros([r, out], device).require_grad()),
            scale,
        });
    };
    for block in &mut decoder.blocks {
        for dense in [&mut block.attn.q, &mut block.attn.k, &mut block.attn.v, &mut block.attn.o] {
            adapt(dense);
        }
        for dense in [&mut block.mlp.gate, &mut block.mlp.up, &mut block.mlp.down] {
            adapt(dense);
        }
    }
    decoder
}

/// The settings a checkpoint must match to be resumed (everything that shapes the run; not
/// how memory is spent, so a run that ran out of memory resumes with checkpointing on).
pub fn run_key(config: &SftConfig) -> String {
    let mut c = config.clone();
    c.save_every = 0;
    c.gradient_checkpointing = false;
    c.loss_chunk = crate::backprop::default_loss_chunk();
    serde_json::to_string(&c).expect("config serialises")
}
