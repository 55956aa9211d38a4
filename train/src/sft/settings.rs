//! The checks of fine-tuning settings: one function for `kiln train` files and `train_sft`
//! stages, so both refuse the same values with the same words (key, bad value, what to do).

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use kiln_pipeline::stage::Problem;

use super::{RunPaths, SftConfig};
use crate::fetch::is_named_model;

impl SftConfig {
    /// Every problem of these settings, with paths relative to `base` (the folder of the file
    /// they were written in). `data` is not checked here: a stage trains on its input, a file on
    /// its `data` ([`read_run`]).
    pub fn problems(&self, base: &Path) -> Vec<Problem> {
        let mut checks = Checks::default();
        let model = base.join(&self.model);
        if !model.exists() && !is_named_model(&self.model) {
            checks.0.push(
                Problem::new("model", format!("`model` = {:?}: no such file or folder", self.model.display()))
                    .help("give a .gguf file, a Hugging Face model directory (relative to this file), or `smollm2`"),
            );
        }
        checks.int("max_len", self.max_len as u64, 2..=1 << 20, "tokens per conversation, e.g. 1024");
        checks.int("batch_size", self.batch_size as u64, 1..=4096, "conversations per micro-batch, e.g. 4");
        checks.int("grad_accum", self.grad_accum as u64, 1..=4096, "micro-batches per optimizer step, e.g. 1");
        checks.int("epochs", self.epochs as u64, 1..=1000, "passes over the data, e.g. 1");
        if let Some(steps) = self.max_steps {
            checks.int("max_steps", steps, 1..=u32::MAX as u64, "leave it out to run the whole schedule");
        }
        checks.int("save_every", self.save_every, 1..=u32::MAX as u64, "steps between checkpoints, e.g. 50");
        checks.int("loss_chunk", self.loss_chunk as u64, 1..=1 << 20, "learned tokens per head pass, e.g. 1024");
        if let Some(lr) = self.lr {
            checks.real("lr", lr, lr > 0.0 && lr < 1.0, "between 0 and 1", "e.g. 1e-5 (full) or 2e-4 (LoRA)");
        }
        let warmup = self.warmup_ratio;
        checks.real(
            "warmup_ratio",
            warmup,
            (0.0..1.0).contains(&warmup),
            "in [0, 1)",
            "a share of the steps, e.g. 0.1",
        );
        let decay = self.weight_decay;
        checks.real("weight_decay", decay, decay >= 0.0, "at least 0", "e.g. 0 or 0.01");
        let clip = self.max_grad_norm;
        checks.real("max_grad_norm", clip, clip > 0.0, "greater than 0", "e.g. 1.0");
        if let Some(lora) = &self.lora {
            checks.int("lora.rank", lora.rank as u64, 1..=4096, "the adapters' rank, e.g. 16");
            checks.real("lora.alpha", lora.alpha, lora.alpha > 0.0, "greater than 0", "e.g. twice the rank");
        }
        checks.0
    }
}

/// Reads a `kiln train` file: its settings and the paths they name (relative to the file), or
/// every problem of the file at once as `file:line:col` diagnostics. The model path is as
/// written: [`crate::fetch::resolve_model`] fetches a named model.
pub fn read_run(path: &Path) -> Result<(SftConfig, RunPaths), kiln_pipeline::Error> {
    let text = std::fs::read_to_string(path).map_err(|e| kiln_pipeline::Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let config = kiln_pipeline::spec::parse_settings(path, &text, |config: &SftConfig| {
        let mut problems = config.problems(&base);
        problems.extend(data_problem(
            &base,
            config.data.as_deref(),
            "a sharegpt export (an `export` stage with format = \"sharegpt\")",
        ));
        problems
    })
    .map_err(kiln_pipeline::Error::Config)?;
    let paths = RunPaths {
        model: base.join(&config.model),
        data: base.join(config.data.as_deref().unwrap_or(Path::new(""))),
        output_dir: base.join(config.output_dir.clone().unwrap_or_else(|| PathBuf::from("outputs/sft"))),
    };
    Ok((config, paths))
}

/// The problem of a training file's `data` key (relative to `base`): missing, or no such file;
/// `what` says what it should be.
pub(crate) fn data_problem(base: &Path, data: Option<&Path>, what: &str) -> Option<Problem> {
    match data {
        None => Some(Problem::new("", "missing key `data`").help(format!("add `data = \"...\"`: {what}"))),
        Some(data) if !base.join(data).is_file() => Some(
            Problem::new("data", format!("`data` = {:?}: no such file", data.display()))
                .help(format!("give {what}, relative to this file")),
        ),
        Some(_) => None,
    }
}

/// Range checks that name the key, the bad value and a sensible one.
#[derive(Default)]
pub(crate) struct Checks(pub(crate) Vec<Problem>);

impl Checks {
    pub(crate) fn int(&mut self, key: &str, value: u64, range: RangeInclusive<u64>, example: &str) {
        if !range.contains(&value) {
            let (lo, hi) = (range.start(), range.end());
            self.0.push(
                Problem::new(key, format!("`{key}` must be between {lo} and {hi}, got {value}"))
                    .help(example.to_string()),
            );
        }
    }

    pub(crate) fn real(&mut self, key: &str, value: f64, ok: bool, want: &str, example: &str) {
        if !ok || !value.is_finite() {
            self.0.push(Problem::new(key, format!("`{key}` must be {want}, got {value}")).help(example.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> SftConfig {
        toml::from_str(toml).unwrap()
    }

    fn keys(problems: &[Problem]) -> Vec<String> {
        problems.iter().map(|p| p.at.join(".")).collect()
    }

    #[test]
    fn sane_settings_have_no_problems() {
        assert!(config("model = \"smollm2\"\nlora = { rank = 8 }").problems(Path::new(".")).is_empty());
    }

    #[test]
    fn every_bad_value_is_named_with_its_key() {
        let c = config(
            "model = \"no/such.gguf\"\nbatch_size = 0\nepochs = 0\nlr = -1.0\nwarmup_ratio = 1.5\nmax_grad_norm = nan\nlora = { rank = 0, alpha = 0.0 }",
        );
        let problems = c.problems(Path::new("."));
        assert_eq!(
            keys(&problems),
            ["model", "batch_size", "epochs", "lr", "warmup_ratio", "max_grad_norm", "lora.rank", "lora.alpha"]
        );
        assert_eq!(problems[6].message, "`lora.rank` must be between 1 and 4096, got 0");
        assert_eq!(problems[5].message, "`max_grad_norm` must be greater than 0, got NaN");
    }
}
