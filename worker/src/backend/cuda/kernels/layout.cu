// Data movement without arithmetic.
//
// split_columns: out[r, c] = x[r, start + c] for r < rows, c < width, with x [rows, d]: one
//   piece of a split of the last dimension (GPT-2's fused q/k/v projection).
//   Launch: 1-D grid-stride loop over rows * width, block 256.

extern "C" __global__ void split_columns(elem_t* out, const elem_t* x, int rows, int d, int start, int width) {
    KERNEL_CHECK(start >= 0 && width > 0 && start + width <= d);
    const size_t n = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / width, c = i % width;
        out[i] = x[r * d + start + c];
    }
}
