//! The Llama/Qwen2 decoder in burn: RMSNorm, rotary embeddings in Hugging Face's "rotate half"
//! layout, grouped-query attention with an optional key/value cache, SwiGLU MLP, optional q/k/v
//! bias, tied or untied output head, and optional LoRA adapters on every projection. The
//! projections run in f32 or, as PyTorch's autocast does, in bf16 over f32 weights.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::{silu, softmax};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;

/// Additive mask value for positions a query may not see: finite, so fully masked rows (left
/// padding) give uniform weights instead of NaN.
const MASKED: f32 = -1e9;

/// The arithmetic of the projections (and the output head).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision as PyTorch users know it: the matrix products take bf16 copies of their
    /// f32 inputs and weights and return f32; weights (the master copy), optimizer moments,
    /// norms, attention's softmax and the loss stay f32.
    Bf16,
}

/// `a · b` in `precision` (f32 result either way).
fn matmul(a: Tensor<2>, b: Tensor<2>, precision: Precision) -> Tensor<2> {
    match precision {
        Precision::F32 => a.matmul(b),
        Precision::Bf16 => a.cast(FloatDType::BF16).matmul(b.cast(FloatDType::BF16)).cast(FloatDType::F32),
    }
}

/// A linear projection stored as `[in, out]`, with optional bias and optional LoRA adapter.
#[derive(Module, Debug)]
pub struct Dense {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub lora: Option<Lora>,
    #[module(skip)]
    pub precision: Precision,
}

/// A low-rank update `x · A · B · scale` added to a frozen projection.
#[derive(Module, Debug)]
pub struct Lora {
    pub a: Param<Tensor<2>>,
    pub b: Param<Tensor<2>>,
    pub scale: f32,
}

impl Dense {
    /// Applies the projection to `[batch, time, in]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let x2 = x.reshape([b * t, d]);
        let p = self.precision;
        let mut y = matmul(x2.clone(), self.weight.val(), p);
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze::<2>();
        }
        if let Some(lora) = &self.lora {
            y = y + matmul(matmul(x2, lora.a.val(), p), lora.b.val(), p).mul_scalar(lora.scale);
        }
        let out = y.dims()[1];
        y.reshape([b, t, out])
    }

    /// Input and output widths.
    pub fn shape(&self) -> [usize; 2] {
        self.weight.val().dims()
    }
}

/// Root-mean-square normalisation with a learned scale.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises the last dimension of `[batch, time, dim]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        let inv = variance.add_scalar(self.eps).sqrt().recip();
        x * inv * self.weight.val().unsqueeze::<3>()
    }
}

/// The rotary frequencies of `config`'s heads, `head_dim / 2` of them (f64 powers rounded to
/// f32, as transformers computes them).
pub fn rope_frequencies(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim();
    (0..dim / 2).map(|i| (1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64)) as f32).collect()
}

/// Rotary position tables for one forward call: `[batch, 1, time, head_dim]` each.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    /// Tables for the given positions of each row (all rows the same length).
    pub fn new(config: &ModelConfig, positions: &[Vec<usize>], device: &Device) -> Self {
        let dim = config.head_dim();
        let half = dim / 2;
        let inv_freq = rope_frequencies(config);
        let (b, t) = (positions.len(), positions.first().map_or(0, Vec::len));
        let mut cos = Vec::with_capacity(b * t * dim);
        let mut sin = Vec::with_capacity(b * t * dim);
        for row in positions {
            for &p in row {
                for i in 0..dim {
                    // float32 product as in transformers' rotary embedding.
                    let angle = p as f32 * inv_freq[i % half];
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = [b, 1, t, dim];
        Rope {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// Rotates `[batch, heads, time, head_dim]` in the rotate-half layout.
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let dim = x.dims()[3];
        let half = dim / 2;
        let first = x.clone().narrow(3, 0, half);
        let second = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// One layer's cached keys and values, `[batch, kv_heads, past, head_dim]` each (none yet at
/// the start).
pub type LayerCache = Option<(Tensor<4>, Tensor<4>)>;

/// Keys and values seen so far, per layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache { layers: vec![None; layers] }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `n` zero positions before every row's keys and values (masked through the rows'
    /// padding), so that rows which are further along line up with this cache's.
    pub fn pad_left(&mut self, n: usize) {
        for (k, v) in self.layers.iter_mut().flatten() {
            let [b, h, _, d] = k.dims();
            let zeros = Tensor::<4>::zeros([b, h, n, d], &k.device());
            *k = Tensor::cat(vec![zeros.clone(), k.clone()], 2);
            *v = Tensor::cat(vec![zeros, v.clone()], 2);
        }
    }

    /// Drops the first `n` positions of every row (padding that no row needs any more).
    pub fn trim_left(&mut self, n: usize) {
        for (k, v) in self.layers.iter_mut().flatten() {
            let len = k.dims()[2];
            *k = k.clone().narrow(2, n, len - n);
            *v = v.clone().narrow(2, n, len - n);
        }
    }

    /// Appends the rows of `other`, a cache of the same length, after this cache's.
    pub fn append(&mut self, other: KvCache) {
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            *mine = match (mine.take(), theirs) {
                (Some((k, v)), Some((k2, v2))) => Some((Tensor::cat(vec![k, k2], 0), Tensor::cat(vec![v, v2], 0))),
                (mine, theirs) => mine.or(theirs),
            };
        }
    }

    /// Keeps the given batch rows, in that order (finished sequences leave the batch; a row
    /// named several times is copied, as the samples of one prompt are after its prefill).
    pub fn retain_rows(&mut self, rows: &[usize]) {
        for (k, v) in self.layers.iter_mut().flatten() {
            let device = k.device();
            let index = Tensor::<1, Int>::from_data(
                TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()]),
                &device,
            );
            *k = k.clone().select(0, index.clone());
            *v = v.clone().select(0, index);
        }
    }
}

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    pub q: Dense,
    pub k: Dense,
    pub v: Dense,
    pub o: Dense,
    pub heads: usize,
    pub kv_heads: usize,
}

