//! Quantized matrix products for the CPU engine: GGUF's Q4_1 and Q8_0 weights times f32
//! activations, the way ggml computes them, laid out for SIMD.
//!
//! Each activation row is quantized to 8-bit blocks exactly as ggml quantizes it (32 signed
//! bytes, a scale and, for Q4_1, the scaled sum of the bytes), and each block pair's integer dot
//! product is exact. What differs from a loop of per-row dot products is the layout: at load,
//! the weights are repacked so that **eight rows are interleaved** block by block
//! ([`GROUP`]). Four bytes of each of the eight rows make one 32-byte vector, so one
//! `maddubs` against the activation's four bytes broadcast gives all eight rows' partial sums at
//! once, and a block ends as one vector of eight row sums: no horizontal sum, one fused
//! multiply-add scales eight rows, and the eight rows' f16 scales convert in one instruction.
//!
//! - A block's unpacked weights are reused across up to four activation rows held in registers
//!   (a batch of decode rows, or prefill), and prefill walks its rows in tiles that stay in L1
//!   while a thread's share of the weights stays in L2.
//! - The float sums run block by block per row, as ggml's reference does: the integer sum times
//!   `dw·dx`, then `mw·sx` for Q4_1, each a fused multiply-add into the row's accumulator. The
//!   AVX2 kernel and the scalar fallback compute the same operations in the same order and agree
//!   bit for bit (tested), and a row's result never depends on the other rows of the pass.
//! - The kernel is picked at run time (AVX2, FMA and F16C, or the scalar loop), and large
//!   products share their row groups out over rayon's threads.

use half::f16;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;
/// Weight rows interleaved in the packed layout.
pub const GROUP: usize = 8;

/// The weight formats the kernels take, in GGUF's block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Per block: f16 scale, f16 minimum, 16 bytes of 4-bit values (value `j` in the low nibble
    /// of byte `j`, value `16 + j` in its high nibble).
    Q4_1,
    /// Per block: f16 scale, 32 signed bytes.
    Q8_0,
}

impl Format {
    /// Bytes of one block in GGUF's layout.
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }

    /// Bytes of one packed block of a group: the eight rows' f16 scales (and minimums), then
    /// their quantized values interleaved four bytes at a time.
    fn packed_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 32 + 8 * 16,
            Format::Q8_0 => 16 + 8 * 32,
        }
    }

    /// Bytes of quantized values per row and block.
    fn value_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 16,
            Format::Q8_0 => 32,
        }
    }

    /// f16 scales per row and block (Q4_1's scale and minimum).
    fn scales(self) -> usize {
        match self {
            Format::Q4_1 => 2,
            Format::Q8_0 => 1,
        }
    }

    /// Copies one row's share of a packed block (`lane` of `src`) into `dst`'s lane `to`.
    fn copy_lane(self, src: &[u8], lane: usize, dst: &mut [u8], to: usize) {
        for s in 0..self.scales() {
            dst[s * 16 + 2 * to..][..2].copy_from_slice(&src[s * 16 + 2 * lane..][..2]);
        }
        let base = 16 * self.scales();
        for k in 0..self.value_bytes() / 4 {
            dst[base + 32 * k + 4 * to..][..4].copy_from_slice(&src[base + 32 * k + 4 * lane..][..4]);
        }
    }
}

/// A `[rows, cols]` weight matrix, repacked from GGUF's layout into groups of [`GROUP`] rows.
#[derive(Clone)]
pub struct QMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    /// Group `g`'s block `b` is at `(g · blocks + b) · packed_bytes`.
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {} × {})", self.format, self.rows, self.cols)
    }
}

/// Activation rows quantized to 8 bits per value: per block, 32 signed bytes, the scale and the
/// scaled sum of the bytes, both rounded through f16 as ggml stores them (Q8_1; Q8_0 is the
/// same without the sum).
struct Acts {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Acts {
    fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut out = Self { qs: vec![0; x.len()], d: vec![0.0; blocks], s: vec![0.0; blocks] };
        let chunks = out.qs.chunks_mut(QUANT_CHUNK).zip(out.d.chunks_mut(QUANT_CHUNK / BLOCK)).zip(out.s.chunks_mut(QUANT_CHUNK / BLOCK));
        if x.len() > QUANT_CHUNK {
            x.par_chunks(QUANT_CHUNK).zip(chunks.collect::<Vec<_>>()).for_each(|(x, ((qs, d), s))| quantize_blocks(x, qs, d, s));
        } else {
            for (x, ((qs, d), s)) in x.chunks(QUANT_CHUNK).zip(chunks) {
                quantize_blocks(x, qs, d, s);
            }
        }
        out
    }
}

