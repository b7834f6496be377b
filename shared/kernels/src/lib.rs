//! Quantized matrix products for the CPU engine, where candle's are scalar.
//!
//! [`Q4_1Matrix::matmul`] multiplies f32 activations by a GGUF Q4_1 weight matrix the way ggml
//! does: each activation row is quantized to Q8_1 blocks (32 signed bytes, a scale and the scaled
//! sum) exactly as ggml and candle quantize it, and each block pair's integer dot product is
//! exact. The float sums run in eight lanes, llama.cpp's way, rather than block by block as
//! candle's scalar kernel adds them, so results differ from candle's in the last bits (tested
//! within 1e-5 of the block-by-block sum). The AVX2 kernel and the scalar fallback compute the
//! same lanes in the same order and agree bit for bit (tested), and a row's result never depends
//! on the other rows of the pass. Where the time goes:
//! - a block's 32 multiply-adds are two AVX2 instructions, its scale one fused multiply-add, and
//!   the horizontal sum comes once a row (the kernel is picked at run time; a CPU without AVX2
//!   and FMA takes the scalar loop);
//! - a weight row stays in L1 while every activation row of the pass is multiplied by it;
//! - large products share their output rows out over rayon's threads.

use half::f16;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;
/// Bytes of a Q4_1 block: scale, minimum (both f16), 16 bytes of 4-bit values.
pub const Q4_1_BYTES: usize = 20;

/// A `[rows, cols]` weight matrix in GGUF's Q4_1 layout (each row `cols / 32` blocks).
#[derive(Clone)]
pub struct Q4_1Matrix {
    data: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for Q4_1Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4_1Matrix({} × {})", self.rows, self.cols)
    }
}

/// Activation rows quantized to Q8_1: per block, 32 signed bytes, the scale and the scaled sum
/// of the bytes, both rounded through f16 as ggml stores them.
struct Q8_1Rows {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8_1Rows {
    fn quantize(x: &[f32], cols: usize) -> Self {
        let blocks = x.len() / BLOCK;
        let mut out = Self { qs: vec![0; x.len()], d: vec![0.0; blocks], s: vec![0.0; blocks] };
        debug_assert!(cols.is_multiple_of(BLOCK));
        for (b, (xs, qs)) in x.chunks_exact(BLOCK).zip(out.qs.chunks_exact_mut(BLOCK)).enumerate() {
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            let dh = f16::from_f32(d);
            out.d[b] = dh.to_f32();
            // ggml keeps the sum times the scale as an f16 product of two f16s.
            out.s[b] = (f16::from_f32(sum as f32) * dh).to_f32();
        }
        out
    }
}

impl Q4_1Matrix {
    /// Wraps `rows × cols / 32` Q4_1 blocks; `None` if the sizes disagree.
    pub fn new(data: Vec<u8>, rows: usize, cols: usize) -> Option<Self> {
        (cols.is_multiple_of(BLOCK) && data.len() == rows * cols / BLOCK * Q4_1_BYTES).then_some(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, r: usize) -> &[u8] {
        let bytes = self.cols / BLOCK * Q4_1_BYTES;
        &self.data[r * bytes..(r + 1) * bytes]
    }

    /// `out[m × rows] = x[m × cols] · Wᵀ`, with the kernel this CPU runs best.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(x, m, out, Kernel::detect())
    }

    /// As [`Q4_1Matrix::matmul`] with a chosen kernel (tests compare them).
    pub fn matmul_with(&self, x: &[f32], m: usize, out: &mut [f32], kernel: Kernel) {
        assert_eq!(x.len(), m * self.cols, "activations of {m} rows of {}", self.cols);
        assert_eq!(out.len(), m * self.rows, "outputs of {m} rows of {}", self.rows);
        let q = Q8_1Rows::quantize(x, self.cols);
        // Each task takes a run of weight rows and writes their results for every activation
        // row into a buffer of its own ([task rows × m]), laid into `out` afterwards. The smallest
        // products run on this thread: handing them out costs more than it saves.
        let threads = rayon::current_num_threads();
        let tasks = if self.rows * self.cols * m < PARALLEL_MACS || threads == 1 { 1 } else { threads };
        let per_task = self.rows.div_ceil(tasks);
        let run = |start: usize| {
            let end = (start + per_task).min(self.rows);
            let mut acc = vec![0f32; (end - start) * m];
            rows_dots(kernel, self, start..end, &q, m, &mut acc);
            (start, acc)
        };
        let parts: Vec<(usize, Vec<f32>)> =
            if tasks == 1 { vec![run(0)] } else { (0..self.rows).step_by(per_task).collect::<Vec<_>>().into_par_iter().map(run).collect() };
        for (start, acc) in parts {
            let n = acc.len() / m.max(1);
            for j in 0..n {
                for i in 0..m {
                    out[i * self.rows + start + j] = acc[j * m + i];
                }
            }
        }
    }
}

/// Which integer dot product a matmul uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The fastest this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }
}

