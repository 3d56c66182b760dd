// Sentence pooling (sentence-transformers' Pooling module, then optionally Normalize), one
// block per sequence of a padded batch.
//
// pool_rows: x is [batch, seq, h], valid [batch, seq] (1 for a real token). With
// V = { t : valid[b, t] } and n = |V|:
//   POOL_CLS:       p[c] = x[b, 0, c]                      (whatever the mask)
//   POOL_MEAN:      p[c] = sum_{t in V} x[b, t, c] / n
//   POOL_MAX:       p[c] = max_{t in V} x[b, t, c]
//   POOL_MEAN_SQRT: p[c] = sum_{t in V} x[b, t, c] / sqrt(n)
//   POOL_LAST:      p[c] = x[b, max V, c]
//   every mode but CLS gives p = 0 when V is empty; then out[b, c] = p[c], or with normalize
//   p[c] / max(||p||_2, 1e-12). out is fp32 whatever elem_t: the embeddings go to the host as
//   they are, never rounded to the storage precision.
//
// Launch: grid (batch), block 256 (any multiple of 32 up to 1024), dynamic shared memory h
// floats: each thread keeps the pooled values of the columns it strides over there (and
// rereads only those, so only the norm's reduction synchronises). Sums run in fp32 over the
// tokens in order; the host keeps the dynamic h * 4 bytes and the static 128 of the reduction
// within the 48 KiB a block may have without opting in.

#define POOL_CLS 0
#define POOL_MEAN 1
#define POOL_MAX 2
#define POOL_MEAN_SQRT 3
#define POOL_LAST 4

extern "C" __global__ void pool_rows(float* out, const elem_t* x, const unsigned char* valid, int seq, int h,
                                     int mode, int normalize) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    KERNEL_CHECK(seq > 0 && h > 0 && mode >= POOL_CLS && mode <= POOL_LAST && blockDim.x % 32 == 0);
    const int b = blockIdx.x;
    const unsigned char* v = valid + (size_t)b * seq;
    const elem_t* xb = x + (size_t)b * seq * h;

    // Every thread counts the valid tokens itself: seq bytes, read by the whole block at once.
    int n = 0, last = -1;
    for (int t = 0; t < seq; ++t) {
        if (v[t]) {
            ++n;
            last = t;
        }
    }

    float squares = 0.0f;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        float p = 0.0f;
        if (mode == POOL_CLS) {
            p = load(xb[c]);
        } else if (mode == POOL_LAST) {
            p = last >= 0 ? load(xb[(size_t)last * h + c]) : 0.0f;
        } else if (n > 0) {
            p = mode == POOL_MAX ? -INFINITY : 0.0f;
            for (int t = 0; t < seq; ++t) {
                if (v[t]) {
                    const float value = load(xb[(size_t)t * h + c]);
                    p = mode == POOL_MAX ? fmaxf(p, value) : p + value;
                }
            }
            if (mode == POOL_MEAN) {
                p /= (float)n;
            } else if (mode == POOL_MEAN_SQRT) {
                p /= sqrtf((float)n);
            }
        }
        smem[c] = p;
        squares += p * p;
    }
    float scale = 1.0f;
    if (normalize) {
        scale = 1.0f / fmaxf(sqrtf(block_sum(squares, scratch)), 1e-12f);
    }
    float* o = out + (size_t)b * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        o[c] = smem[c] * scale;
    }
}