/// Activation values quantized per task when a product's input is large (a prefill chunk).
const QUANT_CHUNK: usize = 64 * BLOCK;

/// [`Acts::quantize`] of a run of whole blocks. The largest magnitude is taken in eight lanes so
/// the loop vectorises; a maximum is the same in any order, so the result is too.
fn quantize_blocks(x: &[f32], qs: &mut [i8], ds: &mut [f32], ss: &mut [f32]) {
    for (((xs, qs), d_out), s_out) in x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK)).zip(ds).zip(ss) {
        let mut lanes = [0f32; 8];
        for c in xs.chunks_exact(8) {
            for (m, v) in lanes.iter_mut().zip(c) {
                *m = m.max(v.abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        let dh = f16::from_f32(d);
        *d_out = dh.to_f32();
        // ggml keeps the sum times the scale as an f16 product of two f16s.
        *s_out = (f16::from_f32(sum as f32) * dh).to_f32();
    }
}

impl QMatrix {
    /// Repacks `rows × cols / 32` blocks in GGUF's layout; `None` if the sizes disagree.
    pub fn from_ggml(format: Format, ggml: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let nb = cols / BLOCK;
        let (gb, vb) = (format.ggml_block_bytes(), format.value_bytes());
        if !cols.is_multiple_of(BLOCK) || cols == 0 || rows == 0 || ggml.len() != rows * nb * gb {
            return None;
        }
        let groups = rows.div_ceil(GROUP);
        let pb = format.packed_bytes();
        // Rows past the end of the last group stay zero: scale 0, so they add nothing and are
        // never written out.
        let mut data = vec![0u8; groups * nb * pb];
        let scales = format.scales();
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let src = &ggml[(r * nb + b) * gb..][..gb];
                let dst = &mut data[(g * nb + b) * pb..][..pb];
                for s in 0..scales {
                    dst[s * 16 + 2 * lane..][..2].copy_from_slice(&src[2 * s..2 * s + 2]);
                }
                let values = &src[2 * scales..];
                for k in 0..vb / 4 {
                    dst[16 * scales + 32 * k + 4 * lane..][..4].copy_from_slice(&values[4 * k..4 * k + 4]);
                }
            }
        }
        Some(Self { format, rows, cols, data })
    }

    /// The matrices' rows one after another (one product for layers that share their input);
    /// `None` unless they have one format and one width.
    pub fn stack(parts: &[&QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        let (format, cols) = (first.format, first.cols);
        if parts.iter().any(|p| p.format != format || p.cols != cols) {
            return None;
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let (nb, pb) = (first.blocks(), format.packed_bytes());
        let mut out = Self { format, rows, cols, data: vec![0u8; rows.div_ceil(GROUP) * nb * pb] };
        let mut to = 0;
        for p in parts {
            for r in 0..p.rows {
                for b in 0..nb {
                    let src = &p.data[((r / GROUP) * nb + b) * pb..][..pb];
                    let dst = &mut out.data[((to / GROUP) * nb + b) * pb..][..pb];
                    format.copy_lane(src, r % GROUP, dst, to % GROUP);
                }
                to += 1;
            }
        }
        Some(out)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// Group `g`'s packed blocks.
    fn group(&self, g: usize) -> &[u8] {
        let len = self.blocks() * self.format.packed_bytes();
        &self.data[g * len..(g + 1) * len]
    }

    /// `out[m × rows] = x[m × cols] · Wᵀ`, with the kernel this CPU runs best.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(x, m, out, Kernel::detect())
    }

    /// As [`QMatrix::matmul`] with a chosen kernel (tests compare them).
    pub fn matmul_with(&self, x: &[f32], m: usize, out: &mut [f32], kernel: Kernel) {
        assert_eq!(x.len(), m * self.cols, "activations of {m} rows of {}", self.cols);
        assert_eq!(out.len(), m * self.rows, "outputs of {m} rows of {}", self.rows);
        if m == 0 {
            return;
        }
        let acts = Acts::quantize(x);
        // Each task takes a run of row groups and writes their results for every activation row
        // into a buffer of its own (`[m × task rows]`), laid into `out` afterwards. The smallest
        // products run on this thread: handing them out costs more than it saves.
        let groups = self.rows.div_ceil(GROUP);
        let threads = rayon::current_num_threads();
        let tasks = if self.rows * self.cols * m < PARALLEL_MACS || threads == 1 { 1 } else { threads.min(groups) };
        let per_task = groups.div_ceil(tasks);
        let run = |first: usize| {
            let gs = first..(first + per_task).min(groups);
            let width = gs.len() * GROUP;
            let mut acc = vec![0f32; m * width];
            self.groups_times_rows(kernel, gs.clone(), &acts, m, &mut acc, width);
            (gs.start * GROUP, width, acc)
        };
        let parts: Vec<(usize, usize, Vec<f32>)> =
            if tasks == 1 { vec![run(0)] } else { (0..groups).step_by(per_task).collect::<Vec<_>>().into_par_iter().map(run).collect() };
        for (start, width, acc) in parts {
            let n = width.min(self.rows - start);
            for i in 0..m {
                out[i * self.rows + start..][..n].copy_from_slice(&acc[i * width..][..n]);
            }
        }
    }

    /// Row groups `gs` against every activation row: `acc[i · width + 8·(g − gs.start) + lane]`.
    /// Activation rows go in tiles of [`ROW_TILE`] (they stay in L1 while the task's groups pass
    /// over them), four at a time through the kernel.
    fn groups_times_rows(&self, kernel: Kernel, gs: std::ops::Range<usize>, acts: &Acts, m: usize, acc: &mut [f32], width: usize) {
        for tile in (0..m).step_by(ROW_TILE) {
            let tile_end = (tile + ROW_TILE).min(m);
            for g in gs.clone() {
                let w = self.group(g);
                let col = (g - gs.start) * GROUP;
                let mut i = tile;
                while i < tile_end {
                    let take = (tile_end - i).min(4);
                    let mut sums = [[0f32; GROUP]; 4];
                    match take {
                        4 => self.kernel::<4>(kernel, w, acts, [i, i + 1, i + 2, i + 3], &mut sums),
                        3 => self.kernel::<3>(kernel, w, acts, [i, i + 1, i + 2], (&mut sums[..3]).try_into().expect("3")),
                        2 => self.kernel::<2>(kernel, w, acts, [i, i + 1], (&mut sums[..2]).try_into().expect("2")),
                        _ => self.kernel::<1>(kernel, w, acts, [i], (&mut sums[..1]).try_into().expect("1")),
                    }
                    for (a, s) in sums[..take].iter().enumerate() {
                        acc[(i + a) * width + col..][..GROUP].copy_from_slice(s);
                    }
                    i += take;
                }
            }
        }
    }

    /// One group's eight rows times `NR` activation rows.
    #[inline(always)]
    fn kernel<const NR: usize>(&self, kernel: Kernel, w: &[u8], acts: &Acts, at: [usize; NR], out: &mut [[f32; GROUP]; NR]) {
        let nb = self.blocks();
        assert!(w.len() == nb * self.format.packed_bytes());
        assert!(at.iter().all(|&i| (i + 1) * nb <= acts.d.len()));
        match (kernel, self.format) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` is only chosen where the CPU reports AVX2, FMA and F16C
            // (`Kernel::detect`), and the sizes the kernels read by were asserted above.
            (Kernel::Avx2, Format::Q4_1) => unsafe { avx2::q4_1::<NR>(w, nb, acts, at, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Kernel::Avx2, Format::Q8_0) => unsafe { avx2::q8_0::<NR>(w, nb, acts, at, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Vnni` is only chosen where the CPU also reports AVX-VNNI; sizes as above.
            (Kernel::Vnni, Format::Q4_1) => unsafe { vnni::q4_1::<NR>(w, nb, acts, at, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Kernel::Vnni, Format::Q8_0) => unsafe { vnni::q8_0::<NR>(w, nb, acts, at, out) },
            (Kernel::Scalar, format) => scalar(format, w, nb, acts, &at, out),
        }
    }
}

/// Activation rows per tile: 32 rows of 1,536 values are 48 KB of bytes, of 576 values 18 KB.
const ROW_TILE: usize = 32;

/// Which integer dot product a matmul uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with AVX-VNNI's byte dot products.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    /// The fastest this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return if std::arch::is_x86_feature_detected!("avxvnni") { Kernel::Vnni } else { Kernel::Avx2 };
        }
        Kernel::Scalar
    }

    /// Every kernel this CPU can run, the scalar one first.
    pub fn available() -> Vec<Self> {
        let mut all = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        match Self::detect() {
            Kernel::Vnni => all.extend([Kernel::Avx2, Kernel::Vnni]),
            Kernel::Avx2 => all.push(Kernel::Avx2),
            Kernel::Scalar => {}
        }
        all
    }
}

