//! GGUF files: metadata, tensor directory, and dequantisation of F32, F16, BF16, Q8_0, Q4_0,
//! Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K tensors to f32 (bit-exact with ggml's
//! reference dequantisers): every type llama.cpp's common quantisations (Q4_K_M, Q5_K_M, Q8_0...)
//! mix.

use std::collections::HashMap;
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::weights::{HostTensor, WeightMap};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Meta {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Meta>),
}

impl Meta {
    /// The value as an integer, if it is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Meta::Int(v) => Some(*v),
            _ => None,
        }
    }
    /// The value as a float (integers widen).
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Meta::Float(v) => Some(*v),
            Meta::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Meta::Str(v) => Some(v),
            _ => None,
        }
    }
    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[Meta]> {
        match self {
            Meta::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's directory entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest (the reverse of row-major shape).
    pub dims: Vec<usize>,
    pub kind: u32,
    pub offset: usize,
}

/// A parsed GGUF file, memory-mapped.
pub struct Gguf {
    pub metadata: HashMap<String, Meta>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    map: memmap2::Mmap,
    path: std::path::PathBuf,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("file ends early")?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.u64()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, kind: u32) -> std::result::Result<Meta, String> {
        let b = |r: &mut Self, n| r.take(n).map(|s| s.to_vec());
        Ok(match kind {
            0 => Meta::Int(b(self, 1)?[0] as i64),
            1 => Meta::Int(b(self, 1)?[0] as i8 as i64),
            2 => Meta::Int(u16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i64),
            3 => Meta::Int(i16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i64),
            4 => Meta::Int(self.u32()? as i64),
            5 => Meta::Int(self.u32()? as i32 as i64),
            6 => Meta::Float(f32::from_le_bytes(b(self, 4)?.try_into().unwrap()) as f64),
            7 => Meta::Bool(b(self, 1)?[0] != 0),
            8 => Meta::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.u64()? as usize;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner)?);
                }
                Meta::Array(items)
            }
            10 => Meta::Int(self.u64()? as i64),
            11 => Meta::Int(self.u64()? as i64),
            12 => Meta::Float(f64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

impl Gguf {
    /// Opens and parses the header and tensor directory of a GGUF file (versions 2 and 3).
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
        // SAFETY: read-only mapping of a file we only read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TrainError::io(path, e))?;
        let (metadata, tensors, data_start) =
            parse_header(&map).map_err(|why| TrainError::invalid(path, format!("not a valid GGUF file: {why}")))?;
        Ok(Gguf { metadata, tensors, data_start, map, path: path.to_path_buf() })
    }

    /// A metadata value by key.
    pub fn meta(&self, key: &str) -> Option<&Meta> {
        self.metadata.get(key)
    }

    fn arch_meta(&self, key: &str) -> Option<&Meta> {
        let arch = self.meta("general.architecture")?.as_str()?;
        self.meta(&format!("{arch}.{key}"))
    }

    /// The model configuration implied by the metadata and tensor shapes.
    pub fn config(&self) -> Result<ModelConfig> {
        let invalid = |why: String| TrainError::invalid(&self.path, why);
        let arch = self.meta("general.architecture").and_then(Meta::as_str).unwrap_or("?").to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2") {
            return Err(invalid(format!("architecture `{arch}` is not supported: kiln runs llama and qwen2")));
        }
        let int = |key: &str| {
            self.arch_meta(key)
                .and_then(Meta::as_int)
                .map(|v| v as usize)
                .ok_or_else(|| invalid(format!("metadata `{arch}.{key}` is missing")))
        };
        let vocab = match self.meta("tokenizer.ggml.tokens").and_then(Meta::as_array) {
            Some(tokens) => tokens.len(),
            None => int("vocab_size")?,
        };
        let has = |name: &str| self.tensors.iter().any(|t| t.name == name);
        let config = ModelConfig {
            architectures: vec![if arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }.into()],
            model_type: arch.clone(),
            vocab_size: vocab,
            hidden_size: int("embedding_length")?,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: int("attention.head_count")?,
            num_key_value_heads: Some(int("attention.head_count_kv").or_else(|_| int("attention.head_count"))?),
            rms_norm_eps: self.arch_meta("attention.layer_norm_rms_epsilon").and_then(Meta::as_float).unwrap_or(1e-6),
            rope_theta: self.arch_meta("rope.freq_base").and_then(Meta::as_float).unwrap_or(10_000.0),
            max_position_embeddings: int("context_length").unwrap_or(4096),
            tie_word_embeddings: !has("output.weight"),
            attention_bias: Some(has("blk.0.attn_q.bias")),
            bos_token_id: self.meta("tokenizer.ggml.bos_token_id").and_then(Meta::as_int).map(|v| v as u32),
            eos_token_id: self
                .meta("tokenizer.ggml.eos_token_id")
                .and_then(Meta::as_int)
                .map(|v| crate::config::EosTokens::One(v as u32)),
            hidden_act: "silu".into(),
            rope_scaling: None,
        };
        config.check().map_err(invalid)?;
        Ok(config)
    }

    /// Every tensor dequantised to f32 under its Hugging Face name and layout. llama.cpp stores
    /// Llama's q/k projections permuted for its interleaved rotary layout; they are permuted back.
    pub fn weights(&self, config: &ModelConfig) -> Result<WeightMap> {
        let mut out = WeightMap::new();
        for info in &self.tensors {
            let Some(name) = hf_name(&info.name) else {
                return Err(TrainError::invalid(&self.path, format!("unexpected tensor `{}`", info.name)));
            };
            let mut tensor = self.tensor(info)?;
            if config.model_type == "llama" {
                // Biases too, as llama.cpp's converter permutes them.
                if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") {
                    tensor = unpermute_rows(tensor, config.num_attention_heads);
                } else if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") {
                    tensor = unpermute_rows(tensor, config.kv_heads());
                }
            }
            out.insert(name, tensor);
        }
        Ok(out)
    }

    /// One tensor, dequantised, in row-major shape.
    pub fn tensor(&self, info: &TensorInfo) -> Result<HostTensor> {
        let count: usize = info.dims.iter().product();
        let data = dequantize(info.kind, self.raw(info)?, count).expect("type checked by raw");
        Ok(HostTensor { shape: info.dims.iter().rev().copied().collect(), data })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One tensor's bytes as stored; an error names a type kiln cannot read.
    pub fn raw(&self, info: &TensorInfo) -> Result<&[u8]> {
        let count: usize = info.dims.iter().product();
        let (block, bytes_per_block) = block_size(info.kind).ok_or_else(|| {
            TrainError::invalid(
                &self.path,
                format!(
                    "tensor `{}` has type {}, which kiln cannot read (it reads F32, F16, BF16, Q4_0, Q4_1, \
                     Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K); convert the model with llama.cpp's \
                     `llama-quantize` to one of these (Q4_K_M, Q5_K_M, Q8_0...)",
                    info.name,
                    type_name(info.kind)
                ),
            )
        })?;
        let len = count / block * bytes_per_block;
        let start = self.data_start + info.offset;
        self.map.get(start..start + len).ok_or_else(|| {
            TrainError::invalid(&self.path, format!("tensor `{}` lies past the end of the file", info.name))
        })
    }
}

