//! Registered memory and remote keys: what peers write into, and what names the peer's memory
//! here.

use super::*;

/// Page-aligned, zeroed host memory, owned through a raw pointer so that UCX (and the peer, via
/// RMA) may write into it while Rust holds no reference to it.
pub(super) struct HostMemory {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
    /// Allocated by UCX along with its mapping, and freed by the unmap: nothing to free here.
    pub(super) by_ucx: bool,
}

// SAFETY: HostMemory is an owning pointer to a plain byte buffer; it has no thread affinity.
unsafe impl Send for HostMemory {}

impl HostMemory {
    pub(super) fn layout(len: usize) -> Result<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(len, 4096).map_err(|e| Error::Invalid(format!("region of {len} bytes: {e}")))
    }

    pub(super) fn alloc(len: usize) -> Result<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: `layout` has a non-zero size (callers reject empty regions).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::Invalid(format!("out of memory for a region of {len} bytes")))?;
        Ok(HostMemory { ptr, len, by_ucx: false })
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if self.by_ucx {
            return;
        }
        if let Ok(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `alloc` with this very layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

pub(super) struct RegionInner {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
    pub(super) memh: usize,
    pub(super) rkey: Vec<u8>,
    pub(super) memory: Option<HostMemory>,
    pub(super) shared: Arc<Shared>,
}

// SAFETY: the pointer refers to memory this struct owns (through `memory`) until drop. Rust code
// only touches it through `MemRegion::read`/`write`, which copy through raw pointers, so sharing
// the region between threads creates no Rust references to memory that UCX or a peer may write.
unsafe impl Send for RegionInner {}
// SAFETY: as above.
unsafe impl Sync for RegionInner {}

impl Drop for RegionInner {
    fn drop(&mut self) {
        if let Some(memory) = self.memory.take() {
            // Unmapping is a UCX call, so the thread does it, then frees the memory. Should the
            // thread be gone, `memory` comes back inside the failed command and is freed here.
            let _ = self.shared.submit(Cmd::Unregister { memh: self.memh, memory });
        }
    }
}

/// Host memory registered with UCX (`ucp_mem_map`), which peers can access one-sidedly given its
/// [`address`](Self::address) and packed [`rkey`](Self::rkey).
///
/// Dropping it unregisters it once no local operation uses it any more, and frees the memory once
/// no endpoint being closed can still deliver a write into it. While an endpoint stays open, its
/// peer must not write into a dropped region: over TCP and shared memory nothing would stop it
/// (RDMA hardware would reject it). Keep the region, or [`Endpoint::retain`] it, for as long as a
/// peer may still write.
pub struct MemRegion {
    pub(super) inner: Arc<RegionInner>,
}

impl std::fmt::Debug for MemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemRegion").field("address", &self.address()).field("len", &self.len()).finish_non_exhaustive()
    }
}

impl MemRegion {
    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The region's address, as the peer names it in RMA operations.
    pub fn address(&self) -> u64 {
        self.inner.ptr.as_ptr() as u64
    }

    /// The packed remote key (`ucp_rkey_pack`) to send to peers.
    pub fn rkey(&self) -> &[u8] {
        &self.inner.rkey
    }

    pub(super) fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::Invalid(format!("{len} bytes at {offset} do not fit a region of {}", self.len()))),
        }
    }

    /// Copies `src` into the region at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: bounds checked above; the region is live while `self` is, and `src` cannot
        // overlap it because Rust never hands out references into region memory.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.inner.ptr.as_ptr().add(offset), src.len()) };
        Ok(())
    }

    /// The region's first `len` bytes as shared, immutable [`Bytes`], without copying. When the
    /// last clone is dropped, `release` gets the region back (to reuse it, or drop it).
    ///
    /// The caller promises what makes this sound: from now until `release` runs, nothing writes
    /// into the region, neither a local operation nor a peer (which only writes where it was told
    /// to, and was told of this region before and is done with it).
    pub fn into_bytes(self, len: usize, release: impl FnOnce(MemRegion) + Send + 'static) -> Result<Bytes> {
        self.check(0, len)?;
        Ok(Bytes::from_owner(RegionBytes { region: Some(self), len, release: Some(Box::new(release)) }))
    }

    /// Copies the region's bytes at `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: as in `write`, in the other direction.
        unsafe { ptr::copy_nonoverlapping(self.inner.ptr.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

/// A region lent out as [`Bytes`] (see [`MemRegion::into_bytes`]).
pub(super) struct RegionBytes {
    pub(super) region: Option<MemRegion>,
    pub(super) len: usize,
    pub(super) release: Option<Box<dyn FnOnce(MemRegion) + Send>>,
}

impl AsRef<[u8]> for RegionBytes {
    fn as_ref(&self) -> &[u8] {
        match &self.region {
            // SAFETY: `len` was checked against the region, which is live while `self` is; by
            // `into_bytes`'s contract nothing writes into it while it is lent out.
            Some(region) => unsafe { std::slice::from_raw_parts(region.inner.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }
}

impl Drop for RegionBytes {
    fn drop(&mut self) {
        if let (Some(region), Some(release)) = (self.region.take(), self.release.take()) {
            release(region);
        }
    }
}

pub(super) struct RkeyInner {
    pub(super) rkey: usize,
    pub(super) ep: u64,
    pub(super) shared: Arc<Shared>,
}

impl Drop for RkeyInner {
    fn drop(&mut self) {
        let _ = self.shared.submit(Cmd::DestroyRkey { rkey: self.rkey });
    }
}

/// A peer's remote key, unpacked for one endpoint. Dropping it destroys it once no operation
/// uses it any more.
pub struct RemoteKey {
    pub(super) inner: Arc<RkeyInner>,
}

impl std::fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKey").field("endpoint", &self.inner.ep).finish_non_exhaustive()
    }
}
