//! One GPU as the engine sees it: a context, one stream that every launch and copy goes through
//! (so stream order is the only synchronisation needed, and CUDA graphs can capture a whole
//! step), a cuBLAS handle with a fixed workspace, and the compiled kernels.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::{CudaError, Result};

const KERNELS: &str = include_str!("kernels.cu");

/// A device allocation with its raw address (kernels take addresses, not typed slices).
pub struct Buf {
    _slice: Backing,
    pub ptr: u64,
    pub bytes: usize,
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl Buf {
    /// Address `elems` elements of `size` bytes past the start.
    pub fn at(&self, elems: usize, size: usize) -> u64 {
        debug_assert!(elems * size <= self.bytes);
        self.ptr + (elems * size) as u64
    }
}

/// Most tokens the matrix-vector kernels take; larger batches go to cuBLAS (measured on an
/// H200: at 8 tokens the per-warp re-reads of the input make the kernel several times slower
/// than cuBLAS).
pub const GEMV_MAX: usize = 2;
/// Shared memory the fused matrix-vector kernels may stage their input rows in (bf16).
const GEMV_FUSED_SMEM: usize = 96 << 10;
// The widest input of the shapes served (Llama 3.1 8B's down projection, 14,336 columns) fits
// for every token count the kernels take.
const _: () = assert!(GEMV_MAX * 14_336 * 2 <= GEMV_FUSED_SMEM);

/// The output mode the matrix-vector and split-K reduction kernels take: 0 bf16, 1 f32,
/// 2 f32 added to what is there (the residual).
fn out_mode(out: Dt, accumulate: bool) -> Result<i32> {
    match (out, accumulate) {
        (Dt::Bf16, false) => Ok(0),
        (Dt::F32, false) => Ok(1),
        (Dt::F32, true) => Ok(2),
        (Dt::Bf16, true) => Err(CudaError::Unsupported("bf16 accumulate".into())),
    }
}

/// K slices for a GEMM of `m` weight rows, `n` tokens and depth `k` on `sms` multiprocessors: 1
/// where its 128×128 output tiles already give every multiprocessor one, else the power of two
/// (at most 8) that brings the tile count up to about one a multiprocessor, each slice at least
/// 256 deep and a multiple of 64, the partial products within the scratch buffer.
pub fn split_k_slices(m: usize, n: usize, k: usize, sms: usize) -> usize {
    let tiles = m.div_ceil(128) * n.div_ceil(128);
    let mut s = 1;
    while s < 8 && tiles * s * 2 <= sms {
        s *= 2;
    }
    while s > 1 && (!k.is_multiple_of(s * 64) || k / s < 256 || s * m * n * 4 > SPLIT_SCRATCH_BYTES || !(m * n).is_multiple_of(4)) {
        s /= 2;
    }
    s
}

/// The stage a fused matrix-vector kernel computes its input with ([`Gpu::gemv_fused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prologue {
    /// RMSNorm of the f32 residual rows times the norm weight.
    Norm,
    /// SiLU(gate) · up of the gate|up rows.
    SiluMul,
}

/// Element type of a GEMM operand or result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    Bf16,
    F32,
}

impl Dt {
    fn cuda(self) -> blas_sys::cudaDataType {
        match self {
            Dt::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            Dt::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// How a model's projection matrices are stored on the device (`TANDEM_CUDA_WEIGHTS=bf16|fp8`).
/// The embedding, the LM head and the norms stay bf16 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    #[default]
    Bf16,
    /// E4M3 with one f32 scale per output row (per output channel), quantised at load from the
    /// bf16 weights: half the bytes a decode step reads.
    Fp8,
}

impl WeightFormat {
    /// The format `TANDEM_CUDA_WEIGHTS` names; bf16 when unset. An unknown name is an error,
    /// not a silent bf16.
    pub fn from_env() -> Result<Self> {
        match std::env::var("TANDEM_CUDA_WEIGHTS") {
            Err(_) => Ok(Self::Bf16),
            Ok(v) => Self::parse(&v),
        }
    }

    pub fn parse(v: &str) -> Result<Self> {
        match v {
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            other => Err(CudaError::Unsupported(format!("weight format {other:?} (bf16 or fp8)"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
        }
    }
}

/// A projection's weights on the device, row-major `[rows × cols]`: bf16, or E4M3 bytes with one
/// f32 scale per row ([`WeightFormat::Fp8`]).
#[derive(Debug)]
pub struct Matrix {
    pub data: Buf,
    pub scale: Option<Buf>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn bytes(&self) -> usize {
        self.data.bytes + self.scale.as_ref().map_or(0, |s| s.bytes)
    }

    pub fn format(&self) -> WeightFormat {
        if self.scale.is_some() {
            WeightFormat::Fp8
        } else {
            WeightFormat::Bf16
        }
    }
}

/// Most tokens the CUDA-core FP8 matrix-vector kernel (`gemv_fp8_{n}`) is compiled for.
pub const GEMV_FP8_KERNELS: usize = 8;
/// Most tokens the tensor-core FP8 matrix-vector kernel (`gemv_fp8_mma_{8,16}`) takes.
pub const GEMV_FP8_MMA_MAX: usize = 16;
/// Most tokens FP8 projections run through an FP8 matrix-vector kernel by default
/// (`TANDEM_CUDA_FP8_GEMV_MAX` overrides, up to [`GEMV_FP8_MMA_MAX`]); larger passes run
/// cuBLASLt's FP8 GEMM (or widen the weights to bf16 and run cuBLAS).
pub const GEMV_FP8_MAX: usize = 16;

/// Most tokens the mid-sized FP8 GEMM (`gemm_fp8_rows_*`, [`Fp8Mid`]) takes: passes past the
/// matrix-vector kernel and up to this size run it, larger ones cuBLASLt's FP8 GEMM.
pub const GEMM_FP8_MID_MAX: usize = 64;

/// Matrices of at most this many weights run the mid-sized FP8 GEMM past 32 tokens whatever
/// their shape ([`Fp8Mid::Auto`]).
pub const FP8_MID_SMALL: usize = 1 << 23;

/// Which form of the mid-sized FP8 GEMM runs (`TANDEM_CUDA_FP8_MID=auto|off|direct|rows|rowsb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Mid {
    /// By the matrix's shape, as measured on an H200 (docs/cuda-engine.md): up to 32 tokens,
    /// matrices deeper than they are tall (down) take [`Fp8Mid::RowsB`] and the others
    /// [`Fp8Mid::Rows`]; past 32 tokens [`Fp8Mid::RowsB`] takes matrices at least as deep as
    /// tall (O, down) or of at most [`FP8_MID_SMALL`] weights (1B's Q/K/V), and cuBLASLt's FP8
    /// GEMM the others (8B's Q/K/V, gate/up), where it is faster.
    Auto,
    /// Not at all: cuBLASLt's FP8 GEMM takes every pass past the matrix-vector kernel.
    Off,
    /// The first form: a block's warps split its K slice, each over four row tiles (two past 32
    /// tokens) with its input fragments read from the caches at every step, their sums added
    /// in shared memory (`gemm_fp8_mma_{32,64}`).
    Direct,
    /// Each warp owns its rows over the block's whole K slice (one row tile up to 32 tokens, two
    /// past), the input staged once per block in shared memory by cp.async
    /// (`gemm_fp8_rows_{32,64}`).
    Rows,
    /// The row-owning form with eight steps in flight a warp up to 32 tokens, and one row tile
    /// a warp past 32 (`gemm_fp8_rows_32_u8`, `gemm_fp8_rows_64_r1`).
    RowsB,
}

impl Fp8Mid {
    pub fn from_env() -> Result<Self> {
        match std::env::var("TANDEM_CUDA_FP8_MID").as_deref() {
            Err(_) | Ok("auto") => Ok(Self::Auto),
            Ok("rows") => Ok(Self::Rows),
            Ok("0") | Ok("off") => Ok(Self::Off),
            Ok("direct") => Ok(Self::Direct),
            Ok("rowsb") => Ok(Self::RowsB),
            Ok(v) => Err(CudaError::Unsupported(format!("TANDEM_CUDA_FP8_MID={v} (auto, off, direct, rows or rowsb)"))),
        }
    }

    /// The form that runs `n` tokens through a `rows × cols` matrix: [`Fp8Mid::Auto`]'s
    /// choice, else itself.
    pub fn for_shape(self, rows: usize, cols: usize, n: usize) -> Self {
        match self {
            Self::Auto if n > 32 || cols > rows => Self::RowsB,
            Self::Auto => Self::Rows,
            f => f,
        }
    }

    /// Whether this choice runs `n` tokens through a `rows × cols` matrix at all (else
    /// cuBLASLt's FP8 GEMM does).
    pub fn takes(self, rows: usize, cols: usize, n: usize) -> bool {
        match self {
            Self::Off => false,
            Self::Auto => n <= 32 || cols >= rows || rows * cols <= FP8_MID_SMALL,
            _ => true,
        }
    }

    /// Rows a block of this form takes for `n` tokens.
    pub fn block_rows(self, n: usize) -> usize {
        match self {
            Self::Off | Self::Direct if n <= 32 => 64,
            Self::Off | Self::Direct => 32,
            Self::Auto | Self::Rows if n <= 32 => 128,
            Self::Auto | Self::Rows => 256,
            Self::RowsB => 128,
        }
    }

    /// Input columns a row-owning block stages at a time for `n` tokens (the K slice must be a
    /// multiple); 64 for the first form, which stages nothing.
    pub fn chunk(self, n: usize) -> usize {
        match self {
            Self::Off | Self::Direct => 64,
            _ if n <= 32 => 512,
            _ => 256,
        }
    }

    /// Dynamic shared memory of a block for `n` tokens: two chunks of the input for every token
    /// of the kernel's width (32 or 64), rows padded by 8 elements.
    pub fn shared_bytes(self, n: usize) -> u32 {
        let width = if n <= 32 { 32 } else { 64 };
        match self {
            Self::Off | Self::Direct => 0,
            _ => (2 * width * (self.chunk(n) + 8) * 2) as u32,
        }
    }
}

/// K slices of the mid-sized FP8 GEMM for `rows × cols` weights and `n` tokens, `block_rows` a
/// block, on `sms` multiprocessors: doubled (up to 8) while there are no more blocks than
/// multiprocessors (two blocks of the row-owning form fit on one), each slice a multiple of 512
/// deep, the partial products within the scratch buffer, and rows a multiple of 4 (the
/// reduction's vector width). Measured on an H200 for 8B's matrices at 32 tokens: O 12.3 µs in
/// 256 blocks against 13.3 in 128; Q/K/V 15.9 in 192 against 18.3 in 384 and 18.9 in 96.
pub fn fp8_mid_splits(block_rows: usize, rows: usize, cols: usize, n: usize, sms: usize) -> usize {
    let blocks = rows.div_ceil(block_rows);
    let mut s = 1;
    while s < 8 && blocks * s <= sms && fp8_mid_slices_fit(rows, cols, n, 2 * s) {
        s *= 2;
    }
    s
}

/// Whether the mid-sized FP8 GEMM can cut K into `s` slices for `rows × cols` weights and `n`
/// tokens: one always; more where each slice is a multiple of 512 deep, the partial products fit
/// the scratch buffer and rows are a multiple of 4.
fn fp8_mid_slices_fit(rows: usize, cols: usize, n: usize, s: usize) -> bool {
    s == 1 || (cols.is_multiple_of(s * 512) && s * n * rows * 4 <= SPLIT_SCRATCH_BYTES && rows.is_multiple_of(4))
}

/// Variants of the tensor-core FP8 matrix-vector kernel for up to 8 tokens
/// (`TANDEM_CUDA_FP8_MMA=u8|w4|sx`): eight steps in flight a warp instead of four; four warps a
/// block instead of eight; the input staged in shared memory (where it fits [`FP8_SX_SMEM`]).
pub const FP8_MMA_VARIANTS: [&str; 3] = ["u8", "w4", "sx"];
/// Which form of the FP8 kernels runs a projection of up to 8 tokens (`TANDEM_CUDA_FP8_MMA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Mma {
    /// By the matrix's shape, as measured in whole decode passes on an H200
    /// (docs/cuda-engine.md): eight steps in flight for up to 4,096 rows (256 blocks or fewer,
    /// too few warps to keep the memory busy otherwise), four-warp blocks from 16,384 rows, the
    /// first form in between.
    Auto,
    /// The first tensor-core form for every shape.
    Base,
    /// One of [`FP8_MMA_VARIANTS`] for every shape.
    Variant(usize),
}

/// The variant [`Fp8Mma::Auto`] takes for a matrix of `rows` (`None`: the first form).
fn auto_fp8_variant(rows: usize) -> Option<usize> {
    if rows <= 4096 {
        Some(0)
    } else if rows >= 16384 {
        Some(1)
    } else {
        None
    }
}

/// Most dynamic shared memory the staged-input variant takes.
pub const FP8_SX_SMEM: usize = 96 * 1024;

/// Which FP8 matrix-vector kernel runs (`TANDEM_CUDA_FP8_GEMV=simt|mma`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Gemv {
    /// Weights widened one at a time by bit moves, products on the CUDA cores (the first form).
    Simt,
    /// Weights widened in pairs to bf16, products on the tensor cores (the default).
    Mma,
}

/// Which prefill attention kernel a pass launches (`TANDEM_CUDA_PREFILL_ATTENTION=staged|wide`;
/// the staged form is the first one, kept to measure against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillAttention {
    /// K staged row-major and V transposed by scalar stores, one tile at a time.
    Staged,
    /// cp.async two tiles deep, ldmatrix operands, mask only on diagonal tiles, heaviest first.
    Pipelined,
    /// The pipelined kernel with 128 query rows a block and 32 a warp, Q staged in shared memory:
    /// each K/V fragment feeds two row groups.
    Wide,
}

/// Passes of at least this many tokens take the wide prefill kernel by default: measured on an
/// H200, it is 6–13% faster at 8,192 tokens, about even at 2,048 and 3–5% slower at 512.
pub const WIDE_FROM_TOKENS: usize = 2048;

impl PrefillAttention {
    /// The kernel `TANDEM_CUDA_PREFILL_ATTENTION` names (`staged`, `pipelined`, `wide`); `None`
    /// when unset, to choose by pass size ([`PrefillAttention::for_pass`]).
    pub fn from_env() -> Option<Self> {
        match std::env::var("TANDEM_CUDA_PREFILL_ATTENTION").as_deref() {
            Ok("staged") => Some(Self::Staged),
            Ok("pipelined") => Some(Self::Pipelined),
            Ok("wide") => Some(Self::Wide),
            _ => None,
        }
    }

