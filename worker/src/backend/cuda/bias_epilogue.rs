//! Projections with their bias added by cuBLASLt's epilogue (`CUBLASLT_EPILOGUE_BIAS`): the
//! product, the residual it accumulates onto (beta 1) and the bias in one kernel; for GPT-2's
//! MLP up-projection the bias and its GELU (`CUBLASLT_EPILOGUE_GELU_BIAS`). Through
//! `cublasGemmEx` the bias is a pass of our `bias_act` kernel over the output after the product:
//! for BERT-base at 32 × 128 tokens, 19 MB read and written again per QKV projection, twelve
//! times a pass; for GPT-2 three such passes a layer (QKV, attention output, FFN down).
//!
//! The GELU epilogue is the tanh approximation (GPT-2's `gelu_new`): cuBLASLt's documentation
//! names no form, and PyTorch, which takes this epilogue for CUDA's `_addmm_activation`, defines
//! that op by `gelu(approximate="tanh")`; the GPU tests hold it to the reference's tanh form.
//! BERT's GELU is the erf form, which no epilogue computes: its up-projection takes cuBLAS and
//! `bias_act`, which adds the bias and applies the activation in one pass (the bias epilogue
//! followed by an activation pass would cost the same).
//!
//! A plan per product shape (the descriptors, the layouts and the algorithm cuBLASLt's
//! heuristic picks for them) is made on a shape's first product and kept, so later passes
//! ask the heuristic nothing. A shape cuBLASLt has no algorithm for, or that fails to plan
//! (with a warning), is remembered as refused; its products, every product whose buffers are
//! not aligned as the algorithms assume, and every product when the library is missing or the
//! epilogue is turned off take the cuBLAS product and `bias_act` instead
//! ([`BiasEpilogue::run`] says which happened). So a projection never fails because of the
//! epilogue, except for a launch that fails outright, which would fail the cuBLAS path too.
//!
//! Which path a product takes depends on its buffers' alignment: every allocation is 256-byte
//! aligned, and CUDA documents the stream-ordered pool (what graph captures allocate from) only
//! as "suitably aligned". A captured step whose buffers were less aligned would take the bias
//! pass, one rounding away from the plain step's result (the product stored before its bias is
//! added); decode steps of up to four rows never reach either (the matrix-vector kernel).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::sys::{
    self as lt, cublasComputeType_t, cublasLtEpilogue_t, cublasLtMatmulDescAttributes_t,
    cublasLtMatmulPreferenceAttributes_t, cublasStatus_t, cudaDataType_t,
};

use super::context::CudaBackend;
use crate::backend::{BackendError, Precision, Result};

/// The alignment every buffer of a product must have: cuBLASLt's heuristic assumes 256 bytes
/// unless told less (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*`), and every allocation has it.
pub(super) const ALIGNMENT: u64 = 256;

/// One projection `out[n, m] = x[n, k] · W[m, k]ᵀ + bias[m]` (row-major), onto `out` as it
/// is when `accumulate` (a residual added in place), through GELU (tanh form) when
/// `gelu_tanh` (never with `accumulate`). In cuBLAS's column-major terms that is
/// `outᵀ[m × n] = op_T(W) · xᵀ`, as `cublas_linear` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct BiasProduct {
    pub n: u64,
    pub k: u64,
    pub m: u64,
    pub accumulate: bool,
    pub gelu_tanh: bool,
}

/// The device addresses of a [`BiasProduct`]'s buffers.
#[derive(Clone, Copy, Debug)]
pub(super) struct BiasOperands {
    pub weight: u64,
    pub x: u64,
    pub bias: u64,
    pub out: u64,
}

impl BiasOperands {
    /// Whether every buffer is [`ALIGNMENT`]-aligned.
    pub(super) fn aligned(&self) -> bool {
        [self.weight, self.x, self.bias, self.out]
            .iter()
            .all(|a| a % ALIGNMENT == 0)
    }
}

