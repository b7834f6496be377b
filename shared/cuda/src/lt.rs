//! FP8 tensor-core GEMMs through cuBLASLt: `y[n × m] (+)= x[n × k] · Wᵀ` with W in E4M3 and one
//! scale per weight row, x quantised to E4M3 per token (one scale per row of x) just before, both
//! scale vectors applied by cuBLASLt's outer-vector scaling, f32 accumulation. A plan (descriptor,
//! layouts, the heuristic's algorithm) is made once per shape and kept; a shape the library
//! cannot run this way is remembered as such, and its caller widens the weights to bf16 instead.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use crate::device::Dt;
use crate::{CudaError, Result};

/// `cublasOperation_t` values (the attributes take them as 32-bit integers).
const OP_N: i32 = 0;
const OP_T: i32 = 1;

/// How many of the library's ranked algorithms a plan asks for.
const HEURISTICS: usize = 8;

/// Workspace the library may use per GEMM.
pub const LT_WORKSPACE_BYTES: usize = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    out: u8,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct Fp8Gemm {
    handle: sys::cublasLtHandle_t,
    /// Which of the library's ranked candidates a plan runs: the first, unless
    /// `TANDEM_CUDA_LT_ALGO` names another (for measuring them against each other).
    pick: usize,
    /// `None`: the library has no algorithm for the shape.
    plans: Mutex<HashMap<Key, Option<Plan>>>,
}

// SAFETY: the handle and descriptors are plain library objects; the engine drives one GPU from
// one thread at a time, and the plan map is behind a mutex.
unsafe impl Send for Fp8Gemm {}
unsafe impl Sync for Fp8Gemm {}

fn blas(e: lt::CublasError) -> CudaError {
    CudaError::Blas(format!("cuBLASLt: {e:?}"))
}

fn lt_type(d: Dt) -> sys::cudaDataType {
    match d {
        Dt::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        Dt::F32 => sys::cudaDataType::CUDA_R_32F,
    }
}

/// Sets one descriptor attribute from a plain value.
///
/// # Safety
/// `desc` is live and `T` is the attribute's documented type.
unsafe fn set<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    // SAFETY: `v` is a live value of the attribute's size (caller's contract).
    unsafe { lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) }.map_err(blas)
}

