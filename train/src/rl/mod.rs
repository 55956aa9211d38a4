//! Reinforcement learning after SFT (RECIPE section 8): DAPO with multi-turn rollouts that run
//! code, and the dynamic mix of SFT and RL.
//!
//! Each step takes `prompts_per_step` items of an `rl` export and samples `group_size`
//! trajectories of each with the policy being trained, through the one agent loop of
//! [`kiln_stages::agent`] (the `trajectories` protocol, sandbox and tools; the policy reads the
//! inference prompt). A trajectory's reward comes from the graders against its own item's gold
//! ([`kiln_stages::graders::reward`]). Dynamic sampling drops groups whose rewards are all
//! equal and samples further prompts to refill the batch (at most `sampling_rounds` rounds).
//! The loss is `L = g * L_SFT + (1 - g) * L_RL`: `L_RL` is DAPO's clipped policy gradient,
//! token-mean over the step (clip `clip_low` / `clip_high`, dual clip `clip_dual`, no KL
//! term), on the policy's own tokens only (interpreter turns and prompts are context), without
//! the trajectories that have a void turn or ran out of turns; `L_SFT` is the token-mean NLL of
//! the expert trajectory of every prompt of the step (also of dropped groups); `g` falls on a
//! cosine from `g_start` to `g_end` over the run (`g = 0` is plain DAPO, `g = 1` plain SFT).
//!
//! The old policy's log-probabilities are those of the weights that sampled the rollouts,
//! computed once per step; `mini_batches` updates per step (the ratio moves away from 1 after
//! the first), each accumulated over micro-batches of `micro_batch` sequences. A checkpoint
//! holds the trainable weights, AdamW's moments, the step and the data position; sampling seeds
//! derive from the pipeline seed, the step and the prompt, so a run killed after a checkpoint
//! and rerun repeats the same steps. Per-step metrics go to `metrics.csv` and `rl.svg`.

mod loss;
mod metrics;
mod policy;
mod run;
pub mod stage;

use std::path::{Path, PathBuf};

use kiln_pipeline::stage::Problem;
use serde::{Deserialize, Serialize};

use crate::backprop::Memory;
use crate::fetch::is_named_model;
use crate::model::Precision;
use crate::sft::LoraConfig;
use crate::sft::settings::{Checks, data_problem};
pub use loss::{Clip, group_advantages, informative, sft_weight};
pub use metrics::RlMetrics;
pub use run::{RlReport, train_rl};

kiln_stages::with_agent_keys! {
    /// Everything that defines an RL run: a `train_rl` stage's parameters.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RlConfig {
        /// The policy to start from (the SFT model): a Hugging Face directory, a `.gguf` file,
        /// or `smollm2`.
        pub model: PathBuf,
        /// The `rl` export (Parquet, or the same columns as JSON lines) when the stage has no
        /// input; with an input (an `export` stage of format `rl`), its file.
        #[serde(default)]
        pub data: Option<PathBuf>,
        /// Where checkpoints, metrics and the final model go. Default:
        /// `<output folder>/<stage>.train/<settings hash>/`.
        #[serde(default)]
        pub output_dir: Option<PathBuf>,
        /// Trajectories per prompt (G). Default: 4.
        #[serde(default = "defaults::group_size")]
        pub group_size: usize,
        /// Prompts whose groups make one step's batch. Default: 8.
        #[serde(default = "defaults::prompts_per_step")]
        pub prompts_per_step: usize,
        /// Optimizer updates per step (the batch split in as many parts). Default: 1.
        #[serde(default = "defaults::one")]
        pub mini_batches: usize,
        /// Sequences per forward/backward pass (gradients accumulate). Default: 4.
        #[serde(default = "defaults::micro_batch")]
        pub micro_batch: usize,
        /// Steps (default: `epochs` passes over the prompts).
        #[serde(default)]
        pub max_steps: Option<u64>,
        /// Passes over the prompts when `max_steps` is not given. Default: 1.
        #[serde(default = "defaults::one")]
        pub epochs: usize,
        /// Peak learning rate. Default: 1e-6 (the recipe's), 1e-5 with LoRA.
        #[serde(default)]
        pub lr: Option<f64>,
        /// Share of steps spent warming up. Default: 0.
        #[serde(default)]
        pub warmup_ratio: f64,
        /// Decoupled weight decay. Default: 0.
        #[serde(default)]
        pub weight_decay: f64,
        /// Clip the global gradient norm to this. Default: 1.
        #[serde(default = "defaults::clip_norm")]
        pub max_grad_norm: f64,
        /// Seed of the prompt order and LoRA initialisation (sampling seeds come from the
        /// pipeline's). Default: 0.
        #[serde(default)]
        pub seed: u64,
        /// Train low-rank adapters instead of every weight.
        #[serde(default)]
        pub lora: Option<LoraConfig>,
        /// Save a checkpoint every this many steps. Default: 10.
        #[serde(default = "defaults::save_every")]
        pub save_every: u64,
        /// Rollout temperature. Default: 0.7 (the recipe's).
        #[serde(default = "defaults::temperature")]
        pub temperature: f32,
        /// Rollout nucleus. Default: 1.
        #[serde(default = "defaults::top_p")]
        pub top_p: f32,
        /// Tokens per policy turn at most. Default: 1024.
        #[serde(default = "defaults::max_new_tokens")]
        pub max_new_tokens: usize,
        /// Tokens of a trajectory at most: the policy is not asked to continue a longer one, and
        /// training cuts it there. Default: 8192.
        #[serde(default = "defaults::max_len")]
        pub max_len: usize,
        /// Lower clip of the ratio (1 - clip_low). Default: 0.2.
        #[serde(default = "defaults::clip_low")]
        pub clip_low: f64,
        /// Upper clip of the ratio (1 + clip_high). Default: 0.28.
        #[serde(default = "defaults::clip_high")]
        pub clip_high: f64,
        /// Dual clip for negative advantages. Default: 10.
        #[serde(default = "defaults::clip_dual")]
        pub clip_dual: f64,
        /// SFT weight g at the first step. Default: 0.9.
        #[serde(default = "defaults::g_start")]
        pub g_start: f64,
        /// SFT weight g at the last step. Default: 0.05.
        #[serde(default = "defaults::g_end")]
        pub g_end: f64,
        /// Rounds of sampling per step to refill groups dropped for equal rewards. Default: 3.
        #[serde(default = "defaults::sampling_rounds")]
        pub sampling_rounds: usize,
        /// A negative control: rewards are permuted across each round's trajectories before
        /// they are used, so nothing links a trajectory to its reward. A run that still improves
        /// is learning from something other than the reward. Default: false.
        #[serde(default)]
        pub shuffle_rewards: bool,
        /// The matrix products' arithmetic: `"f32"`, or `"bf16"` mixed precision (f32 master
        /// weights, optimizer moments, norms, softmax and loss). Default: `"f32"`.
        #[serde(default, skip_serializing_if = "crate::backprop::is_default")]
        pub precision: Precision,
        /// Recompute each decoder layer in the backward pass instead of keeping its
        /// activations (one more forward pass per update; long trajectories fit). Default: false.
        #[serde(default, skip_serializing_if = "crate::backprop::is_default")]
        pub gradient_checkpointing: bool,
        /// Learned tokens whose logits are computed at once (bounds the output head's memory).
        /// Default: 1024.
        #[serde(default = "crate::backprop::default_loss_chunk", skip_serializing_if = "crate::backprop::is_default_loss_chunk")]
        pub loss_chunk: usize,
    }
}

