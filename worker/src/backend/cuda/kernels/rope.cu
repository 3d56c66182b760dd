// Rotary position embedding, Hugging Face "rotate_half" convention.
//
// rope: x and out are [tokens, heads, d] with d even and h = d / 2. For token t at position
//   p = positions[t] and i < h:
//     freq_i  = theta^(-2i / d),   angle = p * freq_i
//     out[i]     = x[i] * cos(angle) - x[i + h] * sin(angle)
//     out[i + h] = x[i + h] * cos(angle) + x[i] * sin(angle)
//   The angle, its sine and cosine are computed in double and rounded to fp32, exactly as the CPU
//   backend does: p * freq in fp32 loses the angle's low bits at long contexts. Double math here
//   is d/2 sincos per token and head, negligible next to the projections around it.
//
// Launch: grid (tokens), block 128 (any size); threads stride over heads * h pairs.
//
// qkv_rope: the same rotation applied while splitting a fused projection. qkv is [tokens,
//   (heads + 2 * kv_heads) * d] laid out [q heads | k heads | v heads]; q_out is [tokens, heads,
//   d] and k_out [tokens, kv_heads, d] rotated as above, v_out [tokens, kv_heads, d] copied.
//   One pass instead of three splits and two rotations (Llama's attention input).
//   Launch: grid (tokens), block 128 (any size); threads stride over the (heads + kv_heads) * h
//   pairs, then over the kv_heads * d values of v.
//
// qkv_rope_paged: qkv_rope with k and v written straight into their key/value pool rows: token
//   t's rotated keys go to k_pool[slots[t], :, :] and its values to v_pool[slots[t], :, :] (the
//   pools are [slots, kv_heads, d]), so a decode step's new keys need no separate kv_write.
//   Same launch as qkv_rope.

// The rotation of one (x[i], x[i + h]) pair of a head at position `pos` (the math above).
__device__ __forceinline__ void rotate_pair(elem_t* out, const elem_t* x, int i, int h, int d, double pos,
                                            float theta) {
    const double freq = pow((double)theta, -2.0 * (double)i / (double)d);
    double s, c;
    sincos(pos * freq, &s, &c);
    const float cf = (float)c, sf = (float)s;
    const float a = load(x[i]), b = load(x[i + h]);
    out[i] = store(a * cf - b * sf);
    out[i + h] = store(b * cf + a * sf);
}

extern "C" __global__ void rope(elem_t* out, const elem_t* x, const unsigned int* positions, int tokens, int heads,
                                int d, float theta) {
    KERNEL_CHECK(d % 2 == 0);
    const int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    const int h = d / 2;
    const double pos = (double)positions[t];
    for (int idx = threadIdx.x; idx < heads * h; idx += blockDim.x) {
        const int head = idx / h, i = idx % h;
        const size_t base = ((size_t)t * heads + head) * d;
        rotate_pair(out + base, x + base, i, h, d, pos, theta);
    }
}

// One token's share of qkv_rope: its fused row `row` into q_out, k_out and v_out (rows of
// heads * d and kv_heads * d elements).
__device__ __forceinline__ void qkv_rope_token(elem_t* q_out, elem_t* k_out, elem_t* v_out, const elem_t* row,
                                               double pos, int heads, int kv_heads, int d, float theta) {
    const int h = d / 2;
    for (int idx = threadIdx.x; idx < (heads + kv_heads) * h; idx += blockDim.x) {
        const int head = idx / h, i = idx % h;
        if (head < heads) {
            rotate_pair(q_out + (size_t)head * d, row + (size_t)head * d, i, h, d, pos, theta);
        } else {
            const int kh = head - heads;
            rotate_pair(k_out + (size_t)kh * d, row + (size_t)head * d, i, h, d, pos, theta);
        }
    }
    const elem_t* v = row + (size_t)(heads + kv_heads) * d;
    for (int c = threadIdx.x; c < kv_heads * d; c += blockDim.x) {
        v_out[c] = v[c];
    }
}

extern "C" __global__ void qkv_rope(elem_t* q_out, elem_t* k_out, elem_t* v_out, const elem_t* qkv,
                                    const unsigned int* positions, int tokens, int heads, int kv_heads, int d,
                                    float theta) {
    KERNEL_CHECK(d % 2 == 0);
    const int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    const size_t kv_row = (size_t)t * kv_heads * d;
    qkv_rope_token(q_out + (size_t)t * heads * d, k_out + kv_row, v_out + kv_row,
                   qkv + (size_t)t * (heads + 2 * kv_heads) * d, (double)positions[t], heads, kv_heads, d, theta);
}

extern "C" __global__ void qkv_rope_paged(elem_t* q_out, elem_t* k_pool, elem_t* v_pool, const elem_t* qkv,
                                          const unsigned int* positions, const unsigned int* slots, int tokens,
                                          int heads, int kv_heads, int d, float theta) {
    KERNEL_CHECK(d % 2 == 0);
    const int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    const size_t kv_row = (size_t)slots[t] * kv_heads * d;
    qkv_rope_token(q_out + (size_t)t * heads * d, k_pool + kv_row, v_pool + kv_row,
                   qkv + (size_t)t * (heads + 2 * kv_heads) * d, (double)positions[t], heads, kv_heads, d, theta);
}
