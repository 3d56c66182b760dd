// Token selection on the device, so that only one id per sequence (not a vocabulary of logits)
// crosses to the host at each decode step.
//
// argmax_rows: out[r] = the index of the largest of x[r, 0..vocab); the first one on ties
//   (as torch.argmax and the CPU sampler); NaN never wins (a row of only NaN gives 0).
//   Launch: grid (rows), block 256 (a multiple of 32 up to 1024). Each thread scans a strided
//   slice, then (value, index) pairs are reduced across the warp with shuffles and across warps
//   through shared memory.
// sample_rows: out[r] = the token sampling.rs's `choose` picks from x[r] with the draw
//   draws[4r .. 4r+4) = (temperature T, top_k, top_p, uniform u), all as doubles:
//   - T == 0, or a row whose maximum is not finite: the argmax;
//   - weights w_i = exp((x_i - max) / T) in double (NaN logits are never kept);
//   - the kept set: the top_k largest logits (0 or at least the row keeps all; ties to the lower
//     index), then the shortest prefix of those, largest first, whose weights reach top_p of their
//     sum (1 keeps all);
//   - the draw: target = u * (sum of kept weights), and the first kept index, in index order,
//     whose running sum passes the target.
//   The cuts need no sort. Logits map to order keys (unsigned integers that order as the floats
//   do), and an 8-bit radix select over the keys finds the cut: top-k by counting keys (exact),
//   top-p by summing weights in 64-bit fixed point per radix bin (integer sums, so the same on
//   every run). Keys equal to the cut's are kept in index order until the count or the mass is
//   reached. The draw: each thread sums a contiguous chunk of the row; thread 0 scans the chunk
//   sums in shared memory (exclusive prefix, in double), and the one thread whose chunk holds
//   the target walks it. The host sums in one running order and compares the nucleus in double,
//   so a uniform or a top_p within rounding (~1e-13 relative) of a boundary between two tokens
//   may pick the neighbour; otherwise the draws are the same.
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
#define RADIX 256

// The order key of a float that is not NaN: key(a) > key(b) exactly when a > b, with -0 below
// +0 (Rust's total_cmp, which the host's sort uses). No such float has key 0.
__device__ __forceinline__ unsigned int order_key(float v) {
    const unsigned int bits = __float_as_uint(v);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The float whose order key is `key`.
__device__ __forceinline__ float key_value(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The draw weight exp((v - m) / T), computed as the host computes it.
__device__ __forceinline__ double draw_weight(float v, float m, double inv_t) {
    return exp(((double)v - (double)m) * inv_t);
}

// A weight in [0, 1] as an integer: w * scale, rounded down.
__device__ __forceinline__ unsigned long long fixed_weight(float v, float m, double inv_t, double scale) {
    return (unsigned long long)(draw_weight(v, m, inv_t) * scale);
}

// A kept set of a row: every value whose key is above `key`, and the first `ties` (in index
// order) of those whose key equals it. Key 0 with ties 0 keeps every value that is not NaN.
struct Cut {
    unsigned int key;
    unsigned int ties;
};

// The top-k cut: the k-th largest key among the row's values that are not NaN
// (1 <= k <= their count) and how many of the values with that key are within the k. Radix
// select, 8 bits a pass from the top, counting keys in shared memory. Every thread of the block
// calls it; the result is in *cut for all of them on return.
__device__ void select_top_k(const elem_t* xr, int vocab, unsigned int k, unsigned int* counts, Cut* cut) {
    unsigned int prefix = 0, mask = 0, rest = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < RADIX; i += blockDim.x) {
            counts[i] = 0;
        }
        __syncthreads();
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            const float v = load(xr[c]);
            if (isnan(v)) {
                continue;
            }
            const unsigned int key = order_key(v);
            if ((key & mask) == prefix) {
                atomicAdd(&counts[(key >> shift) & (RADIX - 1)], 1u);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int digit = RADIX - 1;
            while (digit > 0 && rest > counts[digit]) {
                rest -= counts[digit];
                --digit;
            }
            cut->key = prefix | ((unsigned int)digit << shift);
            cut->ties = rest;
        }
        __syncthreads();
        prefix = cut->key;
        rest = cut->ties;
        mask |= (RADIX - 1u) << shift;
    }
}

