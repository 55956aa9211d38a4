//! The pieces of the RL objective (RECIPE section 8, DAPO): group advantages, dynamic
//! sampling's test, the clipped policy-gradient term with the dual clip, the cosine of the
//! SFT weight `g`, and the rollout policy's log-probabilities and entropy.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::config::ModelConfig;
use crate::learned::{Packed, host};
use crate::model::Decoder;

/// Mean entropy (nats) of the next-token distribution at the packed positions, and the
/// log-probabilities of the targets: what the rollout policy did. `decoder` runs off the
/// autodiff graph (a [`burn::module::Module::valid`] copy, on its plain device), and the
/// head over `chunk` tokens at a time.
pub fn rollout_stats(
    decoder: &Decoder,
    config: &ModelConfig,
    packed: &Packed,
    device: &Device,
    chunk: usize,
) -> (Vec<f32>, f64) {
    let hidden = decoder.hidden(config, &packed.batch, None, device);
    let [b, t, d] = hidden.dims();
    let hidden = hidden.reshape([b * t, d]);
    let n = packed.rows.len();
    let (mut logp, mut entropy) = (Vec::with_capacity(n), 0.0);
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(n);
        let rows =
            Tensor::<1, Int>::from_data(TensorData::new(packed.rows[start..end].to_vec(), [end - start]), device);
        let logits = decoder.logits(hidden.clone().select(0, rows).unsqueeze_dim::<3>(0)).squeeze_dim::<2>(0);
        let all = log_softmax(logits, 1);
        entropy -= (all.clone().exp() * all.clone()).sum().into_scalar::<f32>() as f64;
        let targets = TensorData::new(packed.targets[start..end].to_vec(), [end - start]);
        let targets = Tensor::<1, Int>::from_data(targets, device);
        logp.extend(host(all.gather(1, targets.unsqueeze_dim::<2>(1)).squeeze_dim::<1>(1)));
    }
    (logp, entropy / n.max(1) as f64)
}

/// DAPO's clip: the ratio is kept within `[1 - low, 1 + high]`, and for negative advantages
/// the loss is capped at `dual` times the advantage (the dual clip).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clip {
    pub low: f64,
    pub high: f64,
    pub dual: f64,
}

/// The per-token policy-gradient loss (to be summed and divided by the step's token count):
/// `max(-A r, -A clip(r))`, and for `A < 0` at most `-A c`, with `r = exp(logp - old)`.
pub fn pg_loss(logp: Tensor<1>, old: Tensor<1>, advantages: Tensor<1>, clip: Clip) -> Tensor<1> {
    let ratio = (logp - old).exp();
    let clipped = ratio.clone().clamp(1.0 - clip.low, 1.0 + clip.high);
    let neg = advantages.clone().neg();
    let surrogate = (neg.clone() * ratio).max_pair(neg.clone() * clipped);
    let dual = surrogate.clone().min_pair(neg.mul_scalar(clip.dual));
    surrogate.mask_where(advantages.lower_elem(0.0), dual)
}

/// Tokens whose ratio the clip (or the dual clip) held, given ratios and advantages.
pub fn clipped_tokens(ratios: &[f32], advantages: &[f32], clip: Clip) -> usize {
    ratios
        .iter()
        .zip(advantages)
        .filter(|&(&r, &a)| {
            let r = r as f64;
            (a > 0.0 && r > 1.0 + clip.high) || (a < 0.0 && (r < 1.0 - clip.low || r > clip.dual))
        })
        .count()
}

/// GRPO's advantages of one group: rewards centred on the group mean, divided by the group's
/// (sample) standard deviation.
pub fn group_advantages(rewards: &[f64]) -> Vec<f64> {
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    rewards.iter().map(|r| (r - mean) / (var.sqrt() + 1e-6)).collect()
}

/// Dynamic sampling keeps a group only when its rewards differ (equal rewards teach nothing).
pub fn informative(rewards: &[f64]) -> bool {
    rewards.iter().any(|r| (r - rewards[0]).abs() > 1e-9)
}