/// Metadata, tensor directory and the offset where tensor data starts.
type Header = (HashMap<String, Meta>, Vec<TensorInfo>, usize);

fn parse_header(bytes: &[u8]) -> std::result::Result<Header, String> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(4)? != b"GGUF" {
        return Err("bad magic (expected `GGUF`)".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("version {version} (kiln reads 2 and 3)"));
    }
    let (n_tensors, n_meta) = (r.u64()? as usize, r.u64()? as usize);
    let mut metadata = HashMap::new();
    for _ in 0..n_meta {
        let key = r.string()?;
        let kind = r.u32()?;
        metadata.insert(key, r.value(kind)?);
    }
    let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()? as usize;
        let dims = (0..n_dims).map(|_| r.u64().map(|d| d as usize)).collect::<std::result::Result<Vec<_>, _>>()?;
        let kind = r.u32()?;
        let offset = r.u64()? as usize;
        tensors.push(TensorInfo { name, dims, kind, offset });
    }
    let align = metadata.get("general.alignment").and_then(Meta::as_int).unwrap_or(32) as usize;
    let data_start = r.pos.div_ceil(align) * align;
    Ok((metadata, tensors, data_start))
}

/// HF name for a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Where each row of a Llama q/k projection (or bias) with `rows` rows over `heads` heads comes
/// from in llama.cpp's layout: its row `(head, i, j)` (pairs interleaved) is Hugging Face's row
/// `(head, j, i)` (halves). `sources[dst]` is the GGUF row that becomes row `dst`.
pub fn llama_qk_sources(rows: usize, heads: usize) -> Vec<usize> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    (0..rows)
        .map(|dst| {
            let (h, rest) = (dst / head_dim, dst % head_dim);
            let (j, i) = (rest / half, rest % half);
            h * head_dim + i * 2 + j
        })
        .collect()
}

