//! Weight matrices packed once for decoding: each row as runs of 16 small integers with one f32
//! scale and one f32 minimum per run (a GGUF block type's own integers, 1 byte each, with the
//! scales ggml's dequantiser computes), and the products `W · x` for a few rows `x` at a time
//! that never re-pack: each weight row is expanded once, in cache, then met by every row of
//! the batch. The expanded values are bit for bit what [`crate::gguf::dequantize`] gives, so
//! results agree with the dequantised f32 path up to the order of the sums.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::gguf::{Run, gather_rows, is_quantised, llama_qk_sources, unpack};

/// Values per run.
pub const RUN: usize = 16;

/// Output rows one task of a product takes.
const ROWS_PER_TASK: usize = 32;

/// A `[rows, cols]` matrix (row `r` holds output `r`'s weights), packed.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    min: Vec<f32>,
}

thread_local! {
    /// One expanded weight row per thread, reused by every product.
    static EXPANDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl PackedMatrix {
    /// The matrix of a GGUF tensor of quantised type `kind` with `rows` rows of `cols` values
    /// (`cols` a multiple of the type's block); `None` for a type that is not block-quantised.
    pub fn from_gguf(kind: u32, raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !is_quantised(kind) || !cols.is_multiple_of(RUN) {
            return None;
        }
        let runs = rows * cols / RUN;
        let mut m = PackedMatrix {
            rows,
            cols,
            q: Vec::with_capacity(rows * cols),
            scale: Vec::with_capacity(runs),
            min: Vec::with_capacity(runs),
        };
        unpack(kind, raw, rows * cols, &mut |run: Run| {
            m.q.extend_from_slice(&run.q);
            m.scale.push(run.d);
            m.min.push(run.min);
        })?;
        (m.q.len() == rows * cols).then_some(m)
    }

    /// `values` (`rows` rows of `cols`, row-major) in 8 bits per value, a symmetric scale per
    /// run (for weights stored unquantised: F32, F16, BF16).
    pub fn from_f32(values: &[f32], rows: usize, cols: usize) -> Self {
        assert!(cols.is_multiple_of(RUN) && values.len() == rows * cols, "a [{rows}, {cols}] matrix in runs of {RUN}");
        let mut m =
            PackedMatrix { rows, cols, q: Vec::with_capacity(values.len()), scale: Vec::new(), min: Vec::new() };
        for run in values.chunks_exact(RUN) {
            let top = run.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = if top > 0.0 { top / 127.0 } else { 1.0 };
            m.q.extend(run.iter().map(|v| (v / d).round().clamp(-127.0, 127.0) as i8));
            m.scale.push(d);
            m.min.push(0.0);
        }
        m
    }

    /// Undoes llama.cpp's q/k permutation for `heads` heads ([`crate::gguf::llama_qk_sources`]).
    pub fn unpermute_heads(&mut self, heads: usize) {
        let sources = llama_qk_sources(self.rows, heads);
        self.q = gather_rows(&self.q, &sources, self.cols);
        self.scale = gather_rows(&self.scale, &sources, self.cols / RUN);
        self.min = gather_rows(&self.min, &sources, self.cols / RUN);
    }

    /// Row `r`'s values, into `out` (`cols` long).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        expand_row(self, r, out)
    }

    /// `out[b][r] = W[r] · x[b]` for the `batch` rows of `x` (each `cols` long) into `out`
    /// (`batch` rows of `rows`), blocks of output rows spread over the thread pool.
    pub fn product(&self, x: &[f32], batch: usize, out: &mut [f32]) {
        assert_eq!(x.len(), batch * self.cols, "x has {batch} rows of {}", self.cols);
        assert_eq!(out.len(), batch * self.rows, "out has {batch} rows of {}", self.rows);
        let out = Shared(out.as_mut_ptr());
        let simd = simd();
        (0..self.rows.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
            let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(self.rows);
            EXPANDED.with(|expanded| {
                let mut w = expanded.borrow_mut();
                w.resize(self.cols, 0.0);
                let write = |b: usize, r: usize, v: f32| {
                    // SAFETY: `out` holds `batch * rows` values and outlives the loop; each
                    // (b, r) is written by the one task whose block holds r.
                    unsafe { *out.at(b * self.rows + r) = v }
                };
                let task = Task { m: self, x, batch, rows };
                if simd {
                    // SAFETY: `simd()` checked that the CPU has AVX2 and FMA.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        rows_avx2(task, &mut w, write)
                    }
                } else {
                    rows_of::<false>(task, &mut w, write)
                }
            });
        });
    }
}

/// `out`'s pointer, shared by the tasks of one product (each writes its own values).
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the tasks write disjoint values (see `PackedMatrix::product`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY (of the callers' writes): `i` is within the slice this pointer came from.
        unsafe { self.0.add(i) }
    }
}

/// Whether this CPU runs the AVX2 + FMA version of the products.
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One task of a product: weight rows `rows` of `m` with the `batch` rows of `x`.
struct Task<'a> {
    m: &'a PackedMatrix,
    x: &'a [f32],
    batch: usize,
    rows: std::ops::Range<usize>,
}