/// The SFT weight `g` at `step` (0-based) of `total`: a cosine from `start` at the first step
/// to `end` at the last.
pub fn sft_weight(step: u64, total: u64, start: f64, end: f64) -> f64 {
    let progress = (step as f64 / total.saturating_sub(1).max(1) as f64).min(1.0);
    end + (start - end) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learned::{Sequence, logprobs_of, pack, token_logprobs};
    use crate::weights::{build_decoder, random_weights};

    const CLIP: Clip = Clip { low: 0.2, high: 0.28, dual: 10.0 };

    fn autodiff() -> Device {
        crate::default_device().autodiff()
    }

    fn tensor(values: &[f32], device: &Device) -> Tensor<1> {
        Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
    }

    /// Loss and gradient of one token at ratio `ratio` with advantage `a`.
    fn at(ratio: f32, a: f32) -> (f32, f32) {
        let device = autodiff();
        let logp = tensor(&[ratio.ln()], &device).require_grad();
        let loss = pg_loss(logp.clone(), tensor(&[0.0], &device), tensor(&[a], &device), CLIP);
        let value = loss.clone().sum().into_scalar::<f32>();
        let grads = loss.sum().backward();
        (value, host(logp.grad(&grads).unwrap()).remove(0))
    }

    #[test]
    fn the_clip_and_dual_clip_bound_the_ratio_as_written() {
        // Inside the clip range the loss is -A r and the gradient flows.
        let (loss, grad) = at(1.1, 1.0);
        assert!((loss + 1.1).abs() < 1e-5 && (grad + 1.1).abs() < 1e-5, "{loss} {grad}");
        // A > 0: the ratio is held at 1 + 0.28, with no gradient beyond.
        assert_eq!(at(2.0, 1.0), (-1.28, 0.0));
        // A < 0: held at 1 - 0.2 below...
        let (loss, grad) = at(0.5, -1.0);
        assert!((loss - 0.8).abs() < 1e-6 && grad == 0.0, "{loss} {grad}");
        // ...unbounded above up to the dual clip c = 10...
        let (loss, grad) = at(5.0, -1.0);
        assert!((loss - 5.0).abs() < 1e-4 && (grad - 5.0).abs() < 1e-4, "{loss} {grad}");
        // ...and capped at c |A| beyond it.
        let (loss, grad) = at(20.0, -2.0);
        assert!((loss - 20.0).abs() < 1e-4 && grad == 0.0, "{loss} {grad}");
        assert_eq!(clipped_tokens(&[1.1, 2.0, 0.5, 5.0, 20.0], &[1.0, 1.0, -1.0, -1.0, -2.0], CLIP), 3);
    }

    #[test]
    fn only_learned_tokens_get_a_gradient() {
        let device = autodiff();
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true
        }))
        .unwrap();
        let decoder = build_decoder(&config, random_weights(&config, 3), std::path::Path::new("t"), &device).unwrap();
        // Prompt (0..3), a policy turn (3..6), an interpreter turn (6..9), a policy turn (9..12).
        let learn: Vec<bool> = (0..12).map(|i| (3..6).contains(&i) || (9..12).contains(&i)).collect();
        let seq = Sequence { ids: (0..12).map(|i| (i * 7 % 40) as u32).collect(), learn, weight: 1.0 };
        let packed = pack(&[&seq]);
        assert_eq!(packed.rows, [2, 3, 4, 8, 9, 10], "positions that predict learned tokens");
        let hidden = decoder.hidden(&config, &packed.batch, None, &device).detach().require_grad();
        let rows = Tensor::<1, Int>::from_data(TensorData::new(packed.rows.clone(), [6]), &device);
        let logp = logprobs_of(&decoder, hidden.clone().reshape([11, 16]).select(0, rows), &packed.targets, &device);
        let old = logp.clone().detach();
        let loss = pg_loss(logp, old, tensor(&packed.weights, &device), CLIP).sum();
        let grads = loss.backward();
        let grad = hidden.grad(&grads).unwrap().reshape([11, 16]);
        let norms = host(grad.powi_scalar(2).sum_dim(1).squeeze_dim::<1>(1));
        for (t, norm) in norms.iter().enumerate() {
            if packed.rows.contains(&(t as i64)) {
                assert!(*norm > 0.0, "position {t} predicts a learned token");
            } else {
                assert_eq!(*norm, 0.0, "position {t} predicts a prompt or interpreter token");
            }
        }
        // A sequence of zero advantage (a dropped group's) contributes exactly nothing.
        let flat = Sequence { weight: 0.0, ..seq };
        let packed = pack(&[&flat]);
        let logp = token_logprobs(&decoder, &config, &packed, &device);
        let loss = pg_loss(logp.clone(), logp.clone().detach(), tensor(&packed.weights, &device), CLIP).sum();
        let grads = GradientsCheck::all_zero(&decoder, loss);
        assert!(grads, "zero advantages give a zero gradient everywhere");
    }

    /// Whether every parameter gradient of `loss` is exactly zero.
    struct GradientsCheck;

    impl GradientsCheck {
        fn all_zero(decoder: &Decoder, loss: Tensor<1>) -> bool {
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), decoder);
            crate::sft::optim::global_norm(decoder, &grads) == 0.0
        }
    }

    #[test]
    fn groups_of_equal_rewards_are_dropped_and_advantages_centre() {
        assert!(!informative(&[1.0, 1.0, 1.0, 1.0]));
        assert!(!informative(&[-0.1; 4]));
        assert!(informative(&[0.0, 0.0, 1.0, 0.0]));
        let a = group_advantages(&[1.0, 0.0, 0.0, 0.0]);
        assert!((a.iter().sum::<f64>()).abs() < 1e-9);
        assert!((a[0] - 1.5).abs() < 1e-5 && (a[1] + 0.5).abs() < 1e-5, "{a:?}");
    }

    #[test]
    fn g_follows_its_cosine() {
        assert_eq!(sft_weight(0, 350, 0.9, 0.05), 0.9);
        assert!((sft_weight(349, 350, 0.9, 0.05) - 0.05).abs() < 1e-12);
        let mid = sft_weight(174, 349, 0.9, 0.05);
        assert!((mid - 0.475).abs() < 1e-9, "{mid}");
        let curve: Vec<f64> = (0..350).map(|s| sft_weight(s, 350, 0.9, 0.05)).collect();
        assert!(curve.windows(2).all(|w| w[1] <= w[0]), "g only falls");
        assert_eq!(sft_weight(3, 10, 0.0, 0.0), 0.0, "g = 0 is plain DAPO");
        assert_eq!(sft_weight(3, 10, 1.0, 1.0), 1.0, "g = 1 is plain SFT");
    }
}
