// Scaled dot-product attention with grouped-query heads, padding mask and causal offset.
//
// Shapes: q [batch, s_q, heads, d], k and v [batch, s_k, kv_heads, d], out like q; query head h
// reads key/value head h / (heads / kv_heads). For query i of batch row b, key j is visible when
//   j < s_k  and  (!has_valid || key_valid[b * s_k + j])  and  (causal_offset < 0 || j <= causal_offset + i)
// and
//   out[b, i, h, :] = sum_j softmax_j(scale * q . k_j) v_j     over visible j,
// zeros when no key is visible. Both kernels use the online softmax: a running maximum m, a
// running sum l of exp(s - m) and a running output, rescaled by exp(m_old - m_new) whenever the
// maximum grows, so scores are never materialised in global memory.
//
// flash_attention_f32 (prefill / encoding):
//   Launch: grid (ceil(s_q / 16), heads, batch), block 128 (4 warps), dynamic shared memory
//   (16 * d + 32 * (d + 1) + 32 * d) floats. The block stages 16 query rows (pre-scaled) in
//   shared memory and walks the keys in tiles of 32, staging K (rows padded to d + 1 so that
//   lanes reading different keys hit different banks) and V. Each warp owns 4 query rows; for a
//   tile, lane j scores key j, the warp reduces max and sum with shuffles, then every lane
//   accumulates its d / 32 output dims with each key's probability broadcast by shuffle. With a
//   causal mask the walk stops after the last key the block's last query can see. Tiles past
//   s_k and rows past s_q are padded and never written.
// decode_attention_f32 (one or few queries over a KV cache):
//   Launch: grid (heads, s_q, batch), block 256 (8 warps), dynamic shared memory
//   (d + 8 * (d + 2)) floats. Warp w takes keys w, w + 8, ...; for each key the warp computes
//   the dot product with lanes splitting d (coalesced reads of the cache row) and updates its
//   running softmax; the 8 partial results are merged through shared memory at the end.
//
// d is at most ATTN_MAX_D (checked on the host and on the device): each lane keeps its share of
// the output rows in registers.

#define ATTN_MAX_D 256
#define ATTN_DPL (ATTN_MAX_D / 32)
#define ATTN_WARPS 4
#define ATTN_ROWS_PER_WARP 4
#define ATTN_BQ (ATTN_WARPS * ATTN_ROWS_PER_WARP)
#define ATTN_BK 32
#define DECODE_WARPS 8

__device__ __forceinline__ bool key_visible(const unsigned char* key_valid, int has_valid, int causal_offset, int b,
                                            int s_k, int i, int j) {
    if (j >= s_k) {
        return false;
    }
    if (has_valid && !key_valid[(size_t)b * s_k + j]) {
        return false;
    }
    return causal_offset < 0 || j <= causal_offset + i;
}

