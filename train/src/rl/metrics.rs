//! Per-step metrics of an RL run: `metrics.csv` (kept up to the resumed step) and `rl.svg`
//! (reward, accuracy and g over the steps).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// One step of an RL run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RlMetrics {
    pub step: u64,
    /// Mean and standard deviation of the rewards of every trajectory sampled in the step.
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Share of the step's trajectories whose answer is right.
    pub accuracy: f64,
    /// Trajectories sampled, and prompts sampled (dropped groups included).
    pub trajectories: u64,
    pub prompts: u64,
    /// Groups kept for the policy gradient, and dropped for equal rewards.
    pub groups_kept: u64,
    pub groups_dropped: u64,
    /// Sampling rounds the step took (dynamic sampling refills).
    pub sampling_rounds: u64,
    /// Trajectories left out of the policy gradient (a void turn, or out of turns).
    pub masked: u64,
    /// Mean tokens the policy wrote per trajectory.
    pub response_tokens: f64,
    /// Mean entropy (nats) of the rollout policy on its own tokens.
    pub entropy: f64,
    /// Share of policy-gradient tokens the clip held.
    pub clip_fraction: f64,
    /// The SFT weight of the step.
    pub g: f64,
    pub lr: f64,
    pub pg_loss: f64,
    pub sft_loss: f64,
    /// `g * sft_loss + (1 - g) * pg_loss`.
    pub loss: f64,
    pub grad_norm: f64,
    /// Wall seconds of the rollouts, of which generating and running code (summed over
    /// trajectories, so it may exceed the wall time), and of training.
    pub rollout_s: f64,
    pub generation_s: f64,
    pub sandbox_s: f64,
    pub training_s: f64,
}

/// The CSV's and the dataset's columns, in order.
pub(super) const COLUMNS: &[&str] = &[
    "step",
    "reward_mean",
    "reward_std",
    "accuracy",
    "trajectories",
    "prompts",
    "groups_kept",
    "groups_dropped",
    "sampling_rounds",
    "masked",
    "response_tokens",
    "entropy",
    "clip_fraction",
    "g",
    "lr",
    "pg_loss",
    "sft_loss",
    "loss",
    "grad_norm",
    "rollout_s",
    "generation_s",
    "sandbox_s",
    "training_s",
];

impl RlMetrics {
    fn values(&self) -> Vec<String> {
        let json = serde_json::to_value(self).expect("metrics serialise");
        COLUMNS.iter().map(|c| json[c].to_string()).collect()
    }

    fn parse(line: &str) -> Option<RlMetrics> {
        let map: serde_json::Map<String, serde_json::Value> = COLUMNS
            .iter()
            .zip(line.split(','))
            .map(|(c, v)| Some((c.to_string(), serde_json::from_str(v).ok()?)))
            .collect::<Option<_>>()?;
        serde_json::from_value(serde_json::Value::Object(map)).ok()
    }
}

/// Metrics already logged up to `step` (a resumed run rewrites the rest).
pub(super) fn read_metrics(path: &Path, step: u64) -> Vec<RlMetrics> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines().skip(1).filter_map(RlMetrics::parse).filter(|m| m.step <= step).collect()
}

/// The metrics file rewritten with `kept`, open for appending.
pub(super) struct MetricsLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl MetricsLog {
    pub(super) fn open(path: &Path, kept: &[RlMetrics]) -> Result<Self> {
        let mut text = COLUMNS.join(",") + "\n";
        for m in kept {
            text.push_str(&(m.values().join(",") + "\n"));
        }
        std::fs::write(path, text).map_err(|e| TrainError::io(path, e))?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| TrainError::io(path, e))?;
        Ok(MetricsLog { file, path: path.to_path_buf() })
    }

    pub(super) fn write(&mut self, m: &RlMetrics) -> Result<()> {
        writeln!(self.file, "{}", m.values().join(","))
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// `rollouts.jsonl`: every trajectory sampled, with its step, item, reward, outcome, answer and
/// turns (what the policy wrote and the interpreter answered), for reading what RL did.
pub(super) struct RolloutLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl RolloutLog {
    /// The log with the records of steps after `step` dropped (a resumed run writes them again).
    pub(super) fn open(path: &Path, step: u64) -> Result<Self> {
        let kept: String = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, kept).map_err(|e| TrainError::io(path, e))?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| TrainError::io(path, e))?;
        Ok(RolloutLog { file, path: path.to_path_buf() })
    }

    pub(super) fn write(&mut self, records: &[serde_json::Value]) -> Result<()> {
        let text: String = records.iter().map(|r| format!("{r}\n")).collect();
        self.file.write_all(text.as_bytes()).and_then(|_| self.file.flush()).map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Reward, accuracy and g over the steps, as an SVG.
pub(super) fn plot(metrics: &[RlMetrics], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let max_step = metrics.iter().map(|m| m.step).max().unwrap_or(1).max(1);
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("RL: reward, accuracy and g", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0u64..max_step, -0.1..1.05)?;
        chart.configure_mesh().x_desc("step").draw()?;
        type Series = (&'static str, fn(&RlMetrics) -> f64, RGBColor);
        let series: [Series; 3] = [
            ("reward mean", |m| m.reward_mean, BLUE),
            ("accuracy", |m| m.accuracy, GREEN),
            ("g (SFT weight)", |m| m.g, RED),
        ];
        for (name, value, color) in series {
            chart
                .draw_series(LineSeries::new(metrics.iter().map(|m| (m.step, value(m))), &color))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| TrainError::invalid(path, format!("cannot draw the RL plot: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_survive_the_csv() {
        let m = RlMetrics { step: 3, reward_mean: 0.25, accuracy: 0.5, g: 0.9, masked: 2, ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let mut log = MetricsLog::open(&path, &[]).unwrap();
        log.write(&m).unwrap();
        log.write(&RlMetrics { step: 4, ..m.clone() }).unwrap();
        assert_eq!(read_metrics(&path, 3), [m]);
    }
}
