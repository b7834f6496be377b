//! Page-locked host memory for KV blocks on their way out of the cache or into it, in
//! block-sized slots.
//!
//! A copy between the device and pageable memory goes through the driver's own bounce buffers
//! and holds the calling thread until it is done; with page-locked memory it is one DMA at the
//! link's speed. A prefill worker reads every prompt's blocks out, and a decode worker writes
//! every handoff's blocks in, on the engine's thread, so both go through slots: allocated once,
//! on first use (a decode worker never makes export slots, a prefill worker no import slots),
//! and reused. A block read out is a [`Bytes`] that owns its slot and gives it back when the
//! last reader (the handoff, the offload to the block store) drops it; a block received is read
//! off the socket straight into a slot ([`BlockMemory`]), and its slot comes back once the
//! import copied it to the device.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, CudaContext};
use tandem_protocol::{BlockMemory, Bytes, ReceiveBuffer};

use crate::Result;

/// One allocation of `slots × slot` page-locked bytes and the slots not handed out.
struct Arena {
    base: *mut u8,
    slot: usize,
    free: Mutex<Vec<usize>>,
    ctx: Arc<CudaContext>,
}

// SAFETY: the arena's memory is only reached through slots, each owned by one `Slot` at a time
// (the free list hands an index to one taker), and the driver's free is thread-agnostic.
unsafe impl Send for Arena {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for Arena {}

impl Drop for Arena {
    fn drop(&mut self) {
        // Slots hold the arena alive, so nothing points into the memory any more.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `base` came from `malloc_host` and is freed once, here.
            let _ = unsafe { result::free_host(self.base.cast()) };
        }
    }
}

/// A slot taken from the arena; its memory is this slot's alone until it drops.
struct Slot {
    arena: Arc<Arena>,
    index: usize,
}

impl Slot {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: `index < slots`, so the offset stays inside the allocation.
        unsafe { self.arena.base.add(self.index * self.arena.slot) }
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the slot's `slot` bytes lie inside the arena, which outlives `self`; nothing
        // writes them while the slot is shared (the device copy into it finished before the slot
        // became a `Bytes`).
        unsafe { std::slice::from_raw_parts(self.ptr(), self.arena.slot) }
    }
}

impl ReceiveBuffer for Slot {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the slot's memory is this slot's alone (see `Slot`), and `&mut self` makes this
        // the only view of it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.arena.slot) }
    }

    fn freeze(self: Box<Self>) -> Bytes {
        Bytes::from_owner(*self)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.arena.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.index);
    }
}

/// Block-sized slots of page-locked host memory; cloning shares them.
#[derive(Clone)]
pub(crate) struct PinnedSlots {
    arena: Arc<Arena>,
}

impl std::fmt::Debug for PinnedSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedSlots").field("slot", &self.arena.slot).field("free", &self.free()).finish()
    }
}

/// Slots being filled: the device writes into them until the stream is synchronised, after which
/// [`Filling::into_bytes`] hands them out.
pub(crate) struct Filling {
    slots: Vec<Slot>,
}

impl Filling {
    /// No slots: every block goes the pageable way.
    pub fn none() -> Self {
        Self { slots: Vec::new() }
    }

    /// How many slots were taken (possibly fewer than asked: the rest go the pageable way).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Slot `i` as the destination of a device copy.
    ///
    /// # Safety
    /// The caller writes into it only through a copy it synchronises before
    /// [`Filling::into_bytes`], and reads nothing from it meanwhile.
    pub unsafe fn dst(&mut self, i: usize) -> &mut [u8] {
        self.slots[i].as_mut_slice()
    }

    /// The filled slots as bytes; each slot returns to the arena when its last clone drops.
    pub fn into_bytes(self) -> Vec<Bytes> {
        self.slots.into_iter().map(Bytes::from_owner).collect()
    }
}

impl PinnedSlots {
    /// Allocates `slots` slots of `slot` bytes each.
    pub fn new(ctx: &Arc<CudaContext>, slot: usize, slots: usize) -> Result<Self> {
        ctx.bind_to_thread()?;
        // SAFETY: a plain page-locked allocation (cacheable: the host reads it back, to checksum
        // and send it); it is freed by the arena's drop.
        let base = unsafe { result::malloc_host(slot * slots, 0)? }.cast::<u8>();
        let arena = Arena { base, slot, free: Mutex::new((0..slots).rev().collect()), ctx: ctx.clone() };
        Ok(Self { arena: Arc::new(arena) })
    }

    /// Up to `n` free slots.
    pub fn take(&self, n: usize) -> Filling {
        let mut free = self.arena.free.lock().unwrap_or_else(|e| e.into_inner());
        let k = n.min(free.len());
        let at = free.len() - k;
        let slots = free.drain(at..).map(|index| Slot { arena: self.arena.clone(), index }).collect();
        Filling { slots }
    }

    /// Slots not handed out.
    pub fn free(&self) -> usize {
        self.arena.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Slots allocated on first use (`what` names them in the warning when none can be had).
pub(crate) struct LazySlots {
    ctx: Arc<CudaContext>,
    slot: usize,
    slots: usize,
    what: &'static str,
    cell: OnceLock<Option<PinnedSlots>>,
}

impl std::fmt::Debug for LazySlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazySlots").field("what", &self.what).field("slot", &self.slot).field("slots", &self.slots).finish()
    }
}

impl LazySlots {
    pub fn new(ctx: &Arc<CudaContext>, slot: usize, slots: usize, what: &'static str) -> Self {
        Self { ctx: ctx.clone(), slot, slots, what, cell: OnceLock::new() }
    }

    /// The slots, allocated now if this is the first use; `None` when there are none to have.
    pub fn get(&self) -> Option<&PinnedSlots> {
        self.cell
            .get_or_init(|| {
                if self.slots == 0 {
                    return None;
                }
                match PinnedSlots::new(&self.ctx, self.slot, self.slots) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::warn!(error = %e, what = self.what, "no page-locked memory; copies go through pageable memory");
                        None
                    }
                }
            })
            .as_ref()
    }
}

impl BlockMemory for LazySlots {
    fn buffer(&self, len: usize) -> Option<Box<dyn ReceiveBuffer>> {
        if len != self.slot {
            return None;
        }
        let mut taken = self.get()?.take(1);
        let slot = taken.slots.pop()?;
        Some(Box::new(slot))
    }
}