/// The rows `sources` of `values` (rows of `width`), in that order.
pub fn gather_rows<T: Copy>(values: &[T], sources: &[usize], width: usize) -> Vec<T> {
    sources.iter().flat_map(|&src| values[src * width..(src + 1) * width].iter().copied()).collect()
}

/// Undoes llama.cpp's q/k permutation of a weight (`[rows, cols]`) or bias (`[rows]`).
fn unpermute_rows(t: HostTensor, heads: usize) -> HostTensor {
    let rows = t.shape[0];
    let data = gather_rows(&t.data, &llama_qk_sources(rows, heads), t.data.len() / rows);
    HostTensor { shape: t.shape, data }
}

/// ggml type ids.
pub mod kinds {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q5_0: u32 = 6;
    pub const Q5_1: u32 = 7;
    pub const Q8_0: u32 = 8;
    pub const Q2_K: u32 = 10;
    pub const Q3_K: u32 = 11;
    pub const Q4_K: u32 = 12;
    pub const Q5_K: u32 = 13;
    pub const Q6_K: u32 = 14;
    pub const BF16: u32 = 30;
}

/// ggml's name of type `kind` (ggml.h's `ggml_type`), for messages.
pub fn type_name(kind: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    match NAMES.get(kind as usize) {
        Some(name) => format!("{name} (ggml type {kind})"),
        None => format!("ggml type {kind}"),
    }
}

/// Elements per block and bytes per block of a supported type.
pub fn block_size(kind: u32) -> Option<(usize, usize)> {
    Some(match kind {
        kinds::F32 => (1, 4),
        kinds::F16 | kinds::BF16 => (1, 2),
        kinds::Q8_0 => (32, 34),
        kinds::Q4_0 => (32, 18),
        kinds::Q4_1 => (32, 20),
        kinds::Q5_0 => (32, 22),
        kinds::Q5_1 => (32, 24),
        kinds::Q2_K => (256, 84),
        kinds::Q3_K => (256, 110),
        kinds::Q4_K => (256, 144),
        kinds::Q5_K => (256, 176),
        kinds::Q6_K => (256, 210),
        _ => return None,
    })
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Sixteen consecutive values of a quantised tensor as ggml's dequantisers compute them:
/// `d * q - min`, in f32, for each of the 16 small integers `q` (every block type ggml has splits
/// into such runs, with one scale and one minimum each; types without a minimum have 0, which
/// leaves every value's bits as `d * q` gave them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Run {
    pub d: f32,
    pub min: f32,
    pub q: [i8; 16],
}

impl Run {
    /// The 16 values.
    pub fn values(&self) -> impl Iterator<Item = f32> + '_ {
        self.q.iter().map(|&q| self.d * q as f32 - self.min)
    }
}

/// Whether `kind` is a block-quantised type ([`unpack`] reads it).
pub fn is_quantised(kind: u32) -> bool {
    block_size(kind).is_some_and(|(block, _)| block > 1)
}

