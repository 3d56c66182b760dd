// Numerically stable softmax over the last dimension d, one block per row.
//
// softmax_rows: out[r, c] = exp(x[r, c] - max_r) / sum_c' exp(x[r, c'] - max_r).
//   -inf entries are masked out (they give exactly 0); a row that is entirely -inf gives zeros
//   rather than 0/0.
//
// Launch: grid (rows), block 256 (any multiple of 32 up to 1024). Three passes over the row
// (max, sum of exponentials, scaled exponentials); only the reductions synchronise.

extern "C" __global__ void softmax_rows(elem_t* out, const elem_t* x, int rows, int d) {
    __shared__ float scratch[32];
    KERNEL_CHECK(d > 0 && blockDim.x % 32 == 0);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const elem_t* xr = x + (size_t)r * d;
    elem_t* o = out + (size_t)r * d;

    float m = -INFINITY;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        m = fmaxf(m, load(xr[c]));
    }
    m = block_max(m, scratch);
    if (m == -INFINITY) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            o[c] = store(0.0f);
        }
        return;
    }

    // The exponentials are recomputed in the last pass rather than stored, so that in half
    // precision only the final probabilities are rounded.
    float sum = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        sum += expf(load(xr[c]) - m);
    }
    const float inv = 1.0f / block_sum(sum, scratch);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        o[c] = store(expf(load(xr[c]) - m) * inv);
    }
}
