//! Moving KV blocks between GPUs of one host. With peer access enabled, a copy goes device to
//! device over NVLink or PCIe without touching host memory; where the devices cannot reach each
//! other, [`PeerLink::direct`] is false and the driver stages the copy itself (still correct,
//! slower). Blocks headed off the host (UCX, QUIC) are staged through pinned host buffers
//! instead: [`Staging`].
//!
//! The CUDA driver is loaded at run time (cudarc's dynamic loading), so this builds and links on
//! machines without CUDA; calls fail with [`GpuError`] there.

use std::sync::Arc;

pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PinnedHostSlice};
use cudarc::driver::{sys, DriverError};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA: {0}")]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, GpuError>;

/// GPUs visible to this process (0 where there is no driver).
pub fn device_count() -> usize {
    std::panic::catch_unwind(|| CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)).unwrap_or(0)
}

/// A copy path from one GPU to another, with a stream on each side.
#[derive(Debug)]
pub struct PeerLink {
    pub src: Arc<CudaContext>,
    pub dst: Arc<CudaContext>,
    pub src_stream: Arc<CudaStream>,
    pub dst_stream: Arc<CudaStream>,
    direct: bool,
}

/// Enables `ctx` to address `peer`'s memory; false if the hardware cannot.
fn enable_peer(ctx: &Arc<CudaContext>, peer: &Arc<CudaContext>) -> Result<bool> {
    let mut can = 0i32;
    // SAFETY: `can` is a valid out-pointer; both devices come from live contexts.
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, ctx.cu_device(), peer.cu_device()) }.result()?;
    if can == 0 {
        return Ok(false);
    }
    ctx.bind_to_thread()?;
    // SAFETY: `peer.cu_ctx()` is a live primary context held by `peer`; flags must be 0.
    match unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) } {
        sys::cudaError_enum::CUDA_SUCCESS | sys::cudaError_enum::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(true),
        e => Err(GpuError::Driver(DriverError(e))),
    }
}

impl PeerLink {
    /// Opens the path from GPU `src` to GPU `dst`, enabling peer access both ways where the
    /// devices allow it.
    pub fn open(src: usize, dst: usize) -> Result<Self> {
        if src == dst {
            return Err(GpuError::Invalid(format!("a peer link needs two GPUs, got {src} twice")));
        }
        let (s, d) = (CudaContext::new(src)?, CudaContext::new(dst)?);
        let direct = enable_peer(&d, &s)? && enable_peer(&s, &d)?;
        Ok(Self { src_stream: s.new_stream()?, dst_stream: d.new_stream()?, src: s, dst: d, direct })
    }

    /// Whether copies go device to device without host staging.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Copies every source block into the destination block beside it and waits for the copy.
    /// The copies are queued on the destination's stream after everything already queued on the
    /// source's stream, so a block is never read before the work that produced it.
    pub fn copy(&self, src: &[CudaSlice<u8>], dst: &mut [CudaSlice<u8>]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(GpuError::Invalid(format!("{} source blocks for {} destination blocks", src.len(), dst.len())));
        }
        for (s, d) in src.iter().zip(dst.iter_mut()) {
            if s.len() != d.len() {
                return Err(GpuError::Invalid(format!("block of {} bytes into one of {}", s.len(), d.len())));
            }
            self.dst_stream.memcpy_dtod(s, d)?;
        }
        self.dst_stream.synchronize()?;
        Ok(())
    }
}

/// A reusable pinned host buffer for staging blocks between a GPU and a network transport.
#[derive(Debug)]
pub struct Staging {
    stream: Arc<CudaStream>,
    buf: PinnedHostSlice<u8>,
}

impl Staging {
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        // SAFETY: the buffer is written (by a device-to-host copy) before it is read.
        let buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }?;
        Ok(Self { stream: ctx.new_stream()?, buf })
    }

    /// Copies `blocks` (back to back) into the pinned buffer and returns it.
    pub fn download(&mut self, blocks: &[CudaSlice<u8>]) -> Result<&[u8]> {
        let total: usize = blocks.iter().map(|b| b.len()).sum();
        if total > self.buf.len() {
            return Err(GpuError::Invalid(format!("{total} bytes into a staging buffer of {}", self.buf.len())));
        }
        let mut off = 0;
        for b in blocks {
            let dst = self.buf.as_mut_slice()?;
            self.stream.memcpy_dtoh(b, &mut dst[off..off + b.len()])?;
            off += b.len();
        }
        self.stream.synchronize()?;
        Ok(&self.buf.as_slice()?[..total])
    }

    /// Copies bytes from the pinned buffer (filled by `fill`) into `blocks` on `stream`'s device.
    pub fn upload(&mut self, fill: impl FnOnce(&mut [u8]), blocks: &mut [CudaSlice<u8>], stream: &Arc<CudaStream>) -> Result<()> {
        let total: usize = blocks.iter().map(|b| b.len()).sum();
        if total > self.buf.len() {
            return Err(GpuError::Invalid(format!("{total} bytes from a staging buffer of {}", self.buf.len())));
        }
        fill(&mut self.buf.as_mut_slice()?[..total]);
        let mut off = 0;
        for b in blocks.iter_mut() {
            let n = b.len();
            stream.memcpy_htod(&self.buf.as_slice()?[off..off + n], b)?;
            off += n;
        }
        stream.synchronize()?;
        Ok(())
    }
}
