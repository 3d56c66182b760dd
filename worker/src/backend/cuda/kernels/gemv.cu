// Matrix-vector products for a few rows (decode steps): the weight is read once, straight from
// memory, with the row's neighbouring ops folded into the same pass.
//
// gemv: for rows r < `rows` (at most GEMV_MAX_ROWS) of x [rows, k] and weight [wrows, k]:
//   s_r   = 1 / sqrt(sum_k x[r, k]^2 / k + eps)   when has_norm (RMS norm, Llama), else 1
//   x'    = x[r, k] * norm_w[k]                   when has_norm, else x[r, k]
//   dot_c = s_r * sum_k x'[k] * weight[c, k] + bias[c]   (bias when has_bias)
//   plain  (swiglu == 0, wrows = n):  out[r, j] = act(dot_j), or out[r, j] += dot_j when
//          accumulate (the residual stream updated in place: a block's output projection and
//          its residual add), with act one of common.cuh's activations (ACT_NONE with
//          accumulate: an activation never follows a residual add)
//   swiglu (swiglu == 1, wrows = 2n): out[r, j] = silu(dot_j) * dot_{n + j}   (Llama's fused
//          gate/up projection; not with accumulate)
//   So one launch is rms_norm + linear, linear + residual add, linear + GELU (GPT-2's and
//   BERT's MLP up-projections), or rms_norm + linear + SwiGLU,
//   without storing the intermediate: in half precision it rounds once, where the composed
//   ops round after each step (the tests hold both to the f64 composition). Each output
//   element is read (accumulate) and written by one thread.
//
// Why not cuBLAS: at one to four rows a product is a pass over the weight (2 bytes an element
// in half precision, one or a few multiply-adds per element), so it runs at memory bandwidth
// whatever the arithmetic; fusing the norm, bias, activation or SwiGLU and residual saves the
// separate launches, which at batch 1 cost about as much as the smaller products themselves.
//
// Layout of the work: a block of GEMV_WARPS warps owns GEMV_COLS weight rows (plain: outputs
// j0 .. j0 + 4; swiglu: gates j0, j0 + 1 and their up rows n + j0, n + j0 + 1). Each lane reads
// 8 consecutive elements of a weight row with 16-byte loads (32 lanes: 256 elements, one
// coalesced 512-byte read in half precision), the warps take every GEMV_WARPS-th 256-element
// chunk of k, and the x chunk a lane loads serves all of the block's weight rows. Partial sums
// are reduced over the warp by shuffles, then over the warps in shared memory; the sum of
// squares for the norm comes from the same x loads, so the norm costs no extra pass.
//
// Requirements (checked on the host, which otherwise takes cuBLAS): k % 8 == 0 and every
// pointer 16-byte aligned, so that each 8-element chunk is one aligned vector (two in fp32).
// Launch: grid ceil(n / outputs per block), block GEMV_WARPS * 32 = 256, no dynamic shared
// memory.

#define GEMV_MAX_ROWS 4
#define GEMV_COLS 4
#define GEMV_WARPS 8
#define GEMV_CHUNK 8

extern "C" __global__ void gemv(elem_t* out, const elem_t* x, const elem_t* weight, const elem_t* norm_w,
                                int has_norm, float eps, const elem_t* bias, int has_bias, int accumulate, int swiglu, int act,
                                int rows, int n, int k) {
    __shared__ float partial[GEMV_WARPS][GEMV_COLS][GEMV_MAX_ROWS];
    __shared__ float squares[GEMV_WARPS][GEMV_MAX_ROWS];
    KERNEL_CHECK(rows >= 1 && rows <= GEMV_MAX_ROWS && k % GEMV_CHUNK == 0 && blockDim.x == GEMV_WARPS * 32);
    KERNEL_CHECK(!(swiglu && accumulate) && act >= ACT_NONE && act <= ACT_SILU);
    KERNEL_CHECK(act == ACT_NONE || !(swiglu || accumulate));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    // The block's outputs start at j0; its weight rows are wrow[c] (-1 past the end).
    const int outs = swiglu ? GEMV_COLS / 2 : GEMV_COLS;
    const int j0 = blockIdx.x * outs;
    int wrow[GEMV_COLS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) {
        const int j = j0 + (swiglu ? c % outs : c);
        wrow[c] = j < n ? (swiglu && c >= outs ? n + j : j) : -1;
    }

    float acc[GEMV_COLS][GEMV_MAX_ROWS];
    float sq[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        sq[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) {
            acc[c][r] = 0.0f;
        }
    }
    for (int base = (warp * 32 + lane) * GEMV_CHUNK; base < k; base += GEMV_WARPS * 32 * GEMV_CHUNK) {
        float g[GEMV_CHUNK];
        if (has_norm) {
            load_chunk(g, norm_w + base);
        }
        float xs[GEMV_MAX_ROWS][GEMV_CHUNK];
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
            if (r < rows) {
                load_chunk(xs[r], x + (size_t)r * k + base);
                if (has_norm) {
#pragma unroll
                    for (int i = 0; i < GEMV_CHUNK; ++i) {
                        sq[r] += xs[r][i] * xs[r][i];
                        xs[r][i] *= g[i];
                    }
                }
            }
        }
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) {
            if (wrow[c] < 0) {
                continue;
            }
            float w[GEMV_CHUNK];
            load_chunk(w, weight + (size_t)wrow[c] * k + base);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
                if (r < rows) {
#pragma unroll
                    for (int i = 0; i < GEMV_CHUNK; ++i) {
                        acc[c][r] += xs[r][i] * w[i];
                    }
                }
            }
        }
    }

    // Every lane takes part in the shuffles (the bounds above are per lane, these are not).
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r < rows) {
#pragma unroll
            for (int c = 0; c < GEMV_COLS; ++c) {
                acc[c][r] = warp_sum(acc[c][r]);
            }
            if (has_norm) {
                sq[r] = warp_sum(sq[r]);
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
            if (r < rows) {
#pragma unroll
                for (int c = 0; c < GEMV_COLS; ++c) {
                    partial[warp][c][r] = acc[c][r];
                }
                squares[warp][r] = sq[r];
            }
        }
    }
    __syncthreads();

    // One thread per (row, output) of the block finishes it.
    const int t = threadIdx.x;
    if (t >= rows * outs) {
        return;
    }
    const int r = t / outs, o = t % outs, j = j0 + o;
    if (j >= n) {
        return;
    }
    float scale = 1.0f;
    if (has_norm) {
        float total = 0.0f;
        for (int w = 0; w < GEMV_WARPS; ++w) {
            total += squares[w][r];
        }
        scale = 1.0f / sqrtf(total / k + eps);
    }
    // Column c of the block's weight rows, summed over the warps, scaled, with its bias.
    // (Indexes are computed rather than read from wrow[], so that the register arrays above
    // are only ever indexed by unrolled constants and stay in registers.)
    auto finish = [&](int c, int weight_row) {
        float total = 0.0f;
        for (int w = 0; w < GEMV_WARPS; ++w) {
            total += partial[w][c][r];
        }
        return total * scale + (has_bias ? load(bias[weight_row]) : 0.0f);
    };
    float v = finish(o, j);
    if (swiglu) {
        v = act_silu(v) * finish(o + outs, n + j);
    } else {
        v = activate(v, act);
    }
    if (accumulate) {
        v += load(out[(size_t)r * n + j]);
    }
    out[(size_t)r * n + j] = store(v);
}