/// Multiply-adds below which a product runs on the calling thread. Low enough that a decode
/// step's matrices (one activation row; the smallest, 192 × 576, is 110,592) are shared out: from
/// a rayon worker (the CPU engine runs its passes on one) a split costs a few microseconds, while
/// each half of a 576 × 1,536 row takes 30.
const PARALLEL_MACS: usize = 100_000;

/// The block's scale and minimum.
#[inline(always)]
fn scales(w: &[u8]) -> (f32, f32) {
    (f16::from_le_bytes([w[0], w[1]]).to_f32(), f16::from_le_bytes([w[2], w[3]]).to_f32())
}

/// Weight rows `rows` against every activation row: `acc[j·m + i]` is weight row
/// `rows.start + j` times activation row `i`.
fn rows_dots(kernel: Kernel, w: &Q4_1Matrix, rows: std::ops::Range<usize>, q: &Q8_1Rows, m: usize, acc: &mut [f32]) {
    for (j, r) in rows.enumerate() {
        let row = w.row(r);
        for (i, a) in acc[j * m..(j + 1) * m].iter_mut().enumerate() {
            *a = match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Avx2` is only chosen where the CPU reports AVX2 and FMA
                // (`Kernel::detect`, or a caller that checked the same).
                Kernel::Avx2 => unsafe { avx2::dot_row(row, q, i) },
                Kernel::Scalar => scalar_dot_row(row, q, i),
            };
        }
    }
}

/// One weight row times activation row `i`, in the order the AVX2 kernel computes it, so the
/// two agree bit for bit: eight lanes of partial sums (lane `l < 4` holds the low-nibble
/// products of bytes `4l..4l+4`, lane `4 + l` the high-nibble ones), each lane's integer sum
/// scaled by the block's `dw·dx` and added by a fused multiply-add; the lanes summed as a tree;
/// the minimum's terms `mw·sx` summed on the side, block by block.
fn scalar_dot_row(row: &[u8], q: &Q8_1Rows, i: usize) -> f32 {
    let nb = row.len() / Q4_1_BYTES;
    let mut lanes = [0f32; 8];
    let mut mins = 0f32;
    for (b, blk) in row.chunks_exact(Q4_1_BYTES).enumerate() {
        let at = i * nb + b;
        let x = &q.qs[at * BLOCK..][..BLOCK];
        let (dw, mw) = scales(blk);
        let scale = dw * q.d[at];
        for l in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for k in 4 * l..4 * l + 4 {
                lo += (blk[4 + k] & 0x0F) as i32 * x[k] as i32;
                hi += (blk[4 + k] >> 4) as i32 * x[k + BLOCK / 2] as i32;
            }
            lanes[l] = (lo as f32).mul_add(scale, lanes[l]);
            lanes[4 + l] = (hi as f32).mul_add(scale, lanes[4 + l]);
        }
        mins += mw * q.s[at];
    }
    let h: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
    ((h[0] + h[2]) + (h[1] + h[3])) + mins
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{scales, Q8_1Rows, BLOCK, Q4_1_BYTES};

    /// One weight row (its Q4_1 blocks) times activation row `i`: per block, the 32 four-bit
    /// weights are unpacked (low nibbles are values 0–15, high nibbles 16–31) and multiplied
    /// with the row's 32 signed bytes by `maddubs` (unsigned × signed, pairs summed into 16
    /// bits: at most 2 · 15 · 128, no saturation) and `madd` by ones, giving eight exact integer
    /// partial sums; those are scaled by `dw·dx` into eight float lanes with one fused
    /// multiply-add. No horizontal sum until the row ends.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_row(row: &[u8], q: &Q8_1Rows, i: usize) -> f32 {
        let nb = row.len() / Q4_1_BYTES;
        assert!(q.qs.len() >= (i + 1) * nb * BLOCK && q.d.len() >= (i + 1) * nb && q.s.len() >= (i + 1) * nb);
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut lanes = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (b, blk) in row.chunks_exact(Q4_1_BYTES).enumerate() {
            let at = i * nb + b;
            // SAFETY: `blk[4..20]` is 16 readable bytes; unaligned loads are allowed.
            let packed = unsafe { _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i) };
            let weights = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
            // SAFETY: block `at` is the 32 bytes from `at·32`, inside `q.qs` (asserted above).
            let x = unsafe { _mm256_loadu_si256(q.qs.as_ptr().add(at * BLOCK) as *const __m256i) };
            let quads = _mm256_madd_epi16(_mm256_maddubs_epi16(weights, x), ones);
            let (dw, mw) = scales(blk);
            lanes = _mm256_fmadd_ps(_mm256_cvtepi32_ps(quads), _mm256_set1_ps(dw * q.d[at]), lanes);
            mins += mw * q.s[at];
        }
        // (l0 + l4, l1 + l5, l2 + l6, l3 + l7), then (h0 + h2) + (h1 + h3).
        let h = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 0b01));
        _mm_cvtss_f32(h) + mins
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random Q4_1 blocks: scales and minimums of either sign, every nibble value.
    fn random_matrix(rng: &mut rand::rngs::StdRng, rows: usize, cols: usize) -> Q4_1Matrix {
        let mut data = Vec::with_capacity(rows * cols / BLOCK * Q4_1_BYTES);
        for _ in 0..rows * cols / BLOCK {
            data.extend_from_slice(&f16::from_f32(rng.random_range(-0.05..0.05)).to_le_bytes());
            data.extend_from_slice(&f16::from_f32(rng.random_range(-0.5..0.5)).to_le_bytes());
            data.extend((0..16).map(|_| rng.random::<u8>()));
        }
        Q4_1Matrix::new(data, rows, cols).expect("sizes agree")
    }

    /// ggml's reference, written out: the same quantized activations, blocks summed in order.
    fn reference(w: &Q4_1Matrix, x: &[f32], m: usize) -> Vec<f32> {
        let q = Q8_1Rows::quantize(x, w.cols);
        let nb = w.cols / BLOCK;
        let mut out = vec![0f32; m * w.rows];
        for i in 0..m {
            for r in 0..w.rows {
                let mut sumf = 0f32;
                for b in 0..nb {
                    let blk = &w.row(r)[b * Q4_1_BYTES..(b + 1) * Q4_1_BYTES];
                    let xs = &q.qs[(i * nb + b) * BLOCK..][..BLOCK];
                    let mut sumi = 0i32;
                    for j in 0..16 {
                        sumi += (blk[4 + j] & 0x0F) as i32 * xs[j] as i32 + (blk[4 + j] >> 4) as i32 * xs[j + 16] as i32;
                    }
                    let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let mw = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    sumf += sumi as f32 * dw * q.d[i * nb + b] + mw * q.s[i * nb + b];
                }
                out[i * w.rows + r] = sumf;
            }
        }
        out
    }

    #[test]
    fn kernels_agree_with_ggml_and_each_other() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Odd shapes: one block, row counts that leave partial tasks, batches of 1 to 9 rows, and
        // one product large enough to be shared out over threads.
        for (rows, cols, m) in [(1, 32, 1), (7, 64, 3), (33, 96, 1), (300, 576, 9), (17, 1536, 2), (1000, 64, 5), (515, 1024, 8)] {
            let w = random_matrix(&mut rng, rows, cols);
            let mut x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            if m > 1 {
                x[..cols].iter_mut().for_each(|v| *v = 0.0); // an all-zero row: scale 0
            }
            let want = reference(&w, &x, m);
            let mut scalar = vec![f32::NAN; m * rows];
            w.matmul_with(&x, m, &mut scalar, Kernel::Scalar);
            // Against the reference: the same integer sums, floats added in another order.
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
            for (a, b) in scalar.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-5 * scale, "{rows}×{cols}, {m} rows: {a} against {b}");
            }
            // The SIMD kernel against the scalar one: bit for bit.
            let mut simd = vec![f32::NAN; m * rows];
            w.matmul_with(&x, m, &mut simd, Kernel::detect());
            assert!(simd.iter().zip(&scalar).all(|(a, b)| a.to_bits() == b.to_bits()), "{:?} {rows}×{cols}, {m} rows", Kernel::detect());
            // A row's result does not depend on the rows beside it in the pass.
            let mut alone = vec![0f32; rows];
            w.matmul(&x[(m - 1) * cols..], 1, &mut alone);
            assert!(alone.iter().zip(&simd[(m - 1) * rows..]).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn sizes_that_disagree_are_refused() {
        assert!(Q4_1Matrix::new(vec![0; 20], 1, 32).is_some());
        assert!(Q4_1Matrix::new(vec![0; 20], 1, 33).is_none());
        assert!(Q4_1Matrix::new(vec![0; 19], 1, 32).is_none());
    }
}