mod defaults {
    pub fn group_size() -> usize {
        4
    }
    pub fn prompts_per_step() -> usize {
        8
    }
    pub fn one() -> usize {
        1
    }
    pub fn micro_batch() -> usize {
        4
    }
    pub fn clip_norm() -> f64 {
        1.0
    }
    pub fn save_every() -> u64 {
        10
    }
    pub fn temperature() -> f32 {
        0.7
    }
    pub fn top_p() -> f32 {
        1.0
    }
    pub fn max_new_tokens() -> usize {
        1024
    }
    pub fn max_len() -> usize {
        8192
    }
    pub fn clip_low() -> f64 {
        0.2
    }
    pub fn clip_high() -> f64 {
        0.28
    }
    pub fn clip_dual() -> f64 {
        10.0
    }
    pub fn g_start() -> f64 {
        0.9
    }
    pub fn g_end() -> f64 {
        0.05
    }
    pub fn sampling_rounds() -> usize {
        3
    }
}

impl RlConfig {
    /// Every problem of these settings (paths relative to `base`), at its key.
    pub fn problems(&self, base: &Path) -> Vec<Problem> {
        let mut checks = Checks::default();
        if !base.join(&self.model).exists() && !is_named_model(&self.model) {
            checks.0.push(
                Problem::new("model", format!("`model` = {:?}: no such file or folder", self.model.display()))
                    .help("give the SFT model: a Hugging Face directory (relative to the pipeline), a .gguf file, or `smollm2`"),
            );
        }
        checks.int(
            "group_size",
            self.group_size as u64,
            2..=1024,
            "trajectories per prompt, e.g. 4 (one gives no baseline)",
        );
        checks.int("prompts_per_step", self.prompts_per_step as u64, 1..=1 << 20, "prompts per step, e.g. 8");
        checks.int("mini_batches", self.mini_batches as u64, 1..=4096, "updates per step, e.g. 1");
        checks.int("micro_batch", self.micro_batch as u64, 1..=4096, "sequences per pass, e.g. 4");
        checks.int("epochs", self.epochs as u64, 1..=1000, "passes over the prompts, e.g. 1");
        if let Some(steps) = self.max_steps {
            checks.int("max_steps", steps, 1..=u32::MAX as u64, "leave it out for `epochs` passes");
        }
        checks.int("save_every", self.save_every, 1..=u32::MAX as u64, "steps between checkpoints, e.g. 10");
        checks.int("max_new_tokens", self.max_new_tokens as u64, 1..=1 << 20, "tokens per turn, e.g. 1024");
        checks.int("max_len", self.max_len as u64, 16..=1 << 22, "tokens per trajectory, e.g. 8192");
        checks.int("sampling_rounds", self.sampling_rounds as u64, 1..=100, "refill rounds per step, e.g. 3");
        checks.int("loss_chunk", self.loss_chunk as u64, 1..=1 << 20, "learned tokens per head pass, e.g. 1024");
        if let Some(lr) = self.lr {
            checks.real("lr", lr, lr > 0.0 && lr < 1.0, "between 0 and 1", "e.g. 1e-6 (full) or 1e-5 (LoRA)");
        }
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        checks.real("warmup_ratio", self.warmup_ratio, (0.0..1.0).contains(&self.warmup_ratio), "in [0, 1)", "e.g. 0");
        checks.real("weight_decay", self.weight_decay, self.weight_decay >= 0.0, "at least 0", "e.g. 0 or 0.01");
        checks.real("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0.0, "greater than 0", "e.g. 1.0");
        let t = self.temperature as f64;
        checks.real("temperature", t, t > 0.0 && t <= 2.0, "in (0, 2]", "rollouts must sample: e.g. 0.7");
        let p = self.top_p as f64;
        checks.real("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]", "e.g. 1.0");
        checks.real("clip_low", self.clip_low, self.clip_low > 0.0 && self.clip_low < 1.0, "in (0, 1)", "e.g. 0.2");
        checks.real("clip_high", self.clip_high, self.clip_high > 0.0, "greater than 0", "e.g. 0.28");
        let dual = self.clip_dual;
        checks.real("clip_dual", dual, dual > 1.0 + self.clip_high, "greater than 1 + clip_high", "e.g. 10");
        checks.real("g_start", self.g_start, unit(self.g_start), "in [0, 1]", "e.g. 0.9 (0 for plain DAPO)");
        checks.real("g_end", self.g_end, unit(self.g_end), "in [0, 1]", "e.g. 0.05");
        if let Some(lora) = &self.lora {
            checks.int("lora.rank", lora.rank as u64, 1..=4096, "the adapters' rank, e.g. 16");
            checks.real("lora.alpha", lora.alpha, lora.alpha > 0.0, "greater than 0", "e.g. twice the rank");
        }
        checks.0
    }

    /// The settings a checkpoint must match to be resumed (not how memory is spent).
    pub fn run_key(&self) -> String {
        let mut c = self.clone();
        c.save_every = 0;
        c.gradient_checkpointing = false;
        c.loss_chunk = crate::backprop::default_loss_chunk();
        serde_json::to_string(&c).expect("settings serialise")
    }

    /// How an update spends memory.
    pub fn memory(&self) -> Memory {
        Memory { checkpoint_layers: self.gradient_checkpointing, loss_chunk: self.loss_chunk, ..Memory::default() }
    }

    /// The DAPO clip.
    pub fn clip(&self) -> Clip {
        Clip { low: self.clip_low, high: self.clip_high, dual: self.clip_dual }
    }
}

/// Where a run reads and writes.
#[derive(Clone, Debug)]
pub struct RlPaths {
    /// The starting model, resolved.
    pub model: PathBuf,
    /// Checkpoints, metrics and the final model.
    pub output_dir: PathBuf,
}

/// The one-stage pipeline `kiln train --rl FILE` runs: FILE holds a `train_rl` stage's
/// settings (with `data`, the `rl` export, relative to FILE); the stage is named `rl` and writes
/// to `output_dir` (default `outputs/rl`); a `templates` folder beside FILE holds its own
/// prompt templates. Problems of FILE are reported at its lines, as `kiln check` does.
pub fn pipeline_for(path: &Path) -> Result<String, kiln_pipeline::Error> {
    let text = std::fs::read_to_string(path).map_err(|e| kiln_pipeline::Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    kiln_pipeline::spec::parse_settings(path, &text, |config: &RlConfig| {
        let mut problems = config.problems(&base);
        problems.extend(data_problem(
            &base,
            config.data.as_deref(),
            "an `rl` export (an `export` stage with format = \"rl\")",
        ));
        problems
    })
    .map_err(kiln_pipeline::Error::Config)?;
    let mut stage: toml::Table = text.parse().map_err(|e| kiln_pipeline::Error::Internal(format!("{e}")))?;
    stage.insert("kind".into(), "train_rl".into());
    stage.entry("output_dir").or_insert_with(|| "outputs/rl".into());
    let name = path.file_stem().map_or_else(|| "rl".into(), |s| s.to_string_lossy().into_owned());
    let mut settings: toml::Table = [("name".to_string(), name.into())].into_iter().collect();
    if base.join("templates").is_dir() {
        settings.insert("templates".into(), "templates".into());
    }
    let mut pipeline = toml::Table::new();
    pipeline.insert("pipeline".into(), settings.into());
    pipeline.insert("stages".into(), toml::Value::Table([("rl".to_string(), stage.into())].into_iter().collect()));
    toml::to_string(&pipeline).map_err(|e| kiln_pipeline::Error::Internal(e.to_string()))
}
