//! The backward pass of a loss over learned tokens, in segments so that memory does not grow
//! with the vocabulary or the depth:
//!
//! - the output head and the loss run over `loss_chunk` learned tokens at a time, each chunk's
//!   backward done before the next is computed, so the `[tokens, vocab]` logits (150k wide for
//!   Qwen) are never held all at once, in the forward pass or the backward;
//! - with `checkpoint_layers`, the blocks first run off the autodiff graph, keeping only each
//!   block's input; the backward pass then recomputes one block at a time on the graph and
//!   backpropagates the gradient of its output through it (one more forward pass per step, in
//!   exchange for one layer's activations instead of all of them). Within a block, attention
//!   is recomputed `attention_block` query positions at a time, each block's backward done
//!   before the next, so the score matrix of even one layer is never whole (burn 0.22's
//!   autodiff has no fused attention backward to do this for us).
//!
//! Both give the gradients of the plain backward pass, up to float rounding: each segment's
//! backward is driven by the surrogate `sum(output * upstream_gradient)`, whose gradient with
//! respect to the segment's inputs and weights is exactly the chain rule's.

use std::ops::Range;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

use crate::config::ModelConfig;
use crate::learned::{Packed, logprobs_of};
use crate::model::{Block, Decoder, Rope, attend};

/// How a training pass trades compute for memory (the `gradient_checkpointing` and
/// `loss_chunk` settings of SFT and RL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub checkpoint_layers: bool,
    /// Learned tokens whose logits are computed at once.
    pub loss_chunk: usize,
    /// With `checkpoint_layers`: query positions whose attention scores are recomputed at
    /// once (the `[heads, queries, keys]` score matrix is never whole). Default: 1024.
    pub attention_block: usize,
}

/// The default `loss_chunk`: 1024 tokens (600 MB of f32 logits at Qwen's 150k vocabulary).
pub fn default_loss_chunk() -> usize {
    1024
}

/// Whether `loss_chunk` is the default (see [`is_default`]).
pub fn is_default_loss_chunk(chunk: &usize) -> bool {
    *chunk == default_loss_chunk()
}

/// Whether a setting has its default value (such settings stay out of run keys, so runs
/// checkpointed before the setting existed still resume).
pub fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl Default for Memory {
    fn default() -> Self {
        Memory { checkpoint_layers: false, loss_chunk: default_loss_chunk(), attention_block: 1024 }
    }
}

/// Runs `decoder` over `packed` and backpropagates `loss`, a sum over learned tokens:
/// `loss(logp, range)` gets the log-probabilities of the learned tokens `range` (indices into
/// `packed.targets`) and returns their share of the loss, a one-element tensor. Returns the
/// loss's value and the gradients of the decoder's trainable parameters.
pub fn backward(
    decoder: &Decoder,
    config: &ModelConfig,
    packed: &Packed,
    device: &Device,
    memory: Memory,
    mut loss: impl FnMut(Tensor<1>, Range<usize>) -> Tensor<1>,
) -> (f64, GradientsParams) {
    let n = packed.rows.len();
    if n == 0 {
        return (0.0, GradientsParams::new());
    }
    let body = if memory.checkpoint_layers {
        Body::off_graph(decoder, config, packed, device)
    } else {
        Body::on_graph(decoder, config, packed, device)
    };
    let [b, t, d] = body.hidden.dims();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(packed.rows.clone(), [n]), device);
    let picked = body.hidden.clone().reshape([b * t, d]).select(0, rows);

    // The head and the loss, a chunk at a time, each from a leaf cut off the body's graph.
    let mut grads = GradientsParams::new();
    let (mut value, mut upstream) = (0.0, Vec::new());
    let chunk = memory.loss_chunk.max(1);
    for start in (0..n).step_by(chunk) {
        let range = start..(start + chunk).min(n);
        let leaf = picked.clone().detach().narrow(0, start, range.len()).require_grad();
        let logp = logprobs_of(decoder, leaf.clone(), &packed.targets[range.clone()], device);
        let part = loss(logp, range);
        value += part.clone().into_scalar::<f32>() as f64;
        let g = part.backward();
        upstream.push(leaf.grad(&g).expect("the head's input is on the graph"));
        grads = accumulate(decoder, grads, GradientsParams::from_grads(g, decoder));
    }
    let upstream = Tensor::from_inner(Tensor::cat(upstream, 0));
    let g = (picked * upstream).sum().backward();
    let below = body.input.as_ref().map(|leaf| leaf.grad(&g).expect("the body's input is on the graph"));
    grads = accumulate(decoder, grads, GradientsParams::from_grads(g, decoder));
    if let Some(upstream) = below {
        grads = body.recompute(decoder, config, packed, device, memory.attention_block, upstream, grads);
    }
    (value, grads)
}

