// Scaled dot-product attention with grouped-query heads, over dense keys (encoders: padding
// mask, causal offset) or over a paged key/value pool (decoders: each sequence's keys read in
// place through its block table).
//
// Query head h reads key/value head h / (heads / kv_heads). For query i of sequence b, with
// visible keys V(b, i),
//   out[b, i, h, :] = sum_{j in V} softmax_j(scale * q . k_j) v_j,   zeros when V is empty.
// Both kernel bodies use the online softmax: a running maximum m, a running sum l of
// exp(s - m) and a running output, rescaled by exp(m_old - m_new) whenever the maximum grows, so
// scores are never materialised in global memory.
//
// The bodies are templates over a layout, which says where rows are and which keys are visible:
// - DenseLayout: q [batch, s_q, heads, d], k and v [batch, s_k, kv_heads, d]; key j is visible
//   to query i when (!has_valid || key_valid[b * s_k + j]) and (causal_offset < 0 ||
//   j <= causal_offset + i).
// - PagedLayout: q [tokens, heads, d] packed sequence after sequence; k and v pools [slots,
//   kv_heads, d]. meta holds 4 ints per sequence: first query row, q_len, k_len, first entry of
//   its block table in `tables`. Key position j of sequence b is pool row
//   tables[table_start + j / block_size] * block_size + j % block_size. Query i is position
//   p = k_len - q_len + i and sees keys max(0, p + 1 - window) ..= p (window <= 0: no window).
//
// flash_attention / paged_flash_attention (prefill / encoding):
//   Launch: grid (ceil(max s_q / 16), heads, batch), block 128 (4 warps), dynamic shared memory
//   (16 * d + 32 * (d + 1) + 32 * d) floats. The block stages 16 query rows (pre-scaled) in
//   shared memory and walks the keys in tiles of 32, staging K (rows padded to d + 1 so that
//   lanes reading different keys hit different banks) and V. Each warp owns 4 query rows; for a
//   tile, lane j scores key j against all 4 rows (each key element read from shared memory once
//   for the 4), the warp reduces max and sum with shuffles, then every lane accumulates its
//   d / 32 output dims, reading each value element once for the 4 rows, with each key's
//   probability broadcast by shuffle. The
//   walk covers only the keys some row of the block can see. Rows past the sequence's queries
//   are padded and never written; a block with no rows exits at once.
// flash_attention_tc{32,64,128} / paged_flash_attention_tc{32,64,128} (the same, on tensor
// cores: half precision, sm_80 and later, head dimension d = the suffix, 16-byte aligned q, k
// and v, all checked on the host; in fp32 they only trap):
//   Launch: grid (ceil(max s_q / 64), heads, batch), block 128 (4 warps), dynamic shared memory
//   2 * 64 * (d + 8) storage elements. Each warp owns 16 query rows and loads their A fragments
//   (see mma_16x8x16 in common.cuh) once from the staged query tile. For each tile of 64 keys
//   the block stages K and V as they are laid out, rows padded by 8 elements (so that the 8
//   rows an ldmatrix phase reads fall in distinct banks), by 16-byte asynchronous copies
//   (cp.async), each while the block computes on the other: the tile's V lands while its
//   scores are computed, the next tile's K while its values are added. The fragments come
//   from there by ldmatrix_x4, four registers an instruction, V's through the transposing
//   form; then each warp
//   - computes its 16 x 64 scores in registers, S = Q K^T, and scales and masks them, in base
//     2 (scale * log2 e, so that each exponential below is one exp2);
//   - updates each row's running maximum (the 4 lanes holding a row reduce it with two
//     shuffles) and rescales its fp32 output accumulators and its partial sums by
//     2^(m_old - m_new);
//   - packs 2^(s - m_new) into the A fragments of O += P V: the accumulator layout of two
//     adjacent 8-key column tiles is the A layout of their 16 keys, so P never leaves
//     registers. Probabilities are rounded to the storage type for that product, as the
//     unfused path rounds them; the running sums add them unrounded.
//   A warp runs no mma where none of its 16 rows can see a key: not on a tile outside its
//   rows' keys, nor on the 8-key (scores) and 16-key (values) blocks outside them, and not at
//   all when its rows are past the sequence's queries (a short prompt's block is mostly such
//   warps). At the end the 4 lanes of a row add their partial sums. Rows past the queries are
//   never written; a block with no rows exits at once.
// decode_attention / paged_decode_attention (one or few queries over a KV cache):
//   Launch: grid (heads, max s_q, batch), block 256 (8 warps), dynamic shared memory
//   (d + 8 * (d + 2)) floats. Warp w takes visible keys w, w + 8, ...; for each key the warp
//   computes the dot product with lanes splitting d (coalesced reads of the cache row) and
//   updates its running softmax; the 8 partial results are merged through shared memory.
//
// paged_decode_grouped (decode steps, query heads of one key head together): see its comment.
//
// d is at most ATTN_MAX_D (checked on the host and on the device): each lane keeps its share of
// the output rows in registers. Scores, softmax sums and outputs accumulate in fp32 whatever the
// storage type; shared memory holds fp32 (queries, keys and values widened once as staged).

#define ATTN_MAX_D 256
#define ATTN_DPL (ATTN_MAX_D / 32)
#define ATTN_WARPS 4
#define ATTN_ROWS_PER_WARP 4
#define ATTN_BQ (ATTN_WARPS * ATTN_ROWS_PER_WARP)
#define ATTN_BK 32
#define DECODE_WARPS 8

struct DenseLayout {
    const unsigned char* key_valid;
    int has_valid, causal_offset, s_q, s_k, b;

