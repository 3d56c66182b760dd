// Token selection on the device, so that only one id per sequence (not a vocabulary of logits)
// crosses to the host at each decode step.
//
// argmax_rows: out[r] = the index of the largest of x[r, 0..vocab); the first one on ties
//   (as torch.argmax and the CPU sampler); NaN never wins (a row of only NaN gives 0).
//   Launch: grid (rows), block 256 (a multiple of 32 up to 1024). Each thread scans a strided
//   slice, then (value, index) pairs are reduced across the warp with shuffles and across warps
//   through shared memory.

// True when candidate (v, i) beats the current best (bv, bi).
__device__ __forceinline__ bool beats(float v, unsigned int i, float bv, unsigned int bi) {
    if (isnan(v)) {
        return false;
    }
    if (isnan(bv)) {
        return true;
    }
    return v > bv || (v == bv && i < bi);
}

extern "C" __global__ void argmax_rows(unsigned int* out, const elem_t* x, int rows, int vocab) {
    __shared__ float best_v[32];
    __shared__ unsigned int best_i[32];
    KERNEL_CHECK(vocab > 0 && blockDim.x % 32 == 0);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const elem_t* xr = x + (size_t)r * vocab;
    float bv = NAN;
    unsigned int bi = 0;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = load(xr[c]);
        if (beats(v, c, bv, bi)) {
            bv = v;
            bi = c;
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, offset);
        const unsigned int oi = __shfl_xor_sync(FULL_MASK, bi, offset);
        if (beats(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)blockDim.x / 32; ++w) {
            if (beats(best_v[w], best_i[w], bv, bi)) {
                bv = best_v[w];
                bi = best_i[w];
            }
        }
        out[r] = bi;
    }
}