    /// The kernel for a pass of `tokens` query tokens: `chosen` where set, else the wide kernel
    /// from [`WIDE_FROM_TOKENS`] and the pipelined one below.
    pub fn for_pass(chosen: Option<Self>, tokens: usize) -> Self {
        chosen.unwrap_or(if tokens >= WIDE_FROM_TOKENS { Self::Wide } else { Self::Pipelined })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staged => "staged",
            Self::Pipelined => "pipelined",
            Self::Wide => "wide",
        }
    }

    /// Dynamic shared memory of a block: two stages of 64 K rows and 64 V rows of `hd + 8` bf16,
    /// and for the wide kernel 128 Q rows before them. On an FP8 cache (`fp8`), one bf16 stage
    /// and two raw ones, each 64 K and 64 V rows of `hd` bytes and every thread's scales (a
    /// thread copies those of its own chunks: 64 · hd / 2 bytes a stage).
    pub fn shared_bytes(self, hd: usize, fp8: bool) -> u32 {
        let tile = crate::plan::TILE_ROWS;
        let stages = if fp8 { 1 } else { 2 };
        let rows = match self {
            Self::Staged => return 0,
            Self::Pipelined => stages * 2 * tile,
            Self::Wide => 2 * tile + stages * 2 * tile,
        };
        let raw = if fp8 { 2 * (2 * tile * hd + tile * hd / 2) } else { 0 };
        (rows * (hd + 8) * 2 + raw) as u32
    }
}

/// Key tiles the tensor-core decode kernel keeps in flight on an FP8 cache (the kernel's
/// `DEC8_DEPTH`): its tiles carry half the bytes of bf16 ones.
pub const DECODE_FP8_DEPTH: usize = 4;

/// Which decode attention kernel a pass launches (`TANDEM_CUDA_DECODE_ATTENTION=lanes|mma`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeAttention {
    /// CUDA-core lanes, 16-byte loads straight from the cache: all keys of the split, the
    /// softmax, then all values.
    Lanes,
    /// Tensor cores, the group's heads as tile rows, K/V streamed through shared memory by
    /// cp.async two tiles deep.
    Mma,
}

impl DecodeAttention {
    pub fn from_env() -> Self {
        match std::env::var("TANDEM_CUDA_DECODE_ATTENTION").as_deref() {
            Ok("lanes") => Self::Lanes,
            _ => Self::Mma,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lanes => "lanes",
            Self::Mma => "mma",
        }
    }

    /// Dynamic shared memory of a block: as the pipelined prefill kernel's on a bf16 cache; on an
    /// FP8 one, one stage of 64 K and 64 V rows of `hd + 8` f16, then [`DECODE_FP8_DEPTH`] raw
    /// stages of 64 K and 64 V rows of `hd` bytes and their 128 f32 scales.
    pub fn shared_bytes(self, hd: usize, fp8: bool) -> u32 {
        let tile = crate::plan::TILE_ROWS;
        match (self, fp8) {
            (Self::Lanes, _) => 0,
            (Self::Mma, false) => PrefillAttention::Pipelined.shared_bytes(hd, false),
            (Self::Mma, true) => (2 * tile * (hd + 8) * 2 + DECODE_FP8_DEPTH * 2 * tile * (hd + 4)) as u32,
        }
    }
}

pub struct Kernels {
    _module: Arc<CudaModule>,
    pub fill: CudaFunction,
    pub embed: CudaFunction,
    pub rms_norm: CudaFunction,
    pub silu_mul: CudaFunction,
    pub rope_store: CudaFunction,
    /// `decode_attention[hd_index * 8 + group - 1]`, hd_index 0 for 64 and 1 for 128. Grid
    /// (kv heads, sequences, splits).
    pub decode_attention: Vec<CudaFunction>,
    /// The tensor-core form, indexed as `decode_attention`; see [`DecodeAttention`].
    pub decode_attention_mma: Vec<CudaFunction>,
    /// The attention kernels' forms that read an FP8 cache (`_f8`), indexed as those above.
    pub decode_attention_f8: Vec<CudaFunction>,
    pub decode_attention_mma_f8: Vec<CudaFunction>,
    pub prefill_attention_f8: [CudaFunction; 2],
    pub prefill_attention_pipelined_f8: [CudaFunction; 2],
    pub prefill_attention_wide_f8: [CudaFunction; 2],
    pub fp8_clear_nan: CudaFunction,
    pub attn_combine: CudaFunction,
    /// Prefill attention, `[hd 64, hd 128]`: the first form (synchronous staging, grid (tiles,
    /// heads)) and the pipelined one (cp.async two tiles deep, ldmatrix, grid (heads, tiles),
    /// dynamic shared memory); see [`PrefillAttention`].
    pub prefill_attention: [CudaFunction; 2],
    pub prefill_attention_pipelined: [CudaFunction; 2],
    pub prefill_attention_wide: [CudaFunction; 2],
    /// `gemv[n - 1]`: the matrix-vector kernel for n tokens.
    pub gemv: Vec<CudaFunction>,
    /// `gemv_norm[n - 1]`, `gemv_silu[n - 1]`: the matrix-vector kernel with the RMSNorm or the
    /// SiLU·mul before it in its prologue; see [`Gpu::gemv_fused`].
    pub gemv_norm: Vec<CudaFunction>,
    pub gemv_silu: Vec<CudaFunction>,
    pub splitk_reduce: CudaFunction,
    /// `gemv_fp8[n - 1]`: the matrix-vector kernel on FP8 weights for n tokens.
    pub gemv_fp8: Vec<CudaFunction>,
    /// The tensor-core form for up to 8 and up to 16 tokens.
    pub gemv_fp8_mma: [CudaFunction; 2],
    /// Its variants for up to 8 tokens, measured against it ([`FP8_MMA_VARIANTS`]).
    pub gemv_fp8_mma_variants: [CudaFunction; 3],
    /// The mid-sized FP8 GEMM for up to 32 and up to 64 tokens ([`GEMM_FP8_MID_MAX`]): the
    /// first form ([`Fp8Mid::Direct`]), and the row-owning ones ([`Fp8Mid::Rows`] at indices
    /// 0 and 1, [`Fp8Mid::RowsB`] at 2 and 3).
    pub gemm_fp8_mma: [CudaFunction; 2],
    pub gemm_fp8_rows: [CudaFunction; 4],
    pub quantize_fp8: CudaFunction,
    pub dequantize_fp8: CudaFunction,
    pub argmax: CudaFunction,
    pub sample: CudaFunction,
    pub block_checksum: CudaFunction,
}