    __device__ int q_len() const { return s_q; }
    // The token row of query i and of key j (times heads or kv_heads gives the head row).
    __device__ size_t q_token(int i) const { return (size_t)b * s_q + i; }
    __device__ size_t k_token(int j) const { return (size_t)b * s_k + j; }
    __device__ int key_begin(int) const { return 0; }
    __device__ int key_end(int i) const { return causal_offset >= 0 ? min(s_k, causal_offset + i + 1) : s_k; }
    __device__ bool valid(int j) const { return !has_valid || key_valid[(size_t)b * s_k + j]; }
};

struct PagedLayout {
    const unsigned int* tables;
    int block_size, window, q_start, q_count, k_len, table_start;

    __device__ PagedLayout(const int* meta, const unsigned int* tables_, int block_size_, int window_, int b)
        : tables(tables_), block_size(block_size_), window(window_), q_start(meta[4 * b]), q_count(meta[4 * b + 1]),
          k_len(meta[4 * b + 2]), table_start(meta[4 * b + 3]) {}

    __device__ int q_len() const { return q_count; }
    __device__ size_t q_token(int i) const { return (size_t)q_start + i; }
    __device__ size_t k_token(int j) const {
        return (size_t)tables[table_start + j / block_size] * block_size + j % block_size;
    }
    __device__ int key_end(int i) const { return k_len - q_count + i + 1; }
    __device__ int key_begin(int i) const { return window > 0 ? max(0, key_end(i) - window) : 0; }
    __device__ bool valid(int) const { return true; }
};

template <class L> __device__ __forceinline__ bool key_visible(const L& lay, int i, int j) {
    return j >= lay.key_begin(i) && j < lay.key_end(i) && lay.valid(j);
}

