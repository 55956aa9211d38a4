//! Generation on the CPU built for one token at a time: the weights of a GGUF model kept packed
//! ([`packed::PackedMatrix`]: a block type's own integers, or 16-bit floats, expanded a row at
//! a time in cache),
//! every sequence's keys and values in buffers allocated with room for its prompt and the first
//! [`RESERVED`] tokens (then doubling), and one step's activations in buffers allocated once per
//! batch size. A step runs any rows (a new
//! token of each sequence decoding, or a prompt's tokens being prefilled), so prefill takes
//! the same products with many rows at once.
//!
//! The arithmetic is the burn decoder's ([`crate::model`]): RMSNorm, rotary embeddings in the
//! rotate-half layout, grouped-query attention, SwiGLU, with the same f32 values of the weights.

pub mod packed;

use packed::PackedMatrix;
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::gguf::{Gguf, gather_rows, llama_qk_sources};

/// One transformer block's weights.
#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    q: PackedMatrix,
    k: PackedMatrix,
    v: PackedMatrix,
    o: PackedMatrix,
    bias: Option<[Vec<f32>; 3]>,
    mlp_norm: Vec<f32>,
    gate: PackedMatrix,
    up: PackedMatrix,
    down: PackedMatrix,
}

/// A model ready to decode.
#[derive(Debug)]
pub struct Engine {
    pub config: ModelConfig,
    embed: PackedMatrix,
    /// `None` when the head is tied to the embeddings.
    head: Option<PackedMatrix>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// Rotary frequencies, `head_dim / 2` of them.
    inv_freq: Vec<f32>,
}

/// One sequence's keys and values, per layer, up to `capacity` positions. Room for the prompt
/// and the first [`RESERVED`] generated positions is allocated at once; past that the buffers
/// grow by doubling (memory follows what a sequence uses, not the `max_tokens` it may reach).
#[derive(Clone, Debug)]
pub struct Sequence {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Positions filled.
    pub len: usize,
    pub capacity: usize,
}

/// Positions allocated at once beyond a sequence's prompt.
pub const RESERVED: usize = 256;

/// One step's activations for up to `rows` rows.
#[derive(Debug, Default)]
pub struct Scratch {
    rows: usize,
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    heads: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    positions: Vec<usize>,
    /// Each row's rotary `(cos, sin)` per frequency, computed once per step.
    rotary: Vec<(f32, f32)>,
    /// Next-token logits of the rows that asked for them, `vocab` each.
    pub logits: Vec<f32>,
}

/// One row of a step: sequence `seq` gets token `token` at its next position.
#[derive(Clone, Copy, Debug)]
pub struct StepRow {
    pub seq: usize,
    pub token: u32,
    /// Whether the next-token logits of this row are wanted.
    pub logits: bool,
}

impl StepRow {
    /// The rows that prefill `prompts`, prompt `k` into sequence `k`, each prompt's last token
    /// asking for logits (so a step's logits are the prompts' next-token logits, in order).
    pub fn prefill<P: AsRef<[u32]>>(prompts: &[P]) -> Vec<StepRow> {
        let rows = prompts.iter().enumerate().flat_map(|(seq, p)| {
            let p = p.as_ref();
            p.iter().enumerate().map(move |(i, &token)| StepRow { seq, token, logits: i + 1 == p.len() })
        });
        rows.collect()
    }
}

