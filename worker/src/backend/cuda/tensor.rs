//! The CUDA backend's tensor: a device buffer and its shape.

use cudarc::driver::CudaSlice;

/// A dense row-major tensor in device memory, its elements stored in the backend's precision
/// (the buffer is raw bytes; the kernels read it as their `elem_t`). The buffer holds at least
/// one element (CUDA allocations of zero bytes are refused), so it can be longer than the
/// shape's element count; only the first `numel` elements are meaningful.
#[derive(Debug)]
pub struct CudaTensor {
    pub(super) buf: CudaSlice<u8>,
    pub(super) shape: Vec<usize>,
}

impl CudaTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements the shape describes.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}