template <class L>
__device__ void flash_body(const L& lay, elem_t* out, const elem_t* q, const elem_t* k, const elem_t* v, int heads,
                           int kv_heads, int d, float scale) {
    KERNEL_CHECK(d > 0 && d <= ATTN_MAX_D && blockDim.x == 32 * ATTN_WARPS);
    KERNEL_CHECK(kv_heads > 0 && heads % kv_heads == 0);
    const int s_q = lay.q_len(), q0 = blockIdx.x * ATTN_BQ;
    if (q0 >= s_q) {
        return; // uniform for the block: a shorter sequence of a packed batch
    }
    extern __shared__ float smem[];
    float* qs = smem;                   // [ATTN_BQ][d]
    float* ks = qs + ATTN_BQ * d;       // [ATTN_BK][d + 1]
    float* vs = ks + ATTN_BK * (d + 1); // [ATTN_BK][d]

    const int h = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    for (int idx = threadIdx.x; idx < ATTN_BQ * d; idx += blockDim.x) {
        const int r = idx / d, c = idx % d, i = q0 + r;
        qs[idx] = i < s_q ? load(q[(lay.q_token(i) * heads + h) * d + c]) * scale : 0.0f;
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

    // Only keys some row of the block can see are walked (visibility ranges grow with i).
    const int last = min(q0 + ATTN_BQ, s_q) - 1;
    const int kv_begin = lay.key_begin(q0), kv_end = lay.key_end(last);

    for (int k0 = kv_begin; k0 < kv_end; k0 += ATTN_BK) {
        __syncthreads(); // the previous tile (and, first time round, nothing) is fully consumed
        for (int idx = threadIdx.x; idx < ATTN_BK * d; idx += blockDim.x) {
            const int r = idx / d, c = idx % d, j = k0 + r;
            const bool in = j < kv_end;
            const size_t src = in ? (lay.k_token(j) * kv_heads + kvh) * d + c : 0;
            ks[r * (d + 1) + c] = in ? load(k[src]) : 0.0f;
            vs[r * d + c] = in ? load(v[src]) : 0.0f;
        }
        __syncthreads();

        // Scores of the warp's rows against key j = k0 + lane: each key element is read from
        // shared memory once for all the rows (rows past the queries have zero queries and are
        // ignored below).
        const int j = k0 + lane;
        float dot[ATTN_ROWS_PER_WARP];
#pragma unroll
        for (int rr = 0; rr < ATTN_ROWS_PER_WARP; ++rr) {
            dot[rr] = 0.0f;
        }
        for (int c = 0; c < d; ++c) {
            const float kc = ks[lane * (d + 1) + c];
#pragma unroll
            for (int rr = 0; rr < ATTN_ROWS_PER_WARP; ++rr) {
                dot[rr] += qs[(warp * ATTN_ROWS_PER_WARP + rr) * d + c] * kc;
            }
        }
        // Online softmax per row; `active` (uniform across the warp) marks rows that have seen a
        // visible key, the only ones whose outputs change.
        float p[ATTN_ROWS_PER_WARP];
        bool active[ATTN_ROWS_PER_WARP];
#pragma unroll
        for (int rr = 0; rr < ATTN_ROWS_PER_WARP; ++rr) {
            const int i = q0 + warp * ATTN_ROWS_PER_WARP + rr;
            p[rr] = 0.0f;
            active[rr] = false;
            if (i < s_q) { // uniform across the warp
                const bool visible = j < kv_end && key_visible(lay, i, j);
                const float s = visible ? dot[rr] : -INFINITY;
                const float m_new = fmaxf(m[rr], warp_max(s));
                if (m_new != -INFINITY) { // uniform: some key of this row is visible so far
                    p[rr] = visible ? expf(s - m_new) : 0.0f;
                    const float alpha = expf(m[rr] - m_new); // 0 while m[rr] is still -inf
                    l[rr] = l[rr] * alpha + warp_sum(p[rr]);
                    m[rr] = m_new;
                    active[rr] = true;
#pragma unroll
                    for (int t = 0; t < ATTN_DPL; ++t) {
                        acc[rr][t] *= alpha;
                    }
                }
            }
        }
        // Probabilities times values: each value element is read once for all the rows, each
        // key's probability broadcast from its lane.
        for (int jj = 0; jj < ATTN_BK; ++jj) {
            float vj[ATTN_DPL];
#pragma unroll
            for (int t = 0; t < ATTN_DPL; ++t) {
                const int c = lane + 32 * t;
                vj[t] = c < d ? vs[jj * d + c] : 0.0f;
            }
#pragma unroll
            for (int rr = 0; rr < ATTN_ROWS_PER_WARP; ++rr) {
                const float pj = __shfl_sync(FULL_MASK, p[rr], jj);
                if (active[rr]) {
#pragma unroll
                    for (int t = 0; t < ATTN_DPL; ++t) {
                        acc[rr][t] += pj * vj[t];
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
            elem_t* o = out + (lay.q_token(i) * heads + h) * d;
#pragma unroll
            for (int t = 0; t < ATTN_DPL; ++t) {
                const int c = lane + 32 * t;
                if (c < d) {
                    o[c] = store(acc[rr][t] * inv);
                }
            }
        }
    }
}

// One block's partial softmax over the keys kv_begin .. kv_end of query i: warp w takes keys
// w, w + 8, ...; each warp's (m, l, acc[d]) is left in `part` (shared memory, d + 2 floats per
// warp) for merge_warps. `qs` (shared) receives the pre-scaled query.
template <class L>
__device__ void decode_partial(const L& lay, int i, int kv_begin, int kv_end, const elem_t* q, const elem_t* k,
                               const elem_t* v, int heads, int kv_heads, int d, float scale, float* qs, float* part) {
    const int h = blockIdx.x;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t q_row = (lay.q_token(i) * heads + h) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        qs[c] = load(q[q_row + c]) * scale;
    }
    __syncthreads();

    float m = -INFINITY, l = 0.0f, acc[ATTN_DPL];
#pragma unroll
    for (int t = 0; t < ATTN_DPL; ++t) {
        acc[t] = 0.0f;
    }
    for (int j = kv_begin + warp; j < kv_end; j += DECODE_WARPS) {
        if (!lay.valid(j)) { // uniform per warp
            continue;
        }
        const size_t row = (lay.k_token(j) * kv_heads + kvh) * d;
        float partial = 0.0f;
#pragma unroll
        for (int t = 0; t < ATTN_DPL; ++t) {
            const int c = lane + 32 * t;
            if (c < d) {
                partial += qs[c] * load(k[row + c]);
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
                acc[t] = acc[t] * alpha + p * load(v[row + c]);
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
}

// The warps' partial softmaxes of decode_partial merged for output dim c: each rescaled to the
// overall maximum *m_all; *l_all and *o_all are the rescaled sums (both 0 when no warp saw a
// visible key, *m_all then -inf). Warp w's (m, l, acc[d]) starts at part[w * stride].
__device__ __forceinline__ void merge_warps(const float* part, int stride, int c, float* m_all, float* l_all,
                                            float* o_all) {
    float m = -INFINITY;
    for (int w = 0; w < DECODE_WARPS; ++w) {
        m = fmaxf(m, part[w * stride]);
    }
    float l = 0.0f, o = 0.0f;
    if (m != -INFINITY) {
        for (int w = 0; w < DECODE_WARPS; ++w) {
            const float* pw = part + w * stride;
            const float wgt = expf(pw[0] - m); // 0 for a warp that saw no visible key
            l += pw[1] * wgt;
            o += pw[2 + c] * wgt;
        }
    }
    *m_all = m;
    *l_all = l;
    *o_all = o;
}

template <class L>
__device__ void decode_body(const L& lay, elem_t* out, const elem_t* q, const elem_t* k, const elem_t* v, int heads,
                            int kv_heads, int d, float scale) {
    KERNEL_CHECK(d > 0 && d <= ATTN_MAX_D && blockDim.x == 32 * DECODE_WARPS);
    KERNEL_CHECK(kv_heads > 0 && heads % kv_heads == 0);
    const int h = blockIdx.x, i = blockIdx.y;
    if (i >= lay.q_len()) {
        return; // uniform for the block
    }
    extern __shared__ float smem[];
    float* qs = smem;     // [d], pre-scaled
    float* part = qs + d; // per warp: [m, l, acc[d]]
    decode_partial(lay, i, lay.key_begin(i), lay.key_end(i), q, k, v, heads, kv_heads, d, scale, qs, part);
    elem_t* o = out + (lay.q_token(i) * heads + h) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float m_all, l_all, o_all;
        merge_warps(part, d + 2, c, &m_all, &l_all, &o_all);
        o[c] = store(m_all == -INFINITY ? 0.0f : o_all / l_all); // no visible key: zeros
    }
}

#define TC_BQ 64
#define TC_BK 64
#define TC_PAD 8

#if defined(ATOMIC_HAS_MMA)
// Starts this thread's asynchronous copies of keys k0 .. k0 + TC_BK - 1 of `src` (K or V, key
// head kvh) into `tile`, rows of D elements padded to D + TC_PAD. Keys at or past kv_end are
// zero-filled: their scores are masked and their probabilities 0, and 0 times a zero value
// adds 0 where 0 times whatever the tile held before could add NaN.
template <int D, class L>
__device__ __forceinline__ void tc_stage_tile(const L& lay, unsigned short* tile, const elem_t* src, int k0,
                                              int kv_end, int kv_heads, int kvh) {
    constexpr int LD = D + TC_PAD, CHUNKS = D / 8;
    for (int idx = threadIdx.x; idx < TC_BK * CHUNKS; idx += blockDim.x) {
        const int r = idx / CHUNKS, c = idx % CHUNKS, j = k0 + r;
        const bool present = j < kv_end;
        // A missing key reads nothing, from an address that is still a valid one.
        const elem_t* from = present ? src + (lay.k_token(j) * kv_heads + kvh) * D + c * 8 : src;
        cp_async_16(tile + r * LD + c * 8, from, present ? 16 : 0);
    }
}
#endif

template <int D, class L>
__device__ void tc_flash_body(const L& lay, elem_t* out, const elem_t* q, const elem_t* k, const elem_t* v, int heads,
                              int kv_heads, int d, float scale) {
#if defined(ATOMIC_HAS_MMA)
    KERNEL_CHECK(d == D && blockDim.x == 128);
    KERNEL_CHECK(kv_heads > 0 && heads % kv_heads == 0);
    const int s_q = lay.q_len(), q0 = blockIdx.x * TC_BQ;
    if (q0 >= s_q) {
        return; // uniform for the block: a shorter sequence of a packed batch
    }
    constexpr int LD = D + TC_PAD, CHUNKS = D / 8;
    extern __shared__ float smem[];
    unsigned short* ks = reinterpret_cast<unsigned short*>(smem); // [TC_BK][LD]
    unsigned short* vs = ks + TC_BK * LD;                         // [TC_BK][LD]
    unsigned short* qs = vs; // [TC_BQ][LD], until the fragments are read

    const int h = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row = warp * 16 + g; // this lane's rows of the block: row and row + 8
    // The row this lane addresses in an ldmatrix_x4: row lane % 8 of matrix lane / 8.
    const int matrix = lane / 8, matrix_row = lane % 8;

    // Only keys some row of the block can see are walked (visibility ranges grow with i), and
    // each warp computes only on the tiles its own 16 rows see: none for a warp past the end
    // of a short prompt.
    const int last = min(q0 + TC_BQ, s_q) - 1;
    const int kv_begin = lay.key_begin(q0), kv_end = lay.key_end(last);
    const int warp_q0 = q0 + warp * 16;
    const int warp_kv_begin = warp_q0 < s_q ? lay.key_begin(warp_q0) : 0;
    const int warp_kv_end = warp_q0 < s_q ? lay.key_end(min(warp_q0 + 15, s_q - 1)) : 0;

    // The first tile's K is in flight while the query tile is staged and read.
    if (kv_begin < kv_end) {
        tc_stage_tile<D>(lay, ks, k, kv_begin, kv_end, kv_heads, kvh);
    }
    for (int idx = threadIdx.x; idx < TC_BQ * CHUNKS; idx += blockDim.x) {
        const int r = idx / CHUNKS, c = idx % CHUNKS, i = q0 + r;
        vec16 chunk = {{0u, 0u, 0u, 0u}};
        if (i < s_q) {
            chunk = *reinterpret_cast<const vec16*>(q + (lay.q_token(i) * heads + h) * D + c * 8);
        }
        *reinterpret_cast<vec16*>(qs + r * LD + c * 8) = chunk;
    }
    __syncthreads();
    // A fragments of the warp's 16 x 16 blocks of Q: matrices (rows 0-7, cols 0-7), (rows 8-15,
    // cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) are a[0] .. a[3].
    unsigned int qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        ldmatrix_x4(qa[kk], qs + (warp * 16 + (matrix % 2) * 8 + matrix_row) * LD + kk * 16 + (matrix / 2) * 8);
    }

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            o[n][e] = 0.0f;
        }
    }
    // Rows row and row + 8: running maximum and this lane's part of the running sum, both of
    // scores in base 2 (scaled by log2(e) with the softmax scale, so that exp is one exp2).
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const float scale_log2 = scale * 1.4426950408889634f;

    for (int k0 = kv_begin; k0 < kv_end; k0 += TC_BK) {
        cp_async_wait_all(); // this thread's copies of the tile's K
        // Every thread's K has landed, and the previous tile's V (first time round, the query
        // tile) is fully read, so the tile's V can take its place.
        __syncthreads();
        tc_stage_tile<D>(lay, vs, v, k0, kv_end, kv_heads, kvh);
        // No row of this warp sees a key of the tile (uniform for the warp). Only a tile past
        // the warp's last key can be: its first key is at most 48 past the block's, which the
        // first tile covers, since key_begin grows by at most 1 a row. Such a warp still
        // stages and meets every barrier.
        const bool warp_sees = k0 < warp_kv_end;
        // Keys lo..hi of the tile are the ones some row of this warp may see: the column blocks
        // wholly outside are skipped (their scores stay masked, their probabilities 0). A warp
        // that sees none has the empty range, so runs no mma.
        const int lo = warp_sees ? warp_kv_begin - k0 : 0, hi = warp_sees ? warp_kv_end - k0 : 0;

        float s[TC_BK / 8][4];
#pragma unroll
        for (int n = 0; n < TC_BK / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = 0.0f;
            }
            if (n * 8 + 8 > lo && n * 8 < hi) {
                // B = K^T of keys n * 8 .. + 7: its fragments for two 16-dim blocks are rows of
                // K, matrices (dims 0-7, 8-15) of block kk and of kk + 1.
#pragma unroll
                for (int kk = 0; kk < D / 16; kk += 2) {
                    unsigned int b[4];
                    ldmatrix_x4(b, ks + (n * 8 + matrix_row) * LD + kk * 16 + matrix * 8);
                    mma_16x8x16(s[n], qa[kk], b);
                    mma_16x8x16(s[n], qa[kk + 1], b + 2);
                }
            }
        }

        cp_async_wait_all(); // this thread's copies of the tile's V
        // Every thread's V has landed and K is fully read, so the next tile's K can take its
        // place while this one's values are added.
        __syncthreads();
        if (k0 + TC_BK < kv_end) {
            tc_stage_tile<D>(lay, ks, k, k0 + TC_BK, kv_end, kv_heads, kvh);
        }
        if (!warp_sees) {
            continue;
        }

        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < TC_BK / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = q0 + row + 8 * (e / 2), j = k0 + n * 8 + 2 * t + e % 2;
                s[n][e] = j < kv_end && key_visible(lay, i, j) ? s[n][e] * scale_log2 : -INFINITY;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
            }
        }
        float alpha[2], shift[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // A row's TC_BK scores of the tile are spread over the 4 lanes of its quad.
            const float m_new = fmaxf(m[r], lanes_max(tile_max[r], 4));
            // A row with no visible key yet keeps zeros: nothing to rescale, and every
            // 2^(-inf - 0) below is 0.
            alpha[r] = m_new == -INFINITY ? 1.0f : exp2f(m[r] - m_new); // 0 while m[r] is -inf
            shift[r] = m_new == -INFINITY ? 0.0f : m_new;
            m[r] = m_new;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < TC_BK / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = exp2f(s[n][e] - shift[e / 2]);
                l[e / 2] += s[n][e];
            }
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                o[n][e] *= alpha[e / 2];
            }
        }