/// Hands the runs of 16 values of the first `count` values (whole blocks) of quantised type
/// `kind` in `raw` to `emit`, in order; `None` for types that are not block-quantised.
pub fn unpack(kind: u32, raw: &[u8], count: usize, emit: &mut impl FnMut(Run)) -> Option<()> {
    let (block, size) = block_size(kind).filter(|(block, _)| *block > 1)?;
    for b in raw.chunks_exact(size).take(count.div_ceil(block)) {
        match kind {
            kinds::Q8_0 => halves(emit, f16(b), 0.0, std::array::from_fn(|j| b[2 + j] as i8)),
            kinds::Q4_0 => {
                let qs = &b[2..18];
                halves(emit, f16(b), 0.0, std::array::from_fn(|j| (qs[j % 16] >> (4 * (j / 16)) & 0xF) as i8 - 8));
            }
            kinds::Q4_1 => {
                let qs = &b[4..20];
                halves(
                    emit,
                    f16(b),
                    -f16(&b[2..]),
                    std::array::from_fn(|j| (qs[j % 16] >> (4 * (j / 16)) & 0xF) as i8),
                );
            }
            kinds::Q5_0 => {
                let (low, high) = five_bit(&b[2..]);
                let q: [u8; 32] = std::array::from_fn(|j| if j < 16 { low[j] } else { high[j - 16] });
                halves(emit, f16(b), 0.0, q.map(|q| q as i8 - 16));
            }
            kinds::Q5_1 => {
                let (low, high) = five_bit(&b[4..]);
                let q: [u8; 32] = std::array::from_fn(|j| if j < 16 { low[j] } else { high[j - 16] });
                halves(emit, f16(b), -f16(&b[2..]), q.map(|q| q as i8));
            }
            kinds::Q2_K => unpack_q2_k(b, emit),
            kinds::Q3_K => unpack_q3_k(b, emit),
            kinds::Q4_K => unpack_q4_k(b, emit),
            kinds::Q5_K => unpack_q5_k(b, emit),
            kinds::Q6_K => unpack_q6_k(b, emit),
            _ => return None,
        }
    }
    Some(())
}

/// The two runs of a 32-value block with one scale (and one minimum).
fn halves(emit: &mut impl FnMut(Run), d: f32, min: f32, q: [i8; 32]) {
    emit(Run { d, min, q: q[..16].try_into().expect("16 values") });
    emit(Run { d, min, q: q[16..].try_into().expect("16 values") });
}

/// Dequantises `count` values of ggml type `kind` from `raw`; `None` for unsupported types.
pub fn dequantize(kind: u32, raw: &[u8], count: usize) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(count);
    if is_quantised(kind) {
        unpack(kind, raw, count, &mut |run| out.extend(run.values()))?;
        return Some(out);
    }
    let (_, size) = block_size(kind)?;
    for b in raw.chunks_exact(size).take(count) {
        out.push(match kind {
            kinds::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            kinds::F16 => f16(b),
            _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        });
    }
    Some(out)
}

/// 6-bit scale and min `j` of a Q4_K super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K: eight 32-value runs with 6-bit scales and mins, the low nibbles of 32 bytes then their
/// high nibbles.
fn unpack_q4_k(b: &[u8], emit: &mut impl FnMut(Run)) {
    let (d, dmin) = (f16(b), f16(&b[2..]));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        halves(emit, d * sc1 as f32, dmin * m1 as f32, std::array::from_fn(|j| (q[j] & 0xF) as i8));
        halves(emit, d * sc2 as f32, dmin * m2 as f32, std::array::from_fn(|j| (q[j] >> 4) as i8));
    }
}

/// The 32 five-bit values of a Q5_0/Q5_1 block from its 32 fifth bits (4 bytes) and 16 bytes
/// of nibbles: the first 16 values from the low nibbles, the last 16 from the high ones.
fn five_bit(b: &[u8]) -> ([u8; 16], [u8; 16]) {
    let qh = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let fifth = |j: usize| ((qh >> j) & 1) as u8 * 16;
    let qs = &b[4..20];
    (std::array::from_fn(|j| (qs[j] & 0xF) | fifth(j)), std::array::from_fn(|j| (qs[j] >> 4) | fifth(j + 16)))
}

/// Q2_K: 16 scale/min nibble pairs, 2-bit values, then d and dmin.
fn unpack_q2_k(b: &[u8], emit: &mut impl FnMut(Run)) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16(&b[80..]), f16(&b[82..]));
    let mut is = 0;
    for q in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for part in [&q[..16], &q[16..]] {
                let sc = scales[is];
                is += 1;
                let q = std::array::from_fn(|j| ((part[j] >> shift) & 3) as i8);
                emit(Run { d: d * (sc & 0xF) as f32, min: dmin * (sc >> 4) as f32, q });
            }
        }
    }
}

