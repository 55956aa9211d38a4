//! Per-step metrics of a fine-tuning run: `metrics.csv` (kept up to the resumed step) and the
//! loss plot.

use std::path::Path;

use super::StepMetrics;
use crate::error::{Result, TrainError};

pub(super) const METRICS_HEADER: &str = "step,loss,lr,grad_norm,tokens,tokens_per_s";

/// Metrics already logged up to `step` (a resumed run rewrites the rest).
pub(super) fn read_metrics(path: &Path, step: u64) -> Vec<StepMetrics> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            Some(StepMetrics {
                step: f.first()?.parse().ok()?,
                loss: f.get(1)?.parse().ok()?,
                lr: f.get(2)?.parse().ok()?,
                grad_norm: f.get(3)?.parse().ok()?,
                tokens: f.get(4)?.parse().ok()?,
                tokens_per_s: f.get(5)?.parse().ok()?,
            })
        })
        .filter(|m| m.step <= step)
        .collect()
}

pub(super) fn open_metrics(path: &Path, kept: &[StepMetrics]) -> Result<std::fs::File> {
    let mut text = format!("{METRICS_HEADER}\n");
    for m in kept {
        text.push_str(&format!("{},{},{},{},{},{:.1}\n", m.step, m.loss, m.lr, m.grad_norm, m.tokens, m.tokens_per_s));
    }
    std::fs::write(path, text).map_err(|e| TrainError::io(path, e))?;
    std::fs::OpenOptions::new().append(true).open(path).map_err(|e| TrainError::io(path, e))
}

/// The loss curve as an SVG.
pub(super) fn plot_loss(metrics: &[StepMetrics], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let max_step = metrics.iter().map(|m| m.step).max().unwrap_or(1).max(1);
    let max_loss = metrics.iter().map(|m| m.loss).fold(0.0, f64::max).max(1e-3);
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0u64..max_step, 0.0..max_loss * 1.05)?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw()?;
        chart.draw_series(LineSeries::new(metrics.iter().map(|m| (m.step, m.loss)), &BLUE))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| TrainError::invalid(path, format!("cannot draw the loss plot: {e}")))
}
