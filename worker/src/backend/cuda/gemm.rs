//! Matrix products through cuBLAS's mixed-precision entry points (`cublasGemmEx`,
//! `cublasGemmStridedBatchedEx`) on the backend's raw buffers: operands and result in the
//! storage precision, accumulation in fp32 (`CUBLAS_COMPUTE_32F`). For fp32 tensors that is
//! plain single precision (no TF32), so results match the CPU backend's; for fp16/bf16 cuBLAS
//! runs the product on tensor cores.
//!
//! The attention scores are the one product written in fp32 from half-precision operands
//! (`Gemm::c_f32`). The unfused attention's products are batches given by address
//! (`cublasGemmBatchedEx`), so that they read q, k and v where they are.
//!
//! cuBLAS is column-major. The callers describe the product in its terms: `C[m × n] =
//! op(A)[m × k] · op(B)[k × n]`, each operand with its leading dimension.

use cudarc::cublas::result::{CublasError, gemm_ex, gemm_strided_batched_ex};
use cudarc::cublas::sys::cublasGemmBatchedEx;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cublasStatus_t, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::context::CudaBackend;
use crate::backend::{BackendError, Precision, Result};

/// One column-major product `C = op(A) · op(B)`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Gemm {
    /// Whether A (and B) are read transposed.
    pub transa: bool,
    pub transb: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
    /// C is fp32 whatever the storage precision (attention scores, which the softmax reads in
    /// full precision); otherwise C is in the storage precision like A and B.
    pub c_f32: bool,
    /// `C += op(A) · op(B)` (beta 1: a residual add folded into the product) instead of `C =`.
    pub accumulate: bool,
}

/// Strides (in elements) between the matrices of a batched product.
#[derive(Clone, Copy, Debug)]
pub(super) struct Batch {
    pub count: i32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
}

fn data_type(p: Precision) -> cudaDataType_t {
    match p {
        Precision::F32 => cudaDataType_t::CUDA_R_32F,
        Precision::F16 => cudaDataType_t::CUDA_R_16F,
        Precision::Bf16 => cudaDataType_t::CUDA_R_16BF,
    }
}

fn op(transposed: bool) -> cublasOperation_t {
    if transposed {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// `context: error`, out of memory (cuBLAS could not allocate) as its own error: it fails the
/// product, not the device.
fn blas_err(context: &str, e: CublasError) -> BackendError {
    if e.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
        BackendError::OutOfMemory(format!("{context}: cuBLAS could not allocate"))
    } else {
        BackendError::Device(format!("{context}: {e}"))
    }
}

impl CudaBackend {
    /// `c = a · b` as `g` describes, once or `batch.count` times; `what` names the product in
    /// errors.
    ///
    /// # Safety
    /// The buffers must hold every element `g` and `batch` address, in the backend's precision.
    pub(super) unsafe fn gemm(
        &self,
        what: &str,
        g: Gemm,
        batch: Option<Batch>,
        a: &CudaSlice<u8>,
        b: &CudaSlice<u8>,
        c: &mut CudaSlice<u8>,
    ) -> Result<()> {
        self.bind()?;
        let ty = data_type(self.precision);
        let c_ty = if g.c_f32 { cudaDataType_t::CUDA_R_32F } else { ty };
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        let (a_ptr, _a_sync) = a.device_ptr(&self.stream);
        let (b_ptr, _b_sync) = b.device_ptr(&self.stream);
        let (c_ptr, _c_sync) = c.device_ptr_mut(&self.stream);
        let handle = *self.blas.handle();
        let compute = cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        // SAFETY: the pointers are live device buffers of this backend's stream (cuBLAS is bound
        // to it), alpha and beta are fp32 as COMPUTE_32F requires, and the caller vouches for the
        // extents.
        let result = unsafe {
            match batch {
                None => gemm_ex(
                    handle,
                    op(g.transa),
                    op(g.transb),
                    g.m,
                    g.n,
                    g.k,
                    (&alpha as *const f32).cast(),
                    a_ptr as *const _,
                    ty,
                    g.lda,
                    b_ptr as *const _,
                    ty,
                    g.ldb,
                    (&beta as *const f32).cast(),
                    c_ptr as *mut _,
                    c_ty,
                    g.ldc,
                    compute,
                    algo,
                ),
                Some(s) => gemm_strided_batched_ex(
                    handle,
                    op(g.transa),
                    op(g.transb),
                    g.m,
                    g.n,
                    g.k,
                    (&alpha as *const f32).cast(),
                    a_ptr as *const _,
                    ty,
                    g.lda,
                    s.stride_a,
                    b_ptr as *const _,
                    ty,
                    g.ldb,
                    s.stride_b,
                    (&beta as *const f32).cast(),
                    c_ptr as *mut _,
                    c_ty,
                    g.ldc,
                    s.stride_c,
                    s.count,
                    compute,
                    algo,
                ),
            }
        };
        result.map_err(|e| blas_err(&format!("cuBLAS {} gemm ({what})", self.precision), e))
    }

    /// `C[i] = op(A[i]) · op(B[i])` as `g` describes, for the `count` matrices whose device
    /// addresses are in the tables at `tables` (A, B and C: device arrays of `count` addresses
    /// each); `what` names the product in errors.
    ///
    /// # Safety
    /// The tables must hold `count` addresses each, every one of a live buffer of this stream
    /// holding every element `g` addresses from it, in the backend's precision (C in fp32 when
    /// `g.c_f32`).
    pub(super) unsafe fn gemm_pointers(
        &self,
        what: &str,
        g: Gemm,
        count: usize,
        tables: [u64; 3],
    ) -> Result<()> {
        self.bind()?;
        let ty = data_type(self.precision);
        let c_ty = if g.c_f32 { cudaDataType_t::CUDA_R_32F } else { ty };
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        let count = i32::try_from(count)
            .map_err(|_| BackendError::Device(format!("cuBLAS batched gemm ({what}): {count} matrices")))?;
        let [a, b, c] = tables;
        // SAFETY: the caller vouches for the tables and the extents; alpha and beta are fp32 as
        // COMPUTE_32F requires; cuBLAS is bound to the backend's stream.
        unsafe {
            cublasGemmBatchedEx(
                *self.blas.handle(),
                op(g.transa),
                op(g.transb),
                g.m,
                g.n,
                g.k,
                (&alpha as *const f32).cast(),
                a as *const *const std::ffi::c_void,
                ty,
                g.lda,
                b as *const *const std::ffi::c_void,
                ty,
                g.ldb,
                (&beta as *const f32).cast(),
                c as *const *mut std::ffi::c_void,
                c_ty,
                g.ldc,
                count,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()
        .map_err(|e| blas_err(&format!("cuBLAS {} batched gemm ({what})", self.precision), e))
    }
}
