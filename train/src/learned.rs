//! Log-probabilities of the learned tokens only: the hidden states of the positions whose next
//! token carries loss go through the output head, never the whole context (with a 49k-150k
//! vocabulary the head over every position is most of a step's time and memory). SFT learns
//! the assistant tokens of its conversations, RL the policy's own turns; prompts and interpreter
//! turns are context.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::config::ModelConfig;
use crate::model::{Batch, Decoder};

/// One tokenised conversation trained on.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// `true` where the token is one the model must learn to produce (an assistant's or the
    /// policy's own; never the prompt or an interpreter turn).
    pub learn: Vec<bool>,
    /// The weight of each learned token: 1 for SFT, the advantage for RL.
    pub weight: f32,
}

impl Sequence {
    /// Tokens whose prediction is learned (the first token is never predicted).
    pub fn learned(&self) -> usize {
        self.learn.iter().skip(1).filter(|&&l| l).count()
    }
}

/// Sequences packed for one forward pass: inputs right-padded to the longest, the flat
/// positions (row * width + t) whose next token is learned, those targets, and their weights.
pub struct Packed {
    pub batch: Batch,
    pub rows: Vec<i64>,
    pub targets: Vec<i64>,
    pub weights: Vec<f32>,
}

/// Packs `seqs` (each at least two tokens long).
pub fn pack(seqs: &[&Sequence]) -> Packed {
    let width = seqs.iter().map(|s| s.ids.len().saturating_sub(1)).max().unwrap_or(0);
    let (mut inputs, mut rows, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (r, s) in seqs.iter().enumerate() {
        let n = s.ids.len().saturating_sub(1);
        let mut row = s.ids[..n].to_vec();
        row.resize(width, 0);
        inputs.push(row);
        for t in 0..n {
            if s.learn[t + 1] {
                rows.push((r * width + t) as i64);
                targets.push(s.ids[t + 1] as i64);
                weights.push(s.weight);
            }
        }
    }
    Packed { batch: Batch::dense(inputs), rows, targets, weights }
}

/// Log-probabilities of the packed targets under `decoder`, `[learned tokens]`: hidden states
/// of the learned positions only go through the output head.
pub fn token_logprobs(decoder: &Decoder, config: &ModelConfig, packed: &Packed, device: &Device) -> Tensor<1> {
    let hidden = decoder.hidden(config, &packed.batch, None, device);
    let [b, t, d] = hidden.dims();
    let n = packed.rows.len();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(packed.rows.clone(), [n]), device);
    let picked = hidden.reshape([b * t, d]).select(0, rows);
    logprobs_of(decoder, picked, &packed.targets, device)
}

/// Log-probabilities of `targets` after the hidden states `picked` (`[n, dim]`).
pub(crate) fn logprobs_of(decoder: &Decoder, picked: Tensor<2>, targets: &[i64], device: &Device) -> Tensor<1> {
    let n = targets.len();
    let logits = decoder.logits(picked.unsqueeze_dim::<3>(0)).squeeze_dim::<2>(0);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets.to_vec(), [n]), device);
    log_softmax(logits, 1).gather(1, targets.unsqueeze_dim::<2>(1)).squeeze_dim::<1>(1)
}

/// A 1-D tensor's values on the host.
pub fn host(t: Tensor<1>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values")
}