/// The architecture the kernels are compiled for, as `10 · major + minor`: the device's, or an
/// older one that `TANDEM_CUDA_ARCH` names (`sm_80`, `sm_86`, `sm_89`), so that one GPU can
/// run and check the code paths of another (the E4M3 widening of sm_80 and sm_86, no
/// programmatic dependent launch before sm_90). Compute capability 8.0 is the floor: bf16
/// tensor cores.
pub fn kernel_arch(device: (i32, i32), named: Option<&str>) -> Result<u32> {
    let (major, minor) = device;
    if major < 8 {
        return Err(CudaError::Unsupported(format!("compute capability {major}.{minor}: bf16 tensor cores need 8.0 or newer")));
    }
    let own = (major * 10 + minor) as u32;
    let Some(v) = named else { return Ok(own) };
    match v.strip_prefix("sm_").and_then(|n| n.parse::<u32>().ok()) {
        Some(a) if (80..=own).contains(&a) => Ok(a),
        _ => Err(CudaError::Unsupported(format!("TANDEM_CUDA_ARCH={v}: sm_80 up to this device's sm_{own}"))),
    }
}

/// PTX per architecture, compiled once per process.
fn ptx_for(arch: &str) -> Result<Ptx> {
    static CACHE: OnceLock<Mutex<Vec<(String, String)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    let mut cache = cache.lock().expect("ptx cache lock");
    if let Some((_, src)) = cache.iter().find(|(a, _)| a == arch) {
        return Ok(Ptx::from_src(src.clone()));
    }
    let started = std::time::Instant::now();
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
        fmad: Some(true),
        name: Some("tandem_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts).map_err(|e| CudaError::Compile(e.to_string()))?;
    tracing::info!(arch, ms = started.elapsed().as_millis() as u64, "compiled kernels with NVRTC");
    cache.push((arch.to_string(), ptx.to_src()));
    Ok(ptx)
}

impl Kernels {
    /// Registers, local (spilled) bytes and static shared bytes of the main kernels, from the
    /// driver: spills or register-starved occupancy show up here without a profiler.
    pub fn resources(&self) -> Vec<(String, i32, i32, i32)> {
        let mut named: Vec<(String, &CudaFunction)> = vec![
            ("rope_store".into(), &self.rope_store),
            ("attn_combine".into(), &self.attn_combine),
            ("prefill_attention_64".into(), &self.prefill_attention[0]),
            ("prefill_attention_128".into(), &self.prefill_attention[1]),
            ("prefill_attention_pipelined_64".into(), &self.prefill_attention_pipelined[0]),
            ("prefill_attention_pipelined_128".into(), &self.prefill_attention_pipelined[1]),
            ("prefill_attention_wide_64".into(), &self.prefill_attention_wide[0]),
            ("prefill_attention_wide_128".into(), &self.prefill_attention_wide[1]),
            ("gemv_1".into(), &self.gemv[0]),
            ("gemv_fp8_1".into(), &self.gemv_fp8[0]),
            ("gemv_fp8_4".into(), &self.gemv_fp8[3]),
            ("gemv_fp8_mma_8".into(), &self.gemv_fp8_mma[0]),
            ("gemv_fp8_mma_16".into(), &self.gemv_fp8_mma[1]),
            ("gemm_fp8_mma_32".into(), &self.gemm_fp8_mma[0]),
            ("gemm_fp8_mma_64".into(), &self.gemm_fp8_mma[1]),
            ("gemm_fp8_rows_32".into(), &self.gemm_fp8_rows[0]),
            ("gemm_fp8_rows_64".into(), &self.gemm_fp8_rows[1]),
            ("gemm_fp8_rows_32_u8".into(), &self.gemm_fp8_rows[2]),
            ("gemm_fp8_rows_64_r1".into(), &self.gemm_fp8_rows[3]),
            ("sample_rows".into(), &self.sample),
        ];
        for (i, f) in self.decode_attention.iter().enumerate() {
            named.push((format!("decode_attention_{}_{}", if i < 8 { 64 } else { 128 }, i % 8 + 1), f));
        }
        named
            .into_iter()
            .map(|(n, f)| (n, f.num_regs().unwrap_or(-1), f.local_size_bytes().unwrap_or(-1), f.shared_size_bytes().unwrap_or(-1)))
            .collect()
    }

    fn load(ctx: &Arc<CudaContext>, arch: u32) -> Result<Self> {
        let module = ctx.load_module(ptx_for(&format!("sm_{arch}"))?)?;
        let f = |name: &str| module.load_function(name).map_err(CudaError::from);
        // A kernel that takes more than the default 48 KiB of dynamic shared memory.
        let big = |name: &str, bytes: u32| -> Result<CudaFunction> {
            let func = f(name)?;
            func.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)?;
            Ok(func)
        };
        let fused = |name: &str| -> Result<Vec<CudaFunction>> {
            (1..=GEMV_MAX).map(|n| big(&format!("{name}_{n}"), GEMV_FUSED_SMEM as u32)).collect()
        };
        let prefill = |which: PrefillAttention, name: &str, fp8: bool| -> Result<[CudaFunction; 2]> {
            Ok([big(&format!("{name}_64"), which.shared_bytes(64, fp8))?, big(&format!("{name}_128"), which.shared_bytes(128, fp8))?])
        };
        let decode = |name: &str, which: DecodeAttention, fp8: bool| -> Result<Vec<CudaFunction>> {
            [64, 128]
                .into_iter()
                .flat_map(|hd| (1..=8).map(move |g| (hd, g)))
                .map(|(hd, g)| big(&format!("{name}_{hd}_{g}"), which.shared_bytes(hd, fp8)))
                .collect()
        };
        Ok(Self {
            fill: f("fill_uniform_bf16")?,
            embed: f("embed")?,
            rms_norm: f("rms_norm")?,
            silu_mul: f("silu_mul")?,
            rope_store: f("rope_store")?,
            decode_attention: decode("decode_attention", DecodeAttention::Lanes, false)?,
            decode_attention_mma: decode("decode_attention_mma", DecodeAttention::Mma, false)?,
            decode_attention_f8: decode("decode_attention_f8", DecodeAttention::Lanes, true)?,
            decode_attention_mma_f8: decode("decode_attention_mma_f8", DecodeAttention::Mma, true)?,
            attn_combine: f("attn_combine")?,
            prefill_attention: [f("prefill_attention_64")?, f("prefill_attention_128")?],
            prefill_attention_pipelined: prefill(PrefillAttention::Pipelined, "prefill_attention_pipelined", false)?,
            prefill_attention_wide: prefill(PrefillAttention::Wide, "prefill_attention_wide", false)?,
            prefill_attention_f8: [f("prefill_attention_f8_64")?, f("prefill_attention_f8_128")?],
            prefill_attention_pipelined_f8: prefill(PrefillAttention::Pipelined, "prefill_attention_pipelined_f8", true)?,
            prefill_attention_wide_f8: prefill(PrefillAttention::Wide, "prefill_attention_wide_f8", true)?,
            fp8_clear_nan: f("fp8_clear_nan")?,
            gemv: (1..=GEMV_MAX).map(|n| f(&format!("gemv_{n}"))).collect::<Result<_>>()?,
            gemv_norm: fused("gemv_norm")?,
            splitk_reduce: f("splitk_reduce")?,
            gemv_silu: fused("gemv_silu")?,
            gemv_fp8: (1..=GEMV_FP8_KERNELS).map(|n| f(&format!("gemv_fp8_{n}"))).collect::<Result<_>>()?,
            gemv_fp8_mma: [f("gemv_fp8_mma_8")?, f("gemv_fp8_mma_16")?],
            gemv_fp8_mma_variants: [f("gemv_fp8_mma_8_u8")?, f("gemv_fp8_mma_8_w4")?, big("gemv_fp8_mma_8_sx", FP8_SX_SMEM as u32)?],
            gemm_fp8_mma: [f("gemm_fp8_mma_32")?, f("gemm_fp8_mma_64")?],
            gemm_fp8_rows: [
                big("gemm_fp8_rows_32", Fp8Mid::Rows.shared_bytes(32))?,
                big("gemm_fp8_rows_64", Fp8Mid::Rows.shared_bytes(64))?,
                big("gemm_fp8_rows_32_u8", Fp8Mid::RowsB.shared_bytes(32))?,
                big("gemm_fp8_rows_64_r1", Fp8Mid::RowsB.shared_bytes(64))?,
            ],
            quantize_fp8: f("quantize_fp8_rows")?,
            dequantize_fp8: f("dequantize_fp8_rows")?,
            argmax: f("argmax_rows")?,
            sample: f("sample_rows")?,
            block_checksum: f("block_checksum")?,
            _module: module,
        })
    }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    _workspace: Buf,
    /// Partial products of split-K GEMMs ([`Gpu::split_k`]).
    split_scratch: Buf,
    pub k: Kernels,
    pub name: String,
    pub sms: usize,
    /// The decode pass's kernels launch as programmatic dependents of the kernel ahead of them
    /// (compute capability 9.0 and later; `TANDEM_CUDA_PDL=0` turns it off).
    pdl: bool,
    /// The prefill attention kernel named by the environment ([`PrefillAttention::from_env`]);
    /// `None` chooses by pass size.
    pub prefill_kernel: Option<PrefillAttention>,
    /// The decode attention kernel passes launch ([`DecodeAttention::from_env`]).
    pub decode_kernel: DecodeAttention,
    /// Passes of at most [`GEMV_MAX`] tokens fold the RMSNorm and SiLU·mul into the
    /// matrix-vector kernel after them (`TANDEM_CUDA_FUSE=1`; off by default until measured).
    pub fuse: bool,
    /// GEMMs of few tokens whose output tiles would not fill the GPU cut K into slices
    /// (`TANDEM_CUDA_SPLITK=1`; off by default until measured).
    split_k: bool,
    /// Passes of at most this many tokens run FP8 projections through the FP8 matrix-vector
    /// kernel ([`GEMV_FP8_MAX`]).
    pub fp8_gemv_max: usize,
    /// Which FP8 matrix-vector kernel runs.
    pub fp8_gemv: Fp8Gemv,
    /// Which form of the tensor-core kernel runs up to 8 tokens.
    fp8_mma: Fp8Mma,
    /// Passes past `fp8_gemv_max` and up to [`GEMM_FP8_MID_MAX`] tokens run the mid-sized FP8
    /// GEMM in this form ([`Fp8Mid::Off`] sends them to cuBLASLt, to measure against).
    fp8_mid: Fp8Mid,
    /// K slices of the mid-sized FP8 GEMM named by `TANDEM_CUDA_FP8_MID_SPLITS` (1, 2, 4 or 8)
    /// instead of [`fp8_mid_splits`]' choice, where the depth allows them.
    fp8_mid_splits: Option<usize>,
    /// Where FP8 matrices are widened to bf16 for passes past `fp8_gemv_max` tokens; sized by
    /// [`Gpu::reserve_widened`] when FP8 weights are loaded, before any pass is captured.
    widened: Mutex<Option<Buf>>,
    /// FP8 tensor-core GEMMs (cuBLASLt), made when FP8 weights are first loaded; off with
    /// `TANDEM_CUDA_FP8_GEMM=widen`, which widens every FP8 matrix past the matrix-vector kernel.
    fp8_gemm: OnceLock<crate::lt::Fp8Gemm>,
    fp8_gemm_on: bool,
    /// The E4M3 copy of an FP8 GEMM's input and its per-token scales
    /// ([`Gpu::reserve_fp8_inputs`]), and the library's workspace.
    fp8_inputs: Mutex<Option<(Buf, Buf, Buf)>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("name", &self.name).field("ordinal", &self.ctx.ordinal()).finish()
    }
}