extern "C" __global__ void flash_attention_f32(float* out, const float* q, const float* k, const float* v,
                                               const unsigned char* key_valid, int has_valid, int causal_offset,
                                               int batch, int s_q, int s_k, int heads, int kv_heads, int d,
                                               float scale) {
    KERNEL_CHECK(d > 0 && d <= ATTN_MAX_D && blockDim.x == 32 * ATTN_WARPS);
    KERNEL_CHECK(kv_heads > 0 && heads % kv_heads == 0);
    extern __shared__ float smem[];
    float* qs = smem;                   // [ATTN_BQ][d]
    float* ks = qs + ATTN_BQ * d;       // [ATTN_BK][d + 1]
    float* vs = ks + ATTN_BK * (d + 1); // [ATTN_BK][d]

    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATTN_BQ;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    for (int idx = threadIdx.x; idx < ATTN_BQ * d; idx += blockDim.x) {
        const int r = idx / d, c = idx % d, i = q0 + r;
        qs[idx] = i < s_q ? q[(((size_t)b * s_q + i) * heads + h) * d + c] * scale : 0.0f;
    }

    float m[ATTN_ROWS_PER_WARP], l[ATTN_ROWS_PER_WARP], acc[ATTN_ROWS_PER_WARP][ATTN_DPL];
#pragma unroll
    for (int rr = 0; rr < ATTN_ROWS_PER_WARP; ++rr) {
        m[rr] = -INFINITY;
        l[rr] = 0.0f;
#pragma unroll
        for (int t = 0; t < ATTN_DPL; ++t) {
            acc[rr][t] = 0.0f;
        }
    }

    // Keys past the last one the block's last query row can see are skipped entirely.
    int kv_end = s_k;
    if (causal_offset >= 0) {
        kv_end = min(s_k, causal_offset + min(q0 + ATTN_BQ, s_q));
    }

    for (int k0 = 0; k0 < kv_end; k0 += ATTN_BK) {
        __syncthreads(); // the previous tile (and, first time round, nothing) is fully consumed
        for (int idx = threadIdx.x; idx < ATTN_BK * d; idx += blockDim.x) {
            const int r = idx / d, c = idx % d, j = k0 + r;
            const size_t src = (((size_t)b * s_k + j) * kv_heads + kvh) * d + c;
            ks[r * (d + 1) + c] = j < s_k ? k[src] : 0.0f;
            vs[r * d + c] = j < s_k ? v[src] : 0.0f;
        }
        __syncthreads();

        const int j = k0 + lane;
#pragma unroll
        for (int rr = 0; rr < ATTN_ROWS_PER_WARP; ++rr) {
            const int r = warp * ATTN_ROWS_PER_WARP + rr, i = q0 + r;
            if (i < s_q) { // uniform across the warp
                const bool visible = key_visible(key_valid, has_valid, causal_offset, b, s_k, i, j);
                float s = -INFINITY;
                if (visible) {
                    float dot = 0.0f;
                    for (int c = 0; c < d; ++c) {
                        dot += qs[r * d + c] * ks[lane * (d + 1) + c];
                    }
                    s = dot;
                }
                const float m_new = fmaxf(m[rr], warp_max(s));
                if (m_new != -INFINITY) { // uniform: some key of this row is visible so far
                    const float p = visible ? expf(s - m_new) : 0.0f;
                    const float alpha = expf(m[rr] - m_new); // 0 while m[rr] is still -inf
                    l[rr] = l[rr] * alpha + warp_sum(p);
                    m[rr] = m_new;
#pragma unroll
                    for (int t = 0; t < ATTN_DPL; ++t) {
                        acc[rr][t] *= alpha;
                    }
                    for (int jj = 0; jj < ATTN_BK; ++jj) {
                        const float pj = __shfl_sync(FULL_MASK, p, jj);
#pragma unroll
                        for (int t = 0; t < ATTN_DPL; ++t) {
                            const int c = lane + 32 * t;
                            if (c < d) {
                                acc[rr][t] += pj * vs[jj * d + c];
                            }
                        }
                    }
                }
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < ATTN_ROWS_PER_WARP; ++rr) {
        const int i = q0 + warp * ATTN_ROWS_PER_WARP + rr;
        if (i < s_q) {
            const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
            float* o = out + (((size_t)b * s_q + i) * heads + h) * d;
#pragma unroll
            for (int t = 0; t < ATTN_DPL; ++t) {
                const int c = lane + 32 * t;
                if (c < d) {
                    o[c] = acc[rr][t] * inv;
                }
            }
        }
    }
}

extern "C" __global__ void decode_attention_f32(float* out, const float* q, const float* k, const float* v,
                                                const unsigned char* key_valid, int has_valid, int causal_offset,
                                                int batch, int s_q, int s_k, int heads, int kv_heads, int d,
                                                float scale) {
    KERNEL_CHECK(d > 0 && d <= ATTN_MAX_D && blockDim.x == 32 * DECODE_WARPS);
    KERNEL_CHECK(kv_heads > 0 && heads % kv_heads == 0);
    extern __shared__ float smem[];
    float* qs = smem;                 // [d], pre-scaled
    float* part = qs + d;             // per warp: [m, l, acc[d]]

    const int h = blockIdx.x, i = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        qs[c] = q[(((size_t)b * s_q + i) * heads + h) * d + c] * scale;
    }
    __syncthreads();

    const int kv_end = causal_offset >= 0 ? min(s_k, causal_offset + i + 1) : s_k;
    float m = -INFINITY, l = 0.0f, acc[ATTN_DPL];
#pragma unroll
    for (int t = 0; t < ATTN_DPL; ++t) {
        acc[t] = 0.0f;
    }
    for (int j = warp; j < kv_end; j += DECODE_WARPS) {
        if (!key_visible(key_valid, has_valid, causal_offset, b, s_k, i, j)) { // uniform per warp
            continue;
        }
        const size_t row = (((size_t)b * s_k + j) * kv_heads + kvh) * d;
        float partial = 0.0f;
#pragma unroll
        for (int t = 0; t < ATTN_DPL; ++t) {
            const int c = lane + 32 * t;
            if (c < d) {
                partial += qs[c] * k[row + c];
            }
        }
        const float s = warp_sum(partial);
        const float m_new = fmaxf(m, s);
        const float alpha = expf(m - m_new), p = expf(s - m_new);
        l = l * alpha + p;
        m = m_new;
#pragma unroll
        for (int t = 0; t < ATTN_DPL; ++t) {
            const int c = lane + 32 * t;
            if (c < d) {
                acc[t] = acc[t] * alpha + p * v[row + c];
            }
        }
    }

    float* mine = part + warp * (d + 2);
    if (lane == 0) {
        mine[0] = m;
        mine[1] = l;
    }
#pragma unroll
    for (int t = 0; t < ATTN_DPL; ++t) {
        const int c = lane + 32 * t;
        if (c < d) {
            mine[2 + c] = acc[t];
        }
    }
    __syncthreads();

    // Merge the warps' partial softmaxes: rescale each to the overall maximum.
    float m_all = -INFINITY;
    for (int w = 0; w < DECODE_WARPS; ++w) {
        m_all = fmaxf(m_all, part[w * (d + 2)]);
    }
    float* o = out + (((size_t)b * s_q + i) * heads + h) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        if (m_all == -INFINITY) {
            o[c] = 0.0f; // no visible key
            continue;
        }
        float l_all = 0.0f, o_all = 0.0f;
        for (int w = 0; w < DECODE_WARPS; ++w) {
            const float* pw = part + w * (d + 2);
            const float wgt = expf(pw[0] - m_all); // 0 for a warp that saw no visible key
            l_all += pw[1] * wgt;
            o_all += pw[2 + c] * wgt;
        }
        o[c] = o_all / l_all;
    }
}