impl Fp8Gemm {
    pub fn new() -> Result<Self> {
        let pick = std::env::var("TANDEM_CUDA_LT_ALGO").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Self { handle: lt::create_handle().map_err(blas)?, pick, plans: Mutex::new(HashMap::new()) })
    }

    /// The library checks that a vector scale mode has its pointer before it offers an
    /// algorithm, so the plan is made with real scale vectors in place (each call sets its own).
    fn plan(&self, key: Key, scales: (u64, u64)) -> Result<Option<Plan>> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F).map_err(blas)?;
        let out = if key.out == 0 { Dt::Bf16 } else { Dt::F32 };
        // SAFETY: `desc` was just created; each value has its attribute's type (operations and
        // scale modes are 32-bit integers).
        unsafe {
            set(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &OP_T)?;
            set(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &OP_N)?;
            let outer = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as i32;
            set(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
            set(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
            let (ws, xs) = (scales.0 as *const c_void, scales.1 as *const c_void);
            set(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws)?;
            set(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs)?;
        }
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let a = lt::create_matrix_layout(sys::cudaDataType::CUDA_R_8F_E4M3, k, m, k as i64).map_err(blas)?;
        let b = lt::create_matrix_layout(sys::cudaDataType::CUDA_R_8F_E4M3, k, n, k as i64).map_err(blas)?;
        let d = lt::create_matrix_layout(lt_type(out), m, n, m as i64).map_err(blas)?;
        let pref = lt::create_matmul_pref().map_err(blas)?;
        let ws = LT_WORKSPACE_BYTES as u64;
        // SAFETY: all objects were just created and are destroyed below or kept in the plan.
        let found = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(blas)?;
            let mut results: [sys::cublasLtMatmulHeuristicResult_t; HEURISTICS] = std::mem::zeroed();
            let mut count = 0i32;
            let status = sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                a,
                b,
                d,
                d,
                pref,
                HEURISTICS as i32,
                results.as_mut_ptr(),
                &mut count,
            );
            lt::destroy_matmul_pref(pref).map_err(blas)?;
            let usable: Vec<sys::cublasLtMatmulAlgo_t> = results[..count.clamp(0, HEURISTICS as i32) as usize]
                .iter()
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect();
            match status {
                sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS if !usable.is_empty() => Ok(usable),
                sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Err(lt::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)),
                other => Err(lt::CublasError(other)),
            }
        };
        match found {
            Ok(algos) => {
                let pick = self.pick.min(algos.len() - 1);
                tracing::debug!(m, n, k, candidates = algos.len(), pick, "cuBLASLt FP8 plan");
                Ok(Some(Plan { desc, a, b, d, algo: algos[pick] }))
            }
            Err(e) => {
                tracing::warn!(m, n, k, error = ?e, "no cuBLASLt FP8 algorithm for this shape; widening to bf16");
                // SAFETY: created above, used by nothing else.
                unsafe {
                    lt::destroy_matrix_layout(a).map_err(blas)?;
                    lt::destroy_matrix_layout(b).map_err(blas)?;
                    lt::destroy_matrix_layout(d).map_err(blas)?;
                    lt::destroy_matmul_desc(desc).map_err(blas)?;
                }
                Ok(None)
            }
        }
    }

    /// Whether the library runs this shape (planning it on first sight with the weight's and
    /// the input's scale vectors, `scales`).
    pub fn supports(&self, m: usize, n: usize, k: usize, out: Dt, scales: (u64, u64)) -> Result<bool> {
        let key = Key { m, n, k, out: if out == Dt::Bf16 { 0 } else { 1 } };
        let mut plans = self.plans.lock().expect("plans lock");
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(key, scales)?),
        };
        Ok(plan.is_some())
    }

    /// `y[n × m] (+)= x_q[n × k] · W_qᵀ` scaled by `w_scale[m]` and `x_scale[n]`. The shape must
    /// have passed [`Fp8Gemm::supports`].
    ///
    /// # Safety
    /// `w` holds m×k E4M3 bytes, `x` n×k, `w_scale` m and `x_scale` n f32 values, `y` m·n
    /// elements of `out`'s type, `workspace` at least [`LT_WORKSPACE_BYTES`], all on the device
    /// of `stream`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        w: u64,
        w_scale: u64,
        x: u64,
        x_scale: u64,
        y: u64,
        (m, n, k): (usize, usize, usize),
        out: Dt,
        accumulate: bool,
        workspace: u64,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let key = Key { m, n, k, out: if out == Dt::Bf16 { 0 } else { 1 } };
        let plans = self.plans.lock().expect("plans lock");
        let plan =
            plans.get(&key).and_then(Option::as_ref).ok_or_else(|| CudaError::Unsupported(format!("no FP8 GEMM plan for {m}×{n}×{k}")))?;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let (ws, xs) = (w_scale as *const c_void, x_scale as *const c_void);
        // SAFETY: the plan's objects are live; pointers and sizes per this function's contract.
        unsafe {
            set(plan.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws)?;
            set(plan.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs)?;
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                plan.a,
                x as *const c_void,
                plan.b,
                y as *const c_void,
                plan.d,
                y as *mut c_void,
                plan.d,
                &plan.algo,
                workspace as *mut c_void,
                LT_WORKSPACE_BYTES,
                stream,
            )
            .map_err(blas)
        }
    }
}

impl Drop for Fp8Gemm {
    fn drop(&mut self) {
        let plans = std::mem::take(&mut *self.plans.lock().expect("plans lock"));
        // SAFETY: nothing uses the plans or the handle after the engine drops this.
        unsafe {
            for p in plans.into_values().flatten() {
                let _ = lt::destroy_matrix_layout(p.a);
                let _ = lt::destroy_matrix_layout(p.b);
                let _ = lt::destroy_matrix_layout(p.d);
                let _ = lt::destroy_matmul_desc(p.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
