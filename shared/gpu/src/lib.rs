//! Moving KV blocks between GPUs of one host. With peer access enabled, a copy goes device to
//! device over NVLink or PCIe without touching host memory; where the devices cannot reach each
//! other, [`PeerLink::direct`] is false and the driver stages the copy itself (still correct,
//! slower). Blocks headed off the host (UCX, QUIC) are staged through pinned host buffers
//! instead: [`Staging`].
//!
//! The CUDA driver is loaded at run time (cudarc's dynamic loading), so this builds and links on
//! machines without CUDA; calls fail with [`GpuError`] there.
//!
//! Who uses it: today only `tandem bench gpu-peer`, which measures the copy. Its user on the
//! request path is to be the KV handoff between a prefill and a decode worker on GPUs of one host
//! (a [`crate::PeerLink`] copy instead of GPU → host → UCX → host → GPU), through the transfer
//! layer, together with the CUDA engine's export and import; until then it stays a crate of its
//! own so that the transfer crate does not link the CUDA driver bindings.

use std::sync::Arc;

use cudarc::driver::{result, sys, DevicePtr, DevicePtrMut, DriverError};
pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PinnedHostSlice};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA: {0}")]
    Driver(#[from] DriverError),
    #[error("CUDA, {what}: {error}")]
    Call { what: String, error: DriverError },
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
        sys::cudaError_enum::CUDA_SUCCESS | sys::cudaError_enum::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
        e => return Err(GpuError::Driver(DriverError(e))),
    }
    // Stream-ordered allocations come from the peer device's memory pool, which peer access does
    // not cover: map that pool for this device too, or cross-device copies would be staged.
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device is live.
    unsafe { sys::cuDeviceGetMemPool(&mut pool, peer.cu_device()) }.result()?;
    let desc = sys::CUmemAccessDesc {
        location: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: ctx.ordinal() as i32 },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: `desc` is one valid access descriptor for a device that can access the peer.
    unsafe { sys::cuMemPoolSetAccess(pool, &desc, 1) }.result()?;
    Ok(true)
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
        // SAFETY: ordering between the two streams is enforced explicitly in `copy` (an event
        // recorded on the source stream, waited on by the destination stream, and a synchronize
        // at the end), so the per-access event bookkeeping is not needed; it costs an event per
        // block per copy.
        unsafe {
            s.disable_event_tracking();
            d.disable_event_tracking();
        }
        Ok(Self { src_stream: s.new_stream()?, dst_stream: d.new_stream()?, src: s, dst: d, direct })
    }

    /// Whether copies go device to device without host staging.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Copies every source block into the destination block beside it and waits for the copy.
    /// The copies are queued on the destination's stream after everything already queued on the
    /// source's stream, so a block is never read before the work that produced it. With peer
    /// access on, each is one device-to-device copy over the GPUs' link (unified addressing).
    pub fn copy(&self, src: &[CudaSlice<u8>], dst: &mut [CudaSlice<u8>]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(GpuError::Invalid(format!("{} source blocks for {} destination blocks", src.len(), dst.len())));
        }
        if let Some((s, d)) = src.iter().zip(dst.iter()).find(|(s, d)| s.len() != d.len()) {
            return Err(GpuError::Invalid(format!("block of {} bytes into one of {}", s.len(), d.len())));
        }
        let call = |what: &str| {
            let what = what.to_string();
            move |error| GpuError::Call { what, error }
        };
        let produced = self.src_stream.record_event(None).map_err(call("recording the source stream's event"))?;
        self.dst_stream.wait(&produced).map_err(call("ordering the copy after the source stream"))?;
        self.dst.bind_to_thread()?;
        for (s, d) in src.iter().zip(dst.iter_mut()) {
            let n = s.len();
            let (from, _s) = s.device_ptr(&self.src_stream);
            let (to, _d) = d.device_ptr_mut(&self.dst_stream);
            if self.direct {
                // SAFETY: both pointers are live allocations of `n` bytes (checked above) in
                // contexts that can address each other; the stream belongs to the current context.
                unsafe { result::memcpy_dtod_async(to, from, n, self.dst_stream.cu_stream()) }.map_err(call("device-to-device copy"))?;
            } else {
                // SAFETY: as above; the driver stages the copy when the devices are not peers.
                unsafe { result::memcpy_peer_async(self.dst.cu_ctx(), to, self.src.cu_ctx(), from, n, self.dst_stream.cu_stream()) }
                    .map_err(call("peer copy"))?;
            }
        }
        self.dst_stream.synchronize().map_err(call("waiting for the copies"))?;
        Ok(())
    }
}

/// A reusable pinned host buffer for staging blocks between GPU memory and a network transport
/// (or between GPUs that cannot reach each other).
#[derive(Debug)]
pub struct Staging {
    buf: PinnedHostSlice<u8>,
}

impl Staging {
    /// `bytes` of page-locked memory usable from every context.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        // SAFETY: the buffer is written (by a device-to-host copy or by the caller) before it is
        // read.
        let buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }?;
        Ok(Self { buf })
    }

    /// Copies `blocks` back to back into the buffer on `stream` and returns the bytes.
    pub fn download(&mut self, blocks: &[CudaSlice<u8>], stream: &Arc<CudaStream>) -> Result<&mut [u8]> {
        let total: usize = blocks.iter().map(|b| b.len()).sum();
        if total > self.buf.len() {
            return Err(GpuError::Invalid(format!("{total} bytes into a staging buffer of {}", self.buf.len())));
        }
        let host = self.buf.as_mut_slice()?;
        let mut off = 0;
        for b in blocks {
            stream.memcpy_dtoh(b, &mut host[off..off + b.len()])?;
            off += b.len();
        }
        stream.synchronize()?;
        Ok(&mut host[..total])
    }

    /// The buffer, for filling from the network before an upload.
    pub fn bytes(&mut self) -> Result<&mut [u8]> {
        Ok(self.buf.as_mut_slice()?)
    }

    /// Copies the buffer's leading bytes into `blocks` on `stream` and waits.
    pub fn upload(&self, blocks: &mut [CudaSlice<u8>], stream: &Arc<CudaStream>) -> Result<()> {
        let total: usize = blocks.iter().map(|b| b.len()).sum();
        if total > self.buf.len() {
            return Err(GpuError::Invalid(format!("{total} bytes from a staging buffer of {}", self.buf.len())));
        }
        let host = self.buf.as_slice()?;
        let mut off = 0;
        for b in blocks.iter_mut() {
            let n = b.len();
            stream.memcpy_htod(&host[off..off + n], b)?;
            off += n;
        }
        stream.synchronize()?;
        Ok(())
    }
}
