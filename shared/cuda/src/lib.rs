//! The CUDA backend of the engine: Llama-family decoders in bf16 on NVIDIA GPUs, with the
//! projections optionally in FP8 (E4M3, a scale per output row; [`WeightFormat`]).
//!
//! - Kernels of our own ([`kernels.cu`](../src/kernels.cu)), compiled at run time with NVRTC for
//!   the device's architecture and cached per process: RMSNorm, RoPE with the KV-cache write,
//!   SiLU·mul, paged decode attention (grouped-query, split along the context), flash-style
//!   causal prefill attention on tensor cores, matrix-vector products for small batches, greedy
//!   and top-k/top-p sampling.
//! - GEMMs through cuBLAS in bf16 with f32 accumulation; the residual add is the GEMM's beta.
//!   FP8 projections take a tensor-core matrix-vector kernel up to 16 tokens, cuBLASLt's FP8
//!   GEMM beyond (or the weights widened to bf16 where it has no algorithm).
//! - Decode passes captured as CUDA graphs per (batch bucket, context bucket); all buffers are
//!   allocated up front.
//! - Tensor-parallel groups: one engine drives a rank per GPU, each holding its share of the
//!   heads and FFN rows; the partial sums of the O and down projections meet in an NCCL
//!   all-reduce of the residual stream, captured into each rank's graphs.
//! - The CUDA driver and libraries are loaded at run time (cudarc's dynamic loading), so this
//!   crate builds and its host-side logic is tested on machines without a GPU.

#[cfg(feature = "harness")]
pub mod bench;
#[cfg(feature = "harness")]
pub mod checks;
mod device;
mod engine;
pub mod fp8;
mod group;
mod ipc;
mod lt;
mod model;
mod pinned;
pub mod plan;
pub mod shard;

pub use device::{DecodeAttention, Fp8Gemv, Fp8Mma, Gpu, Matrix, PrefillAttention, Prologue, WeightFormat};
pub use engine::{CudaConfig, CudaEngine, DevicePasses, DeviceSampling};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("compiling kernels: {0}")]
    Compile(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Engine(#[from] tandem_engine::EngineError),
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Blas(format!("{e:?}"))
    }
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// GPUs visible to this process (0 where there is no driver).
pub fn device_count() -> usize {
    driver_device_count().unwrap_or(0)
}

/// Asks the driver how many GPUs it sees. cudarc panics when `libcuda` cannot be loaded; that
/// is caught here, quietly (the panic hook is silenced for the call), and reported as `None`.
pub(crate) fn driver_device_count() -> Option<usize> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let n = std::panic::catch_unwind(cudarc::driver::CudaContext::device_count);
    std::panic::set_hook(hook);
    match n {
        Ok(Ok(n)) => Some(n.max(0) as usize),
        _ => None,
    }
}