impl Attention {
    /// Rotated queries `[batch, heads, time, head_dim]`, and keys and values (after the cached
    /// ones, when a cache is given) repeated to line up with the query heads.
    pub fn project(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, t, _] = x.dims();
        let split = |y: Tensor<3>, heads: usize| {
            let width = y.dims()[2] / heads;
            y.reshape([b, t, heads, width]).swap_dims(1, 2)
        };
        let q = rope.apply(split(self.q.forward(x.clone()), self.heads));
        let mut k = rope.apply(split(self.k.forward(x.clone()), self.kv_heads));
        let mut v = split(self.v.forward(x), self.kv_heads);
        if let Some(slot) = cache {
            if let Some((past_k, past_v)) = slot.take() {
                k = Tensor::cat(vec![past_k, k], 2);
                v = Tensor::cat(vec![past_v, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let group = self.heads / self.kv_heads;
        (q, repeat_kv(k, group), repeat_kv(v, group))
    }

    /// The heads' outputs `[batch, heads, time, head_dim]` merged and projected: `[batch, time, dim]`.
    pub fn output(&self, heads: Tensor<4>) -> Tensor<3> {
        let [b, h, t, d] = heads.dims();
        self.o.forward(heads.swap_dims(1, 2).reshape([b, t, h * d]))
    }
}

/// `softmax(q k^T / sqrt(head_dim) + mask) v`, per head.
pub fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Option<Tensor<4>>) -> Tensor<4> {
    let head_dim = q.dims()[3];
    let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (head_dim as f32).sqrt());
    if let Some(mask) = mask {
        scores = scores + mask;
    }
    softmax(scores, 3).matmul(v)
}

/// Repeats each key/value head `group` times so grouped heads line up with query heads.
fn repeat_kv(x: Tensor<4>, group: usize) -> Tensor<4> {
    if group == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2).repeat_dim(2, group).reshape([b, h * group, s, d])
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate: Dense,
    pub up: Dense,
    pub down: Dense,
}

impl Mlp {
    /// Applies the feed-forward to `[batch, time, dim]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down.forward(silu(self.gate.forward(x.clone())) * self.up.forward(x))
    }
}

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    /// The block's output for `x`, extending the layer's cache `slot` when given.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: Option<Tensor<4>>,
        slot: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let (q, k, v) = self.attn.project(self.attn_norm.forward(x.clone()), rope, slot);
        self.finish(x, attend(q, k, v, mask))
    }

    /// The rest of [`Block::forward`] once attention's heads gave `heads`: the output
    /// projection, the residual, and the MLP.
    pub fn finish(&self, x: Tensor<3>, heads: Tensor<4>) -> Tensor<3> {
        let x = x + self.attn.output(heads);
        let h = self.mlp_norm.forward(x.clone());
        x + self.mlp.forward(h)
    }
}

/// The decoder: embeddings, blocks, final norm, output head.
#[derive(Module, Debug)]
pub struct Decoder {
    pub embed: Param<Tensor<2>>,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embeddings.
    pub head: Option<Dense>,
    /// The tied head's arithmetic (an untied head's is its own).
    #[module(skip)]
    pub precision: Precision,
}