const WORKSPACE_BYTES: usize = 64 << 20;
/// Partial products a split-K GEMM may write (f32): 8 slices of 4,096 × 256 outputs.
const SPLIT_SCRATCH_BYTES: usize = 32 << 20;

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Self> {
        let count = crate::driver_device_count()
            .ok_or_else(|| CudaError::Unsupported("no CUDA driver on this machine (libcuda not found)".into()))?;
        if ordinal >= count {
            return Err(CudaError::Unsupported(format!("cuda:{ordinal} requested, {count} GPU(s) visible")));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream, ordered: cudarc's per-allocation event tracking would add event records
        // and waits that a graph capture must not see.
        // SAFETY: every launch and copy of this engine goes through `stream`, so stream order
        // already orders all accesses; nothing else uses these allocations.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let workspace = alloc(&stream, WORKSPACE_BYTES)?;
        // SAFETY: the workspace outlives the handle (both live in `Gpu`; the handle is dropped
        // first by field order) and is used by no one else.
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), workspace.ptr as *mut c_void, WORKSPACE_BYTES) }
            .result()
            .map_err(|e| CudaError::Blas(format!("{e:?}")))?;
        let arch = kernel_arch(ctx.compute_capability()?, std::env::var("TANDEM_CUDA_ARCH").ok().filter(|v| !v.is_empty()).as_deref())?;
        let k = Kernels::load(&ctx, arch)?;
        let name = ctx.name()?;
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let pdl = arch >= 90 && std::env::var("TANDEM_CUDA_PDL").map_or(true, |v| v != "0");
        let prefill_kernel = PrefillAttention::from_env();
        let decode_kernel = DecodeAttention::from_env();
        let fuse = std::env::var("TANDEM_CUDA_FUSE").is_ok_and(|v| v == "1");
        let split_k = std::env::var("TANDEM_CUDA_SPLITK").is_ok_and(|v| v == "1");
        let split_scratch = alloc(&stream, SPLIT_SCRATCH_BYTES)?;
        let fp8_gemv_max = match std::env::var("TANDEM_CUDA_FP8_GEMV_MAX") {
            Ok(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= GEMV_FP8_MMA_MAX)
                .ok_or_else(|| CudaError::Unsupported(format!("TANDEM_CUDA_FP8_GEMV_MAX={v} (0 to {GEMV_FP8_MMA_MAX})")))?,
            Err(_) => GEMV_FP8_MAX,
        };
        let fp8_gemv = match std::env::var("TANDEM_CUDA_FP8_GEMV").as_deref() {
            Ok("simt") => Fp8Gemv::Simt,
            Ok("mma") | Err(_) => Fp8Gemv::Mma,
            Ok(v) => return Err(CudaError::Unsupported(format!("TANDEM_CUDA_FP8_GEMV={v} (simt or mma)"))),
        };
        let fp8_mma =
            match std::env::var("TANDEM_CUDA_FP8_MMA").as_deref() {
                Err(_) | Ok("auto") => Fp8Mma::Auto,
                Ok("base") => Fp8Mma::Base,
                Ok(v) => Fp8Mma::Variant(FP8_MMA_VARIANTS.iter().position(|k| *k == v).ok_or_else(|| {
                    CudaError::Unsupported(format!("TANDEM_CUDA_FP8_MMA={v} (auto, base, {})", FP8_MMA_VARIANTS.join(", ")))
                })?),
            };
        let fp8_mid_splits = match std::env::var("TANDEM_CUDA_FP8_MID_SPLITS") {
            Ok(v) => Some(
                v.parse::<usize>()
                    .ok()
                    .filter(|s| [1, 2, 4, 8].contains(s))
                    .ok_or_else(|| CudaError::Unsupported(format!("TANDEM_CUDA_FP8_MID_SPLITS={v} (1, 2, 4 or 8)")))?,
            ),
            Err(_) => None,
        };
        Ok(Self {
            ctx,
            stream,
            blas,
            _workspace: workspace,
            split_scratch,
            k,
            name,
            sms,
            pdl,
            prefill_kernel,
            decode_kernel,
            fuse,
            split_k,
            fp8_gemv_max,
            fp8_gemv,
            fp8_mma,
            fp8_mid: Fp8Mid::from_env()?,
            fp8_mid_splits,
            widened: Mutex::new(None),
            fp8_gemm: OnceLock::new(),
            fp8_gemm_on: std::env::var("TANDEM_CUDA_FP8_GEMM").map_or(true, |v| v != "widen"),
            fp8_inputs: Mutex::new(None),
        })
    }

    pub fn alloc(&self, bytes: usize) -> Result<Buf> {
        alloc(&self.stream, bytes)
    }

    /// Free and total device memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    pub fn upload<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // The driver takes a stream of the current context only.
        self.bind()?;
        // SAFETY: `dst` points into an allocation of this context at least `size_of_val(src)`
        // bytes long (callers size buffers from the same counts); the copy is ordered on the
        // stream and completes before `memcpy_htod_async` returns for pageable memory. From
        // page-locked memory it runs later: callers keep `src` alive until they synchronise.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream())?;
        }
        Ok(())
    }

    pub fn download<T: Copy>(&self, dst: &mut [T], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        // The driver takes a stream of the current context only.
        self.bind()?;
        // SAFETY: as for `upload`; the stream is synchronised before the host reads `dst`.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream())?;
        }
        self.stream.synchronize()?;
        Ok(())
    }

    /// Queues a copy from the device into `dst` and returns at once: `dst` must be page-locked
    /// memory that nothing reads until the stream is synchronised.
    pub fn download_async(&self, dst: &mut [u8], src: u64) -> Result<()> {
        // The driver takes a stream of the current context only.
        self.bind()?;
        // SAFETY: `src` points into an allocation of this context at least `dst.len()` bytes
        // long (callers size both from the same block size); the caller keeps `dst` unread and
        // alive until it synchronises the stream.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream())?;
        }
        Ok(())
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // The driver takes a stream of the current context only.
        self.bind()?;
        // SAFETY: both ranges lie in allocations of this context (callers' invariant).
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())? };
        Ok(())
    }

    /// Makes this GPU's context the thread's current one: cuBLAS and the copies act on the
    /// current device, and one thread drives every GPU of a tensor-parallel group.
    pub fn bind(&self) -> Result<()> {
        Ok(self.ctx.bind_to_thread()?)
    }

    pub fn sync(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Fills `n` bf16 values with `offset + scale·u`, u uniform in [-1, 1), from `seed`.
    /// Replaces the E4M3 NaN codes among the `bytes` (a multiple of 4) from `ptr` with the
    /// largest finite magnitude: a random fill of an FP8 cache then holds only numbers.
    pub fn clear_fp8_nan(&self, ptr: u64, bytes: usize) -> Result<()> {
        let words = (bytes / 4) as u64;
        let blocks = (bytes / 4).div_ceil(256).clamp(1, 65536) as u32;
        self.launch(&self.k.fp8_clear_nan, (blocks, 1, 1), 256, 0, &[&ptr, &words])
    }

    pub fn fill_bf16(&self, ptr: u64, n: usize, seed: u64, scale: f32, offset: f32) -> Result<()> {
        let n64 = n as u64;
        let blocks = n.div_ceil(256).min(65536) as u32;
        let mut b = self.stream.launch_builder(&self.k.fill);
        b.arg(&ptr).arg(&n64).arg(&seed).arg(&scale).arg(&offset);
        // SAFETY: the kernel writes exactly `n` bf16 values from `ptr`, inside its allocation.
        unsafe { b.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }?;
        Ok(())
    }

    /// Row-major `y[n × rows] (+)= x[n × cols] · W[rows × cols]ᵀ` in bf16 with f32 accumulation.
    /// `accumulate` adds into `y` (the residual stream, f32). Small batches use the matrix-vector
    /// kernel, larger ones cuBLAS.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(&self, x: u64, w: u64, y: u64, n: usize, rows: usize, cols: usize, out: Dt, accumulate: bool) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n <= GEMV_MAX && cols.is_multiple_of(8) {
            return self.gemv(x, w, y, n, rows, cols, out, accumulate);
        }
        let splits = if self.split_k { split_k_slices(rows, n, cols, self.sms) } else { 1 };
        if splits > 1 {
            return self.gemm_split(w, x, y, out, rows, n, cols, splits, accumulate);
        }
        self.gemm(w, Dt::Bf16, x, Dt::Bf16, y, out, rows, n, cols, accumulate)
    }

    /// `y[n × rows] (+)= x[n × cols] · Wᵀ` for weights in either format: bf16 as [`Gpu::linear`];
    /// FP8 through the FP8 matrix-vector kernel up to `fp8_gemv_max` tokens, the mid-sized FP8
    /// GEMM up to [`GEMM_FP8_MID_MAX`], then cuBLASLt's FP8 GEMM, else widened to bf16 in the
    /// scratch matrix and multiplied by cuBLAS.
    pub fn project(&self, x: u64, w: &Matrix, y: u64, n: usize, out: Dt, accumulate: bool) -> Result<()> {
        let Some(scale) = &w.scale else {
            return self.linear(x, w.data.ptr, y, n, w.rows, w.cols, out, accumulate);
        };
        if n == 0 {
            return Ok(());
        }
        if self.fp8_gemv_takes(n, w.cols) {
            return self.gemv_fp8(x, w, y, n, out, accumulate);
        }
        if self.fp8_mid_takes(n, w) {
            return self.gemm_fp8_mid(x, w, y, n, out, accumulate, None);
        }
        if let Some(lt) = self.fp8_gemm_for(w, scale, n, out)? {
            return self.gemm_fp8(lt, x, w, scale, y, n, out, accumulate);
        }
        self.gemm_widened(x, w, scale, y, n, out, accumulate)
    }

    /// Which path [`Gpu::project`] takes for FP8 weights and `n` tokens: `"matrix-vector"`,
    /// `"mid-sized FP8 GEMM"`, `"cuBLASLt FP8"` or `"widened"` (bf16 weights: `"bf16"`).
    pub fn fp8_path(&self, w: &Matrix, n: usize, out: Dt) -> Result<&'static str> {
        let Some(scale) = &w.scale else {
            return Ok("bf16");
        };
        if self.fp8_gemv_takes(n, w.cols) {
            return Ok("matrix-vector");
        }
        if self.fp8_mid_takes(n, w) {
            return Ok("mid-sized FP8 GEMM");
        }
        if self.fp8_gemm_for(w, scale, n, out)?.is_some() {
            return Ok("cuBLASLt FP8");
        }
        Ok("widened")
    }

    /// FP8 weights widened to bf16 in the scratch matrix, then cuBLAS.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_widened(&self, x: u64, w: &Matrix, scale: &Buf, y: u64, n: usize, out: Dt, accumulate: bool) -> Result<()> {
        let c = w.cols as i32;
        let widened = self.widened.lock().expect("widened lock");
        let buf = widened
            .as_ref()
            .filter(|b| b.bytes >= w.rows * w.cols * 2)
            .ok_or_else(|| CudaError::Unsupported(format!("no room to widen a {}×{} FP8 matrix", w.rows, w.cols)))?;
        let elems = (w.rows * w.cols) as u64;
        let blocks = (w.rows * w.cols).div_ceil(4 * 256).min(65536) as u32;
        // Reads rows×cols bytes and rows scales, writes rows×cols bf16 into a buffer at least
        // that large; ordered after the GEMM that last read the buffer by the stream.
        self.launch(&self.k.dequantize_fp8, (blocks, 1, 1), 256, 0, &[&w.data.ptr, &scale.ptr, &buf.ptr, &elems, &c])?;
        self.linear(x, buf.ptr, y, n, w.rows, w.cols, out, accumulate)
    }

    /// Whether [`Gpu::project`] sends `n` tokens through an FP8 matrix-vector kernel (at most
    /// `fp8_gemv_max` tokens, and a kernel that takes the shape).
    fn fp8_gemv_takes(&self, n: usize, cols: usize) -> bool {
        n <= self.fp8_gemv_max && self.fp8_gemv_kernel(n, cols).is_some()
    }

    /// The FP8 matrix-vector kernel for `n` tokens of `cols`: the tensor-core form where
    /// `cols % 64 == 0` (unless `TANDEM_CUDA_FP8_GEMV=simt`), else the CUDA-core one.
    fn fp8_gemv_kernel(&self, n: usize, cols: usize) -> Option<Fp8Gemv> {
        if n == 0 {
            None
        } else if self.fp8_gemv == Fp8Gemv::Mma && n <= GEMV_FP8_MMA_MAX && cols.is_multiple_of(64) {
            Some(Fp8Gemv::Mma)
        } else if n <= GEMV_FP8_KERNELS && cols.is_multiple_of(16) {
            Some(Fp8Gemv::Simt)
        } else {
            None
        }
    }

    /// An FP8 matrix-vector kernel: `y[n × rows] (+)= x[n × cols] · Wᵀ` for an FP8 `w` and a
    /// shape one of them takes ([`Gpu::fp8_gemv_kernel`]).
    pub fn gemv_fp8(&self, x: u64, w: &Matrix, y: u64, n: usize, out: Dt, accumulate: bool) -> Result<()> {
        let kernel = self
            .fp8_gemv_kernel(n, w.cols)
            .ok_or_else(|| CudaError::Unsupported(format!("FP8 matrix-vector kernel for {n} rows of {}", w.cols)))?;
        self.gemv_fp8_on(kernel, x, w, y, n, out, accumulate)
    }

    /// [`Gpu::gemv_fp8`] on the named kernel, whatever the environment chose (for the checks).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_fp8_on(&self, kernel: Fp8Gemv, x: u64, w: &Matrix, y: u64, n: usize, out: Dt, accumulate: bool) -> Result<()> {
        let scale = w.scale.as_ref().ok_or_else(|| CudaError::Unsupported("FP8 kernel on bf16 weights".into()))?;
        let fits = match kernel {
            Fp8Gemv::Mma => n <= GEMV_FP8_MMA_MAX && w.cols.is_multiple_of(64),
            Fp8Gemv::Simt => n <= GEMV_FP8_KERNELS && w.cols.is_multiple_of(16),
        };
        if n == 0 || !fits {
            return Err(CudaError::Unsupported(format!("{kernel:?} FP8 matrix-vector kernel for {n} rows of {}", w.cols)));
        }
        let mode = out_mode(out, accumulate)?;
        let (r, c) = (w.rows as i32, w.cols as i32);
        if kernel == Fp8Gemv::Mma {
            let nn = n as i32;
            let sx_bytes = n * (w.cols + 8) * 2;
            let variant = match self.fp8_mma {
                Fp8Mma::Auto => auto_fp8_variant(w.rows),
                Fp8Mma::Base => None,
                Fp8Mma::Variant(i) => Some(i),
            };
            let (f, threads, smem) = match variant {
                Some(0) if n <= 8 => (&self.k.gemv_fp8_mma_variants[0], 256, 0),
                Some(1) if n <= 8 => (&self.k.gemv_fp8_mma_variants[1], 128, 0),
                Some(2) if n <= 8 && sx_bytes <= FP8_SX_SMEM => (&self.k.gemv_fp8_mma_variants[2], 256, sx_bytes as u32),
                _ => (&self.k.gemv_fp8_mma[usize::from(n > 8)], 256, 0),
            };
            // W holds rows×cols bytes (cols % 64 == 0) and rows scales, x n×cols and y n×rows
            // elements; a block per 16 rows.
            return self.launch_dependent(
                f,
                (w.rows.div_ceil(16) as u32, 1, 1),
                threads,
                smem,
                &[&w.data.ptr, &scale.ptr, &x, &y, &r, &c, &nn, &mode],
            );
        }
        // W holds rows×cols bytes and rows scales, x n×cols and y n×rows elements.
        self.launch_dependent(
            &self.k.gemv_fp8[n - 1],
            (w.rows.div_ceil(8) as u32, 1, 1),
            256,
            0,
            &[&w.data.ptr, &scale.ptr, &x, &y, &r, &c, &mode],
        )
    }

    /// Whether [`Gpu::project`] sends `n` tokens through the mid-sized FP8 GEMM: past the
    /// matrix-vector kernel, up to [`GEMM_FP8_MID_MAX`], `cols % 64 == 0`, and where the form
    /// is [`Fp8Mid::Auto`], up to 32 tokens or for a matrix with `cols >= rows` or of at most
    /// [`FP8_MID_SMALL`] weights.
    fn fp8_mid_takes(&self, n: usize, w: &Matrix) -> bool {
        self.fp8_mid.takes(w.rows, w.cols, n)
            && !self.fp8_gemv_takes(n, w.cols)
            && (1..=GEMM_FP8_MID_MAX).contains(&n)
            && w.cols.is_multiple_of(64)
    }

    /// The mid-sized FP8 GEMM (`gemm_fp8_mma_{32,64}`) for `n` tokens, whatever the path
    /// choice (the checks call it directly): `y[n × rows] (+)= x[n × cols] · Wᵀ`, with K cut
    /// into `splits` slices (else `TANDEM_CUDA_FP8_MID_SPLITS`, else [`fp8_mid_splits`]) summed
    /// by `splitk_reduce`; a count the shape does not allow falls back to the chosen one.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_fp8_mid(&self, x: u64, w: &Matrix, y: u64, n: usize, out: Dt, accumulate: bool, splits: Option<usize>) -> Result<()> {
        let scale = w.scale.as_ref().ok_or_else(|| CudaError::Unsupported("FP8 kernel on bf16 weights".into()))?;
        if n == 0 || n > GEMM_FP8_MID_MAX || !w.cols.is_multiple_of(64) {
            return Err(CudaError::Unsupported(format!("mid-sized FP8 GEMM for {n} rows of {}", w.cols)));
        }
        let mode = out_mode(out, accumulate)?;
        // The row-owning forms walk K in chunks of 256 or 512 columns; a depth that is not a
        // multiple runs the first form.
        let form = match self.fp8_mid {
            Fp8Mid::Off => Fp8Mid::Rows,
            f => f.for_shape(w.rows, w.cols, n),
        };
        let form = if w.cols.is_multiple_of(form.chunk(n)) { form } else { Fp8Mid::Direct };
        let block_rows = form.block_rows(n);
        let chosen = fp8_mid_splits(block_rows, w.rows, w.cols, n, self.sms);
        let splits = match splits.or(self.fp8_mid_splits) {
            Some(s) if fp8_mid_slices_fit(w.rows, w.cols, n, s) => s,
            _ => chosen,
        };
        let wide = usize::from(n > 32);
        let (kernel, smem) = match form {
            Fp8Mid::Direct | Fp8Mid::Off => (&self.k.gemm_fp8_mma[wide], 0),
            Fp8Mid::Rows | Fp8Mid::Auto => (&self.k.gemm_fp8_rows[wide], form.shared_bytes(n)),
            Fp8Mid::RowsB => (&self.k.gemm_fp8_rows[2 + wide], form.shared_bytes(n)),
        };
        let (r, c, nn, kc) = (w.rows as i32, w.cols as i32, n as i32, (w.cols / splits) as i32);
        let part = self.split_scratch.ptr;
        // W holds rows×cols bytes and rows scales, x n×cols bf16, y n×rows of `out`; with more
        // than one slice the kernel writes splits·n·rows f32 into the scratch (checked above),
        // else y directly. A block per `block_rows` rows and slice.
        self.launch_dependent(
            kernel,
            (w.rows.div_ceil(block_rows) as u32, splits as u32, 1),
            256,
            smem,
            &[&w.data.ptr, &scale.ptr, &x, &y, &part, &r, &c, &nn, &kc, &mode],
        )?;
        if splits == 1 {
            return Ok(());
        }
        let mn = (w.rows * n) as u64;
        let s = splits as i32;
        self.launch(&self.k.splitk_reduce, ((w.rows * n).div_ceil(4 * 256) as u32, 1, 1), 256, 0, &[&part, &y, &mn, &s, &mode])
    }

    /// The input quantised per token to E4M3, then cuBLASLt's FP8 GEMM with both scale vectors.
    #[allow(clippy::too_many_arguments)]
    fn gemm_fp8(
        &self,
        lt: &crate::lt::Fp8Gemm,
        x: u64,
        w: &Matrix,
        scale: &Buf,
        y: u64,
        n: usize,
        out: Dt,
        accumulate: bool,
    ) -> Result<()> {
        let inputs = self.fp8_inputs.lock().expect("fp8 inputs lock");
        let (xq, xs, ws) = inputs
            .as_ref()
            .filter(|(q, s, _)| q.bytes >= n * w.cols && s.bytes >= n * 4)
            .ok_or_else(|| CudaError::Unsupported(format!("no room for {n} FP8 input rows of {}", w.cols)))?;
        let c = w.cols as i32;
        // x holds n×cols bf16; the kernel writes n×cols bytes and n scales, within the buffers.
        self.launch(&self.k.quantize_fp8, (n as u32, 1, 1), 256, 0, &[&x, &xq.ptr, &xs.ptr, &c])?;
        self.bind()?;
        // SAFETY: W holds rows×cols bytes and rows scales, xq/xs were just written for n rows, y
        // holds n×rows elements of `out` (callers size it), the workspace is LT_WORKSPACE_BYTES;
        // all on this GPU, ordered on its stream.
        unsafe {
            lt.run(
                w.data.ptr,
                scale.ptr,
                xq.ptr,
                xs.ptr,
                y,
                (w.rows, n, w.cols),
                out,
                accumulate,
                ws.ptr,
                self.stream.cu_stream() as cudarc::cublaslt::sys::cudaStream_t,
            )
        }
    }

    /// cuBLASLt's FP8 GEMM for `n` tokens through `w` (scales `scale`), when it is on, the FP8
    /// input buffers hold `n` rows, and the library runs the shape.
    fn fp8_gemm_for(&self, w: &Matrix, scale: &Buf, n: usize, out: Dt) -> Result<Option<&crate::lt::Fp8Gemm>> {
        let Some(lt) = self.fp8_gemm.get().filter(|_| self.fp8_gemm_on) else { return Ok(None) };
        let inputs = self.fp8_inputs.lock().expect("fp8 inputs lock");
        let Some((_, xs, _)) = inputs.as_ref().filter(|(q, s, _)| q.bytes >= n * w.cols && s.bytes >= n * 4) else {
            return Ok(None);
        };
        Ok(lt.supports(w.rows, n, w.cols, out, (scale.ptr, xs.ptr))?.then_some(lt))
    }

    /// Makes room for FP8 GEMM inputs of up to `tokens` rows of `cols` (and the FP8 GEMM
    /// library); before any pass is captured.
    pub fn reserve_fp8_inputs(&self, tokens: usize, cols: usize) -> Result<()> {
        if self.fp8_gemm.get().is_none() {
            let lt = crate::lt::Fp8Gemm::new()?;
            let _ = self.fp8_gemm.set(lt);
        }
        let mut inputs = self.fp8_inputs.lock().expect("fp8 inputs lock");
        if inputs.as_ref().is_some_and(|(q, s, _)| q.bytes >= tokens * cols && s.bytes >= tokens * 4) {
            return Ok(());
        }
        self.sync()?;
        *inputs = None;
        *inputs = Some((self.alloc(tokens * cols)?, self.alloc(tokens * 4)?, self.alloc(crate::lt::LT_WORKSPACE_BYTES)?));
        Ok(())
    }

    /// Quantises a bf16 matrix `[rows × cols]` to [`WeightFormat::Fp8`] (one scale per row, the
    /// row's largest magnitude mapped to 448) and makes sure the widening scratch can hold it.
    pub fn quantize_fp8(&self, w: &Buf, rows: usize, cols: usize) -> Result<Matrix> {
        if !cols.is_multiple_of(16) || w.bytes < rows * cols * 2 {
            return Err(CudaError::Unsupported(format!("FP8 weights of {rows}×{cols} (columns must be a multiple of 16)")));
        }
        let data = self.alloc(rows * cols)?;
        let scale = self.alloc(rows * 4)?;
        let c = cols as i32;
        // One block per row, each reading its cols bf16 and writing cols bytes and one scale.
        self.launch(&self.k.quantize_fp8, (rows as u32, 1, 1), 256, 0, &[&w.ptr, &data.ptr, &scale.ptr, &c])?;
        self.reserve_widened(rows * cols * 2)?;
        Ok(Matrix { data, scale: Some(scale), rows, cols })
    }

    /// Grows the scratch FP8 matrices are widened into to at least `bytes`. Not while a pass is
    /// queued or captured: the old buffer is freed after a sync.
    pub fn reserve_widened(&self, bytes: usize) -> Result<()> {
        let mut widened = self.widened.lock().expect("widened lock");
        if widened.as_ref().is_some_and(|b| b.bytes >= bytes) {
            return Ok(());
        }
        self.sync()?;
        *widened = None;
        *widened = Some(self.alloc(bytes)?);
        Ok(())
    }

    /// `y[n × m] (+)= x[n × k] · Wᵀ` as `splits` products over slices of K, each written apart
    /// (f32) by one strided-batched GEMM, then summed (with the residual where `accumulate`) and
    /// converted by `splitk_reduce`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_split(&self, w: u64, x: u64, y: u64, out: Dt, m: usize, n: usize, k: usize, splits: usize, accumulate: bool) -> Result<()> {
        self.bind()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let kc = k / splits;
        let part = self.split_scratch.ptr;
        // SAFETY: W holds m×k and x n×k bf16 elements, slice s of each starting s·kc elements in
        // (strides in elements, leading dimension k); the scratch holds splits·m·n f32
        // (`split_k_slices` keeps within SPLIT_SCRATCH_BYTES); alpha/beta are f32 host scalars.
        unsafe {
            blas_result::gemm_strided_batched_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                kc as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                Dt::Bf16.cuda(),
                k as i32,
                kc as i64,
                x as *const c_void,
                Dt::Bf16.cuda(),
                k as i32,
                kc as i64,
                &beta as *const f32 as *const c_void,
                part as *mut c_void,
                Dt::F32.cuda(),
                m as i32,
                (m * n) as i64,
                splits as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Blas(format!("{e:?} (m={m} n={n} k={k}, {splits} slices)")))?;
        let mode = out_mode(out, accumulate)?;
        let mn = (m * n) as u64;
        let s = splits as i32;
        self.launch(&self.k.splitk_reduce, ((m * n).div_ceil(4 * 256) as u32, 1, 1), 256, 0, &[&part, &y, &mn, &s, &mode])
    }

    /// The matrix-vector kernel: `y[n × rows] (+)= x[n × cols] · Wᵀ` for `n ≤ GEMV_MAX`.
    #[allow(clippy::too_many_arguments)]
    fn gemv(&self, x: u64, w: u64, y: u64, n: usize, rows: usize, cols: usize, out: Dt, accumulate: bool) -> Result<()> {
        if n == 0 || n > GEMV_MAX || !cols.is_multiple_of(8) {
            return Err(CudaError::Unsupported(format!("matrix-vector kernel for {n} rows of {cols}")));
        }
        let mode = out_mode(out, accumulate)?;
        let (r, c) = (rows as i32, cols as i32);
        // W holds rows×cols, x n×cols, y n×rows elements: callers size them so; the kernel
        // touches only those.
        self.launch_dependent(&self.k.gemv[n - 1], (rows.div_ceil(8) as u32, 1, 1), 256, 0, &[&w, &x, &y, &r, &c, &mode])
    }

    /// The matrix-vector kernel with the stage before it folded in, for `n ≤ GEMV_MAX` tokens:
    /// [`Prologue::Norm`] makes its input RMSNorm(x) · `norm_w` from the f32 residual rows `x`
    /// [n × cols]; [`Prologue::SiluMul`] makes it SiLU(gate) · up from the bf16 gate|up rows `x`
    /// [n × 2·cols]. `Ok(false)` where the fused kernel does not apply (too many tokens, fusion
    /// off, an input row past the shared-memory budget): the caller runs the stages apart.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_fused(
        &self,
        prologue: Prologue,
        x: u64,
        norm_w: u64,
        eps: f32,
        w: u64,
        y: u64,
        n: usize,
        rows: usize,
        cols: usize,
        out: Dt,
        accumulate: bool,
    ) -> Result<bool> {
        let smem = n * cols * 2;
        if !self.fuse || n == 0 || n > GEMV_MAX || !cols.is_multiple_of(8) || smem > GEMV_FUSED_SMEM {
            return Ok(false);
        }
        let mode = out_mode(out, accumulate)?;
        let f = match prologue {
            Prologue::Norm => &self.k.gemv_norm[n - 1],
            Prologue::SiluMul => &self.k.gemv_silu[n - 1],
        };
        let (r, c) = (rows as i32, cols as i32);
        self.launch_dependent(f, (rows.div_ceil(8) as u32, 1, 1), 256, smem as u32, &[&w, &x, &norm_w, &eps, &y, &r, &c, &mode])?;
        Ok(true)
    }

    /// Column-major cuBLAS view of the row-major product: C[m × n] = Aᵀ·B with A = W (k × m
    /// column-major, i.e. W row-major m × k) and B = x (k × n column-major = x row-major n × k).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(&self, w: u64, wt: Dt, x: u64, xt: Dt, y: u64, yt: Dt, m: usize, n: usize, k: usize, accumulate: bool) -> Result<()> {
        self.bind()?;
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0f32 };
        // SAFETY: the pointers address device buffers of at least m×k, k×n and m×n elements of
        // the stated types; alpha/beta are f32 host scalars as the compute type requires.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                wt.cuda(),
                k as i32,
                x as *const c_void,
                xt.cuda(),
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                yt.cuda(),
                m as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Blas(format!("{e:?} (m={m} n={n} k={k})")))
    }

    pub fn launch(&self, f: &CudaFunction, grid: (u32, u32, u32), block: u32, smem: u32, args: &[&dyn Arg]) -> Result<()> {
        let mut b = self.stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: every call site passes the argument list its kernel declares (same order,
        // same widths) and buffers sized for the launch; see the kernels' comments.
        unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem }) }?;
        Ok(())
    }

    /// As [`Gpu::launch`], for a kernel that calls `pdl_wait` before it touches anything the
    /// kernel ahead of it writes or reads (kernels.cu): launched as a programmatic dependent, its
    /// blocks start during that kernel's tail, once every block of it has called `pdl_trigger`.
    pub fn launch_dependent(&self, f: &CudaFunction, grid: (u32, u32, u32), block: u32, smem: u32, args: &[&dyn Arg]) -> Result<()> {
        if !self.pdl {
            return self.launch(f, grid, block, smem, args);
        }
        self.bind()?;
        let mut params: Vec<*mut c_void> = args.iter().map(|a| a.param()).collect();
        // SAFETY: a zeroed attribute is a valid value of the plain C union, then set in full.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as for `launch`: the arguments are the kernel's, in order and width, each
        // pointer addressing a value that lives through the call (the driver copies them); the
        // function belongs to this context, bound above, and the stream to this engine.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result()?;
        Ok(())
    }

    /// Causal prefill attention over `n_tiles` tiles of [`crate::plan::TILE_ROWS`] query rows and
    /// `heads` heads, with the kernel `which`; `args` as both kernels declare them.
    /// `fp8`: the cache holds E4M3 rows and their scales (the kernels' `_f8` forms).
    pub fn prefill_attention(
        &self,
        which: PrefillAttention,
        hd: usize,
        fp8: bool,
        n_tiles: usize,
        heads: usize,
        args: &[&dyn Arg],
    ) -> Result<()> {
        let idx = if hd == 64 { 0 } else { 1 };
        let smem = which.shared_bytes(hd, fp8);
        let k = &self.k;
        let (f, grid) = match which {
            PrefillAttention::Staged => {
                (if fp8 { &k.prefill_attention_f8 } else { &k.prefill_attention }, (n_tiles as u32, heads as u32, 1))
            }
            PrefillAttention::Pipelined => {
                (if fp8 { &k.prefill_attention_pipelined_f8 } else { &k.prefill_attention_pipelined }, (heads as u32, n_tiles as u32, 1))
            }
            // A block per plan tile; the second tile of each aligned pair exits at once.
            PrefillAttention::Wide => {
                (if fp8 { &k.prefill_attention_wide_f8 } else { &k.prefill_attention_wide }, (heads as u32, n_tiles as u32, 1))
            }
        };
        self.launch(&f[idx], grid, 128, smem, args)
    }

    /// Split decode attention (grid (kv heads, sequences, splits)) for head size `hd` and
    /// `group` query heads a KV head, with the kernel `which`, launched as a programmatic
    /// dependent; `args` as both kernels declare them.
    pub fn decode_attention(
        &self,
        which: DecodeAttention,
        hd: usize,
        group: usize,
        fp8: bool,
        grid: (u32, u32, u32),
        args: &[&dyn Arg],
    ) -> Result<()> {
        let i = if hd == 64 { 0 } else { 8 } + group - 1;
        let k = &self.k;
        let f = match (which, fp8) {
            (DecodeAttention::Lanes, false) => &k.decode_attention[i],
            (DecodeAttention::Mma, false) => &k.decode_attention_mma[i],
            (DecodeAttention::Lanes, true) => &k.decode_attention_f8[i],
            (DecodeAttention::Mma, true) => &k.decode_attention_mma_f8[i],
        };
        self.launch_dependent(f, grid, 128, which.shared_bytes(hd, fp8), args)
    }

    /// A pair of events around `f`, in milliseconds of device time.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        let start = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&self.stream)?;
        f()?;
        end.record(&self.stream)?;
        end.synchronize()?;
        Ok(start.elapsed_ms(&end)?)
    }
}