/// Multiply-adds below which a product runs on the calling thread. Low enough that a decode
/// step's matrices (one activation row; the smallest, 192 × 576, is 110,592) are shared out: from
/// a rayon worker (the CPU engine runs its passes on one) a split costs a few microseconds, while
/// each half of a 576 × 1,536 row takes 30.
const PARALLEL_MACS: usize = 100_000;

fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

/// The kernels' arithmetic, one value at a time, in the order the AVX2 kernels compute it: per
/// block and row, the exact integer sum, then `acc = isum · (dw·dx) + acc` and, for Q4_1,
/// `acc = mw · sx + acc`, each rounded once.
fn scalar<const NR: usize>(format: Format, w: &[u8], nb: usize, acts: &Acts, at: &[usize; NR], out: &mut [[f32; GROUP]; NR]) {
    let pb = format.packed_bytes();
    for (a, &i) in at.iter().enumerate() {
        let mut acc = [0f32; GROUP];
        for b in 0..nb {
            let blk = &w[b * pb..][..pb];
            let xb = i * nb + b;
            let x = &acts.qs[xb * BLOCK..][..BLOCK];
            for (lane, acc) in acc.iter_mut().enumerate() {
                let dw = f16_at(blk, lane);
                let isum: i32 = match format {
                    Format::Q4_1 => (0..4)
                        .flat_map(|k| (0..4).map(move |j| (k, j)))
                        .map(|(k, j)| {
                            let byte = blk[32 + 32 * k + 4 * lane + j];
                            (byte & 0x0F) as i32 * x[4 * k + j] as i32 + (byte >> 4) as i32 * x[16 + 4 * k + j] as i32
                        })
                        .sum(),
                    Format::Q8_0 => (0..8)
                        .flat_map(|k| (0..4).map(move |j| (k, j)))
                        .map(|(k, j)| blk[16 + 32 * k + 4 * lane + j] as i8 as i32 * x[4 * k + j] as i32)
                        .sum(),
                };
                *acc = (isum as f32).mul_add(dw * acts.d[xb], *acc);
                if format == Format::Q4_1 {
                    *acc = f16_at(&blk[16..], lane).mul_add(acts.s[xb], *acc);
                }
            }
        }
        out[a] = acc;
    }
}

