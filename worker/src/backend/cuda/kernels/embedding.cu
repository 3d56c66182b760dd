// Embedding gather.
//
// embedding_f32: out[t, :] = table[ids[t], :] for t < tokens; table is [vocab, d].
//   Launch: grid (tokens), block (min(d, 256) rounded up to a warp); threads stride over d.
//   The host has already rejected ids >= vocab; the device check guards against a stale id
//   buffer rather than user input.
// embedding_add_f32: out[t, :] = table[ids[t], :] + pos_table[positions[t], :], the gather with
//   learned position embeddings added in the same pass (BERT, GPT-2). Same launch shape.

extern "C" __global__ void embedding_f32(float* out, const float* table, const unsigned int* ids, int tokens,
                                         int vocab, int d) {
    const int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    const unsigned int id = ids[t];
    KERNEL_CHECK(id < (unsigned int)vocab);
    const float* src = table + (size_t)id * d;
    float* dst = out + (size_t)t * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        dst[c] = src[c];
    }
}

extern "C" __global__ void embedding_add_f32(float* out, const float* table, const unsigned int* ids,
                                             const float* pos_table, const unsigned int* positions, int tokens,
                                             int vocab, int max_positions, int d) {
    const int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    const unsigned int id = ids[t], pos = positions[t];
    KERNEL_CHECK(id < (unsigned int)vocab && pos < (unsigned int)max_positions);
    const float* src = table + (size_t)id * d;
    const float* p = pos_table + (size_t)pos * d;
    float* dst = out + (size_t)t * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        dst[c] = src[c] + p[c];
    }
}
