//! The CUDA backend (cargo feature `cuda`): [`CudaBackend`] runs every [`Backend`] operation on
//! one NVIDIA GPU through cudarc, with its libraries loaded at run time, so the feature builds on
//! machines without CUDA.
//!
//! - [`context`]: the device, its stream, cuBLAS and cuBLASLt, the loaded kernels, error mapping.
//! - [`kernels`]: the `.cu` sources (embedded) and their NVRTC compilation, to CUBIN for the
//!   GPU's architecture (PTX for one newer than NVRTC knows).
//! - [`kernel_cache`]: compiled kernels kept on disk between starts (`--kernel-cache-dir`).
//! - [`tensor`]: [`CudaTensor`], a device buffer and its shape; the buffer goes back to the
//!   backend's buffer cache when dropped (`backend::buffer_cache`), so passes of shapes seen
//!   before ask the driver for no memory.
//! - [`gemm`]: matrix products through cuBLAS in the storage precision, fp32 accumulation.
//! - [`dense_chunks`]: how a dense prompt's attention is cut into pieces whose scores fit.
//! - [`bias_epilogue`]: products whose bias cuBLASLt adds in its epilogue, planned per shape.
//! - [`gemv`]: products of a few rows (decode steps) through our matrix-vector kernel, with
//!   the RMS norm, bias, activation, SwiGLU and residual add folded in.
//! - [`launch`]: the launch macro and launch shapes the ops share.
//! - [`ops`]: the operations: cuBLAS for matrix products, our kernels for the rest.
//! - [`paged`]: key/value pools: a step's block tables uploaded once, rows written in place,
//!   attention read through the tables.
//! - [`graph`]: CUDA graphs for decode steps (opt-in): a step's launches recorded once per
//!   batch size and replayed with its inputs staged at fixed addresses.
//! - `emulator.h` (tests only): a CPU model of CUDA's execution, so the tests can run the
//!   kernels' own source without a GPU.
//!
//! Tensors are stored in the backend's [`Precision`] (fp32, fp16 or bf16; the kernels are
//! compiled for it) and every op accumulates in fp32. In fp32 results match the CPU backend to
//! ~1e-5, which is what the GPU tests hold them to; in half precision each stored value carries
//! one rounding (2^-11 relative for fp16, 2^-8 for bf16) and the tests hold results to bounds
//! derived from that. Requires libcuda (the driver), libnvrtc and libcublas (libcublasLt optional) of CUDA 13 on the
//! library path.
//!
//! [`Precision`]: crate::backend::Precision
//!
//! [`Backend`]: crate::backend::Backend

mod bias_epilogue;
mod context;
mod dense_chunks;
mod gemm;
mod gemv;
mod graph;
mod kernel_cache;
pub(crate) mod kernels;
mod launch;
mod ops;
mod paged;
mod tensor;

#[cfg(test)]
mod emulated_tests;
#[cfg(test)]
mod tests;

pub use context::{CudaBackend, KernelBuild};
pub use gemv::GEMV_MAX_ROWS;
pub use paged::CudaPaged;
pub use tensor::CudaTensor;
