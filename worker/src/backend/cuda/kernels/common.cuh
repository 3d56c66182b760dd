// Helpers shared by every kernel file. The backend prepends this text to each .cu source before
// NVRTC compiles it (NVRTC has no include path of ours), so the files stay self-contained units.
//
// Conventions of all kernels:
// - dense row-major tensors of `elem_t`, sizes as `int` (the host refuses tensors of 2^31 or
//   more elements before launching);
// - elem_t is the backend's storage precision, fixed when the module is compiled: float by
//   default, IEEE half with -DATOMIC_F16, bfloat16 with -DATOMIC_BF16. Arithmetic is always fp32:
//   `load` widens exactly, `store` rounds to nearest, ties to even (the rounding PyTorch's
//   .to(dtype) does), so a half-precision model keeps fp32 accumulators, sums and softmaxes and
//   rounds only what it stores;
// - block reductions assume blockDim.x is a multiple of 32 and at most 1024;
// - KERNEL_CHECK is a device-side shape assert: it prints the failed condition and traps, which
//   aborts the launch; the host then reports the sticky launch error on its next synchronisation.

#define KERNEL_CHECK(cond)                                                                   \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            printf("kernel check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__);        \
            __trap();                                                                        \
        }                                                                                    \
    } while (0)

#define FULL_MASK 0xffffffffu

// The storage types are spelled out here rather than taken from cuda_fp16.h / cuda_bf16.h, so
// that the kernels compile with NVRTC alone (no CUDA headers on the include path).
#if defined(ATOMIC_BF16)
struct elem_t {
    unsigned short bits;
};
__device__ __forceinline__ float load(elem_t v) { return __uint_as_float((unsigned int)v.bits << 16); }
__device__ __forceinline__ elem_t store(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return elem_t{(unsigned short)((u >> 16) | 0x40u)}; // NaN stays a (quiet) NaN
    }
    return elem_t{(unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
#elif defined(ATOMIC_F16)
struct elem_t {
    unsigned short bits;
};
#if defined(ATOMIC_EMULATE)
// The CPU emulator of the tests (see emulator.h): the compiler's _Float16, same rounding.
__device__ __forceinline__ float load(elem_t v) {
    _Float16 h;
    memcpy(&h, &v.bits, sizeof h);
    return (float)h;
}
__device__ __forceinline__ elem_t store(float f) {
    const _Float16 h = (_Float16)f;
    elem_t e;
    memcpy(&e.bits, &h, sizeof h);
    return e;
}
#else
__device__ __forceinline__ float load(elem_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ elem_t store(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return elem_t{h};
}
#endif
#else
typedef float elem_t;
__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float store(float f) { return f; }
#endif

struct alignas(16) vec16 {
    unsigned int w[4];
};

// Eight consecutive elements from a 16-byte aligned address, widened to fp32: one 16-byte load
// in half precision, two in fp32 (gemv's weight rows, the grouped decode kernel's cache rows).
__device__ __forceinline__ void load_chunk(float* dst, const elem_t* src) {
#if defined(ATOMIC_BF16) || defined(ATOMIC_F16)
    const vec16 v = *reinterpret_cast<const vec16*>(src);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        dst[2 * i] = load(elem_t{(unsigned short)(v.w[i] & 0xffffu)});
        dst[2 * i + 1] = load(elem_t{(unsigned short)(v.w[i] >> 16)});
    }
#else
    const vec16 lo = reinterpret_cast<const vec16*>(src)[0];
    const vec16 hi = reinterpret_cast<const vec16*>(src)[1];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        dst[i] = __uint_as_float(lo.w[i]);
        dst[4 + i] = __uint_as_float(hi.w[i]);
    }
#endif
}

// NVRTC compiles without the C library headers that define these.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

// The activations of linear layers (bias_act, gemv): GELU in its erf form (BERT, PyTorch's
// default) and its tanh form (GPT-2's "gelu_new"), SiLU (Llama). erff, tanhf and expf are CUDA's
// full-precision functions (no fast-math), within 2 ulp.
#define ACT_NONE 0
#define ACT_GELU 1
#define ACT_GELU_TANH 2
#define ACT_SILU 3

__device__ __forceinline__ float act_gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

__device__ __forceinline__ float act_gelu_tanh(float x) {
    const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
}

__device__ __forceinline__ float act_silu(float x) {
    return x / (1.0f + expf(-x));
}

__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
    case ACT_GELU:
        return act_gelu_erf(x);
    case ACT_GELU_TANH:
        return act_gelu_tanh(x);
    case ACT_SILU:
        return act_silu(x);
    default:
        return x;
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Sum of `v` over the block, returned to every thread. `scratch` holds 32 floats of shared
// memory; the trailing barrier lets the caller reuse it for the next reduction at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = warp_sum(lane < warps ? scratch[lane] : 0.0f);
    __syncthreads();
    return v;
}

// Maximum of `v` over the block, returned to every thread (same contract as block_sum).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = warp_max(lane < warps ? scratch[lane] : -INFINITY);
    __syncthreads();
    return v;
}