#pragma unroll
        for (int kk = 0; kk < TC_BK / 16; ++kk) {
            if (kk * 16 + 16 <= lo || kk * 16 >= hi) {
                continue;
            }
            const unsigned int pa[4] = {pack2(s[2 * kk][0], s[2 * kk][1]), pack2(s[2 * kk][2], s[2 * kk][3]),
                                        pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            // B = V of keys kk * 16 .. + 15: its fragments for two 8-dim blocks are rows of V
            // transposed, matrices (keys 0-7, 8-15) of dims n * 8 and of (n + 1) * 8.
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                unsigned int b[4];
                ldmatrix_x4_trans(b, vs + (kk * 16 + (matrix % 2) * 8 + matrix_row) * LD + (n + matrix / 2) * 8);
                mma_16x8x16(o[n], pa, b);
                mma_16x8x16(o[n + 1], pa, b + 2);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] = lanes_sum(l[r], 4);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int i = q0 + row + 8 * (e / 2);
        if (i < s_q) {
            const float inv = l[e / 2] > 0.0f ? 1.0f / l[e / 2] : 0.0f; // no visible key: zeros
            elem_t* dst = out + (lay.q_token(i) * heads + h) * D + 2 * t + e % 2;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                dst[n * 8] = store(o[n][e] * inv);
            }
        }
    }
