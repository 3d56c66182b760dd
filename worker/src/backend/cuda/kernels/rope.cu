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
        const double freq = pow((double)theta, -2.0 * (double)i / (double)d);
        double s, c;
        sincos(pos * freq, &s, &c);
        const float cf = (float)c, sf = (float)s;
        const size_t base = ((size_t)t * heads + head) * d;
        const float a = load(x[base + i]), b = load(x[base + i + h]);
        out[base + i] = store(a * cf - b * sf);
        out[base + i + h] = store(b * cf + a * sf);
    }
}
