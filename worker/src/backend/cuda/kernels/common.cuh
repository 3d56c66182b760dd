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

// Tensor cores (half precision on sm_80 and later): mma_16x8x16 is the warp-wide
// D = A B + C of PTX's mma.sync.aligned.m16n8k16 with A 16 x 16 (row-major), B 16 x 8
// (column-major), both in the storage type, and C, D in fp32. Each lane holds the fragments
// the PTX ISA lays out for that shape; with g = lane / 4 and t = lane % 4:
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// where a 32-bit register holds two elements, the lower-numbered in its low half (pack2).
// Every lane of the warp must call it. The emulator computes the same product in fp32 from
// the whole warp's fragments, gathered as that layout places them.
#if defined(ATOMIC_F16) || defined(ATOMIC_BF16)
#define ATOMIC_HAS_MMA 1

__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
#if !defined(ATOMIC_EMULATE) && __CUDA_ARCH__ >= 800
    // One instruction rounds both (to nearest, ties to even, as store); its first source
    // goes to the high half.
    unsigned int word;
#if defined(ATOMIC_BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(word) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(word) : "f"(hi), "f"(lo));
#endif
    return word;
#else
    return (unsigned int)store(lo).bits | ((unsigned int)store(hi).bits << 16);
#endif
}

__device__ __forceinline__ float half_of(unsigned int word, int high) {
    return load(elem_t{(unsigned short)(high ? word >> 16 : word & 0xffffu)});
}

__device__ __forceinline__ void mma_16x8x16(float* c, const unsigned int* a, const unsigned int* b) {
#if defined(ATOMIC_EMULATE)
    const unsigned int mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    unsigned int all[32 * 6];
    emu_warp_gather(mine, 6, all);
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
        float sum = 0.0f;
        for (int kk = 0; kk < 16; ++kk) {
            // A[row][kk] sits in lane (row % 8) * 4 + (kk % 8) / 2, register (row >= 8) + 2 (kk >= 8);
            // B[kk][col] in lane col * 4 + (kk % 8) / 2, register (kk >= 8).
            const int a_lane = (row % 8) * 4 + (kk % 8) / 2, a_reg = (row >= 8) + 2 * (kk >= 8);
            const int b_lane = col * 4 + (kk % 8) / 2, b_reg = 4 + (kk >= 8);
            sum += half_of(all[a_lane * 6 + a_reg], kk % 2) * half_of(all[b_lane * 6 + b_reg], kk % 2);
        }
        c[e] += sum;
    }
#elif __CUDA_ARCH__ >= 800
#if defined(ATOMIC_BF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
#else
    __trap(); // older GPUs: the host never launches the tensor-core kernels there
#endif
}

// Four 8 x 8 matrices of storage elements from shared memory into fragments, as PTX's
// ldmatrix.sync.aligned.m8n8.x4.shared.b16 loads them: lanes 8i .. 8i + 7 give the addresses
// of rows 0 .. 7 of matrix i (each row 8 contiguous elements, 16-byte aligned), and register
// i of lane l = 4g + t receives, the lower-numbered element in the low half,
//   ldmatrix_x4:       M_i[g][2t, 2t+1]
//   ldmatrix_x4_trans: M_i[2t, 2t+1][g]   (the matrix transposed: .trans)
// Every lane of the warp must call them. A fragment of mma_16x8x16's B is then one register
// from rows of B^T (non-transposed) or of B (transposed).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4_impl(unsigned int* r, const unsigned short* row) {
#if defined(ATOMIC_EMULATE)
    static_assert(sizeof(row) == 8, "the emulator gathers row addresses as two words");
    unsigned int mine[2];
    memcpy(mine, &row, sizeof row);
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        __trap(); // PTX requires 16-byte aligned rows
    }
    unsigned int all[32 * 2];
    emu_warp_gather(mine, 2, all);
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const auto row_of = [&](int lane_of_row) {
        const unsigned short* p;
        memcpy(&p, all + 2 * lane_of_row, sizeof p);
        return p;
    };
    for (int i = 0; i < 4; ++i) {
        unsigned int lo, hi;
        if constexpr (TRANS) {
            lo = row_of(8 * i + 2 * t)[g];
            hi = row_of(8 * i + 2 * t + 1)[g];
        } else {
            lo = row_of(8 * i + g)[2 * t];
            hi = row_of(8 * i + g)[2 * t + 1];
        }
        r[i] = lo | (hi << 16);
    }
#elif __CUDA_ARCH__ >= 800
    // "memory": the rows are what other threads staged before a barrier, so the load must
    // neither move above it nor be taken for the previous tile's (the address repeats).
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(row);
    if constexpr (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address)
                     : "memory");
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(address)
                     : "memory");
    }
#else
    __trap(); // older GPUs: the host never launches the tensor-core kernels there
#endif
}

__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, const unsigned short* row) {
    ldmatrix_x4_impl<false>(r, row);
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int* r, const unsigned short* row) {
    ldmatrix_x4_impl<true>(r, row);
}

// Asynchronous copies from global to shared memory (sm_80 and later), which let a block stage
// its next tile while it computes on the current one. cp_async_16 starts a copy of 16 bytes
// (both addresses 16-byte aligned) of which the first `src_bytes` (0 or 16) are read and the
// rest zero-filled; cp_async_wait_all returns once every copy this thread started has landed.
// Other threads see the bytes only after the issuing thread's wait and a barrier.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(ATOMIC_EMULATE)
    emu_cp_async(dst, src, src_bytes);
#elif __CUDA_ARCH__ >= 800
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(src), "r"(src_bytes)
                 : "memory");
#else
    __trap(); // older GPUs: the host never launches the tensor-core kernels there
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(ATOMIC_EMULATE)
    emu_cp_async_wait_all();
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}
#endif

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

// Sum (lanes_sum) or maximum (lanes_max) of `v` over each aligned group of `width` lanes (a
// power of two, at most 32), returned to every lane of the group: an xor butterfly, widest step
// first.
#if defined(ATOMIC_EMULATE)
// The emulator computes the same butterfly, in the same order, from one exchange of the warp's
// values (emulator.h): each shuffle would stop every lane's fiber, which is most of the
// emulation's time in the kernels that reduce per key or per output.
__device__ __forceinline__ float lanes_sum(float v, int width) { return emu_butterfly(v, width, false); }
__device__ __forceinline__ float lanes_max(float v, int width) { return emu_butterfly(v, width, true); }
#else
__device__ __forceinline__ float lanes_sum(float v, int width) {
    for (int offset = width / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float lanes_max(float v, int width) {
    for (int offset = width / 2; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}
#endif

__device__ __forceinline__ float warp_sum(float v) { return lanes_sum(v, 32); }
__device__ __forceinline__ float warp_max(float v) { return lanes_max(v, 32); }

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