#else
    const bool half_precision = false; // the host launches these only in fp16 and bf16
    KERNEL_CHECK(half_precision);
#endif
}

// The kernels at each head dimension, with flash_attention's and paged_flash_attention's
// parameters.
extern "C" __global__ void flash_attention_tc32(elem_t* out, const elem_t* q, const elem_t* k, const elem_t* v,
                                              const unsigned char* key_valid, int has_valid, int causal_offset,
                                              int batch, int s_q, int s_k, int heads, int kv_heads, int d,
                                              float scale) {
    const DenseLayout lay{key_valid, has_valid, causal_offset, s_q, s_k, (int)blockIdx.z};
    tc_flash_body<32>(lay, out, q, k, v, heads, kv_heads, d, scale);
}

extern "C" __global__ void flash_attention_tc64(elem_t* out, const elem_t* q, const elem_t* k, const elem_t* v,
                                              const unsigned char* key_valid, int has_valid, int causal_offset,
                                              int batch, int s_q, int s_k, int heads, int kv_heads, int d,
                                              float scale) {
    const DenseLayout lay{key_valid, has_valid, causal_offset, s_q, s_k, (int)blockIdx.z};
    tc_flash_body<64>(lay, out, q, k, v, heads, kv_heads, d, scale);
}

extern "C" __global__ void flash_attention_tc128(elem_t* out, const elem_t* q, const elem_t* k, const elem_t* v,
                                              const unsigned char* key_valid, int has_valid, int causal_offset,
                                              int batch, int s_q, int s_k, int heads, int kv_heads, int d,
                                              float scale) {
    const DenseLayout lay{key_valid, has_valid, causal_offset, s_q, s_k, (int)blockIdx.z};
    tc_flash_body<128>(lay, out, q, k, v, heads, kv_heads, d, scale);
}

extern "C" __global__ void paged_flash_attention_tc32(elem_t* out, const elem_t* q, const elem_t* k_pool,
                                                    const elem_t* v_pool, const int* meta,
                                                    const unsigned int* tables, int seqs, int block_size,
                                                    int window, int heads, int kv_heads, int d, float scale) {
    KERNEL_CHECK((int)blockIdx.z < seqs && block_size > 0);
    const PagedLayout lay(meta, tables, block_size, window, blockIdx.z);
    tc_flash_body<32>(lay, out, q, k_pool, v_pool, heads, kv_heads, d, scale);
}

extern "C" __global__ void paged_flash_attention_tc64(elem_t* out, const elem_t* q, const elem_t* k_pool,
                                                    const elem_t* v_pool, const int* meta,
                                                    const unsigned int* tables, int seqs, int block_size,
                                                    int window, int heads, int kv_heads, int d, float scale) {
    KERNEL_CHECK((int)blockIdx.z < seqs && block_size > 0);
    const PagedLayout lay(meta, tables, block_size, window, blockIdx.z);
    tc_flash_body<64>(lay, out, q, k_pool, v_pool, heads, kv_heads, d, scale);
}

extern "C" __global__ void paged_flash_attention_tc128(elem_t* out, const elem_t* q, const elem_t* k_pool,
                                                    const elem_t* v_pool, const int* meta,
                                                    const unsigned int* tables, int seqs, int block_size,
                                                    int window, int heads, int kv_heads, int d, float scale) {
    KERNEL_CHECK((int)blockIdx.z < seqs && block_size > 0);
    const PagedLayout lay(meta, tables, block_size, window, blockIdx.z);
    tc_flash_body<128>(lay, out, q, k_pool, v_pool, heads, kv_heads, d, scale);
}

extern "C" __global__ void flash_attention(elem_t* out, const elem_t* q, const elem_t* k, const elem_t* v,
                                               const unsigned char* key_valid, int has_valid, int causal_offset,
                                               int batch, int s_q, int s_k, int heads, int kv_heads, int d,
                                               float scale) {
    const DenseLayout lay{key_valid, has_valid, causal_offset, s_q, s_k, (int)blockIdx.z};
    flash_body(lay, out, q, k, v, heads, kv_heads, d, scale);
}