// The top-p cut within the kept set *cut: the shortest prefix of it, largest first, whose
// fixed-point weights reach top_p of their sum, written back to *cut. Radix select as above, with
// each bin holding the count and the summed weight of its keys; the kept values equal to the
// incoming cut's key are added to their bin by count (they share one weight). Every thread calls it.
__device__ void select_top_p(const elem_t* xr, int vocab, float m, double inv_t, double scale, float top_p,
                             unsigned int* counts, unsigned long long* masses, Cut* cut,
                             unsigned long long* above_shared, double* target_shared) {
    const Cut outer = *cut;
    const unsigned long long outer_tie_weight =
        outer.ties > 0 ? fixed_weight(key_value(outer.key), m, inv_t, scale) : 0;
    unsigned int prefix = 0, mask = 0;
    unsigned long long above = 0; // kept weight with keys above the current range
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < RADIX; i += blockDim.x) {
            counts[i] = 0;
            masses[i] = 0;
        }
        __syncthreads();
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            const float v = load(xr[c]);
            if (isnan(v)) {
                continue;
            }
            const unsigned int key = order_key(v);
            if (key > outer.key && (key & mask) == prefix) {
                const unsigned int digit = (key >> shift) & (RADIX - 1);
                atomicAdd(&counts[digit], 1u);
                atomicAdd(&masses[digit], fixed_weight(v, m, inv_t, scale));
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            if (outer.ties > 0 && (outer.key & mask) == prefix) {
                const unsigned int digit = (outer.key >> shift) & (RADIX - 1);
                counts[digit] += outer.ties;
                masses[digit] += (unsigned long long)outer.ties * outer_tie_weight;
            }
            if (shift == 24) { // the whole kept set is in this first pass's bins
                unsigned long long total = 0;
                for (int i = 0; i < RADIX; ++i) {
                    total += masses[i];
                }
                *target_shared = (double)top_p * (double)total;
            }
            const double target = *target_shared;
            int pick = -1, lowest = -1;
            for (int digit = RADIX - 1; digit >= 0; --digit) {
                if (counts[digit] == 0) {
                    continue;
                }
                lowest = digit;
                if ((double)(above + masses[digit]) >= target) {
                    pick = digit;
                    break;
                }
                above += masses[digit];
            }
            if (pick < 0) { // rounding kept the sum below the target: keep the whole range
                pick = lowest;
                above -= masses[lowest];
            }
            cut->key = prefix | ((unsigned int)pick << shift);
            cut->ties = counts[pick];
            *above_shared = above;
        }
        __syncthreads();
        prefix = cut->key;
        above = *above_shared;
        mask |= (RADIX - 1u) << shift;
    }
    if (threadIdx.x == 0) {
        // The fewest values with the cut's key (there are cut->ties) that reach the target.
        const double target = *target_shared;
        const unsigned int available = cut->ties;
        const unsigned long long w = fixed_weight(key_value(prefix), m, inv_t, scale);
        unsigned int ties = available;
        if (w > 0) {
            const double estimate = (target - (double)above) / (double)w;
            ties = estimate <= 1.0 ? 1u : estimate >= (double)available ? available : (unsigned int)estimate;
            while (ties > 1 && (double)(above + (unsigned long long)(ties - 1) * w) >= target) {
                --ties;
            }
            while (ties < available && (double)(above + (unsigned long long)ties * w) < target) {
                ++ties;
            }
        }
        cut->ties = ties;
    }
    __syncthreads();
}

// The weight of a value in the draw, 0 when the cut drops it; `rank` counts the values with the
// cut's key met so far in index order.
__device__ __forceinline__ double kept_weight(float v, float m, double inv_t, Cut cut, unsigned int* rank) {
    if (isnan(v)) {
        return 0.0;
    }
    const unsigned int key = order_key(v);
    if (key < cut.key || (key == cut.key && (*rank)++ >= cut.ties)) {
        return 0.0;
    }
    const double w = draw_weight(v, m, inv_t);
    return w > 0.0 ? w : 0.0;
}