/// A shape's descriptors and chosen algorithm, destroyed with it.
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    /// W (`k × m`, read transposed), x (`k × n`) and out (`m × n`), column-major.
    weight: lt::cublasLtMatrixLayout_t,
    x: lt::cublasLtMatrixLayout_t,
    out: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created for this plan alone and is destroyed once; a failure
        // to destroy leaks a few bytes of host memory, nothing to act on.
        unsafe {
            let _ = lt::cublasLtMatmulDescDestroy(self.desc);
            for layout in [self.weight, self.x, self.out] {
                if !layout.is_null() {
                    let _ = lt::cublasLtMatrixLayoutDestroy(layout);
                }
            }
        }
    }
}

/// What the plans hold under their lock: the library handle with them, since cuBLASLt calls
/// on one handle and its descriptors are made here one at a time.
struct Plans {
    handle: lt::cublasLtHandle_t,
    /// `None`: the shape was refused.
    by_shape: HashMap<BiasProduct, Option<Plan>>,
}

/// cuBLASLt's bias epilogue on one stream: its handle, its plans and whether it is on.
pub(super) struct BiasEpilogue {
    plans: Mutex<Plans>,
    data_type: cudaDataType_t,
    /// The backend's cuBLAS workspace (the two libraries take turns on one stream), which the
    /// backend keeps for as long as this.
    workspace: (u64, usize),
    enabled: AtomicBool,
}

// SAFETY: the handle and the plans' descriptors are host objects of cuBLASLt that it allows
// any thread to use; here they are only touched with the lock held, one call at a time.
unsafe impl Send for Plans {}

impl Drop for Plans {
    fn drop(&mut self) {
        self.by_shape.clear();
        // SAFETY: created in `BiasEpilogue::new`, destroyed once, after the plans made with it.
        let _ = unsafe { lt::cublasLtDestroy(self.handle) };
    }
}

fn lt_err(what: &str, status: cublasStatus_t) -> BackendError {
    if status == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
        BackendError::OutOfMemory(format!("{what}: cuBLASLt could not allocate"))
    } else {
        BackendError::Device(format!("{what}: {status:?}"))
    }
}

fn check(what: &str, status: cublasStatus_t) -> Result<()> {
    match status {
        cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        s => Err(lt_err(what, s)),
    }
}

/// Why a product has no plan: no algorithm for it (expected for some shapes), or a failure
/// while planning (a bug of ours or of the library, worth a warning). Either way its
/// products take cuBLAS and `bias_act`.
#[derive(Debug)]
enum Refusal {
    NoAlgorithm,
    Failed(String),
}

impl From<BackendError> for Refusal {
    fn from(e: BackendError) -> Self {
        Refusal::Failed(e.to_string())
    }
}

/// What a product's launch status means: enqueued, refused before anything was enqueued
/// (`NOT_SUPPORTED`: no kernel for it after all; `INVALID_VALUE`: arguments cuBLASLt
/// rejects, a bug to warn of), or an error of the product.
#[derive(Debug, PartialEq)]
enum Launch {
    Done,
    Unsupported,
    Rejected,
    Failed,
}

fn launch_outcome(status: cublasStatus_t) -> Launch {
    match status {
        cublasStatus_t::CUBLAS_STATUS_SUCCESS => Launch::Done,
        cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => Launch::Unsupported,
        cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE => Launch::Rejected,
        _ => Launch::Failed,
    }
}

/// Sets one attribute of a descriptor to `value`.
///
/// # Safety
/// `desc` must be live and `T` the attribute's type.
unsafe fn set_desc<T>(
    desc: lt::cublasLtMatmulDesc_t,
    attr: cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: the caller vouches for the descriptor and the value's type.
    let status = unsafe {
        lt::cublasLtMatmulDescSetAttribute(desc, attr, (value as *const T).cast::<c_void>(), size_of::<T>())
    };
    check(&format!("cuBLASLt: setting {attr:?}"), status)
}