extern "C" __global__ void decode_attention(elem_t* out, const elem_t* q, const elem_t* k, const elem_t* v,
                                                const unsigned char* key_valid, int has_valid, int causal_offset,
                                                int batch, int s_q, int s_k, int heads, int kv_heads, int d,
                                                float scale) {
    const DenseLayout lay{key_valid, has_valid, causal_offset, s_q, s_k, (int)blockIdx.z};
    decode_body(lay, out, q, k, v, heads, kv_heads, d, scale);
}

extern "C" __global__ void paged_flash_attention(elem_t* out, const elem_t* q, const elem_t* k_pool,
                                                 const elem_t* v_pool, const int* meta,
                                                     const unsigned int* tables, int seqs, int block_size,
                                                     int window, int heads, int kv_heads, int d, float scale) {
    KERNEL_CHECK((int)blockIdx.z < seqs && block_size > 0);
    const PagedLayout lay(meta, tables, block_size, window, blockIdx.z);
    flash_body(lay, out, q, k_pool, v_pool, heads, kv_heads, d, scale);
}

extern "C" __global__ void paged_decode_attention(elem_t* out, const elem_t* q, const elem_t* k_pool,
                                                  const elem_t* v_pool, const int* meta,
                                                      const unsigned int* tables, int seqs, int block_size,
                                                      int window, int heads, int kv_heads, int d, float scale) {
    KERNEL_CHECK((int)blockIdx.z < seqs && block_size > 0);
    const PagedLayout lay(meta, tables, block_size, window, blockIdx.z);
    decode_body(lay, out, q, k_pool, v_pool, heads, kv_heads, d, scale);
}

// paged_decode_split + decode_merge: decode steps (every sequence exactly one query) with each
//   sequence's keys split across `splits` blocks, for when heads x sequences blocks alone leave
//   most of the GPU idle (small batches, long caches).
//   paged_decode_split: grid (heads, splits, seqs), block 256, dynamic shared memory as
//   decode_attention. Split s of a sequence's visible keys [kb, ke) takes
//   [kb + s * c, min(ke, kb + (s + 1) * c)) with c = ceil((ke - kb) / splits), and writes its
//   unnormalised partial (m, l, acc[d]: maximum score, sum of exp(score - m), sum of
//   exp(score - m) v) to partials[((b * heads + h) * splits + s) * (d + 2)]; a split without
//   keys writes m = -inf, l = 0, acc = 0.
//   decode_merge: out[b, h, :] = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M = max_s m_s,
//   zeros when no split saw a key. Grid (heads, seqs), block 128 (threads over d).
//   The split count is fixed per launch shape, not per cache length, so a recorded graph stays
//   valid as the caches grow.
extern "C" __global__ void paged_decode_split(float* partials, const elem_t* q, const elem_t* k_pool,
                                              const elem_t* v_pool, const int* meta, const unsigned int* tables,
                                              int seqs, int block_size, int window, int heads, int kv_heads, int d,
                                              float scale) {
    KERNEL_CHECK((int)blockIdx.z < seqs && block_size > 0);
    KERNEL_CHECK(d > 0 && d <= ATTN_MAX_D && blockDim.x == 32 * DECODE_WARPS);
    KERNEL_CHECK(kv_heads > 0 && heads % kv_heads == 0);
    const PagedLayout lay(meta, tables, block_size, window, blockIdx.z);
    KERNEL_CHECK(lay.q_len() == 1);
    const int h = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int kb = lay.key_begin(0), ke = lay.key_end(0);
    const int chunk = (ke - kb + splits - 1) / splits;
    const int begin = min(ke, kb + split * chunk), end = min(ke, begin + chunk);
    extern __shared__ float smem[];
    float* qs = smem;
    float* part = qs + d;
    decode_partial(lay, 0, begin, end, q, k_pool, v_pool, heads, kv_heads, d, scale, qs, part);
    float* p = partials + (((size_t)blockIdx.z * heads + h) * splits + split) * (d + 2);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float m_all, l_all, o_all;
        merge_warps(part, d + 2, c, &m_all, &l_all, &o_all);
        if (c == 0) {
            p[0] = m_all;
            p[1] = l_all;
        }
        p[2 + c] = o_all;
    }
}

extern "C" __global__ void decode_merge(elem_t* out, const float* partials, const int* meta, int seqs, int splits,
                                        int heads, int d) {
    const int h = blockIdx.x, b = blockIdx.y;
    KERNEL_CHECK(b < seqs && splits > 0);
    const float* ps = partials + ((size_t)b * heads + h) * splits * (d + 2);
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) {
        m = fmaxf(m, ps[s * (d + 2)]);
    }
    elem_t* o = out + ((size_t)meta[4 * b] * heads + h) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        if (m == -INFINITY) {
            o[c] = store(0.0f);
            continue;
        }
        float l = 0.0f, acc = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float* p = ps + s * (d + 2);
            const float wgt = expf(p[0] - m); // 0 for a split without keys
            l += p[1] * wgt;
            acc += p[2 + c] * wgt;
        }
        o[c] = store(acc / l);
    }
}

