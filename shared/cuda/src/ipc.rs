//! The KV pool shared with other processes of the host: the handle this engine's pool is known
//! by, and the pools of other engines it has mapped (their prefill workers' blocks copied device
//! to device, [`tandem_protocol::DeviceBlocks`]).

use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext};
use tandem_protocol::{DeviceBlocks, DevicePeer};

/// Most pools of other processes kept mapped; past it the one mapped longest ago is closed.
const MAX_MAPPED: usize = 64;

/// This engine's side of device handoffs.
#[derive(Debug)]
pub struct IpcPool {
    ctx: Arc<CudaContext>,
    node: String,
    /// The handle of this engine's own KV pool.
    pub handle: Vec<u8>,
    /// Pools of other processes, by handle: their address in this context, oldest first.
    mapped: Mutex<Vec<(Vec<u8>, u64)>>,
}

impl IpcPool {
    pub fn new(ctx: Arc<CudaContext>, handle: Vec<u8>) -> Self {
        Self { ctx, node: tandem_protocol::host_node_id(), handle, mapped: Mutex::new(Vec::new()) }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Where the pool of `blocks` is mapped in this context, mapping it if it is not yet.
    pub fn base_of(&self, blocks: &DeviceBlocks) -> Result<u64, String> {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, ptr)) = mapped.iter().find(|(h, _)| *h == blocks.handle) {
            return Ok(*ptr);
        }
        if blocks.handle == self.handle {
            return Err("the blocks are in this engine's own pool".into());
        }
        let Ok(raw) = <[u8; 64]>::try_from(blocks.handle.as_slice()) else {
            return Err(format!("a handle of {} bytes (the driver's are 64)", blocks.handle.len()));
        };
        self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        let handle = sys::CUipcMemHandle { reserved: raw.map(|b| b as std::ffi::c_char) };
        let mut ptr = 0u64;
        // SAFETY: the handle's bytes came from `cuIpcGetMemHandle` in another process (the
        // driver checks them and refuses a stale or foreign one); the mapping is closed once, by
        // `close` or `Drop`.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle, sys::CUipcMem_flags_enum::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32) }
            .result()
            .map_err(|e| format!("{e:?}"))?;
        if mapped.len() >= MAX_MAPPED {
            let (_, old) = mapped.remove(0);
            close(old);
        }
        mapped.push((blocks.handle.clone(), ptr));
        Ok(ptr)
    }
}

fn close(ptr: u64) {
    // SAFETY: `ptr` was returned by `cuIpcOpenMemHandle` and is closed only here.
    let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
}

impl Drop for IpcPool {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            for (_, ptr) in self.mapped.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
                close(ptr);
            }
        }
    }
}

impl DevicePeer for IpcPool {
    fn node(&self) -> &str {
        &self.node
    }

    fn open(&self, blocks: &DeviceBlocks) -> Result<(), String> {
        self.base_of(blocks).map(|_| ())
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