impl BiasEpilogue {
    /// Opens cuBLASLt for products in `precision` using the given workspace (device address
    /// and bytes). The error says why it cannot be used (the library missing, say); the
    /// backend then adds biases in `bias_act`.
    pub(super) fn new(precision: Precision, workspace: (u64, usize)) -> std::result::Result<Self, String> {
        // cudarc panics on first use of a library it cannot load.
        // SAFETY: this only tries to load the library; no symbol is called.
        if !unsafe { lt::is_culib_present() } {
            return Err("cuBLASLt (libcublasLt.so) not found on the library path".into());
        }
        let mut handle: lt::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: writes a new handle into `handle`.
        let status = unsafe { lt::cublasLtCreate(&mut handle) };
        if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("creating the cuBLASLt handle: {status:?}"));
        }
        Ok(Self {
            plans: Mutex::new(Plans {
                handle,
                by_shape: HashMap::new(),
            }),
            data_type: match precision {
                Precision::F32 => cudaDataType_t::CUDA_R_32F,
                Precision::F16 => cudaDataType_t::CUDA_R_16F,
                Precision::Bf16 => cudaDataType_t::CUDA_R_16BF,
            },
            workspace,
            enabled: AtomicBool::new(true),
        })
    }

    /// Turns the epilogue on or off; returns whether that changed anything.
    pub(super) fn set_enabled(&self, enabled: bool) -> bool {
        self.enabled.swap(enabled, Ordering::Relaxed) != enabled
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether `p` was planned (`Some(true)`), refused (`Some(false)`) or never seen (`None`).
    #[cfg(test)]
    pub(super) fn plan_state(&self, p: BiasProduct) -> Option<bool> {
        let plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        plans.by_shape.get(&p).map(Option::is_some)
    }

    /// How many shapes have a plan and how many were refused.
    pub(super) fn plan_counts(&self) -> (usize, usize) {
        let plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        let planned = plans.by_shape.values().filter(|p| p.is_some()).count();
        (planned, plans.by_shape.len() - planned)
    }

    /// Enqueues `p` on `stream` with its bias in the epilogue; `Ok(false)` when this product
    /// is not one the epilogue takes (turned off, buffers unaligned, shape refused) and
    /// nothing was enqueued.
    ///
    /// # Safety
    /// The addresses must be live device buffers of `stream` holding every element `p`
    /// addresses, in the precision given to [`BiasEpilogue::new`].
    pub(super) unsafe fn run(
        &self,
        p: BiasProduct,
        ops: BiasOperands,
        stream: lt::cudaStream_t,
    ) -> Result<bool> {
        if !self.enabled()
            || !ops.aligned()
            || p.n == 0
            || p.k == 0
            || p.m == 0
            || (p.gelu_tanh && p.accumulate)
        {
            return Ok(false);
        }
        // A plan left half made by a panic elsewhere is never stored, so a poisoned lock still
        // guards consistent plans.
        let mut guard = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        let Plans { handle, by_shape } = &mut *guard;
        let handle = *handle;
        let plan = match by_shape.entry(p) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(match self.plan(handle, p) {
                Ok(plan) => Some(plan),
                Err(Refusal::NoAlgorithm) => {
                    tracing::debug!(?p, "cuBLASLt has no bias-epilogue algorithm for this product; it takes cuBLAS and bias_act");
                    None
                }
                Err(Refusal::Failed(why)) => {
                    tracing::warn!(?p, %why, "cannot plan a bias-epilogue product; it takes cuBLAS and bias_act");
                    None
                }
            }),
        };
        let Some(ready) = plan.as_ref() else {
            return Ok(false);
        };
        // SAFETY: a live descriptor of this plan; the attribute is a device pointer.
        let bias_set = unsafe {
            set_desc(
                ready.desc,
                cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &(ops.bias as *const c_void),
            )
        };
        if let Err(e) = bias_set {
            tracing::warn!(?p, error = %e, "cannot set a bias-epilogue product's bias pointer; it takes cuBLAS and bias_act");
            *plan = None;
            return Ok(false);
        }
        let (alpha, beta) = (1.0f32, if p.accumulate { 1.0f32 } else { 0.0 });
        let (workspace, workspace_bytes) = self.workspace;
        // SAFETY: the plan's layouts describe the caller's buffers (the caller vouches for
        // their extents); C and D are the one output buffer with one layout, which cuBLASLt
        // allows; alpha and beta are fp32 as the fp32 scale type requires; the workspace is
        // the backend's, used in stream order.
        let status = unsafe {
            lt::cublasLtMatmul(
                handle,
                ready.desc,
                (&alpha as *const f32).cast(),
                ops.weight as *const c_void,
                ready.weight,
                ops.x as *const c_void,
                ready.x,
                (&beta as *const f32).cast(),
                ops.out as *const c_void,
                ready.out,
                ops.out as *mut c_void,
                ready.out,
                &ready.algo,
                workspace as *mut c_void,
                workspace_bytes,
                stream,
            )
        };
        match launch_outcome(status) {
            Launch::Done => Ok(true),
            Launch::Unsupported => {
                tracing::debug!(
                    ?p,
                    "cuBLASLt refused a planned bias-epilogue product; it takes cuBLAS and bias_act"
                );
                *plan = None;
                Ok(false)
            }
            Launch::Rejected => {
                tracing::warn!(
                    ?p,
                    ?status,
                    "cuBLASLt rejected a bias-epilogue product's arguments; it takes cuBLAS and bias_act"
                );
                *plan = None;
                Ok(false)
            }
            Launch::Failed => Err(lt_err(
                &format!("cuBLASLt bias-epilogue product {}x{}x{}", p.n, p.k, p.m),
                status,
            )),
        }
    }

    /// The plan for `p`, or why there is none.
    fn plan(&self, handle: lt::cublasLtHandle_t, p: BiasProduct) -> std::result::Result<Plan, Refusal> {
        let what = "cuBLASLt: planning a bias-epilogue product";
        let ty = self.data_type;
        let layout = |rows: u64, cols: u64| -> Result<lt::cublasLtMatrixLayout_t> {
            let mut l: lt::cublasLtMatrixLayout_t = std::ptr::null_mut();
            // SAFETY: writes a new layout into `l`; rows is the leading dimension (packed).
            check(what, unsafe {
                lt::cublasLtMatrixLayoutCreate(&mut l, ty, rows, cols, rows as i64)
            })?;
            Ok(l)
        };
        let mut desc: lt::cublasLtMatmulDesc_t = std::ptr::null_mut();
        // SAFETY: writes a new descriptor into `desc`. fp32 accumulation and scale, as the
        // cuBLAS products (no TF32 for fp32 tensors).
        check(what, unsafe {
            lt::cublasLtMatmulDescCreate(
                &mut desc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cudaDataType_t::CUDA_R_32F,
            )
        })?;
        // The plan owns each handle as soon as it exists, so an error below frees them.
        let mut plan = Plan {
            desc,
            weight: std::ptr::null_mut(),
            x: std::ptr::null_mut(),
            out: std::ptr::null_mut(),
            algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.weight = layout(p.k, p.m)?;
        plan.x = layout(p.k, p.n)?;
        plan.out = layout(p.m, p.n)?;
        // SAFETY: a live descriptor; each value has its attribute's type (int32 operations,
        // uint32 epilogue, int32 data type).
        unsafe {
            use cublasLtMatmulDescAttributes_t as A;
            set_desc(
                desc,
                A::CUBLASLT_MATMUL_DESC_TRANSA,
                &cublasOperation_t::CUBLAS_OP_T,
            )?;
            set_desc(
                desc,
                A::CUBLASLT_MATMUL_DESC_TRANSB,
                &cublasOperation_t::CUBLAS_OP_N,
            )?;
            let epilogue = if p.gelu_tanh {
                cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS
            } else {
                cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
            };
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &ty)?;
        }
        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: writes a new preference into `pref`.
        check(what, unsafe { lt::cublasLtMatmulPreferenceCreate(&mut pref) })?;
        let workspace_bytes = self.workspace.1 as u64;
        let mut found = lt::cublasLtMatmulHeuristicResult_t {
            algo: plan.algo,
            workspaceSize: 0,
            state: cublasStatus_t::CUBLAS_STATUS_SUCCESS,
            wavesCount: 0.0,
            reserved: [0; 4],
        };
        let mut count = 0;
        // SAFETY: live handles; the preference's attribute is a uint64 byte count; the
        // heuristic writes at most the one result asked for.
        let (set, status) = unsafe {
            let set = lt::cublasLtMatmulPreferenceSetAttribute(
                pref,
                cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace_bytes as *const u64).cast(),
                size_of::<u64>(),
            );
            let status = if set == cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                lt::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    desc,
                    plan.weight,
                    plan.x,
                    plan.out,
                    plan.out,
                    pref,
                    1,
                    &mut found,
                    &mut count,
                )
            } else {
                set
            };
            let _ = lt::cublasLtMatmulPreferenceDestroy(pref);
            (set, status)
        };
        // A preference we could not set is our mistake, not the shape's.
        check("cuBLASLt: setting the workspace preference", set)?;
        match status {
            cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => return Err(Refusal::NoAlgorithm),
            cublasStatus_t::CUBLAS_STATUS_SUCCESS if count == 0 => return Err(Refusal::NoAlgorithm),
            s => check("cuBLASLt: the algorithm heuristic", s)?,
        }
        check("cuBLASLt: the heuristic's algorithm", found.state)?;
        if found.workspaceSize > self.workspace.1 {
            return Err(Refusal::Failed(format!(
                "the heuristic's algorithm needs {} bytes of workspace, more than the {} given",
                found.workspaceSize, self.workspace.1
            )));
        }
        plan.algo = found.algo;
        Ok(plan)
    }
}