/// The decoder up to its final norm: on the graph, or run off it with each block's input kept.
struct Body {
    /// Final hidden states `[batch, time, dim]`, on the graph from `input` (or the embeddings).
    hidden: Tensor<3>,
    /// With checkpointing: the leaf the final norm starts from (the last block's output).
    input: Option<Tensor<3>>,
    /// With checkpointing: each block's input, off the graph.
    saved: Vec<Tensor<3>>,
    /// With checkpointing: the decoder off the graph, with its rotary tables and mask.
    frozen: Option<(Decoder, Rope, Option<Tensor<4>>)>,
}

impl Body {
    fn on_graph(decoder: &Decoder, config: &ModelConfig, packed: &Packed, device: &Device) -> Self {
        Body {
            hidden: decoder.hidden(config, &packed.batch, None, device),
            input: None,
            saved: Vec::new(),
            frozen: None,
        }
    }

    fn off_graph(decoder: &Decoder, config: &ModelConfig, packed: &Packed, device: &Device) -> Self {
        let plain = device.clone().inner();
        let frozen = decoder.valid();
        let mut x = frozen.embed_tokens(&packed.batch, &plain);
        let (rope, mask) = frozen.context(config, &packed.batch, 0, &plain);
        let mut saved = Vec::with_capacity(frozen.blocks.len());
        for block in &frozen.blocks {
            saved.push(x.clone());
            x = block.forward(x, &rope, mask.clone(), None);
        }
        let input = Tensor::from_inner(x).require_grad();
        let hidden = decoder.norm.forward(input.clone());
        Body { hidden, input: Some(input), saved, frozen: Some((frozen, rope, mask)) }
    }

    /// Backpropagates `upstream` (the gradient of the last block's output) through the blocks,
    /// last first, recomputing each on the graph, and then into the embeddings.
    #[allow(clippy::too_many_arguments)]
    fn recompute(
        self,
        decoder: &Decoder,
        config: &ModelConfig,
        packed: &Packed,
        device: &Device,
        queries: usize,
        mut upstream: Tensor<3>,
        mut grads: GradientsParams,
    ) -> GradientsParams {
        let (frozen, plain_rope, plain_mask) = self.frozen.expect("a checkpointed body");
        let (rope, mask) = decoder.context(config, &packed.batch, 0, device);
        let layer = Recompute { decoder, rope, mask, plain_rope, plain_mask, queries: queries.max(1) };
        for ((block, off), input) in decoder.blocks.iter().zip(&frozen.blocks).zip(self.saved).rev() {
            upstream = layer.backward(block, off, input, upstream, &mut grads);
        }
        let embedded = decoder.embed_tokens(&packed.batch, device);
        if embedded.is_tracked() {
            let g = (embedded * Tensor::from_inner(upstream)).sum().backward();
            grads = accumulate(decoder, grads, GradientsParams::from_grads(g, decoder));
        }
        grads
    }
}

/// What recomputing any block needs: the rotary tables and mask on the autodiff device and off
/// it, and the attention block size.
struct Recompute<'a> {
    decoder: &'a Decoder,
    rope: Rope,
    mask: Option<Tensor<4>>,
    plain_rope: Rope,
    plain_mask: Option<Tensor<4>>,
    queries: usize,
}