/// Which positions of a batch are real tokens (for left-padded generation batches).
#[derive(Clone, Debug)]
pub struct Batch {
    /// Token ids, `[batch][time]`, all rows the same length.
    pub tokens: Vec<Vec<u32>>,
    /// Position of each token (skipping padding), `[batch][time]`.
    pub positions: Vec<Vec<usize>>,
    /// Per row, how many leading positions of the whole sequence (cache included) are padding.
    pub pad: Vec<usize>,
}

impl Batch {
    /// A batch of unpadded rows starting at position 0 (training, single prompts).
    pub fn dense(tokens: Vec<Vec<u32>>) -> Self {
        let positions = tokens.iter().map(|r| (0..r.len()).collect()).collect();
        let pad = vec![0; tokens.len()];
        Batch { tokens, positions, pad }
    }
}

impl Decoder {
    /// The decoder with every projection and the head computing in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        let blocks = self.blocks.iter_mut();
        let denses = blocks.flat_map(|b| {
            [
                &mut b.attn.q,
                &mut b.attn.k,
                &mut b.attn.v,
                &mut b.attn.o,
                &mut b.mlp.gate,
                &mut b.mlp.up,
                &mut b.mlp.down,
            ]
        });
        for dense in denses.chain(self.head.as_mut()) {
            dense.precision = precision;
        }
        self
    }

    /// Logits `[batch, time, vocab]` for `batch`, extending `cache` when given.
    pub fn forward(&self, config: &ModelConfig, batch: &Batch, cache: Option<&mut KvCache>) -> Tensor<3> {
        let device = self.embed.val().device();
        let hidden = self.hidden(config, batch, cache, &device);
        self.logits(hidden)
    }

    /// Logits `[batch, 1, vocab]` of the last position only (a prompt's prefill: the head, as
    /// large as the rest of a small model, runs once per row instead of once per position).
    pub fn forward_last(&self, config: &ModelConfig, batch: &Batch, cache: Option<&mut KvCache>) -> Tensor<3> {
        let device = self.embed.val().device();
        let hidden = self.hidden(config, batch, cache, &device);
        let t = hidden.dims()[1];
        self.logits(hidden.narrow(1, t - 1, 1))
    }

    /// Final hidden states `[batch, time, dim]` (before the output head).
    pub fn hidden(
        &self,
        config: &ModelConfig,
        batch: &Batch,
        mut cache: Option<&mut KvCache>,
        device: &Device,
    ) -> Tensor<3> {
        let mut x = self.embed_tokens(batch, device);
        let (rope, mask) = self.context(config, batch, cache.as_ref().map_or(0, |c| c.len()), device);
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = block.forward(x, &rope, mask.clone(), slot);
        }
        self.norm.forward(x)
    }

    /// The embeddings of `batch`'s tokens, `[batch, time, dim]`.
    pub fn embed_tokens(&self, batch: &Batch, device: &Device) -> Tensor<3> {
        let (b, t) = (batch.tokens.len(), batch.tokens.first().map_or(0, Vec::len));
        let ids: Vec<i64> = batch.tokens.iter().flatten().map(|&id| id as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [b * t]), device);
        let dim = self.embed.val().dims()[1];
        self.embed.val().select(0, ids).reshape([b, t, dim])
    }

    /// What every block of a forward call over `batch` shares: the rotary tables and the
    /// attention mask (after `past` cached positions).
    pub fn context(
        &self,
        config: &ModelConfig,
        batch: &Batch,
        past: usize,
        device: &Device,
    ) -> (Rope, Option<Tensor<4>>) {
        let t = batch.tokens.first().map_or(0, Vec::len);
        (Rope::new(config, &batch.positions, device), attention_mask(&batch.pad, past, t, device))
    }

    /// Projects hidden states to vocabulary logits.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, t, d] = hidden.dims();
                // embed · hidden^T, then transpose the small result: transposing the
                // [vocab, dim] embedding instead would copy it on every call.
                let logits =
                    matmul(self.embed.val(), hidden.reshape([b * t, d]).transpose(), self.precision).transpose();
                let v = logits.dims()[1];
                logits.reshape([b, t, v])
            }
        }
    }
}

/// Causal mask over `past + time` keys with per-row left padding, `[batch, 1, time, past+time]`;
/// `None` when a single query token without padding sees everything.
fn attention_mask(pad: &[usize], past: usize, time: usize, device: &Device) -> Option<Tensor<4>> {
    let total = past + time;
    if time == 1 && pad.iter().all(|&p| p == 0) {
        return None;
    }
    let mut values = Vec::with_capacity(pad.len() * time * total);
    for &p in pad {
        for q in 0..time {
            let query = past + q;
            values.extend((0..total).map(|k| if k > query || k < p { MASKED } else { 0.0 }));
        }
    }
    Some(Tensor::from_data(TensorData::new(values, [pad.len(), 1, time, total]), device))
}