/// Asks the cache for `rows` runs of `len` elements of `data`, from `start` and `stride` apart
/// (the next key or value block of the CPU attention, whose rows are strided and whose blocks
/// are scattered, so the hardware prefetcher does not foresee them). A hint: nothing is read.
pub fn prefetch_rows<T>(data: &[T], start: usize, rows: usize, stride: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for j in 0..rows {
        let from = start + j * stride;
        if from + len > data.len() {
            break;
        }
        let p = data[from..].as_ptr() as *const u8;
        prefetch(p, len * std::mem::size_of::<T>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, start, rows, stride, len);
}

/// `dst[c · dst_stride + j] = src[j · src_stride + c]` for `j < n`, `c < d`: a block of `n`
/// rows of `d` floats turned into `d` rows of `n` (the CPU attention's key blocks, so that a
/// score row is a vector loop over keys). A pure copy: the result is the same whichever path
/// runs; with AVX2, 8 × 8 tiles are transposed in registers.
pub fn transpose(src: &[f32], src_stride: usize, n: usize, d: usize, dst: &mut [f32], dst_stride: usize) {
    if n == 0 || d == 0 {
        return;
    }
    assert!(n <= dst_stride && d <= src_stride, "strides shorter than the rows");
    assert!(src.len() >= (n - 1) * src_stride + d, "source of {n} rows of {d}");
    assert!(dst.len() >= (d - 1) * dst_stride + n, "destination of {d} rows of {n}");
    let (mut j0, mut c_tiled) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if Kernel::detect() != Kernel::Scalar {
        c_tiled = d / 8 * 8;
        while j0 + 8 <= n {
            for c0 in (0..c_tiled).step_by(8) {
                // SAFETY: AVX2 is present (checked above); rows `j0..j0 + 8` of the source hold
                // columns `c0..c0 + 8` (`j0 + 8 ≤ n`, `c0 + 8 ≤ d`, the length asserted), and the
                // destination's rows `c0..c0 + 8` hold columns `j0..j0 + 8` likewise.
                unsafe {
                    avx2::transpose8(
                        src.as_ptr().add(j0 * src_stride + c0),
                        src_stride,
                        dst.as_mut_ptr().add(c0 * dst_stride + j0),
                        dst_stride,
                    )
                };
            }
            j0 += 8;
        }
    }
    // What the tiles left: the last rows (every column), and the columns past the tiles.
    for j in 0..n {
        let cs = if j < j0 { c_tiled..d } else { 0..d };
        for c in cs {
            dst[c * dst_stride + j] = src[j * src_stride + c];
        }
    }
}

/// Bytes ahead of the block in use that the packed kernels ask the cache for. The weights stream
/// once per step and the hardware prefetcher alone leaves the kernels waiting on them.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 1024;

/// Asks for the cache lines of `len` bytes from `p` into L1. A hint: it reads nothing and cannot
/// fault, so `p` may point past the weights.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const u8, len: usize) {
    for off in (0..len).step_by(64).chain(std::iter::once(len - 1)) {
        // SAFETY: a prefetch hint touches no memory the program can observe.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(off) as *const i8) };
    }
}