// paged_decode_grouped: decode steps (one query per sequence) with the query heads that share a
//   key/value head served by one block, so each cache row is read once for up to GQ_HEADS of
//   them (grouped-query attention: 8 query heads per key head in TinyLlama and Llama 3 8B; the
//   other decode kernels read it once per query head), in 16-byte loads.
//   Heads: key head kvh serves query heads kvh * group .. (kvh + 1) * group - 1, group =
//   heads / kv_heads, cut into tiles of `hpb` heads (the host picks hpb = ceil(group /
//   ceil(group / GQ_HEADS)), so tiles are even); block x = kvh * tiles + tile takes the heads
//   kvh * group + tile * hpb + g, g < min(hpb, group - tile * hpb).
//   Keys: L = d / 8 lanes read one key row, each lane 8 consecutive dims (load_chunk), so a
//   warp takes 32 / L keys at a time and the block 8 * 32 / L. The L lanes of a key sum its
//   scores with xor shuffles inside their aligned group (L is a power of two). Each lane keeps
//   an online softmax per head over the keys of its slot (m, l and its 8 dims of acc); the
//   slots of a warp merge by xor shuffles, the warps through shared memory (merge_warps).
//   Split s of `splits` takes the keys paged_decode_split's split s takes; with one split the
//   block writes out[token, h, :] itself (zeros when no key is visible), otherwise its partial
//   to `partials` in paged_decode_split's layout, for decode_merge.
//   Requires d % 8 == 0 with d / 8 a power of two (d = 8, 16, 32, 64, 128 or 256) and 16-byte
//   aligned q and pools (checked on the host, which otherwise takes the other decode kernels).
//   Launch: grid (kv_heads * tiles, splits, seqs), block 256, dynamic shared memory
//   DECODE_WARPS * hpb * (d + 2) floats.
#define GQ_HEADS 4
#define GQ_CHUNK 8

// Folds the online softmax (mo, lo, ao[GQ_CHUNK]) into (m, l, acc): both rescaled to the larger
// maximum; an empty state (maximum -inf) contributes nothing.
__device__ __forceinline__ void fold_softmax(float& m, float& l, float* acc, float mo, float lo, const float* ao) {
    const float mn = fmaxf(m, mo);
    if (mn == -INFINITY) {
        return; // both empty
    }
    const float a = expf(m - mn), b = expf(mo - mn);
    l = l * a + lo * b;
#pragma unroll
    for (int e = 0; e < GQ_CHUNK; ++e) {
        acc[e] = acc[e] * a + ao[e] * b;
    }
    m = mn;
}

