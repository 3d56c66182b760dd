// Embedding gather.
//
// embedding: out[t, :] = table[ids[t], :] for t < tokens; table is [vocab, d].
//   Launch: grid (tokens), block (min(d, 256) rounded up to a warp); threads stride over d.
//   The host has already rejected ids >= vocab; the device check guards against a stale id
//   buffer rather than user input.
// embedding_add: out[t, :] = table[ids[t], :] + pos_table[positions[t], :], the gather with
//   learned position embeddings added in the same pass (BERT, GPT-2). Same launch shape.

extern "C" __global__ void embedding(elem_t* out, const elem_t* table, const unsigned int* ids, int tokens,
                                     int vocab, int d) {
    const int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    const unsigned int id = ids[t];
    KERNEL_CHECK(id < (unsigned int)vocab);
    const elem_t* src = table + (size_t)id * d;
    elem_t* dst = out + (size_t)t * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        dst[c] = src[c];
    }
}

extern "C" __global__ void embedding_add(elem_t* out, const elem_t* table, const unsigned int* ids,
                                         const elem_t* pos_table, const unsigned int* positions, int tokens,
                                         int vocab, int max_positions, int d) {
    const int t = blockIdx.x;
    if (t >= tokens) {
        return;
    }
    const unsigned int id = ids[t], pos = positions[t];
    KERNEL_CHECK(id < (unsigned int)vocab && pos < (unsigned int)max_positions);
    const elem_t* src = table + (size_t)id * d;
    const elem_t* p = pos_table + (size_t)pos * d;
    elem_t* dst = out + (size_t)t * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        dst[c] = store(load(src[c]) + load(p[c]));
    }
}
