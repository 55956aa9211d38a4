//! Generation throughput of kiln's decoder: a prompt batch prefilled at once, then greedy decode
//! steps with the key/value cache, on random weights, reported as JSON (time to first token,
//! decode tokens/s over the batch). `train/scripts/gpu_bench.sh` runs it beside
//! `bench_generate_torch.py` (transformers' `generate`, the same shapes).
//!
//! `cargo bench -p kiln-train --bench generate_tokens -- --shape qwen2.5-0.5b --batch 32
//!  --prompt 128 --new 128 [--dtype bf16-pure]`. Without `--bench`, a tiny shape runs as a smoke
//! test. `--gguf FILE` runs a real model instead, both ways in the same run: the burn decoder
//! over dequantised weights, and the packed decode path (`kiln_train::decode`), one JSON line each.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{DeviceConfig, FloatDType};
use kiln_train::ModelConfig;
use kiln_train::decode::Engine;
use kiln_train::generate::{Request, Running, Sampling};
use kiln_train::model::{Batch, Decoder, KvCache};
use kiln_train::weights::{build_decoder, random_weights};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let config = ModelConfig::bench_shape(&arg(&args, "--shape", if full { "qwen2.5-0.5b" } else { "tiny" }));
    let batch: usize = arg(&args, "--batch", "1").parse().unwrap();
    let prompt: usize = arg(&args, "--prompt", if full { "128" } else { "8" }).parse().unwrap();
    let new: usize = arg(&args, "--new", if full { "128" } else { "4" }).parse().unwrap();
    let dtype = arg(&args, "--dtype", "f32");

    if let Some(path) = args.iter().position(|a| a == "--gguf").and_then(|i| args.get(i + 1)) {
        return compare_on_gguf(std::path::Path::new(path), batch, prompt, new);
    }
    let mut device = kiln_train::default_device();
    if dtype == "bf16-pure" {
        device.configure(DeviceConfig::default().float_dtype(FloatDType::BF16)).expect("bf16 on this device");
    }
    let decoder = build_decoder(&config, random_weights(&config, 0), std::path::Path::new("random"), &device).unwrap();
    let mut rng = fastrand::Rng::with_seed(1);
    let tokens: Vec<Vec<u32>> =
        (0..batch).map(|_| (0..prompt).map(|_| rng.u32(..config.vocab_size as u32)).collect()).collect();

    // A first, short run compiles the kernels on a GPU; the second is measured.
    let warm_up = Instant::now();
    run(&decoder, &config, &tokens, 2);
    let warm_up_s = warm_up.elapsed().as_secs_f64();
    let (first_token_s, decode_s) = run(&decoder, &config, &tokens, new);
    println!(
        "{}",
        serde_json::json!({
            "impl": "kiln-burn", "device": format!("{device:?}"), "dtype": dtype, "batch": batch,
            "prompt": prompt, "new_tokens": new, "warm_up_s": warm_up_s, "first_token_s": first_token_s,
            "decode_tokens_per_s": (batch * (new - 1)) as f64 / decode_s.max(1e-9),
            "tokens_per_s": (batch * new) as f64 / (first_token_s + decode_s),
        })
    );
}

/// The burn decoder and the packed decode path on the model in `path`, the same random prompts.
fn compare_on_gguf(path: &std::path::Path, batch: usize, prompt: usize, new: usize) {
    let model = kiln_train::LoadedModel::load(path, &kiln_train::default_device()).unwrap();
    let engine = Engine::from_gguf(&kiln_train::gguf::Gguf::open(path).unwrap(), &model.config).unwrap();
    let config = &model.config;
    let mut rng = fastrand::Rng::with_seed(1);
    let tokens: Vec<Vec<u32>> =
        (0..batch).map(|_| (0..prompt).map(|_| rng.u32(..config.vocab_size as u32)).collect()).collect();
    let report = |name: &str, (first_token_s, decode_s, generated): (f64, f64, usize)| {
        println!(
            "{}",
            serde_json::json!({
                "impl": name, "model": model.name(), "batch": batch, "prompt": prompt, "new_tokens": new,
                "generated": generated, "threads": rayon::current_num_threads(), "first_token_s": first_token_s,
                "decode_tokens_per_s": generated.saturating_sub(batch) as f64 / decode_s.max(1e-9),
                "tokens_per_s": generated as f64 / (first_token_s + decode_s),
            })
        );
    };
    let (first_token_s, decode_s) = run(&model.decoder, config, &tokens, new);
    report("kiln-burn", (first_token_s, decode_s, batch * new));
    report("kiln-packed", run_packed(&model, &engine, &tokens, new));
}

/// [`run`] as `kiln serve` runs a GGUF: prompts prefilled through the burn decoder, tokens
/// decoded on the packed path ([`Running::packed`]); rows that meet a stop token leave early.
/// The seconds to the first token, of the decode steps after it, and the tokens generated.
fn run_packed(model: &kiln_train::LoadedModel, engine: &Engine, tokens: &[Vec<u32>], new: usize) -> (f64, f64, usize) {
    let start = Instant::now();
    let mut running = Running::packed(&model.codec, engine);
    let sampling = Sampling { max_tokens: new, ..Sampling::default() };
    let requests = tokens.iter().map(|t| Request { prompt: t.clone(), sampling: sampling.clone() });
    running.join(requests.enumerate().collect());
    let first_token_s = start.elapsed().as_secs_f64();
    let decode = Instant::now();
    let mut generated = 0;
    while !running.is_empty() {
        generated += running.step(&mut |_| {}).unwrap().iter().map(|(_, c)| c.tokens.len()).sum::<usize>();
    }
    (first_token_s, decode.elapsed().as_secs_f64(), generated)
}

/// Prefills `tokens` and decodes greedily until each row has `new` tokens: the seconds to the
/// first token and of the decode steps after it.
fn run(decoder: &Decoder, config: &ModelConfig, tokens: &[Vec<u32>], new: usize) -> (f64, f64) {
    let (batch, prompt) = (tokens.len(), tokens[0].len());
    let start = Instant::now();
    let mut cache = KvCache::new(config.num_hidden_layers);
    let mut next = greedy(decoder.forward(config, &Batch::dense(tokens.to_vec()), Some(&mut cache)));
    let first_token_s = start.elapsed().as_secs_f64();
    let decode = Instant::now();
    for step in 1..new {
        let past = prompt + step - 1;
        let step = Batch {
            tokens: next.iter().map(|&t| vec![t]).collect(),
            positions: vec![vec![past]; batch],
            pad: vec![0; batch],
        };
        next = greedy(decoder.forward(config, &step, Some(&mut cache)));
    }
    (first_token_s, decode.elapsed().as_secs_f64())
}

/// The most likely next token of each row (the last position's logits).
fn greedy(logits: Tensor<3>) -> Vec<u32> {
    let [b, t, _] = logits.dims();
    let ids = logits.narrow(1, t - 1, 1).argmax(2).reshape([b]);
    ids.into_data().convert::<i64>().try_into_vec::<i64>().unwrap().into_iter().map(|i| i as u32).collect()
}
