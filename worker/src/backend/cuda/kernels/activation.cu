// Elementwise operations and activations.
//
// add:        out = a + b
// gelu_erf:   out = x/2 * (1 + erf(x / sqrt(2)))                  (BERT, PyTorch's default)
// gelu_tanh:  out = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))   (GPT-2 "gelu_new")
// silu_mul:   out = gate / (1 + exp(-gate)) * up                  (SwiGLU, Llama)
// swiglu:     out[r, i] = silu(x[r, i]) * x[r, n + i] for x [rows, 2n] (a fused gate/up
//                 projection) and out [rows, n] (Llama's MLP, without splitting x first)
// bias_act:   y[r, c] = act(y[r, c] + bias[c]) in place over a [rows, m] matrix: the
//                 epilogue of a linear layer (the matrix product itself is cuBLAS), with
//                 act 0 = identity, 1 = GELU (erf), 2 = GELU (tanh), 3 = SiLU (the
//                 functions are common.cuh's, which the matrix-vector kernel folds too).
//
// Launch: 1-D grid-stride loops, block 256, grid ceil(n / 256) capped by the host; any grid
// size is correct. erff/tanhf/expf are CUDA's full-precision functions (no fast-math), within
// 2 ulp, so fp32 results match the CPU backend to ~1e-6 relative. The bias is added in fp32
// to the stored product (rounded to the storage type once more in half precision, as a
// PyTorch linear layer followed by an activation rounds).

#define GRID_STRIDE(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)(n); \
                               i += (size_t)gridDim.x * blockDim.x)

extern "C" __global__ void add(elem_t* out, const elem_t* a, const elem_t* b, int n) {
    GRID_STRIDE(i, n) { out[i] = store(load(a[i]) + load(b[i])); }
}

extern "C" __global__ void gelu_erf(elem_t* out, const elem_t* x, int n) {
    GRID_STRIDE(i, n) { out[i] = store(act_gelu_erf(load(x[i]))); }
}

extern "C" __global__ void gelu_tanh(elem_t* out, const elem_t* x, int n) {
    GRID_STRIDE(i, n) { out[i] = store(act_gelu_tanh(load(x[i]))); }
}

extern "C" __global__ void silu_mul(elem_t* out, const elem_t* gate, const elem_t* up, int n) {
    GRID_STRIDE(i, n) { out[i] = store(act_silu(load(gate[i])) * load(up[i])); }
}

extern "C" __global__ void swiglu(elem_t* out, const elem_t* x, int rows, int n) {
    KERNEL_CHECK(n > 0);
    GRID_STRIDE(i, (size_t)rows * n) {
        const size_t r = i / n, c = i % n;
        const elem_t* row = x + r * 2 * n;
        out[i] = store(act_silu(load(row[c])) * load(row[n + c]));
    }
}

extern "C" __global__ void bias_act(elem_t* y, const elem_t* bias, int has_bias, int rows, int m, int act) {
    KERNEL_CHECK(m > 0 && act >= ACT_NONE && act <= ACT_SILU);
    GRID_STRIDE(i, (size_t)rows * m) {
        const float v = has_bias ? load(y[i]) + load(bias[i % m]) : load(y[i]);
        y[i] = store(activate(v, act));
    }
}