impl Engine {
    /// The model in `gguf`, its weights packed.
    pub fn from_gguf(gguf: &Gguf, config: &ModelConfig) -> Result<Engine> {
        let invalid = |m: String| TrainError::invalid(gguf.path(), m);
        let info = |name: &str| {
            gguf.tensors
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| invalid(format!("the model has no tensor `{name}`")))
        };
        let vector = |name: &str| -> Result<Vec<f32>> { Ok(gguf.tensor(info(name)?)?.data) };
        let matrix = |name: &str, permute_heads: Option<usize>| -> Result<PackedMatrix> {
            let t = info(name)?;
            let (cols, rows) = (t.dims[0], t.dims.iter().skip(1).product::<usize>());
            let mut m = PackedMatrix::from_gguf(t.kind, gguf.raw(t)?, rows, cols)
                .ok_or_else(|| invalid(format!("tensor `{name}` has rows of {cols}, not whole blocks")))?;
            if let Some(heads) = permute_heads {
                m.unpermute_heads(heads);
            }
            Ok(m)
        };
        // llama.cpp stores Llama's q/k rows permuted for its interleaved rotary layout.
        let llama = config.model_type == "llama";
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let n = |part: &str| format!("blk.{i}.{part}");
            let bias = if gguf.tensors.iter().any(|t| t.name == n("attn_q.bias")) {
                let mut q = vector(&n("attn_q.bias"))?;
                let mut k = vector(&n("attn_k.bias"))?;
                if llama {
                    q = gather_rows(&q, &llama_qk_sources(q.len(), config.num_attention_heads), 1);
                    k = gather_rows(&k, &llama_qk_sources(k.len(), config.kv_heads()), 1);
                }
                Some([q, k, vector(&n("attn_v.bias"))?])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm.weight"))?,
                q: matrix(&n("attn_q.weight"), llama.then_some(config.num_attention_heads))?,
                k: matrix(&n("attn_k.weight"), llama.then_some(config.kv_heads()))?,
                v: matrix(&n("attn_v.weight"), None)?,
                o: matrix(&n("attn_output.weight"), None)?,
                bias,
                mlp_norm: vector(&n("ffn_norm.weight"))?,
                gate: matrix(&n("ffn_gate.weight"), None)?,
                up: matrix(&n("ffn_up.weight"), None)?,
                down: matrix(&n("ffn_down.weight"), None)?,
            });
        }
        let head = match gguf.tensors.iter().any(|t| t.name == "output.weight") {
            true => Some(matrix("output.weight", None)?),
            false => None,
        };
        let inv_freq = crate::model::rope_frequencies(config);
        Ok(Engine {
            config: config.clone(),
            embed: matrix("token_embd.weight", None)?,
            head,
            layers,
            norm: vector("output_norm.weight")?,
            inv_freq,
        })
    }

    /// An empty sequence of at most `capacity` positions, of which `prompt` plus [`RESERVED`]
    /// are allocated now.
    pub fn sequence(&self, prompt: usize, capacity: usize) -> Sequence {
        let room = (prompt + RESERVED).min(capacity) * self.kv_dim();
        let layers = || (0..self.layers.len()).map(|_| Vec::with_capacity(room)).collect();
        Sequence { keys: layers(), values: layers(), len: 0, capacity }
    }

    /// Bytes the packed matrices take in memory.
    pub fn bytes(&self) -> usize {
        let layers = self.layers.iter().flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]);
        layers.chain([&self.embed]).chain(&self.head).map(PackedMatrix::bytes).sum()
    }

    /// Logits per row: the vocabulary's size.
    pub fn vocab(&self) -> usize {
        self.head.as_ref().unwrap_or(&self.embed).rows
    }

    fn kv_dim(&self) -> usize {
        self.config.kv_heads() * self.config.head_dim()
    }

    /// Buffers for steps of up to `rows` rows.
    pub fn scratch(&self, rows: usize) -> Scratch {
        let c = &self.config;
        let (d, q, kv, ff) = (c.hidden_size, c.num_attention_heads * c.head_dim(), self.kv_dim(), c.intermediate_size);
        Scratch {
            rows,
            x: vec![0.0; rows * d],
            h: vec![0.0; rows * d],
            q: vec![0.0; rows * q],
            k: vec![0.0; rows * kv],
            v: vec![0.0; rows * kv],
            heads: vec![0.0; rows * q],
            o: vec![0.0; rows * d],
            gate: vec![0.0; rows * ff],
            up: vec![0.0; rows * ff],
            positions: Vec::with_capacity(rows),
            rotary: Vec::with_capacity(rows * c.head_dim() / 2),
            logits: Vec::new(),
        }
    }

    /// Runs `rows` through the model: each row's token goes at its sequence's next position
    /// (rows of one sequence in order), its keys and values into the sequence. Afterwards
    /// `scratch.logits` holds the next-token logits of the rows that asked, in order.
    pub fn step(&self, rows: &[StepRow], seqs: &mut [Sequence], scratch: &mut Scratch) -> Result<()> {
        let n = rows.len();
        if n > scratch.rows {
            *scratch = self.scratch(n);
        }
        let c = &self.config;
        let (d, head_dim, heads, kv_heads) = (c.hidden_size, c.head_dim(), c.num_attention_heads, c.kv_heads());
        let (qd, kvd, ff) = (heads * head_dim, self.kv_dim(), c.intermediate_size);
        let s = scratch;
        // Each row's position: its sequence's length plus the rows of that sequence before it.
        s.positions.clear();
        for (i, row) in rows.iter().enumerate() {
            let before = rows[..i].iter().filter(|r| r.seq == row.seq).count();
            let seq = &seqs[row.seq];
            let at = seq.len + before;
            if at >= seq.capacity {
                return Err(TrainError::Other(format!("a sequence outgrew its {} positions", seq.capacity)));
            }
            s.positions.push(at);
        }
        let positions = std::mem::take(&mut s.positions);
        s.rotary.clear();
        for &p in &positions {
            s.rotary.extend(self.inv_freq.iter().map(|&f| {
                let (sin, cos) = (p as f32 * f).sin_cos();
                (cos, sin)
            }));
        }
        for (i, row) in rows.iter().enumerate() {
            self.embed.row_into(row.token as usize, &mut s.x[i * d..(i + 1) * d]);
        }
        let eps = c.rms_norm_eps as f32;
        let half = self.inv_freq.len();
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x[..n * d], &layer.attn_norm, eps, &mut s.h[..n * d]);
            let qkv =
                [(&layer.q, &mut s.q[..n * qd]), (&layer.k, &mut s.k[..n * kvd]), (&layer.v, &mut s.v[..n * kvd])];
            packed::products(qkv, &s.h[..n * d], n);
            if let Some([qb, kb, vb]) = &layer.bias {
                add_rows(&mut s.q[..n * qd], qb);
                add_rows(&mut s.k[..n * kvd], kb);
                add_rows(&mut s.v[..n * kvd], vb);
            }
            for (i, &p) in positions.iter().enumerate() {
                let rotary = &s.rotary[i * half..(i + 1) * half];
                rotate(&mut s.q[i * qd..(i + 1) * qd], rotary);
                rotate(&mut s.k[i * kvd..(i + 1) * kvd], rotary);
                // Rows of a sequence come in position order: each appends its position.
                let seq = &mut seqs[rows[i].seq];
                debug_assert_eq!(seq.keys[l].len(), p * kvd);
                seq.keys[l].extend_from_slice(&s.k[i * kvd..(i + 1) * kvd]);
                seq.values[l].extend_from_slice(&s.v[i * kvd..(i + 1) * kvd]);
            }
            // Attention, one task of the thread pool per row and head.
            let (group, q, seqs) = (heads / kv_heads, &s.q, &*seqs);
            s.heads[..n * qd].par_chunks_mut(head_dim).enumerate().for_each(|(task, out)| {
                let (i, h) = (task / heads, task % heads);
                let seq = &seqs[rows[i].seq];
                let head = Head { offset: h / group * head_dim, stride: kvd, len: positions[i] + 1 };
                attend(&q[i * qd + h * head_dim..][..head_dim], &seq.keys[l], &seq.values[l], head, out);
            });
            layer.o.product(&s.heads[..n * qd], n, &mut s.o[..n * d]);
            s.x[..n * d].iter_mut().zip(&s.o[..n * d]).for_each(|(x, o)| *x += o);
            rms_norm(&s.x[..n * d], &layer.mlp_norm, eps, &mut s.h[..n * d]);
            packed::products(
                [(&layer.gate, &mut s.gate[..n * ff]), (&layer.up, &mut s.up[..n * ff])],
                &s.h[..n * d],
                n,
            );
            s.gate[..n * ff].iter_mut().zip(&s.up[..n * ff]).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            layer.down.product(&s.gate[..n * ff], n, &mut s.o[..n * d]);
            s.x[..n * d].iter_mut().zip(&s.o[..n * d]).for_each(|(x, o)| *x += o);
        }
        s.positions = positions;
        for row in rows {
            seqs[row.seq].len += 1;
        }
        // The final hidden states of the rows that asked for logits, normalised, through the head.
        let mut wanted = 0;
        for (i, row) in rows.iter().enumerate() {
            if row.logits {
                rms_norm(&s.x[i * d..(i + 1) * d], &self.norm, eps, &mut s.h[wanted * d..(wanted + 1) * d]);
                wanted += 1;
            }
        }
        let head = self.head.as_ref().unwrap_or(&self.embed);
        // Sized by the rows that want logits (a prompt's prefill wants one of many).
        s.logits.resize(wanted * head.rows, 0.0);
        head.product(&s.h[..wanted * d], wanted, &mut s.logits);
        Ok(())
    }
}

