//! The KV pool shared with other processes of the host: the handle this engine's pool is known
//! by, and the pools of other engines it has mapped (their prefill workers' blocks copied device
//! to device, [`tandem_protocol::DeviceBlocks`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{sys, CudaContext};
use tandem_protocol::{DeviceBlocks, DevicePeer};

/// Most pools of other processes kept mapped; past it the one used longest ago is closed.
const MAX_MAPPED: usize = 16;
/// A mapping unused this long is closed (its sender restarted or left): an open mapping may keep
/// the exporter's memory from being freed.
const IDLE_CLOSE: Duration = Duration::from_secs(600);

/// Another process's pool mapped into this context; closed when the last holder drops it, so a
/// copy in progress keeps its source mapped even if the pool is evicted meanwhile.
#[derive(Debug)]
pub struct Mapping {
    ctx: Arc<CudaContext>,
    /// Where the pool starts in this context.
    pub base: u64,
    /// Its size in bytes, from the driver.
    pub bytes: u64,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `base` was returned by `cuIpcOpenMemHandle` and is closed only here, once
            // nothing holds the mapping.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.base) };
        }
    }
}

/// A mapped pool, by handle, and when it was last used.
type Entry = (Vec<u8>, Arc<Mapping>, Instant);

/// This engine's side of device handoffs.
#[derive(Debug)]
pub struct IpcPool {
    ctx: Arc<CudaContext>,
    node: String,
    /// The handle of this engine's own KV pool.
    pub handle: Vec<u8>,
    /// Pools of other processes, least recently used first.
    mapped: Mutex<Vec<Entry>>,
}

impl IpcPool {
    pub fn new(ctx: Arc<CudaContext>, handle: Vec<u8>) -> Self {
        Self { ctx, node: tandem_protocol::host_node_id(), handle, mapped: Mutex::new(Vec::new()) }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The mapping of the pool `blocks` lie in, made if it is not yet. Hold it while copying.
    pub fn mapping(&self, blocks: &DeviceBlocks) -> Result<Arc<Mapping>, String> {
        let now = Instant::now();
        {
            let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
            mapped.retain(|(_, _, used)| now.duration_since(*used) < IDLE_CLOSE);
            if let Some(i) = mapped.iter().position(|(h, _, _)| *h == blocks.handle) {
                let mut e = mapped.remove(i);
                e.2 = now;
                let m = e.1.clone();
                mapped.push(e);
                return Ok(m);
            }
        }
        if blocks.handle == self.handle {
            return Err("the blocks are in this engine's own pool".into());
        }
        let Ok(raw) = <[u8; 64]>::try_from(blocks.handle.as_slice()) else {
            return Err(format!("a handle of {} bytes (the driver's are 64)", blocks.handle.len()));
        };
        // Mapped outside the lock: the engine's thread may be looking up another pool meanwhile.
        self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        let handle = sys::CUipcMemHandle { reserved: raw.map(|b| b as std::ffi::c_char) };
        let mut base = 0u64;
        // SAFETY: the handle's bytes came from `cuIpcGetMemHandle` in another process (the
        // driver checks them and refuses a stale or foreign one); the mapping is closed once, by
        // `Mapping::drop`.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut base, handle, sys::CUipcMem_flags_enum::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32) }
            .result()
            .map_err(|e| format!("{e:?}"))?;
        let mut mapping = Mapping { ctx: self.ctx.clone(), base, bytes: 0 };
        let (mut start, mut size) = (0u64, 0usize);
        // SAFETY: `base` is a device address of this context; the driver writes the range.
        unsafe { sys::cuMemGetAddressRange_v2(&mut start, &mut size, base) }.result().map_err(|e| format!("{e:?}"))?;
        mapping.bytes = (start + size as u64).saturating_sub(base);
        let mapping = Arc::new(mapping);
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = mapped.iter().position(|(h, _, _)| *h == blocks.handle) {
            // Mapped by another thread meanwhile: keep that one (ours closes as it drops).
            return Ok(mapped[i].1.clone());
        }
        if mapped.len() >= MAX_MAPPED {
            mapped.remove(0);
        }
        mapped.push((blocks.handle.clone(), mapping.clone(), now));
        Ok(mapping)
    }

    /// The mapping of `blocks`' pool, once every block of `block_bytes` is checked to lie in it.
    pub fn checked(&self, blocks: &DeviceBlocks, block_bytes: usize) -> Result<Arc<Mapping>, String> {
        let m = self.mapping(blocks)?;
        blocks.check_within(m.bytes, block_bytes)?;
        Ok(m)
    }
}

impl DevicePeer for IpcPool {
    fn node(&self) -> &str {
        &self.node
    }

    fn open(&self, blocks: &DeviceBlocks, block_bytes: usize) -> Result<(), String> {
        self.checked(blocks, block_bytes).map(|_| ())
    }
}

/// Runs of blocks that lie back to back on both sides: `(dst, src, count)` in blocks and bytes'
/// offsets, so a handoff is a few large copies rather than one per block.
pub fn copy_runs(dst: &[u64], src: &[u64], block_bytes: u64) -> Vec<(u64, u64, u64)> {
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for (&d, &s) in dst.iter().zip(src) {
        match runs.last_mut() {
            Some((rd, rs, n)) if *rd + *n * block_bytes == d && *rs + *n * block_bytes == s => *n += 1,
            _ => runs.push((d, s, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::copy_runs;

    #[test]
    fn adjacent_blocks_on_both_sides_merge_into_one_copy() {
        let b = 100;
        assert_eq!(copy_runs(&[0, 100, 200, 500], &[1000, 1100, 1200, 1300], b), vec![(0, 1000, 3), (500, 1300, 1)]);
        assert_eq!(copy_runs(&[0, 100], &[1000, 900], b), vec![(0, 1000, 1), (100, 900, 1)]);
        assert!(copy_runs(&[], &[], b).is_empty());
    }
}
