//! The all-reduce of a tensor-parallel group on GPUs: one NCCL communicator per rank, every rank
//! a GPU driven by this process's one engine thread. Each collective is issued inside an NCCL
//! group call, so the ranks' launches are queued together instead of one rank waiting for the
//! others to arrive. NCCL is loaded at run time, like the CUDA libraries; a machine without it
//! runs groups of one.

use std::ffi::c_void;

use cudarc::nccl::{result as nccl, sys as nccl_sys};

use crate::device::Gpu;
use crate::{CudaError, Result};

pub(crate) struct Nccl {
    comms: Vec<nccl_sys::ncclComm_t>,
}

fn err(what: &str, e: nccl::NcclError) -> CudaError {
    CudaError::Nccl(format!("{what}: {:?}", e.0))
}

impl Nccl {
    /// One communicator per GPU of `gpus`, rank `r` on `gpus[r]`.
    pub fn new(gpus: &[&Gpu]) -> Result<Self> {
        // SAFETY: only tries to open the library; nothing is called through it.
        if !unsafe { nccl_sys::is_culib_present() } {
            return Err(CudaError::Nccl(
                "libnccl.so not found: a tensor-parallel group on GPUs needs NCCL (install it, or put its folder on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let ordinals: Vec<i32> = gpus.iter().map(|g| g.ctx.ordinal() as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); gpus.len()];
        // SAFETY: `comms` has room for one communicator per ordinal; the ordinals are devices
        // this process opened.
        unsafe { nccl::comm_init_all(comms.as_mut_ptr(), ordinals.len() as i32, ordinals.as_ptr()) }
            .map_err(|e| err("creating the group's communicators", e))?;
        Ok(Self { comms })
    }

    /// Sums `count` f32 values at address `bufs[r]` of rank `r` across the ranks, in place,
    /// ordered on each rank's stream (so it can be captured into the ranks' graphs).
    pub fn all_reduce_f32(&self, gpus: &[&Gpu], bufs: &[u64], count: usize) -> Result<()> {
        debug_assert!(gpus.len() == self.comms.len() && bufs.len() == self.comms.len());
        nccl::group_start().map_err(|e| err("group start", e))?;
        let mut queued = Ok(());
        for ((&comm, gpu), &ptr) in self.comms.iter().zip(gpus).zip(bufs) {
            // SAFETY: `ptr` addresses at least `count` f32 values on the communicator's device
            // (the rank's residual stream, sized for the largest pass); send and receive buffers
            // being the same is NCCL's in-place form.
            let r = unsafe {
                nccl::all_reduce(
                    ptr as *const c_void,
                    ptr as *mut c_void,
                    count,
                    nccl_sys::ncclDataType_t::ncclFloat32,
                    nccl_sys::ncclRedOp_t::ncclSum,
                    comm,
                    gpu.stream.cu_stream() as nccl_sys::cudaStream_t,
                )
            };
            if let Err(e) = r {
                queued = Err(err("all-reduce", e));
                break;
            }
        }
        // The group is always closed, even after a failed call, or the next collective would
        // join a broken group.
        let ended = nccl::group_end().map_err(|e| err("group end", e));
        queued.and(ended).map(|_| ())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        for &c in &self.comms {
            // SAFETY: each communicator was created by `comm_init_all` and is destroyed once.
            let _ = unsafe { nccl::comm_destroy(c) };
        }
    }
}

// SAFETY: communicators are opaque handles NCCL allows to be used from any thread, one at a
// time; the engine that owns them is driven by one thread at a time (`Send`, not `Sync`).
unsafe impl Send for Nccl {}