/// Rotates each head of `x` by the `(cos, sin)` of each frequency, rotate-half layout.
fn rotate(x: &mut [f32], rotary: &[(f32, f32)]) {
    let half = rotary.len();
    for head in x.chunks_exact_mut(2 * half) {
        for (i, &(cos, sin)) in rotary.iter().enumerate() {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

/// Where one key/value head's vectors lie in a sequence's cache: `len` positions of `stride`
/// values each, this head's `head_dim` values at `offset`.
#[derive(Clone, Copy)]
struct Head {
    offset: usize,
    stride: usize,
    len: usize,
}

thread_local! {
    /// One head's attention weights, per thread.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out` = softmax(q · k / sqrt(head_dim)) · v over the positions of `head`.
fn attend(q: &[f32], keys: &[f32], values: &[f32], head: Head, out: &mut [f32]) {
    let dim = q.len();
    let scale = 1.0 / (dim as f32).sqrt();
    let at = |t: usize| t * head.stride + head.offset..t * head.stride + head.offset + dim;
    SCORES.with(|scores| {
        let mut scores = scores.borrow_mut();
        scores.clear();
        scores.extend((0..head.len).map(|t| packed::dot(q, &keys[at(t)]) * scale));
        softmax(&mut scores);
        out.fill(0.0);
        for (t, &w) in scores.iter().enumerate() {
            out.iter_mut().zip(&values[at(t)]).for_each(|(o, v)| *o += w * v);
        }
    })
}

/// `out = x / rms(x) * weight`, row by row.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (row, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        out.iter_mut().zip(row).zip(weight).for_each(|((o, v), w)| *o = v * inv * w);
    }
}

/// Adds `bias` to every row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// Softmax in place.
fn softmax(x: &mut [f32]) {
    let top = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - top).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}
