// Row normalisations over the last dimension d, one block per row.
//
// layer_norm_f32: with v = x (+ residual when has_residual),
//   mean = sum(v) / d,  var = sum((v - mean)^2) / d  (biased, as PyTorch),
//   out = (v - mean) / sqrt(var + eps) * gamma + beta.
//   The residual sum is rounded to fp32 (stored into out) before the statistics, as every
//   backend stores it. The variance is a second pass over the row, not E[v^2] - mean^2, which
//   cancels badly when |mean| >> std.
// rms_norm_f32: out = x / sqrt(sum(x^2) / d + eps) * weight (Llama).
//
// Launch: grid (rows), block 256 (any multiple of 32 up to 1024); threads stride over the row,
// each thread rereading only the elements it wrote, so no barrier is needed between passes
// beyond the reductions'.

extern "C" __global__ void layer_norm_f32(float* out, const float* x, const float* residual, int has_residual,
                                          const float* gamma, const float* beta, int rows, int d, float eps) {
    __shared__ float scratch[32];
    KERNEL_CHECK(d > 0 && blockDim.x % 32 == 0);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const float* xr = x + (size_t)r * d;
    const float* rr = residual + (size_t)r * d;
    float* o = out + (size_t)r * d;

    float sum = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = xr[c];
        if (has_residual) {
            v += rr[c];
            o[c] = v;
        }
        sum += v;
    }
    const float mean = block_sum(sum, scratch) / d;

    float sq = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = (has_residual ? o[c] : xr[c]) - mean;
        sq += v * v;
    }
    const float inv = 1.0f / sqrtf(block_sum(sq, scratch) / d + eps);

    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = has_residual ? o[c] : xr[c];
        o[c] = (v - mean) * inv * gamma[c] + beta[c];
    }
}

extern "C" __global__ void rms_norm_f32(float* out, const float* x, const float* weight, int rows, int d,
                                        float eps) {
    __shared__ float scratch[32];
    KERNEL_CHECK(d > 0 && blockDim.x % 32 == 0);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const float* xr = x + (size_t)r * d;
    float* o = out + (size_t)r * d;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        sq += xr[c] * xr[c];
    }
    const float inv = 1.0f / sqrtf(block_sum(sq, scratch) / d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        o[c] = xr[c] * inv * weight[c];
    }
}
