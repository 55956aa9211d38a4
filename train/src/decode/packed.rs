//! Weight matrices packed once for decoding, and the products `W · x` for a few rows `x` at a
//! time that never re-pack: each weight row is expanded once, in cache, then met by every row
//! of the batch. A block-quantised tensor keeps its type's own integers, 1 byte each, as runs of
//! 16 with the f32 scale and minimum ggml's dequantiser computes; F16 and BF16 tensors keep
//! their 16-bit values; F32 ones are rounded to bf16. The expanded values of quantised, F16 and
//! BF16 tensors are bit for bit what [`crate::gguf::dequantize`] gives, so results agree with
//! the dequantised f32 path up to the order of the sums.

use std::cell::RefCell;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::gguf::{Run, gather_rows, is_quantised, kinds, llama_qk_sources, unpack};

/// Values per run.
pub const RUN: usize = 16;

/// Rows ahead of the one being expanded whose integers are asked of memory in advance.
const AHEAD: usize = 4;

/// Batch rows a product meets each expanded weight row with before moving on.
const BATCH_BLOCK: usize = 64;

/// Output rows one task of a product takes.
const ROWS_PER_TASK: usize = 32;

/// A `[rows, cols]` matrix (row `r` holds output `r`'s weights), packed.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    values: Values,
}

/// How a matrix's values are kept.
#[derive(Clone, Debug)]
enum Values {
    /// A block type's integers with a scale and a minimum per run: `value = scale * q - min`.
    Runs(Runs),
    /// IEEE half precision (F16 tensors).
    F16(Vec<f16>),
    /// bfloat16 (BF16 tensors; F32 ones rounded to the nearest).
    Bf16(Vec<bf16>),
}

/// A block-quantised matrix's integers, scales and minimums, as small as they go exactly.
#[derive(Clone, Debug)]
struct Runs {
    /// Values per scale (and minimum): [`RUN`], or 32 where each block's two runs share them.
    run: usize,
    /// Each integer as `q + offset` in one byte, or in four bits (`nibbles`) where every
    /// integer of the matrix fits in 16 values: the byte `j` of a run then holds value `j` in
    /// its low half and value `j + run / 2` in its high half.
    q: Vec<u8>,
    nibbles: bool,
    offset: i16,
    scale: Vec<f32>,
    /// Empty where every minimum is 0 (types without one).
    min: Vec<f32>,
}