/// The packed-group kernels, written once over the module's block-sum steps (`q4_step`,
/// `q4_end`, `q8_step`) and compiled for its target features.
///
/// Q4_1, per block: the eight rows' scales and minimums convert from f16 in one instruction
/// each; the values unpack once (low nibbles are values 0–15, high nibbles 16–31, four bytes per
/// row in each 32-byte vector) and serve every activation row, each step taking four bytes of
/// every row against the same four activation bytes broadcast. Q8_0 likewise, with signed values.
///
/// Safety of the functions made: the target features must be available; `w` holds `nb` packed
/// blocks of the format and every activation row `at[a]` has `nb` blocks in `acts`.
#[cfg(target_arch = "x86_64")]
macro_rules! quant_kernels {
    ($features:literal) => {
        /// Q4_1 group times `NR` activation rows (see [`quant_kernels`]).
        ///
        /// # Safety
        /// As the macro says.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn q4_1<const NR: usize>(w: &[u8], nb: usize, acts: &Acts, at: [usize; NR], out: &mut [[f32; GROUP]; NR]) {
            let mask = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); NR];
            let (wp, qs) = (w.as_ptr(), acts.qs.as_ptr());
            for b in 0..nb {
                // SAFETY: block `b` is the 160 bytes from `b · 160`, inside `w` (the caller's sizes).
                let p = unsafe { wp.add(b * 160) };
                prefetch(wp.wrapping_add(b * 160 + PREFETCH), 160);
                // SAFETY: the scales are the block's first 16 bytes, the minimums the next 16.
                let (dw, mw) = unsafe {
                    (_mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)), _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)))
                };
                let mut lo = [_mm256_setzero_si256(); 4];
                let mut hi = [_mm256_setzero_si256(); 4];
                for k in 0..4 {
                    // SAFETY: the values are the block's bytes 32..160, 32 per `k`.
                    let v = unsafe { _mm256_loadu_si256(p.add(32 + 32 * k) as *const __m256i) };
                    lo[k] = _mm256_and_si256(v, mask);
                    hi[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                }
                for a in 0..NR {
                    let xb = at[a] * nb + b;
                    // SAFETY: activation block `xb` is the 32 bytes from `xb · 32`, inside `acts.qs`.
                    let x = unsafe { qs.add(xb * BLOCK) };
                    let mut s = _mm256_setzero_si256();
                    for k in 0..4 {
                        // SAFETY: bytes `4k..4k + 4` and `16 + 4k..16 + 4k + 4` of the block.
                        let (xl, xh) = unsafe { (broadcast4(x.add(4 * k)), broadcast4(x.add(16 + 4 * k))) };
                        s = q4_step(s, lo[k], xl);
                        s = q4_step(s, hi[k], xh);
                    }
                    let sums = _mm256_cvtepi32_ps(q4_end(s));
                    acc[a] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, _mm256_set1_ps(acts.d[xb])), acc[a]);
                    acc[a] = _mm256_fmadd_ps(mw, _mm256_set1_ps(acts.s[xb]), acc[a]);
                }
            }
            for a in 0..NR {
                // SAFETY: `out[a]` is eight writable floats.
                unsafe { _mm256_storeu_ps(out[a].as_mut_ptr(), acc[a]) };
            }
        }

        /// Q8_0 group times `NR` activation rows (see [`quant_kernels`]).
        ///
        /// # Safety
        /// As the macro says.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn q8_0<const NR: usize>(w: &[u8], nb: usize, acts: &Acts, at: [usize; NR], out: &mut [[f32; GROUP]; NR]) {
            let mut acc = [_mm256_setzero_ps(); NR];
            let (wp, qs) = (w.as_ptr(), acts.qs.as_ptr());
            for b in 0..nb {
                // SAFETY: block `b` is the 272 bytes from `b · 272`, inside `w`.
                let p = unsafe { wp.add(b * 272) };
                prefetch(wp.wrapping_add(b * 272 + PREFETCH), 272);
                // SAFETY: the scales are the block's first 16 bytes.
                let dw = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) };
                for a in 0..NR {
                    let xb = at[a] * nb + b;
                    // SAFETY: activation block `xb` is inside `acts.qs`.
                    let x = unsafe { qs.add(xb * BLOCK) };
                    let mut s = _mm256_setzero_si256();
                    for k in 0..8 {
                        // SAFETY: the values are the block's bytes 16..272, 32 per `k`; the
                        // activation's bytes `4k..4k + 4` are inside its block.
                        let (v, xk) = unsafe { (_mm256_loadu_si256(p.add(16 + 32 * k) as *const __m256i), broadcast4(x.add(4 * k))) };
                        s = q8_step(s, v, xk);
                    }
                    acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(acts.d[xb])), acc[a]);
                }
            }
            for a in 0..NR {
                // SAFETY: `out[a]` is eight writable floats.
                unsafe { _mm256_storeu_ps(out[a].as_mut_ptr(), acc[a]) };
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{prefetch, Acts, BLOCK, GROUP, PREFETCH};

    /// Four activation bytes at `p`, in every 32-bit lane.
    ///
    /// # Safety
    /// `p..p + 4` must be readable, and AVX2 available.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn broadcast4(p: *const i8) -> __m256i {
        // SAFETY: the caller vouches for the four bytes; unaligned reads are allowed.
        _mm256_set1_epi32(unsafe { (p as *const i32).read_unaligned() })
    }

    /// The 8 × 8 tile at `src` (rows `src_stride` apart) written transposed at `dst` (rows
    /// `dst_stride` apart): unpack pairs, then quads, then swap 128-bit halves.
    ///
    /// # Safety
    /// AVX2 must be available; eight floats from each of `src + i · src_stride` and
    /// `dst + i · dst_stride`, `i < 8`, must be readable and writable respectively.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
        // SAFETY: the caller vouches for the eight source rows.
        let r: [__m256; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.add(i * src_stride)) });
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, v) in out.into_iter().enumerate() {
            // SAFETY: the caller vouches for the eight destination rows.
            unsafe { _mm256_storeu_ps(dst.add(i * dst_stride), v) };
        }
    }

    /// The block sums of the AVX2 kernels. Q4_1: each `maddubs` multiplies four unsigned
    /// nibbles of every row by the same four signed activation bytes, pairs summed into 16 bits
    /// (at most 2 · 15 · 127); eight of them added stay under 32,767, so the block's integer sums
    /// are exact after one `madd` at the end.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q4_step(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_add_epi16(s, _mm256_maddubs_epi16(w, x))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn q4_end(s: __m256i) -> __m256i {
        _mm256_madd_epi16(s, _mm256_set1_epi16(1))
    }

    /// Q8_0: `maddubs` takes an unsigned operand, so each weight byte's sign moves to its
    /// activation byte (`|w| · sign(w)·x`); a pair of products reaches 2 · 128 · 127, so each
    /// `maddubs` is widened to 32 bits at once.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q8_step(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let prod = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
        _mm256_add_epi32(s, _mm256_madd_epi16(prod, _mm256_set1_epi16(1)))
    }

    quant_kernels!("avx2,fma,f16c");
}

