//! The CUDA backend's tensor: a device buffer of `f32` and its shape.

use cudarc::driver::CudaSlice;

/// A dense row-major `f32` tensor in device memory. The buffer holds at least one element (CUDA
/// allocations of zero bytes are refused), so its length can exceed the shape's element count;
/// only the first `numel` elements are meaningful.
#[derive(Debug)]
pub struct CudaTensor {
    pub(super) buf: CudaSlice<f32>,
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