impl Runs {
    /// `rows` rows of `cols` values from runs of [`RUN`] integers with a scale and minimum each.
    fn new(q: &[i8], scale: Vec<f32>, min: Vec<f32>, cols: usize) -> Runs {
        let shared = |v: &[f32]| v.chunks_exact(2).all(|p| p[0].to_bits() == p[1].to_bits());
        let run = if cols.is_multiple_of(2 * RUN) && shared(&scale) && shared(&min) { 2 * RUN } else { RUN };
        let every_other = |v: Vec<f32>| if run == RUN { v } else { v.into_iter().step_by(2).collect() };
        let min = if min.iter().all(|m| m.to_bits() == 0) { Vec::new() } else { every_other(min) };
        let (lo, hi) = q.iter().fold((i8::MAX, i8::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let nibbles = (hi as i16 - lo as i16) < 16;
        let offset = if nibbles { -(lo as i16) } else { 0 };
        let q = if nibbles {
            let half = run / 2;
            let nibble = move |v: i8| (v as i16 + offset) as u8;
            q.chunks_exact(run).flat_map(|r| (0..half).map(move |j| nibble(r[j]) | nibble(r[j + half]) << 4)).collect()
        } else {
            q.iter().map(|&v| v as u8).collect()
        };
        Runs { run, q, nibbles, offset, scale: every_other(scale), min }
    }

    /// Bytes of integers per row of `cols` values.
    fn row_bytes(&self, cols: usize) -> usize {
        if self.nibbles { cols / 2 } else { cols }
    }

    /// Row `r` (of `cols` values) expanded into `out`, runs of `N` values kept in `W` bytes
    /// each (`N == W`, or `N == 2 * W` for nibbles).
    /// `SIMD`: with AVX2 (the caller checked).
    #[inline(always)]
    fn expand<const SIMD: bool, const NIBBLES: bool, const W: usize, const N: usize, const MIN: bool>(
        &self,
        cols: usize,
        r: usize,
        out: &mut [f32],
    ) {
        let per_row = cols / N;
        let q = &self.q[r * per_row * W..(r + 1) * per_row * W];
        let scale = &self.scale[r * per_row..(r + 1) * per_row];
        let min = if MIN { &self.min[r * per_row..(r + 1) * per_row] } else { &[][..] };
        let offset = self.offset as f32;
        for (k, (q, out)) in q.chunks_exact(W).zip(out.chunks_exact_mut(N)).enumerate() {
            let q: &[u8; W] = q.try_into().expect("a run");
            let out: &mut [f32; N] = out.try_into().expect("a run");
            let (d, min) = (scale[k], if MIN { min[k] } else { 0.0 });
            #[cfg(target_arch = "x86_64")]
            if SIMD {
                // SAFETY: `SIMD` is only set where the CPU has AVX2; `out` holds `N` values:
                // `W` for bytes, `2 * W` for nibbles.
                unsafe { run_avx2::<NIBBLES, W, MIN>(q, out, d, min, offset) };
                continue;
            }
            // `q - offset` is exact in f32, so each value is `d * q - min` bit for bit as
            // ggml computes it (without a minimum, `d * q - 0.0` is `d * q`).
            let value = |q: f32| if MIN { d * q - min } else { d * q };
            if NIBBLES {
                let (low, high) = out.split_at_mut(W);
                for (o, q) in low.iter_mut().zip(q) {
                    *o = value((q & 0x0F) as f32 - offset);
                }
                for (o, q) in high.iter_mut().zip(q) {
                    *o = value((q >> 4) as f32 - offset);
                }
            } else {
                for j in 0..N {
                    out[j] = value(q[j] as i8 as f32);
                }
            }
        }
    }
}

/// One run of [`Runs::expand`] with AVX2: eight values at a time, each `d * q - min` with a
/// separate multiply and subtract (as ggml rounds them).
///
/// # Safety
/// The CPU has AVX2, and `out` holds `W` values (`2 * W` for nibbles).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn run_avx2<const NIBBLES: bool, const W: usize, const MIN: bool>(
    q: &[u8; W],
    out: &mut [f32],
    d: f32,
    min: f32,
    offset: f32,
) {
    use std::arch::x86_64::*;
    let (d, min, offset, low) = (_mm256_set1_ps(d), _mm256_set1_ps(min), _mm256_set1_ps(offset), _mm_set1_epi8(0x0F));
    let value = |ints: __m256i, offset: __m256| {
        let v = _mm256_mul_ps(d, _mm256_sub_ps(_mm256_cvtepi32_ps(ints), offset));
        if MIN { _mm256_sub_ps(v, min) } else { v }
    };
    let out = out.as_mut_ptr();
    for c in (0..W).step_by(8) {
        // SAFETY: bytes `c..c + 8` of `q` and the values written are within the caller's bounds.
        unsafe {
            let bytes = _mm_loadl_epi64(q.as_ptr().add(c).cast());
            if NIBBLES {
                let (lo, hi) = (_mm_and_si128(bytes, low), _mm_and_si128(_mm_srli_epi16(bytes, 4), low));
                _mm256_storeu_ps(out.add(c), value(_mm256_cvtepu8_epi32(lo), offset));
                _mm256_storeu_ps(out.add(W + c), value(_mm256_cvtepu8_epi32(hi), offset));
            } else {
                _mm256_storeu_ps(out.add(c), value(_mm256_cvtepi8_epi32(bytes), _mm256_setzero_ps()));
            }
        }
    }
}

thread_local! {
    /// Two expanded weight rows per thread, reused by every product.
    static EXPANDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl PackedMatrix {
    /// The matrix of a GGUF tensor of type `kind` (block-quantised, F16, BF16 or F32) with
    /// `rows` rows of `cols` values; `None` when `raw` does not hold such a matrix (rows that are
    /// not whole blocks, another type).
    pub fn from_gguf(kind: u32, raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let count = rows * cols;
        let halves = || raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let values = match kind {
            kinds::F16 if raw.len() == 2 * count => Values::F16(halves().map(f16::from_bits).collect()),
            kinds::BF16 if raw.len() == 2 * count => Values::Bf16(halves().map(bf16::from_bits).collect()),
            kinds::F32 if raw.len() == 4 * count => Values::Bf16(
                raw.chunks_exact(4).map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect(),
            ),
            _ if is_quantised(kind) && cols.is_multiple_of(RUN) => {
                let (mut q, mut scale, mut min) =
                    (Vec::with_capacity(count), Vec::with_capacity(count / RUN), Vec::with_capacity(count / RUN));
                unpack(kind, raw, count, &mut |run: Run| {
                    q.extend_from_slice(&run.q);
                    scale.push(run.d);
                    min.push(run.min);
                })?;
                (q.len() == count).then(|| Values::Runs(Runs::new(&q, scale, min, cols)))?
            }
            _ => return None,
        };
        Some(PackedMatrix { rows, cols, values })
    }

    /// Undoes llama.cpp's q/k permutation for `heads` heads ([`crate::gguf::llama_qk_sources`]).
    pub fn unpermute_heads(&mut self, heads: usize) {
        let sources = llama_qk_sources(self.rows, heads);
        let cols = self.cols;
        match &mut self.values {
            Values::Runs(runs) => {
                runs.q = gather_rows(&runs.q, &sources, runs.row_bytes(cols));
                runs.scale = gather_rows(&runs.scale, &sources, cols / runs.run);
                if !runs.min.is_empty() {
                    runs.min = gather_rows(&runs.min, &sources, cols / runs.run);
                }
            }
            Values::F16(v) => *v = gather_rows(v, &sources, cols),
            Values::Bf16(v) => *v = gather_rows(v, &sources, cols),
        }
    }

    /// Bytes the values take in memory.
    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::Runs(runs) => runs.q.len() + 4 * (runs.scale.len() + runs.min.len()),
            Values::F16(v) => 2 * v.len(),
            Values::Bf16(v) => 2 * v.len(),
        }
    }