/// A kernel argument: scalars by value, addresses as u64.
pub trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
    /// The address of the value, as a kernel parameter for `cuLaunchKernelEx`.
    fn param(&self) -> *mut c_void;
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }

            fn param(&self) -> *mut c_void {
                self as *const $t as *mut c_void
            }
        }
    )*};
}
scalar_arg!(u64, i32, f32);

impl Gpu {
    /// Device memory another process of this host can map: allocated by the driver's classic
    /// allocator (the stream-ordered pools cannot export inter-process handles) and zeroed.
    pub fn alloc_shareable(&self, bytes: usize) -> Result<Buf> {
        self.bind()?;
        let bytes = bytes.max(16);
        // SAFETY: a plain allocation in the current (bound) context; `Shareable` frees it once.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes)? };
        let owned = Shareable { ctx: self.ctx.clone(), ptr };
        // SAFETY: `ptr` heads an allocation of `bytes` bytes of this context.
        unsafe { cudarc::driver::result::memset_d8_sync(ptr, 0, bytes)? };
        Ok(Buf { _slice: Backing::Shareable { _owned: owned }, ptr, bytes })
    }

    /// The inter-process handle of an allocation made by [`Gpu::alloc_shareable`].
    pub fn ipc_handle(&self, buf: &Buf) -> Result<Vec<u8>> {
        if !matches!(buf._slice, Backing::Shareable { .. }) {
            return Err(CudaError::Unsupported("an inter-process handle of pooled memory".into()));
        }
        self.bind()?;
        let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `buf.ptr` heads a `cuMemAlloc` allocation of the bound context; the driver
        // fills the handle.
        let handle = unsafe {
            sys::cuIpcGetMemHandle(handle.as_mut_ptr(), buf.ptr).result()?;
            handle.assume_init()
        };
        Ok(handle.reserved.iter().map(|&b| b as u8).collect())
    }