impl CudaBackend {
    /// Turns cuBLASLt's bias epilogue on or off (on by default where cuBLASLt opened); off,
    /// every bias is a `bias_act` pass after the cuBLAS product. Benchmarks time both; tests
    /// compare them. Recorded decode graphs are dropped on a change, as for `set_gemv`.
    pub fn set_bias_epilogue(&self, enabled: bool) {
        if self
            .bias_epilogue
            .as_ref()
            .is_some_and(|e| e.set_enabled(enabled))
        {
            self.forget_decode_graphs();
        }
    }

    /// Whether products with a bias may take the epilogue: cuBLASLt opened and it is on.
    pub fn bias_epilogue_enabled(&self) -> bool {
        self.bias_epilogue.as_ref().is_some_and(BiasEpilogue::enabled)
    }

    /// Whether the product `x [n, k] · W[m, k]ᵀ` (onto a residual when `accumulate`, through
    /// GELU when `gelu_tanh`) was planned (`Some(true)`), refused (`Some(false)`) or never seen
    /// (`None`), for tests.
    #[cfg(test)]
    pub(crate) fn bias_epilogue_plan(
        &self,
        (n, k, m): (usize, usize, usize),
        accumulate: bool,
        gelu_tanh: bool,
    ) -> Option<bool> {
        let p = BiasProduct {
            n: n as u64,
            k: k as u64,
            m: m as u64,
            accumulate,
            gelu_tanh,
        };
        self.bias_epilogue.as_ref().and_then(|e| e.plan_state(p))
    }