    /// Asks for row `r`'s integers to be brought into cache (a hint; nothing on other CPUs).
    #[inline(always)]
    fn prefetch_row(&self, r: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Values::Runs(runs) = &self.values {
            let width = runs.row_bytes(self.cols);
            let bytes = &runs.q[r * width..(r + 1) * width];
            for line in (0..width).step_by(64) {
                // SAFETY: a prefetch of an address inside `bytes`; it reads nothing.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        bytes.as_ptr().add(line).cast(),
                    )
                };
            }
        }
    }

    /// Row `r`'s values, into `out` (`cols` long).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        /// [`expand_row`] compiled for AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn row_avx2(m: &PackedMatrix, r: usize, out: &mut [f32]) {
            expand_row::<true>(m, r, out)
        }
        #[cfg(target_arch = "x86_64")]
        if simd() {
            // SAFETY: `simd()` checked that the CPU has AVX2 and FMA.
            return unsafe { row_avx2(self, r, out) };
        }
        expand_row::<false>(self, r, out)
    }

    /// `out[b][r] = W[r] · x[b]` for the `batch` rows of `x` (each `cols` long) into `out`
    /// (`batch` rows of `rows`), blocks of output rows spread over the thread pool.
    pub fn product(&self, x: &[f32], batch: usize, out: &mut [f32]) {
        products([(self, out)], x, batch)
    }
}

/// [`PackedMatrix::product`] of `N` matrices with the same input at once, `(matrix, out)` each:
/// one round of the thread pool for all of them (a round costs thread wake-ups, and a token
/// of a small model takes hundreds).
pub fn products<const N: usize>(parts: [(&PackedMatrix, &mut [f32]); N], x: &[f32], batch: usize) {
    products_on(simd(), parts, x, batch)
}