extern "C" __global__ void paged_decode_grouped(elem_t* out, float* partials, const elem_t* q, const elem_t* k_pool,
                                                const elem_t* v_pool, const int* meta, const unsigned int* tables,
                                                int seqs, int block_size, int window, int heads, int kv_heads, int d,
                                                float scale, int hpb) {
    KERNEL_CHECK((int)blockIdx.z < seqs && block_size > 0);
    KERNEL_CHECK(blockDim.x == 32 * DECODE_WARPS && kv_heads > 0 && heads % kv_heads == 0);
    KERNEL_CHECK(d % GQ_CHUNK == 0 && d <= ATTN_MAX_D && ((d / GQ_CHUNK) & (d / GQ_CHUNK - 1)) == 0);
    KERNEL_CHECK(hpb >= 1 && hpb <= GQ_HEADS);
    const PagedLayout lay(meta, tables, block_size, window, blockIdx.z);
    KERNEL_CHECK(lay.q_len() == 1);
    const int group = heads / kv_heads, tiles = (group + hpb - 1) / hpb;
    KERNEL_CHECK((int)gridDim.x == kv_heads * tiles);
    const int kvh = blockIdx.x / tiles, tile = blockIdx.x % tiles;
    const int h0 = kvh * group + tile * hpb, nh = min(hpb, group - tile * hpb);
    const int lanes = d / GQ_CHUNK, slots = 32 / lanes; // lanes per key, keys per warp
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int slot = lane / lanes, c0 = (lane % lanes) * GQ_CHUNK;
    const int split = blockIdx.y, splits = gridDim.y;
    const int kb = lay.key_begin(0), ke = lay.key_end(0);
    const int chunk = (ke - kb + splits - 1) / splits;
    const int begin = min(ke, kb + split * chunk), end = min(ke, begin + chunk);
    const size_t q_token = lay.q_token(0);

    float qr[GQ_HEADS][GQ_CHUNK], m[GQ_HEADS], l[GQ_HEADS], acc[GQ_HEADS][GQ_CHUNK];
#pragma unroll
    for (int g = 0; g < GQ_HEADS; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < GQ_CHUNK; ++e) {
            qr[g][e] = 0.0f;
            acc[g][e] = 0.0f;
        }
        if (g < nh) {
            load_chunk(qr[g], q + (q_token * heads + h0 + g) * d + c0);
#pragma unroll
            for (int e = 0; e < GQ_CHUNK; ++e) {
                qr[g][e] *= scale;
            }
        }
    }

    // The loop bound is uniform per warp, so every lane reaches the shuffles; slots past the
    // end take part with zeros and skip the update.
    for (int base = begin + warp * slots; base < end; base += DECODE_WARPS * slots) {
        const int j = base + slot;
        const bool active = j < end;
        float kf[GQ_CHUNK], vf[GQ_CHUNK];
#pragma unroll
        for (int e = 0; e < GQ_CHUNK; ++e) {
            kf[e] = 0.0f;
            vf[e] = 0.0f;
        }
        if (active) {
            const size_t row = (lay.k_token(j) * kv_heads + kvh) * d + c0;
            load_chunk(kf, k_pool + row);
            load_chunk(vf, v_pool + row);
        }
#pragma unroll
        for (int g = 0; g < GQ_HEADS; ++g) {
            if (g >= nh) { // uniform for the block
                continue;
            }
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < GQ_CHUNK; ++e) {
                s += qr[g][e] * kf[e];
            }
            s = lanes_sum(s, lanes);
            if (active) {
                const float mn = fmaxf(m[g], s);
                const float a = expf(m[g] - mn), p = expf(s - mn);
                l[g] = l[g] * a + p;
                m[g] = mn;
#pragma unroll
                for (int e = 0; e < GQ_CHUNK; ++e) {
                    acc[g][e] = acc[g][e] * a + p * vf[e];
                }
            }
        }
    }

    // The warp's slots merged: lanes lane ^ off (off a multiple of L) own the same dims.
    for (int off = lanes; off < 32; off *= 2) {
#pragma unroll
        for (int g = 0; g < GQ_HEADS; ++g) {
            if (g >= nh) {
                continue;
            }
            const float mo = __shfl_xor_sync(FULL_MASK, m[g], off);
            const float lo = __shfl_xor_sync(FULL_MASK, l[g], off);
            float ao[GQ_CHUNK];
#pragma unroll
            for (int e = 0; e < GQ_CHUNK; ++e) {
                ao[e] = __shfl_xor_sync(FULL_MASK, acc[g][e], off);
            }
            fold_softmax(m[g], l[g], acc[g], mo, lo, ao);
        }
    }

    extern __shared__ float smem[];
    float* part = smem; // [DECODE_WARPS][hpb][d + 2]: per warp and head (m, l, acc[d])
    if (slot == 0) {
#pragma unroll
        for (int g = 0; g < GQ_HEADS; ++g) {
            if (g >= nh) {
                continue;
            }
            float* pw = part + (warp * hpb + g) * (d + 2);
            if (lane == 0) {
                pw[0] = m[g];
                pw[1] = l[g];
            }
#pragma unroll
            for (int e = 0; e < GQ_CHUNK; ++e) {
                pw[2 + c0 + e] = acc[g][e];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * d; idx += blockDim.x) {
        const int g = idx / d, c = idx % d, h = h0 + g;
        float m_all, l_all, o_all;
        merge_warps(part + g * (d + 2), hpb * (d + 2), c, &m_all, &l_all, &o_all);
        if (splits == 1) {
            out[(q_token * heads + h) * d + c] = store(m_all == -INFINITY ? 0.0f : o_all / l_all);
        } else {
            float* p = partials + (((size_t)blockIdx.z * heads + h) * splits + split) * (d + 2);
            if (c == 0) {
                p[0] = m_all;
                p[1] = l_all;
            }
            p[2 + c] = o_all;
        }
    }
}

// The unfused attention of dense prompts (encoders): two batched matrix products on cuBLAS
// (tensor cores in half precision) that read q, k and v where they are, around this masked
// softmax.
//
// attn_softmax: p[r, j] = softmax over the visible keys j of scale * s[r, j], for the fp32 scores
//   s [batch * heads * s_q, s_k]; row r = (b * heads + h) * s_q + i. Key j is visible as in
//   DenseLayout (key_valid[b * s_k + j] when has_valid; j <= causal_offset + i when
//   causal_offset >= 0) and, with a sliding window (window > 0, causal only), when
//   j > causal_offset + i - window, as PagedLayout's window; invisible keys and rows without a
//   visible key get 0. The probabilities are stored in elem_t, the precision the second
//   product reads.
//   Launch: grid (rows), block 256.
extern "C" __global__ void attn_softmax(elem_t* p, const float* s, const unsigned char* key_valid, int has_valid,
                                        int causal_offset, int window, int rows, int s_q, int s_k, int heads,
                                        float scale) {
    __shared__ float scratch[32];
    KERNEL_CHECK(s_q > 0 && heads > 0 && blockDim.x % 32 == 0);
    KERNEL_CHECK(window <= 0 || causal_offset >= 0);
    const int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    const int i = r % s_q;
    const size_t b = (size_t)(r / s_q / heads);
    const float* sr = s + (size_t)r * s_k;
    elem_t* pr = p + (size_t)r * s_k;
    const int end = causal_offset >= 0 ? min(s_k, causal_offset + i + 1) : s_k;
    const int begin = window > 0 ? max(0, causal_offset + i + 1 - window) : 0;
    float m = -INFINITY;
    for (int j = begin + threadIdx.x; j < end; j += blockDim.x) {
        if (!has_valid || key_valid[b * s_k + j]) {
            m = fmaxf(m, sr[j] * scale);
        }
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
    if (m != -INFINITY) { // uniform for the block
        for (int j = begin + threadIdx.x; j < end; j += blockDim.x) {
            if (!has_valid || key_valid[b * s_k + j]) {
                sum += expf(sr[j] * scale - m);
            }
        }
    }
    sum = block_sum(sum, scratch);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int j = threadIdx.x; j < s_k; j += blockDim.x) {
        const bool visible = j >= begin && j < end && (!has_valid || key_valid[b * s_k + j]);
        pr[j] = store(visible ? expf(sr[j] * scale - m) * inv : 0.0f);
    }
}

// paged_gather: one sequence's keys and values copied out of the pools into dense rows, for the
//   unfused (cuBLAS) attention of prompts: k_out[j, :] = k_pool[row(j), :] and v_out likewise for
//   j < k_len, row(j) = tables[table_start + j / block_size] * block_size + j % block_size, rows
//   of `width` (kv_heads * d) elements. Launch: grid-stride over k_len * width.
extern "C" __global__ void paged_gather(elem_t* k_out, elem_t* v_out, const elem_t* k_pool, const elem_t* v_pool,
                                        const unsigned int* tables, int table_start, int block_size, int k_len,
                                        int width) {
    KERNEL_CHECK(block_size > 0);
    const size_t n = (size_t)k_len * width;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t j = idx / width, c = idx % width;
        const size_t row = (size_t)tables[table_start + j / block_size] * block_size + j % block_size;
        k_out[idx] = k_pool[row * width + c];
        v_out[idx] = v_pool[row * width + c];
    }
}

// kv_write: pool[slots[t], :] = rows[t, :] for t < tokens, rows of `width` floats (one
//   position's keys or values over all kv heads). Launch: grid-stride over tokens * width.
extern "C" __global__ void kv_write(elem_t* pool, const elem_t* rows, const unsigned int* slots, int tokens,
                                        int width) {
    const size_t n = (size_t)tokens * width;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t t = idx / width, c = idx % width;
        pool[(size_t)slots[t] * width + c] = rows[idx];
    }
}