impl Recompute<'_> {
    /// Backpropagates `upstream` (the gradient of `block`'s output) through `block` at its
    /// `input` (`off` is the block off the graph); adds the block's parameter gradients to
    /// `grads` and returns the gradient of the input. Three segments: attention's heads off the
    /// graph; the output projection, residual and MLP on it, from leaves at the input and the
    /// heads; then attention from the input, a block of queries at a time.
    fn backward(
        &self,
        block: &Block,
        off: &Block,
        input: Tensor<3>,
        upstream: Tensor<3>,
        grads: &mut GradientsParams,
    ) -> Tensor<3> {
        let t = input.dims()[1];
        let spans: Vec<Range<usize>> = (0..t).step_by(self.queries).map(|s| s..(s + self.queries).min(t)).collect();
        let rows = |m: &Option<Tensor<4>>, r: &Range<usize>| m.clone().map(|m| m.narrow(2, r.start, r.len()));

        let (q, k, v) = off.attn.project(off.attn_norm.forward(input.clone()), &self.plain_rope, None);
        let heads = spans
            .iter()
            .map(|r| attend(q.clone().narrow(2, r.start, r.len()), k.clone(), v.clone(), rows(&self.plain_mask, r)));
        let heads = Tensor::cat(heads.collect(), 2);

        let x = Tensor::from_inner(input.clone()).require_grad();
        let h = Tensor::from_inner(heads).require_grad();
        let g = (block.finish(x.clone(), h.clone()) * Tensor::from_inner(upstream)).sum().backward();
        let (g_heads, g_residual) = (h.grad(&g).expect("heads on the graph"), x.grad(&g).expect("input on the graph"));
        *grads = accumulate(self.decoder, std::mem::take(grads), GradientsParams::from_grads(g, self.decoder));

        let x = Tensor::from_inner(input).require_grad();
        let (q, k, v) = block.attn.project(block.attn_norm.forward(x.clone()), &self.rope, None);
        let (k_leaf, v_leaf) = (k.clone().detach().require_grad(), v.clone().detach().require_grad());
        let (mut g_q, mut g_k, mut g_v) = (Vec::new(), None, None);
        for r in &spans {
            let q_leaf = q.clone().detach().narrow(2, r.start, r.len()).require_grad();
            let out = attend(q_leaf.clone(), k_leaf.clone(), v_leaf.clone(), rows(&self.mask, r));
            let g = (out * Tensor::from_inner(g_heads.clone().narrow(2, r.start, r.len()))).sum().backward();
            g_q.push(q_leaf.grad(&g).expect("queries on the graph"));
            let add = |sum: Option<Tensor<4>>, more: Tensor<4>| Some(sum.map_or(more.clone(), |s| s + more));
            g_k = add(g_k, k_leaf.grad(&g).expect("keys on the graph"));
            g_v = add(g_v, v_leaf.grad(&g).expect("values on the graph"));
        }
        let on = |g: Option<Tensor<4>>| Tensor::from_inner(g.expect("at least one query block"));
        let g_q = Tensor::from_inner(Tensor::cat(g_q, 2));
        let g = (q * g_q + k * on(g_k) + v * on(g_v)).sum().backward();
        let g_input = g_residual + x.grad(&g).expect("input on the graph");
        *grads = accumulate(self.decoder, std::mem::take(grads), GradientsParams::from_grads(g, self.decoder));
        g_input
    }
}

