// Token selection on the device, so that only one id per sequence (not a vocabulary of logits)
// crosses to the host at each decode step.
//
// argmax_rows: out[r] = the index of the largest of x[r, 0..vocab); the first one on ties
//   (as torch.argmax and the CPU sampler); NaN never wins (a row of only NaN gives 0).
//   Launch: grid (rows), block 256 (a multiple of 32 up to 1024). Each thread scans a strided
//   slice, then (value, index) pairs are reduced across the warp with shuffles and across warps
//   through shared memory.
// sample_rows: out[r] = a draw from softmax(x[r] / temps[r]) with the uniform uniforms[r], the
//   host's draw_in_index_order (sampling.rs): weights w_i = exp((x_i - max) / T) in double (NaN
//   gives 0), target = u * sum(w), and the first index whose running sum passes the target.
//   temps[r] == 0 gives the argmax, as does a row whose maximum is not finite. Each thread sums
//   a contiguous chunk of the row; thread 0 scans the chunk sums in shared memory (exclusive
//   prefix, in double), and the one thread whose chunk holds the target walks it. The host sums
//   in a single running order, so a target within rounding (~1e-16 relative) of a boundary
//   between two tokens may pick the neighbour; otherwise the draws are the same.
//   Launch: grid (rows), block 256 (a multiple of 32 up to 1024).

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

// The argmax of one row, valid in thread 0 (every thread of the block must call it).
__device__ unsigned int row_argmax(const elem_t* xr, int vocab) {
    __shared__ float best_v[32];
    __shared__ unsigned int best_i[32];
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
    }
    return bi;
}

extern "C" __global__ void argmax_rows(unsigned int* out, const elem_t* x, int rows, int vocab) {
    KERNEL_CHECK(vocab > 0 && blockDim.x % 32 == 0);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const unsigned int id = row_argmax(x + (size_t)r * vocab, vocab);
    if (threadIdx.x == 0) {
        out[r] = id;
    }
}

#define SAMPLE_MAX_THREADS 1024
#define NONE 0xffffffffu

extern "C" __global__ void sample_rows(unsigned int* out, const elem_t* x, const float* temps,
                                       const double* uniforms, int rows, int vocab) {
    __shared__ double starts[SAMPLE_MAX_THREADS + 1];
    __shared__ unsigned int last_positive[SAMPLE_MAX_THREADS];
    __shared__ float scratch[32];
    __shared__ unsigned int chosen;
    KERNEL_CHECK(vocab > 0 && blockDim.x % 32 == 0 && blockDim.x <= SAMPLE_MAX_THREADS);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const elem_t* xr = x + (size_t)r * vocab;
    const float t = temps[r];
    float m = -INFINITY;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        m = fmaxf(m, load(xr[c])); // fmaxf drops NaN operands
    }
    m = block_max(m, scratch);
    if (t == 0.0f || !isfinite(m)) { // uniform for the block
        const unsigned int id = row_argmax(xr, vocab);
        if (threadIdx.x == 0) {
            out[r] = id;
        }
        return;
    }

    const double inv_t = 1.0 / (double)t;
    const int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    const int begin = min(vocab, (int)threadIdx.x * chunk), end = min(vocab, begin + chunk);
    double sum = 0.0;
    unsigned int last = NONE;
    for (int c = begin; c < end; ++c) {
        const double w = exp(((double)load(xr[c]) - (double)m) * inv_t);
        if (w > 0.0) { // false for NaN
            sum += w;
            last = c;
        }
    }
    starts[threadIdx.x] = sum;
    last_positive[threadIdx.x] = last;
    if (threadIdx.x == 0) {
        chosen = NONE;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double running = 0.0;
        for (int i = 0; i < (int)blockDim.x; ++i) {
            const double s = starts[i];
            starts[i] = running;
            running += s;
        }
        starts[blockDim.x] = running;
    }
    __syncthreads();

    const double target = uniforms[r] * starts[blockDim.x];
    const double start = starts[threadIdx.x];
    // starts[i + 1] is exactly start + sum (the scan's own addition), so one chunk at most holds
    // the target.
    if (sum > 0.0 && target >= start && target < starts[threadIdx.x + 1]) {
        double left = target - start;
        unsigned int pick = last; // rounding past the chunk's end: its last positive weight
        for (int c = begin; c < end; ++c) {
            const double w = exp(((double)load(xr[c]) - (double)m) * inv_t);
            if (w > 0.0) {
                if (left < w) {
                    pick = c;
                    break;
                }
                left -= w;
            }
        }
        chosen = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int id = chosen;
        if (id == NONE) { // rounding put the target at or past the total: the last positive weight
            for (int i = (int)blockDim.x - 1; i >= 0 && id == NONE; --i) {
                id = last_positive[i];
            }
        }
        out[r] = id == NONE ? 0u : id;
    }
}