/// [`products`] with the AVX2 kernels (`simd`, where the CPU has them) or the portable ones.
fn products_on<const N: usize>(simd: bool, parts: [(&PackedMatrix, &mut [f32]); N], x: &[f32], batch: usize) {
    let parts = parts.map(|(m, out)| {
        assert_eq!(x.len(), batch * m.cols, "x has {batch} rows of {}", m.cols);
        assert_eq!(out.len(), batch * m.rows, "out has {batch} rows of {}", m.rows);
        (m, Shared(out.as_mut_ptr()))
    });
    let tasks = parts.map(|(m, _)| m.rows.div_ceil(ROWS_PER_TASK));
    (0..tasks.iter().sum::<usize>()).into_par_iter().for_each(|mut task| {
        let mut part = 0;
        while task >= tasks[part] {
            task -= tasks[part];
            part += 1;
        }
        let (m, out) = parts[part];
        let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(m.rows);
        EXPANDED.with(|expanded| {
            let mut w = expanded.borrow_mut();
            w.resize(2 * m.cols, 0.0);
            let write = |b: usize, r: usize, v: f32| {
                // SAFETY: `out` holds `batch * m.rows` values and outlives the loop; each
                // (b, r) is written by the one task whose block holds r.
                unsafe { *out.at(b * m.rows + r) = v }
            };
            let task = Task { m, x, batch, rows };
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

/// A task's products, each handed to `write(b, r, value)`: for each block of [`BATCH_BLOCK`]
/// batch rows, the task's weight rows expanded into `w`, two at a time when the block has four
/// rows or more (each load of four batch values then serves two weight rows, and each load of
/// weights four batch rows), else one at a time.
#[inline(always)]
fn rows_of<const SIMD: bool>(task: Task, w: &mut [f32], write: impl Fn(usize, usize, f32)) {
    let Task { m, x, batch, rows } = task;
    let row = |b: usize| &x[b * m.cols..(b + 1) * m.cols];
    let (w0, w1) = w.split_at_mut(m.cols);
    // A prompt's prefill has hundreds of rows: they are met a block at a time, so that the
    // block stays in cache while the weight rows pass (each weight row expanded once a block).
    for first in (0..batch).step_by(BATCH_BLOCK) {
        let end = (first + BATCH_BLOCK).min(batch);
        let fours = first + (end - first) / 4 * 4;
        let mut r = rows.start;
        while r < rows.end {
            if SIMD && r + AHEAD < rows.end {
                m.prefetch_row(r + AHEAD);
            }
            expand_row::<SIMD>(m, r, w0);
            if fours > first && r + 1 < rows.end {
                if SIMD && r + 1 + AHEAD < rows.end {
                    m.prefetch_row(r + 1 + AHEAD);
                }
                expand_row::<SIMD>(m, r + 1, w1);
                for b in (first..fours).step_by(4) {
                    let sums = dots::<SIMD, 2, 4, 1>([w0, w1], [row(b), row(b + 1), row(b + 2), row(b + 3)]);
                    for (i, sums) in sums.into_iter().enumerate() {
                        sums.into_iter().enumerate().for_each(|(j, v)| write(b + j, r + i, v));
                    }
                }
                for b in fours..end {
                    let [[v0], [v1]] = dots::<SIMD, 2, 1, 2>([w0, w1], [row(b)]);
                    write(b, r, v0);
                    write(b, r + 1, v1);
                }
                r += 2;
                continue;
            }
            for b in (first..fours).step_by(4) {
                let [sums] = dots::<SIMD, 1, 4, 2>([w0], [row(b), row(b + 1), row(b + 2), row(b + 3)]);
                sums.into_iter().enumerate().for_each(|(j, v)| write(b + j, r, v));
            }
            for b in fours..end {
                write(b, r, dots::<SIMD, 1, 1, 4>([w0], [row(b)])[0][0]);
            }
            r += 1;
        }
    }
}

/// Row `r` of `m` expanded into `out` (inlined into the products, so that it is compiled for
/// the CPU features they run with).
#[inline(always)]
fn expand_row<const SIMD: bool>(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    let row = r * m.cols..(r + 1) * m.cols;
    match &m.values {
        Values::Runs(runs) => match (runs.nibbles, runs.run == RUN, runs.min.is_empty()) {
            (false, true, false) => runs.expand::<SIMD, false, 16, 16, true>(m.cols, r, out),
            (false, true, true) => runs.expand::<SIMD, false, 16, 16, false>(m.cols, r, out),
            (false, false, false) => runs.expand::<SIMD, false, 32, 32, true>(m.cols, r, out),
            (false, false, true) => runs.expand::<SIMD, false, 32, 32, false>(m.cols, r, out),
            (true, true, false) => runs.expand::<SIMD, true, 8, 16, true>(m.cols, r, out),
            (true, true, true) => runs.expand::<SIMD, true, 8, 16, false>(m.cols, r, out),
            (true, false, false) => runs.expand::<SIMD, true, 16, 32, true>(m.cols, r, out),
            (true, false, true) => runs.expand::<SIMD, true, 16, 32, false>(m.cols, r, out),
        },
        Values::F16(v) => v[row].convert_to_f32_slice(out),
        Values::Bf16(v) => v[row].convert_to_f32_slice(out),
    }
}

/// `a · b` in f32, vectorised where the CPU has AVX2 and FMA.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    /// [`dots`] compiled for AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        dots::<true, 1, 1, 2>([a], [b])[0][0]
    }
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: `simd()` checked that the CPU has AVX2 and FMA.
        return unsafe { dot_avx2(a, b) };
    }
    dots::<false, 1, 1, 2>([a], [b])[0][0]
}

/// `w[r] · x[b]` for each of the `R` rows of `w` and `B` rows of `x`, in f32: each product
/// sums in `U` independent sets of eight lanes (so that multiply-adds overlap instead of
/// waiting on each other), and each load serves all the products it is part of. `SIMD`: with
/// AVX2 and FMA (the caller checked).
#[inline(always)]
fn dots<const SIMD: bool, const R: usize, const B: usize, const U: usize>(
    w: [&[f32]; R],
    x: [&[f32]; B],
) -> [[f32; B]; R] {
    let n = w[0].len();
    let (w, x) = (w.map(|w| &w[..n]), x.map(|x| &x[..n]));
    let whole = n / (8 * U) * (8 * U);
    let lanes: [[[f32; 8]; B]; R] = if SIMD {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `SIMD` is only set where the CPU has AVX2 and FMA; every load is within
        // `whole <= n` values of each `w[r]` and `x[b]`.
        unsafe {
            lanes_avx2::<R, B, U>(w, x, whole)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("SIMD products exist on x86_64 only")
    } else {
        let mut acc = [[[[0f32; 8]; U]; B]; R];
        for base in (0..whole).step_by(8 * U) {
            for u in 0..U {
                let at = base + 8 * u;
                for (acc, w) in acc.iter_mut().zip(&w) {
                    for (acc, x) in acc.iter_mut().zip(&x) {
                        for j in 0..8 {
                            acc[u][j] += w[at + j] * x[at + j];
                        }
                    }
                }
            }
        }
        acc.map(|a| a.map(|a| std::array::from_fn(|j| a.iter().map(|l| l[j]).sum())))
    };
    std::array::from_fn(|r| {
        std::array::from_fn(|b| {
            let tail: f32 = w[r][whole..].iter().zip(&x[b][whole..]).map(|(w, x)| w * x).sum();
            lanes[r][b].iter().sum::<f32>() + tail
        })
    })
}

/// The eight lane sums of [`dots`] over the first `whole` values, with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA, `whole` is a multiple of `8 * U`, and every `w[r]` and `x[b]` hold
/// at least `whole` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn lanes_avx2<const R: usize, const B: usize, const U: usize>(
    w: [&[f32]; R],
    x: [&[f32]; B],
    whole: usize,
) -> [[[f32; 8]; B]; R] {
    use std::arch::x86_64::*;
    // SAFETY: the caller's guarantees.
    unsafe {
        let mut acc = [[[_mm256_setzero_ps(); U]; B]; R];
        let mut i = 0;
        while i < whole {
            // `u` picks both the eight values and the set of sums they go to.
            #[allow(clippy::needless_range_loop)]
            for u in 0..U {
                let wv = w.map(|w| _mm256_loadu_ps(w.as_ptr().add(i + 8 * u)));
                for (b, x) in x.iter().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(i + 8 * u));
                    for (acc, wv) in acc.iter_mut().zip(&wv) {
                        acc[b][u] = _mm256_fmadd_ps(*wv, xv, acc[b][u]);
                    }
                }
            }
            i += 8 * U;
        }
        acc.map(|a| {
            a.map(|a| {
                let mut sum = a[0];
                for v in &a[1..] {
                    sum = _mm256_add_ps(sum, *v);
                }
                std::mem::transmute::<__m256, [f32; 8]>(sum)
            })
        })
    }
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
        // Each type with the bytes a value takes packed: its integers in 4 bits where they fit,
        // f32 scales (and minimums, where the type has them) per 32 values where blocks share
        // them, else per 16.
        let kinds = [
            (kinds::Q8_0, 1.0 + 4.0 / 32.0),
            (kinds::Q4_0, 0.5 + 4.0 / 32.0),
            (kinds::Q4_1, 0.5 + 8.0 / 32.0),
            (kinds::Q5_0, 1.0 + 4.0 / 32.0),
            (kinds::Q5_1, 1.0 + 8.0 / 32.0),
            (kinds::Q2_K, 0.5 + 8.0 / 16.0),
            (kinds::Q3_K, 0.5 + 4.0 / 16.0),
            (kinds::Q4_K, 0.5 + 8.0 / 32.0),
            (kinds::Q5_K, 1.0 + 8.0 / 32.0),
            (kinds::Q6_K, 1.0 + 4.0 / 16.0),
        ];
        let (rows, cols, batch) = (70, 512, 6);
        for (kind, bytes_per_value) in kinds {
            let raw = random_tensor(kind, rows, cols, &mut rng);
            let m = PackedMatrix::from_gguf(kind, &raw, rows, cols).unwrap();
            assert_eq!(m.bytes() as f64, bytes_per_value * (rows * cols) as f64, "type {kind}");
            let dense = dequantize(kind, &raw, rows * cols).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                m.row_into(r, &mut row);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&row), bits(&dense[r * cols..(r + 1) * cols]), "type {kind} row {r}");
            }
            let mut portable = vec![0f32; cols];
            for r in 0..rows {
                expand_row::<false>(&m, r, &mut portable);
                m.row_into(r, &mut row);
                assert_eq!(portable, row, "type {kind} row {r}: the portable expansion");
            }
            let x: Vec<f32> = (0..batch * cols).map(|_| rng.f32() - 0.5).collect();
            let mut out = vec![0f32; batch * rows];
            m.product(&x, batch, &mut out);
            let mut on_portable = vec![0f32; batch * rows];
            products_on(false, [(&m, &mut on_portable[..])], &x, batch);
            for (a, b) in out.iter().zip(&on_portable) {
                assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "type {kind}: {a} (AVX2) vs {b} (portable)");
            }
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
    fn float_weights_keep_sixteen_bits() {
        let mut rng = fastrand::Rng::with_seed(4);
        let (rows, cols) = (5, 24);
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let f16_raw: Vec<u8> = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        let bf16_raw: Vec<u8> = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let f32_raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut row = vec![0f32; cols];
        for (kind, raw) in [(kinds::F16, &f16_raw), (kinds::BF16, &bf16_raw)] {
            // Exactly the stored values (rows need not be whole runs).
            let m = PackedMatrix::from_gguf(kind, raw, rows, cols).unwrap();
            let dense = dequantize(kind, raw, rows * cols).unwrap();
            for r in 0..rows {
                m.row_into(r, &mut row);
                assert_eq!(row, dense[r * cols..(r + 1) * cols], "type {kind} row {r}");
            }
        }
        // Products over rows that are not whole sets of lanes, weight rows two and one at a
        // time, batch rows four and one at a time, in more than one block of the batch.
        let m = PackedMatrix::from_gguf(kinds::F16, &f16_raw, rows, cols).unwrap();
        let dense = dequantize(kinds::F16, &f16_raw, rows * cols).unwrap();
        let batch = BATCH_BLOCK + 3;
        let x: Vec<f32> = (0..batch * cols).map(|_| rng.f32() - 0.5).collect();
        let mut out = vec![0f32; batch * rows];
        m.product(&x, batch, &mut out);
        for b in 0..batch {
            for r in 0..rows {
                let want: f32 = (0..cols).map(|c| dense[r * cols + c] * x[b * cols + c]).sum();
                assert!((out[b * rows + r] - want).abs() < 1e-5, "({b}, {r}): {} vs {want}", out[b * rows + r]);
            }
        }
        // F32 rounded to bf16: within half a unit of bf16's 8-bit significand.
        let m = PackedMatrix::from_gguf(kinds::F32, &f32_raw, rows, cols).unwrap();
        for r in 0..rows {
            m.row_into(r, &mut row);
            for (c, v) in row.iter().enumerate() {
                let want = values[r * cols + c];
                assert!((v - want).abs() <= want.abs() / 256.0, "{v} vs {want}");
            }
        }
        assert!(PackedMatrix::from_gguf(kinds::F32, &f32_raw[4..], rows, cols).is_none(), "a short tensor");
    }
}