/// Adds `more` to `acc` parameter by parameter.
pub fn accumulate(decoder: &Decoder, acc: GradientsParams, more: GradientsParams) -> GradientsParams {
    if acc.is_empty() {
        return more;
    }
    let mut acc = acc;
    let mut more = more;
    struct Add<'a> {
        acc: &'a mut GradientsParams,
        more: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.more.remove::<D>(param.id) {
                let sum = match self.acc.remove::<D>(param.id) {
                    Some(a) => a + g,
                    None => g,
                };
                self.acc.register(param.id, sum);
            }
        }
    }
    decoder.visit(&mut Add { acc: &mut acc, more: &mut more });
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learned::{Sequence, pack, token_logprobs};
    use crate::model::Precision;
    use crate::weights::{build_decoder, random_weights};

    fn tiny(layers: usize, precision: Precision) -> (ModelConfig, Decoder, Device) {
        let device = crate::default_device().autodiff();
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 48, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true,
            "attention_bias": true
        }))
        .unwrap();
        let weights = random_weights(&config, 5);
        let decoder = build_decoder(&config, weights, std::path::Path::new("t"), &device).unwrap();
        (config, decoder.with_precision(precision), device)
    }

    /// Two conversations of different lengths (right padding), learned tokens in two spans.
    fn batch() -> Packed {
        let seq = |n: usize, salt: usize| Sequence {
            ids: (0..n).map(|i| ((i * 7 + salt) % 48) as u32).collect(),
            learn: (0..n).map(|i| (4..9).contains(&i) || i >= n - 3).collect(),
            weight: 1.0,
        };
        let (a, b) = (seq(14, 1), seq(10, 5));
        pack(&[&a, &b])
    }

    /// Every parameter's gradient, flattened, in the decoder's order.
    fn flat(decoder: &Decoder, grads: &GradientsParams) -> Vec<Vec<f32>> {
        struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(g) = self.0.get::<D>(param.id) {
                    self.1.push(g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap());
                }
            }
        }
        let mut c = Collect(grads, Vec::new());
        decoder.visit(&mut c);
        c.1
    }

    /// The plain pass: the whole graph, the head over every learned token at once.
    fn plain(decoder: &Decoder, config: &ModelConfig, packed: &Packed, device: &Device) -> (f64, Vec<Vec<f32>>) {
        let loss = token_logprobs(decoder, config, packed, device).sum().neg().div_scalar(packed.rows.len() as f64);
        let value = loss.clone().into_scalar::<f32>() as f64;
        (value, flat(decoder, &GradientsParams::from_grads(loss.backward(), decoder)))
    }

    fn segmented(
        decoder: &Decoder,
        config: &ModelConfig,
        packed: &Packed,
        device: &Device,
        memory: Memory,
    ) -> (f64, Vec<Vec<f32>>) {
        let n = packed.rows.len() as f64;
        let (value, grads) =
            backward(decoder, config, packed, device, memory, |logp, _| logp.sum().neg().div_scalar(n));
        (value, flat(decoder, &grads))
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        assert_eq!(a.len(), b.len(), "the same parameters have gradients");
        a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn chunked_loss_and_checkpointed_layers_give_the_plain_gradients() {
        let (config, decoder, device) = tiny(3, Precision::F32);
        let packed = batch();
        let (loss, want) = plain(&decoder, &config, &packed, &device);
        assert!(want.iter().flatten().any(|g| g.abs() > 1e-3), "the gradients are not trivially zero");
        // Attention blocks of 4 query positions split both conversations (13 and 9 tokens).
        let cases = [(false, 3, 1024), (true, 1024, 1024), (true, 4, 4), (false, 1024, 1024), (true, 1024, 1)];
        for (checkpoint_layers, loss_chunk, attention_block) in cases {
            let memory = Memory { checkpoint_layers, loss_chunk, attention_block };
            let (value, got) = segmented(&decoder, &config, &packed, &device, memory);
            assert!((value - loss).abs() < 1e-5, "{memory:?}: loss {value} vs {loss}");
            let diff = max_diff(&want, &got);
            assert!(diff < 1e-4, "{memory:?}: gradients differ by {diff}");
        }
    }

    #[test]
    fn adapters_alone_train_through_the_checkpointed_pass() {
        let (config, decoder, device) = tiny(2, Precision::F32);
        let lora = crate::sft::LoraConfig { rank: 2, alpha: 4.0 };
        let decoder = crate::sft::add_lora(decoder.no_grad(), &lora, 1, &device);
        // B starts at zero, so only B's gradients are non-zero; move B off zero first.
        let decoder = decoder.map(&mut Nudge);
        let packed = batch();
        let (_, want) = plain(&decoder, &config, &packed, &device);
        let memory = Memory { checkpoint_layers: true, loss_chunk: 5, attention_block: 3 };
        let (_, got) = segmented(&decoder, &config, &packed, &device, memory);
        assert_eq!(want.len(), 2 * 7 * 2, "A and B of 7 projections in 2 layers, nothing else");
        assert!(max_diff(&want, &got) < 1e-4);
    }

    /// Adds 0.1 to every trainable parameter.
    struct Nudge;
    impl burn::module::ModuleMapper for Nudge {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if param.val().is_require_grad() { param.map(|t| t.add_scalar(0.1).detach().require_grad()) } else { param }
        }
    }

    #[test]
    fn bf16_mixed_precision_follows_f32_within_bf16_rounding() {
        let (config, f32_model, device) = tiny(2, Precision::F32);
        let packed = batch();
        let memory = Memory::default();
        let (loss, want) = segmented(&f32_model, &config, &packed, &device, memory);
        let mixed = f32_model.with_precision(Precision::Bf16);
        let (value, got) = segmented(&mixed, &config, &packed, &device, memory);
        assert!((value - loss).abs() < 1e-2 * loss.abs(), "loss {value} vs {loss}");
        assert_ne!(value, loss, "the products really ran in bf16");
        // Each parameter's gradient points the same way, to bf16's 8 bits of mantissa.
        for (w, g) in want.iter().zip(&got) {
            let dot: f32 = w.iter().zip(g).map(|(a, b)| a * b).sum();
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let cosine = dot / (norm(w) * norm(g)).max(1e-12);
            assert!(cosine > 0.99, "cosine {cosine}");
        }
        // The master weights stay f32.
        assert_eq!(mixed.blocks[0].mlp.up.weight.val().dtype(), burn::tensor::DType::F32);
    }
}
