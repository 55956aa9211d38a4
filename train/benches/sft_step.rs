//! SFT step throughput of kiln's decoder in burn: forward, assistant-masked loss, backward and
//! AdamW on random weights and tokens, reported as JSON (tokens/s, first-step seconds, MFU when
//! the card's peak is given). `train/scripts/gpu_bench.sh` runs it beside PyTorch on the same
//! shapes.
//!
//! `cargo bench -p kiln-train --bench sft_step -- --shape qwen2.5-0.5b --batch 8 --seq 1024
//!  --steps 10 --dtype bf16 --peak-tflops 989 [--checkpoint] [--loss-chunk 1024] [--layers N]`. `--dtype bf16`
//! is mixed precision (f32 master weights, bf16 products, as PyTorch's autocast);
//! `bf16-pure` computes and stores everything in bf16. Without `--bench` (as in `cargo test`),
//! one step of a tiny shape runs as a smoke test.

use std::time::Instant;

use burn::tensor::{DeviceConfig, FloatDType};
use kiln_train::ModelConfig;
use kiln_train::backprop::{Memory, backward};
use kiln_train::learned::{Sequence, pack};
use kiln_train::model::Precision;
use kiln_train::sft::optim::{AdamWSettings, AdamWState, global_norm, step};
use kiln_train::weights::{build_decoder, random_weights};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let mut config = ModelConfig::bench_shape(&arg(&args, "--shape", if full { "qwen2.5-0.5b" } else { "tiny" }));
    // `--layers 1`: the shape's widths with fewer layers (to reproduce a problem small).
    if let Ok(layers) = arg(&args, "--layers", "").parse() {
        config.num_hidden_layers = layers;
    }
    let batch: usize = arg(&args, "--batch", if full { "8" } else { "2" }).parse().unwrap();
    let seq: usize = arg(&args, "--seq", if full { "1024" } else { "64" }).parse().unwrap();
    let steps: usize = arg(&args, "--steps", if full { "10" } else { "2" }).parse().unwrap();
    let dtype = arg(&args, "--dtype", "f32");
    let peak: f64 = arg(&args, "--peak-tflops", "0").parse().unwrap();

    let memory = Memory {
        checkpoint_layers: args.iter().any(|a| a == "--checkpoint"),
        loss_chunk: arg(&args, "--loss-chunk", "1024").parse().unwrap(),
        ..Memory::default()
    };

    let mut device = kiln_train::default_device();
    if dtype == "bf16-pure" {
        device.configure(DeviceConfig::default().float_dtype(FloatDType::BF16)).expect("bf16 on this device");
    }
    let device = device.autodiff();
    let precision = if dtype == "bf16" { Precision::Bf16 } else { Precision::F32 };
    let mut decoder = build_decoder(&config, random_weights(&config, 0), std::path::Path::new("random"), &device)
        .unwrap()
        .with_precision(precision);
    let mut rng = fastrand::Rng::with_seed(1);
    // Every token learned (the learned-token path still runs), as in PyTorch's plain LM loss.
    let examples: Vec<Sequence> = (0..batch)
        .map(|_| Sequence {
            ids: (0..seq + 1).map(|_| rng.u32(..config.vocab_size as u32)).collect(),
            learn: vec![true; seq + 1],
            weight: 1.0,
        })
        .collect();
    let rows: Vec<&Sequence> = examples.iter().collect();
    let packed = pack(&rows);
    let settings = AdamWSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut state = AdamWState::default();
    let mut times = Vec::new();
    for _ in 0..steps {
        let start = Instant::now();
        let nll = |logp: burn::prelude::Tensor<1>, _| logp.sum().neg().div_scalar((batch * seq) as f64);
        let (loss_value, mut grads) = backward(&decoder, &config, &packed, &device, memory, nll);
        let norm = global_norm(&decoder, &grads);
        decoder = step(decoder, &mut grads, &mut state, &settings, 1e-4, (1.0 / norm.max(1.0)).min(1.0));
        assert!(loss_value.is_finite(), "loss {loss_value}");
        times.push(start.elapsed().as_secs_f64());
    }
    let steady = if times.len() > 1 { &times[1..] } else { &times[..] };
    let per_step = steady.iter().sum::<f64>() / steady.len() as f64;
    let tokens_per_s = (batch * seq) as f64 / per_step;
    // 6 FLOPs per parameter per token (forward + backward), plus attention's 12·layers·dim·seq.
    let params = config.parameter_count() as f64;
    let flops_per_token = 6.0 * params + 12.0 * (config.num_hidden_layers * config.hidden_size * seq) as f64;
    let mfu = if peak > 0.0 { tokens_per_s * flops_per_token / (peak * 1e12) } else { f64::NAN };
    println!(
        "{}",
        serde_json::json!({
            "impl": "kiln-burn", "device": format!("{device:?}"), "dtype": dtype, "batch": batch, "seq": seq,
            "checkpoint": memory.checkpoint_layers, "loss_chunk": memory.loss_chunk, "peak_rss_mib": peak_rss_mib(),
            "params": params, "steps": steps, "first_step_s": times[0], "step_s": per_step,
            "tokens_per_s": tokens_per_s, "mfu": if mfu.is_nan() { serde_json::Value::Null } else { mfu.into() },
        })
    );
}

/// This process's peak resident memory (host memory; a GPU's is sampled by gpu_bench.sh).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kib.map_or(f64::NAN, |k| k / 1024.0)
}