extern "C" __global__ void sample_rows(unsigned int* out, const elem_t* x, const double* draws, int rows,
                                       int vocab) {
    __shared__ double starts[SAMPLE_MAX_THREADS + 1];
    __shared__ unsigned int last_positive[SAMPLE_MAX_THREADS];
    __shared__ unsigned int ties_before[SAMPLE_MAX_THREADS];
    __shared__ unsigned int counts[RADIX];
    __shared__ unsigned long long masses[RADIX];
    __shared__ float scratch[32];
    __shared__ Cut cut;
    __shared__ unsigned int valid, chosen;
    __shared__ unsigned long long above;
    __shared__ double target_mass;
    KERNEL_CHECK(vocab > 0 && blockDim.x % 32 == 0 && blockDim.x <= SAMPLE_MAX_THREADS);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const elem_t* xr = x + (size_t)r * vocab;
    const double* draw = draws + (size_t)r * 4;
    const float t = (float)draw[0];
    const unsigned int top_k = (unsigned int)draw[1];
    const float top_p = (float)draw[2];
    const double u = draw[3];
    if (threadIdx.x == 0) {
        valid = 0;
        chosen = NONE;
        cut.key = 0;
        cut.ties = 0;
    }
    __syncthreads();
    float m = -INFINITY;
    unsigned int not_nan = 0;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = load(xr[c]);
        m = fmaxf(m, v); // fmaxf drops NaN operands
        not_nan += isnan(v) ? 0u : 1u;
    }
    atomicAdd(&valid, not_nan);
    m = block_max(m, scratch); // its barriers also publish `valid`
    if (t == 0.0f || !isfinite(m)) { // uniform for the block
        const unsigned int id = row_argmax(xr, vocab);
        if (threadIdx.x == 0) {
            out[r] = id;
        }
        return;
    }
    const double inv_t = 1.0 / (double)t;

    // The cuts (every branch below is uniform for the block).
    if (top_k != 0 && top_k < valid) {
        select_top_k(xr, vocab, top_k, counts, &cut);
    }
    if (top_p < 1.0f) {
        // Fixed point with a row's whole sum below 2^63: each weight is at most 1.
        int bits = 0;
        while ((vocab >> bits) != 0) {
            ++bits;
        }
        double scale = 1.0;
        for (int i = 0; i < 63 - bits; ++i) {
            scale *= 2.0;
        }
        select_top_p(xr, vocab, m, inv_t, scale, top_p, counts, masses, &cut, &above, &target_mass);
    }
    const Cut kept = cut;

    const int chunk = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    const int begin = min(vocab, (int)threadIdx.x * chunk), end = min(vocab, begin + chunk);
    // Each chunk's first rank among the values with the cut's key.
    unsigned int own_ties = 0;
    if (kept.ties > 0) {
        for (int c = begin; c < end; ++c) {
            const float v = load(xr[c]);
            own_ties += (!isnan(v) && order_key(v) == kept.key) ? 1u : 0u;
        }
    }
    ties_before[threadIdx.x] = own_ties;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int running = 0;
        for (int i = 0; i < (int)blockDim.x; ++i) {
            const unsigned int n = ties_before[i];
            ties_before[i] = running;
            running += n;
        }
    }
    __syncthreads();

    double sum = 0.0;
    unsigned int last = NONE;
    unsigned int rank = ties_before[threadIdx.x];
    for (int c = begin; c < end; ++c) {
        const double w = kept_weight(load(xr[c]), m, inv_t, kept, &rank);
        if (w > 0.0) {
            sum += w;
            last = c;
        }
    }
    starts[threadIdx.x] = sum;
    last_positive[threadIdx.x] = last;
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

    const double target = u * starts[blockDim.x];
    const double start = starts[threadIdx.x];
    // starts[i + 1] is exactly start + sum (the scan's own addition), so one chunk at most holds
    // the target.
    if (sum > 0.0 && target >= start && target < starts[threadIdx.x + 1]) {
        double left = target - start;
        unsigned int pick = last; // rounding past the chunk's end: its last positive weight
        rank = ties_before[threadIdx.x];
        for (int c = begin; c < end; ++c) {
            const double w = kept_weight(load(xr[c]), m, inv_t, kept, &rank);
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