    /// Checksums ([`tandem_protocol::device_checksum`]) of the blocks of `block_bytes` bytes at
    /// `base + offsets[i]`, computed on this GPU.
    pub fn block_checksums(&self, base: u64, offsets: &[u64], block_bytes: usize) -> Result<Vec<u64>> {
        if offsets.is_empty() {
            return Ok(Vec::new());
        }
        if !block_bytes.is_multiple_of(8) {
            return Err(CudaError::Unsupported(format!("checksums of {block_bytes}-byte blocks (not whole 64-bit words)")));
        }
        let scratch = self.alloc(offsets.len() * 16)?;
        let (offs, sums) = (scratch.ptr, scratch.at(offsets.len(), 8));
        self.upload(offs, offsets)?;
        let words = (block_bytes / 8) as u64;
        self.launch(&self.k.block_checksum, (offsets.len() as u32, 1, 1), 1024, 0, &[&base, &offs, &words, &sums])?;
        let mut out = vec![0u64; offsets.len()];
        self.download(&mut out, sums)?;
        Ok(out)
    }
}

/// What keeps a [`Buf`]'s memory alive.
enum Backing {
    Pooled { _slice: CudaSlice<u8> },
    Shareable { _owned: Shareable },
}

/// A `cuMemAlloc` allocation, freed on drop.
struct Shareable {
    ctx: Arc<CudaContext>,
    ptr: u64,
}