/// [`rows_of`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(task: Task, w: &mut [f32], write: impl Fn(usize, usize, f32)) {
    rows_of::<true>(task, w, write)
}

/// A task's products, each handed to `write(b, r, value)`: each weight row expanded into `w`
/// once, then met by every row of the batch.
#[inline(always)]
fn rows_of<const FMA: bool>(task: Task, w: &mut [f32], write: impl Fn(usize, usize, f32)) {
    let Task { m, x, batch, rows } = task;
    for r in rows {
        expand_row(m, r, w);
        for b in 0..batch {
            write(b, r, dot::<FMA>(w, &x[b * m.cols..(b + 1) * m.cols]));
        }
    }
}

/// Row `r` of `m` expanded into `out`, a run of 16 at a time (inlined into the products, so
/// that it is compiled for the CPU features they run with).
#[inline(always)]
fn expand_row(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    let runs = m.cols / RUN;
    let q = &m.q[r * m.cols..(r + 1) * m.cols];
    let (scale, min) = (&m.scale[r * runs..(r + 1) * runs], &m.min[r * runs..(r + 1) * runs]);
    for (((qs, out), &d), &min) in q.chunks_exact(RUN).zip(out.chunks_exact_mut(RUN)).zip(scale).zip(min) {
        let qs: &[i8; RUN] = qs.try_into().expect("a run");
        let out: &mut [f32; RUN] = out.try_into().expect("a run");
        for j in 0..RUN {
            out[j] = d * qs[j] as f32 - min;
        }
    }
}

/// `a · b` in f32 with eight partial sums (vectorised by the compiler; fused multiply-adds
/// where the CPU has them).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for j in 0..8 {
            lanes[j] = if FMA { x[j].mul_add(y[j], lanes[j]) } else { lanes[j] + x[j] * y[j] };
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{dequantize, kinds};

    /// Random bytes shaped as `rows` rows of blocks of `kind`, with sane f16 scales.
    fn random_tensor(kind: u32, rows: usize, cols: usize, rng: &mut fastrand::Rng) -> Vec<u8> {
        let (block, size) = crate::gguf::block_size(kind).unwrap();
        let mut raw: Vec<u8> = (0..rows * cols / block * size).map(|_| rng.u8(..)).collect();
        // Every f16 scale a small positive number (0x2000..0x2fff), wherever the type keeps it.
        let scale_at: &[usize] = match kind {
            kinds::Q8_0 | kinds::Q4_0 | kinds::Q5_0 => &[0],
            kinds::Q4_1 | kinds::Q5_1 | kinds::Q4_K | kinds::Q5_K => &[0, 2],
            kinds::Q2_K => &[80, 82],
            kinds::Q3_K => &[108],
            _ => &[208],
        };
        for b in raw.chunks_exact_mut(size) {
            for &at in scale_at {
                b[at + 1] = 0x20 | (b[at + 1] & 0x0f);
            }
        }
        raw
    }

    #[test]
    fn packed_rows_are_the_dequantised_values_and_products_match_f32() {
        let mut rng = fastrand::Rng::with_seed(3);
        let kinds = [
            kinds::Q8_0,
            kinds::Q4_0,
            kinds::Q4_1,
            kinds::Q5_0,
            kinds::Q5_1,
            kinds::Q2_K,
            kinds::Q3_K,
            kinds::Q4_K,
            kinds::Q5_K,
            kinds::Q6_K,
        ];
        let (rows, cols, batch) = (70, 512, 3);
        for kind in kinds {
            let raw = random_tensor(kind, rows, cols, &mut rng);
            let m = PackedMatrix::from_gguf(kind, &raw, rows, cols).unwrap();
            let dense = dequantize(kind, &raw, rows * cols).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                m.row_into(r, &mut row);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&row), bits(&dense[r * cols..(r + 1) * cols]), "type {kind} row {r}");
            }
            let x: Vec<f32> = (0..batch * cols).map(|_| rng.f32() - 0.5).collect();
            let mut out = vec![0f32; batch * rows];
            m.product(&x, batch, &mut out);
            for b in 0..batch {
                for r in 0..rows {
                    let want: f64 = (0..cols).map(|c| dense[r * cols + c] as f64 * x[b * cols + c] as f64).sum();
                    let scale: f64 =
                        (0..cols).map(|c| (dense[r * cols + c] as f64 * x[b * cols + c] as f64).abs()).sum();
                    let got = out[b * rows + r] as f64;
                    assert!((got - want).abs() <= 1e-5 * scale.max(1e-6), "type {kind} ({b}, {r}): {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn unquantised_weights_pack_to_eight_bits() {
        let mut rng = fastrand::Rng::with_seed(4);
        let (rows, cols) = (5, 64);
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let m = PackedMatrix::from_f32(&values, rows, cols);
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            m.row_into(r, &mut row);
            for (c, v) in row.iter().enumerate() {
                assert!((v - values[r * cols + c]).abs() <= 1.0 / 254.0 + 1e-6);
            }
        }
        assert!(PackedMatrix::from_gguf(kinds::F32, &[], 1, 16).is_none());
    }
}