    /// Product shapes the epilogue has planned and refused so far.
    pub fn bias_epilogue_plans(&self) -> (usize, usize) {
        self.bias_epilogue
            .as_ref()
            .map_or((0, 0), BiasEpilogue::plan_counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operands(weight: u64) -> BiasOperands {
        BiasOperands {
            weight,
            x: 512,
            bias: 1024,
            out: 4096,
        }
    }

    #[test]
    fn only_fully_aligned_operands_take_the_epilogue() {
        assert!(operands(0).aligned());
        assert!(operands(ALIGNMENT * 7).aligned());
        // A view 16 bytes into an allocation: fine for our kernels, not for the epilogue's
        // algorithms.
        assert!(!operands(ALIGNMENT + 16).aligned());
        let mut bias_off = operands(0);
        bias_off.bias += 2;
        assert!(!bias_off.aligned());
    }

    #[test]
    fn refusals_are_told_apart_from_failures() {
        assert_eq!(
            launch_outcome(cublasStatus_t::CUBLAS_STATUS_SUCCESS),
            Launch::Done
        );
        assert_eq!(
            launch_outcome(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED),
            Launch::Unsupported
        );
        assert_eq!(
            launch_outcome(cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE),
            Launch::Rejected
        );
        assert_eq!(
            launch_outcome(cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED),
            Launch::Failed
        );
        assert_eq!(
            launch_outcome(cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED),
            Launch::Failed
        );
        assert!(matches!(
            lt_err("x", cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED),
            BackendError::OutOfMemory(_)
        ));
        assert!(matches!(
            lt_err("x", cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED),
            BackendError::Device(_)
        ));
        assert!(matches!(
            Refusal::from(lt_err("planning", cublasStatus_t::CUBLAS_STATUS_INTERNAL_ERROR)),
            Refusal::Failed(why) if why.contains("planning") && why.contains("INTERNAL_ERROR")
        ));
    }
}