/// Q3_K: the high bits as a mask, 2-bit low values, 16 signed 6-bit scales packed in 12 bytes,
/// then d.
fn unpack_q3_k(b: &[u8], emit: &mut impl FnMut(Run)) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16(&b[108..]);
    // ggml's unpacking: scale j has its low 4 bits in nibble j of bytes 0..8 and its high 2
    // bits in bytes 8..12.
    let scale = |j: usize| -> f32 {
        let low = (packed[j % 8] >> (4 * (j / 8))) & 0xF;
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        ((low | (high << 4)) as i32 - 32) as f32
    };
    let (mut is, mut m) = (0, 1u8);
    for q in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for (half, part) in [&q[..16], &q[16..]].into_iter().enumerate() {
                let dl = d * scale(is);
                is += 1;
                let hm = &hmask[16 * half..];
                let q = std::array::from_fn(|j| ((part[j] >> shift) & 3) as i8 - if hm[j] & m != 0 { 0 } else { 4 });
                emit(Run { d: dl, min: 0.0, q });
            }
            m <<= 1;
        }
    }
}

/// Q5_K: Q4_K's scales and mins with a fifth bit per value.
fn unpack_q5_k(b: &[u8], emit: &mut impl FnMut(Run)) {
    let (d, dmin) = (f16(b), f16(&b[2..]));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (chunk, ql) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let high = |h: u8, u: u8| if h & u != 0 { 16 } else { 0 };
        halves(
            emit,
            d * sc1 as f32,
            dmin * m1 as f32,
            std::array::from_fn(|j| ((ql[j] & 0xF) + high(qh[j], u1)) as i8),
        );
        halves(emit, d * sc2 as f32, dmin * m2 as f32, std::array::from_fn(|j| ((ql[j] >> 4) + high(qh[j], u2)) as i8));
    }
}

/// Q6_K: low nibbles, high 2-bit pairs, 16 signed 8-bit scales (one per 16 values), then d.
fn unpack_q6_k(b: &[u8], emit: &mut impl FnMut(Run)) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16(&b[208..]);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &sc[half * 8..]);
        // Values l, l + 32, l + 64, l + 96 of this half for l in 0..32, as ggml lays them out.
        let value = |l: usize, part: usize| -> i8 {
            let (lo, shift) = match part {
                0 => (ql[l] & 0xF, 0),
                1 => (ql[l + 32] & 0xF, 2),
                2 => (ql[l] >> 4, 4),
                _ => (ql[l + 32] >> 4, 6),
            };
            (lo | (((qh[l] >> shift) & 3) << 4)) as i8 - 32
        };
        for part in 0..4 {
            for run in 0..2 {
                let is = run + 2 * part;
                let q = std::array::from_fn(|j| value(16 * run + j, part));
                emit(Run { d: d * (sc[is] as i8) as f32, min: 0.0, q });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file with no metadata and the given tensors (name, ggml dims, type, data).
    fn gguf_file(tensors: &[(&str, &[u64], u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend(0u64.to_le_bytes());
        let mut offset = 0u64;
        for (name, dims, kind, data) in tensors {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(kind.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in tensors {
            let start = out.len();
            out.extend(data);
            out.resize(start + data.len().div_ceil(32) * 32, 0);
        }
        out
    }

    #[test]
    fn tensors_of_mixed_types_load_and_an_unknown_type_is_named() {
        // One Q5_0 block (d = 1.0, every fifth bit set, nibbles 0..15) and an IQ2_XXS tensor.
        let mut q5 = half::f16::from_f32(1.0).to_le_bytes().to_vec();
        q5.extend([0xFF; 4]);
        q5.extend((0..16u8).map(|j| j | (j << 4)));
        let iq2 = vec![0u8; 66];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.gguf");
        std::fs::write(&path, gguf_file(&[("a.weight", &[32], kinds::Q5_0, q5), ("b.weight", &[256], 16, iq2)]))
            .unwrap();
        let file = Gguf::open(&path).unwrap();
        let a = file.tensor(&file.tensors[0]).unwrap();
        let expected: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
        assert_eq!(a.data, expected, "16 + nibble - 16");
        let err = file.tensor(&file.tensors[1]).unwrap_err().to_string();
        assert!(err.contains("`b.weight`") && err.contains("IQ2_XXS (ggml type 16)"), "{err}");
        assert!(err.contains("mixed.gguf") && err.contains("llama-quantize"), "{err}");
        assert_eq!(type_name(99), "ggml type 99");
    }
}
