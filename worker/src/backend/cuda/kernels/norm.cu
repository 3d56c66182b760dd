// Row normalisations over the last dimension d, one block per row.
//
// layer_norm: with v = x (+ bias[c] when has_bias) (+ residual when has_residual),
//   mean = sum(v) / d,  var = sum((v - mean)^2) / d  (biased, as PyTorch),
//   out = (v - mean) / sqrt(var + eps) * gamma + beta.
//   The bias is that of the product x came from (BERT's output projections: their bias pass
//   folded in here instead of a pass of its own). The sum is rounded to the storage type
//   (stored into out) before the statistics, as every backend stores it. The variance is a second pass over the row, not E[v^2] - mean^2, which
//   cancels badly when |mean| >> std.
// rms_norm: out = x / sqrt(sum(x^2) / d + eps) * weight (Llama).
//
// Launch: grid (rows), block 256 (any multiple of 32 up to 1024); threads stride over the row,
// each thread rereading only the elements it wrote, so no barrier is needed between passes
// beyond the reductions'.

extern "C" __global__ void layer_norm(elem_t* out, const elem_t* x, const elem_t* residual, int has_residual,
                                      const elem_t* bias, int has_bias, const elem_t* gamma, const elem_t* beta,
                                      int rows, int d, float eps) {
    __shared__ float scratch[32];
    KERNEL_CHECK(d > 0 && blockDim.x % 32 == 0);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const elem_t* xr = x + (size_t)r * d;
    const elem_t* rr = residual + (size_t)r * d;
    elem_t* o = out + (size_t)r * d;

    const bool summed = has_residual || has_bias; // v is stored in out first
    float sum = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = load(xr[c]);
        if (summed) {
            o[c] = store(v + (has_bias ? load(bias[c]) : 0.0f) + (has_residual ? load(rr[c]) : 0.0f));
            v = load(o[c]);
        }
        sum += v;
    }
    const float mean = block_sum(sum, scratch) / d;

    float sq = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = load(summed ? o[c] : xr[c]) - mean;
        sq += v * v;
    }
    const float inv = 1.0f / sqrtf(block_sum(sq, scratch) / d + eps);

    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = load(summed ? o[c] : xr[c]);
        o[c] = store((v - mean) * inv * load(gamma[c]) + load(beta[c]));
    }
}

extern "C" __global__ void rms_norm(elem_t* out, const elem_t* x, const elem_t* weight, int rows, int d,
                                    float eps) {
    __shared__ float scratch[32];
    KERNEL_CHECK(d > 0 && blockDim.x % 32 == 0);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const elem_t* xr = x + (size_t)r * d;
    elem_t* o = out + (size_t)r * d;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = load(xr[c]);
        sq += v * v;
    }
    const float inv = 1.0f / sqrtf(block_sum(sq, scratch) / d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        o[c] = store(load(xr[c]) * inv * load(weight[c]));
    }
}