/// The same kernels where the CPU has AVX-VNNI: `vpdpbusd` multiplies unsigned by signed bytes
/// and adds each lane's four products into its 32-bit sum in one instruction, exactly, so the
/// integer sums (and every float after them) equal the AVX2 kernels' bit for bit.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::avx2::broadcast4;
    use super::{prefetch, Acts, BLOCK, GROUP, PREFETCH};

    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn q4_step(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(s, w, x)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn q4_end(s: __m256i) -> __m256i {
        s
    }

    #[inline]
    #[target_feature(enable = "avx2,avxvnni")]
    fn q8_step(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(s, _mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
    }

    quant_kernels!("avx2,fma,f16c,avxvnni");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random blocks in GGUF's layout: scales (and minimums) of either sign, every value.
    fn random_ggml(rng: &mut rand::rngs::StdRng, format: Format, rows: usize, cols: usize) -> Vec<u8> {
        let mut data = Vec::with_capacity(rows * cols / BLOCK * format.ggml_block_bytes());
        for _ in 0..rows * cols / BLOCK {
            data.extend_from_slice(&f16::from_f32(rng.random_range(-0.05..0.05)).to_le_bytes());
            match format {
                Format::Q4_1 => {
                    data.extend_from_slice(&f16::from_f32(rng.random_range(-0.5..0.5)).to_le_bytes());
                    data.extend((0..16).map(|_| rng.random::<u8>()));
                }
                // -128 included: its magnitude does not fit a signed byte.
                Format::Q8_0 => data.extend((0..32).map(|_| rng.random::<u8>())),
            }
        }
        data
    }

    /// ggml's reference, written out from the GGUF bytes: the same quantized activations, each
    /// block's integer sum, blocks summed in order.
    fn reference(format: Format, ggml: &[u8], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f32> {
        let q = Acts::quantize(x);
        let (nb, gb) = (cols / BLOCK, format.ggml_block_bytes());
        let mut out = vec![0f32; m * rows];
        for i in 0..m {
            for r in 0..rows {
                let mut sumf = 0f32;
                for b in 0..nb {
                    let blk = &ggml[(r * nb + b) * gb..][..gb];
                    let xb = i * nb + b;
                    let xs = &q.qs[xb * BLOCK..][..BLOCK];
                    let dw = f16_at(blk, 0);
                    sumf += match format {
                        Format::Q4_1 => {
                            let sumi: i32 = (0..16)
                                .map(|j| (blk[4 + j] & 0x0F) as i32 * xs[j] as i32 + (blk[4 + j] >> 4) as i32 * xs[j + 16] as i32)
                                .sum();
                            sumi as f32 * dw * q.d[xb] + f16_at(blk, 1) * q.s[xb]
                        }
                        Format::Q8_0 => {
                            let sumi: i32 = (0..32).map(|j| blk[2 + j] as i8 as i32 * xs[j] as i32).sum();
                            sumi as f32 * dw * q.d[xb]
                        }
                    };
                }
                out[i * rows + r] = sumf;
            }
        }
        out
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn kernels_agree_with_ggml_and_each_other() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Odd shapes: one block, row counts that leave partial groups and tasks, batches of 1 to
        // 37 rows (every remainder of four, more than one row tile), and products large enough
        // to be shared out over threads.
        for format in [Format::Q4_1, Format::Q8_0] {
            for (rows, cols, m) in
                [(1, 32, 1), (7, 64, 3), (33, 96, 1), (300, 576, 9), (17, 1536, 2), (1000, 64, 5), (515, 1024, 8), (20, 64, 37), (9, 32, 6)]
            {
                let ggml = random_ggml(&mut rng, format, rows, cols);
                let w = QMatrix::from_ggml(format, &ggml, rows, cols).expect("sizes agree");
                let mut x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
                if m > 1 {
                    x[..cols].iter_mut().for_each(|v| *v = 0.0); // an all-zero row: scale 0
                }
                let want = reference(format, &ggml, rows, cols, &x, m);
                let mut scalar = vec![f32::NAN; m * rows];
                w.matmul_with(&x, m, &mut scalar, Kernel::Scalar);
                // Against the reference: the same integer sums, floats rounded in another order.
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
                for (a, b) in scalar.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-5 * scale, "{format:?} {rows}×{cols}, {m} rows: {a} against {b}");
                }
                // Every SIMD kernel this CPU runs against the scalar one: bit for bit.
                let mut simd = vec![f32::NAN; m * rows];
                for kernel in Kernel::available() {
                    w.matmul_with(&x, m, &mut simd, kernel);
                    assert!(same_bits(&simd, &scalar), "{format:?} {kernel:?} {rows}×{cols}, {m} rows");
                }
                // A row's result does not depend on the rows beside it in the pass.
                for i in [0, m - 1] {
                    let mut alone = vec![0f32; rows];
                    w.matmul(&x[i * cols..(i + 1) * cols], 1, &mut alone);
                    assert!(same_bits(&alone, &simd[i * rows..(i + 1) * rows]), "{format:?} {rows}×{cols}, row {i} of {m}");
                }
            }
        }
    }

    /// Stacked matrices compute what each computes alone, whatever their row counts.
    #[test]
    fn stacked_matrices_compute_their_parts() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for format in [Format::Q4_1, Format::Q8_0] {
            let (cols, m) = (96, 5);
            let parts: Vec<(usize, Vec<u8>)> = [13usize, 8, 3].iter().map(|&r| (r, random_ggml(&mut rng, format, r, cols))).collect();
            let ms: Vec<QMatrix> = parts.iter().map(|(r, g)| QMatrix::from_ggml(format, g, *r, cols).expect("sizes")).collect();
            let stacked = QMatrix::stack(&ms.iter().collect::<Vec<_>>()).expect("one format, one width");
            assert_eq!(stacked.rows(), 24);
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            let mut all = vec![0f32; m * 24];
            stacked.matmul(&x, m, &mut all);
            let mut at = 0;
            for w in &ms {
                let mut one = vec![0f32; m * w.rows()];
                w.matmul(&x, m, &mut one);
                for i in 0..m {
                    assert!(same_bits(&one[i * w.rows()..][..w.rows()], &all[i * 24 + at..][..w.rows()]), "{format:?} part at {at}");
                }
                at += w.rows();
            }
        }
        let a = QMatrix::from_ggml(Format::Q4_1, &[0; 20], 1, 32).expect("sizes");
        let b = QMatrix::from_ggml(Format::Q8_0, &[0; 34], 1, 32).expect("sizes");
        assert!(QMatrix::stack(&[&a, &b]).is_none(), "formats differ");
    }

    /// The transposed copy holds every element where the definition puts it, for sizes with and
    /// without whole 8 × 8 tiles, and leaves the padding alone.
    #[test]
    fn transpose_moves_every_element() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (n, d, src_stride, dst_stride) in
            [(16, 64, 192, 16), (13, 64, 64, 16), (8, 8, 8, 8), (5, 3, 7, 9), (17, 12, 12, 24), (1, 64, 64, 1)]
        {
            let src: Vec<f32> = (0..(n - 1) * src_stride + d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut dst = vec![f32::NAN; (d - 1) * dst_stride + n];
            transpose(&src, src_stride, n, d, &mut dst, dst_stride);
            for c in 0..d {
                for j in 0..dst_stride.min(dst.len() - c * dst_stride) {
                    let got = dst[c * dst_stride + j];
                    if j < n {
                        assert_eq!(got.to_bits(), src[j * src_stride + c].to_bits(), "n {n} d {d} ({j}, {c})");
                    } else {
                        assert!(got.is_nan(), "padding written at n {n} d {d} ({j}, {c})");
                    }
                }
            }
        }
    }

    #[test]
    fn sizes_that_disagree_are_refused() {
        assert!(QMatrix::from_ggml(Format::Q4_1, &[0; 20], 1, 32).is_some());
        assert!(QMatrix::from_ggml(Format::Q4_1, &[0; 20], 1, 33).is_none());
        assert!(QMatrix::from_ggml(Format::Q4_1, &[0; 19], 1, 32).is_none());
        assert!(QMatrix::from_ggml(Format::Q8_0, &[0; 68], 2, 32).is_some());
        assert!(QMatrix::from_ggml(Format::Q8_0, &[0; 68], 1, 32).is_none());
        assert!(QMatrix::from_ggml(Format::Q8_0, &[], 0, 32).is_none());
    }
}