impl Drop for Shareable {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `alloc_shareable` in this context and freed only here; the
            // engine synchronises its stream before it drops its buffers.
            let _ = unsafe { cudarc::driver::result::free_sync(self.ptr) };
        }
    }
}

fn alloc(stream: &Arc<CudaStream>, bytes: usize) -> Result<Buf> {
    let slice = stream.alloc_zeros::<u8>(bytes.max(16))?;
    let ptr = {
        let (ptr, _guard) = slice.device_ptr(stream);
        ptr
    };
    Ok(Buf { ptr, bytes, _slice: Backing::Pooled { _slice: slice } })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hopper and Ada give a block at most 227 KiB of dynamic shared memory, Ampere (8.0) 163 KiB:
    /// every attention form must fit the smaller, and two blocks of each tiled form must fit an
    /// H100/H200 multiprocessor (228 KiB) so the copy of one overlaps the other's arithmetic.
    #[test]
    fn attention_shared_memory_fits_the_devices() {
        for hd in [64, 128] {
            for fp8 in [false, true] {
                for k in [PrefillAttention::Staged, PrefillAttention::Pipelined, PrefillAttention::Wide] {
                    let b = k.shared_bytes(hd, fp8) as usize;
                    assert!(b <= 163 << 10, "{k:?} hd {hd}: {b} bytes");
                    assert!(2 * b <= 228 << 10, "{k:?} hd {hd}: two blocks of {b} bytes");
                }
                assert_eq!(DecodeAttention::Lanes.shared_bytes(hd, fp8), 0);
            }
            // Decode keeps three blocks a multiprocessor on a bf16 cache, two (each four tiles
            // deep) on an FP8 one; each block also takes 1 KiB the hardware reserves.
            let block = |fp8| DecodeAttention::Mma.shared_bytes(hd, fp8) as usize + 1024;
            assert!(3 * block(false) <= 228 << 10 && 2 * block(true) <= 228 << 10, "hd {hd}");
            assert_eq!(DecodeAttention::Mma.shared_bytes(hd, false), PrefillAttention::Pipelined.shared_bytes(hd, false));
        }
        assert_eq!(PrefillAttention::Pipelined.shared_bytes(128, false), 69_632);
        assert_eq!(PrefillAttention::Wide.shared_bytes(128, false), 104_448);
        // FP8 prefill: one bf16 stage (34,816 bytes at HD 128), two raw stages of 16 KiB rows and
        // 4 KiB of scales; FP8 decode: one f16 stage, four raw stages of 16 KiB rows and 512
        // bytes of scales.
        assert_eq!(PrefillAttention::Pipelined.shared_bytes(128, true), 34_816 + 2 * (16_384 + 4_096));
        assert_eq!(DecodeAttention::Mma.shared_bytes(128, true), 34_816 + 4 * (16_384 + 512));
        // The decode kernel's merge reuses the first stage: four warps' rows of 8 heads and their
        // (max, sum) pairs, in f32.
        for hd in [64, 128] {
            assert!((4 * 8 * hd + 4 * 8 * 2) * 4 <= 2 * 64 * (hd + 8) * 2);
        }
    }

    #[test]
    fn kernels_build_for_the_device_or_an_older_named_architecture() {
        assert_eq!(kernel_arch((9, 0), None).unwrap(), 90);
        assert_eq!(kernel_arch((8, 6), None).unwrap(), 86);
        assert_eq!(kernel_arch((9, 0), Some("sm_80")).unwrap(), 80);
        assert_eq!(kernel_arch((9, 0), Some("sm_90")).unwrap(), 90);
        for bad in ["sm_100", "sm_75", "90", "sm_x"] {
            let e = kernel_arch((9, 0), Some(bad)).unwrap_err().to_string();
            assert!(e.contains("TANDEM_CUDA_ARCH") && e.contains("sm_90"), "{bad}: {e}");
        }
        assert!(kernel_arch((7, 5), None).unwrap_err().to_string().contains("8.0 or newer"));
    }

    /// The kernels compile, through NVRTC and its PTX assembler, for the oldest architecture the
    /// engine runs on, for Ada and for Hopper; no GPU is needed, only the NVRTC library
    /// (scripts/test.sh installs it from PyPI). An instruction newer than an architecture fails
    /// here: before sm_89 the E4M3 widening moves bits instead of using the conversion.
    #[test]
    fn the_kernels_compile_from_sm_80_to_sm_90() {
        for arch in ["sm_80", "sm_89", "sm_90"] {
            let ptx = std::panic::catch_unwind(|| ptx_for(arch))
                .unwrap_or_else(|_| {
                    panic!("NVRTC did not load: scripts/test.sh installs it (pip nvidia-cuda-nvrtc) and puts it on LD_LIBRARY_PATH")
                })
                .unwrap_or_else(|e| panic!("{arch}: {e}"))
                .to_src();
            assert!(ptx.contains(&format!(".target {arch}")), "{arch}");
            for entry in ["gemv_1", "rope_store", "decode_attention_mma_f8_128_4", "prefill_attention_pipelined_128", "sample_rows"] {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{arch}: no kernel {entry}");
            }
            assert_eq!(ptx.contains("cvt.rn.f16x2.e4m3x2"), arch != "sm_80", "{arch}");
            assert_eq!(ptx.contains("griddepcontrol.wait"), arch == "sm_90", "{arch}");
        }
    }

    #[test]
    fn prefill_kernel_by_pass_size_unless_named() {
        assert_eq!(PrefillAttention::for_pass(None, 512), PrefillAttention::Pipelined);
        assert_eq!(PrefillAttention::for_pass(None, WIDE_FROM_TOKENS - 1), PrefillAttention::Pipelined);
        assert_eq!(PrefillAttention::for_pass(None, WIDE_FROM_TOKENS), PrefillAttention::Wide);
        assert_eq!(PrefillAttention::for_pass(Some(PrefillAttention::Staged), 8192), PrefillAttention::Staged);
        assert_eq!(PrefillAttention::for_pass(Some(PrefillAttention::Pipelined), 8192), PrefillAttention::Pipelined);
    }

    #[test]
    fn mid_fp8_splits_fill_the_gpu_within_the_depth() {
        // The shape rule: up to 32 tokens down (deeper than tall) takes the second row-owning
        // form, the others the first; past 32 the second, for O, down and small matrices only;
        // a form named in the environment runs everywhere.
        assert!(Fp8Mid::Auto.takes(6144, 4096, 32) && Fp8Mid::Auto.takes(28_672, 4096, 32));
        assert!(!Fp8Mid::Auto.takes(6144, 4096, 64) && !Fp8Mid::Auto.takes(28_672, 4096, 64));
        assert!(Fp8Mid::Auto.takes(4096, 4096, 64) && Fp8Mid::Auto.takes(4096, 14_336, 64));
        assert!(Fp8Mid::Auto.takes(3072, 2048, 64) && !Fp8Mid::Auto.takes(16_384, 2048, 64));
        assert!(Fp8Mid::Rows.takes(28_672, 4096, 64) && !Fp8Mid::Off.takes(4096, 4096, 20));
        assert_eq!(Fp8Mid::Auto.for_shape(4096, 14_336, 32), Fp8Mid::RowsB);
        assert_eq!(Fp8Mid::Auto.for_shape(6144, 4096, 32), Fp8Mid::Rows);
        assert_eq!(Fp8Mid::Auto.for_shape(4096, 4096, 32), Fp8Mid::Rows);
        assert_eq!(Fp8Mid::Auto.for_shape(4096, 4096, 33), Fp8Mid::RowsB);
        assert_eq!(Fp8Mid::Direct.for_shape(4096, 14_336, 32), Fp8Mid::Direct);
        let rows32 = Fp8Mid::Rows.block_rows(32);
        assert_eq!(rows32, 128);
        // Llama 3.1 8B on 132 SMs, 32 tokens in 128-row blocks: O (32 blocks) eight slices,
        // down (32) and Q/K/V (48) four, gate|up (224 blocks) none.
        assert_eq!(fp8_mid_splits(rows32, 4096, 4096, 32, 132), 8);
        assert_eq!(fp8_mid_splits(rows32, 4096, 14_336, 32, 132), 4);
        assert_eq!(fp8_mid_splits(rows32, 6144, 4096, 32, 132), 4);
        assert_eq!(fp8_mid_splits(rows32, 28_672, 4096, 32, 132), 1);
        // Down's depth (14,336 = 7 × 2,048) stops at four slices of 3,584 even where eight
        // would fill more of the GPU (64 tokens, 256-row blocks: 16 of them).
        assert_eq!(fp8_mid_splits(Fp8Mid::Rows.block_rows(64), 4096, 14_336, 64, 132), 4);
        // Llama 3.2 1B's gate|up: 128 blocks, two slices.
        assert_eq!(fp8_mid_splits(rows32, 16_384, 2048, 32, 132), 2);
        // The first form's 64-row blocks for 32 tokens: 64 blocks of O take four slices.
        assert_eq!(fp8_mid_splits(Fp8Mid::Direct.block_rows(32), 4096, 4096, 32, 132), 4);
        // Depth caps the slices (8,192 = 16 × 512; 1,536 is not a multiple of 1,024).
        assert_eq!(fp8_mid_splits(64, 512, 8192, 20, 132), 8);
        assert_eq!(fp8_mid_splits(64, 512, 1536, 20, 132), 1);
        // Rows that are not a multiple of 4 never split.
        assert_eq!(fp8_mid_splits(64, 1026, 4096, 20, 132), 1);
    }

    #[test]
    fn split_k_fills_the_gpu_only_where_tiles_are_few() {
        // Llama 3.2 1B at 128 tokens on 132 SMs: Q/K/V (3,072 rows, 24 tiles) and O (2,048
        // rows over 2,048, 16 tiles) split; gate|up (16,384 rows, 128 tiles) and the LM head do
        // not.
        assert_eq!(split_k_slices(3072, 128, 2048, 132), 4);
        assert_eq!(split_k_slices(2048, 128, 2048, 132), 8);
        assert_eq!(split_k_slices(16384, 128, 2048, 132), 1);
        assert_eq!(split_k_slices(128_256, 128, 2048, 132), 1);
        // The down projection (2,048 rows over 8,192) goes to the cap of 8.
        assert_eq!(split_k_slices(2048, 128, 8192, 132), 8);
        // Prefill-sized passes have tiles enough.
        assert_eq!(split_k_slices(4096, 2048, 4096, 132), 1);
        // Slices stay 256 deep and a multiple of 64, and the partials fit the scratch.
        for (m, n, k) in [(3072, 8, 576), (4096, 256, 14336), (1024, 64, 960), (6144, 200, 4096)] {
            let s = split_k_slices(m, n, k, 132);
            assert!(k % (s * 64) == 0 && k / s >= 256 || s == 1, "{m}×{n}×{k}: {s}");
            assert!(s * m * n * 4 <= SPLIT_SCRATCH_BYTES);
        }
    }
}
