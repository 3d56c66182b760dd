// A CPU emulator of the CUDA execution model, just enough for this backend's kernels, so that
// tests can run the kernels' own source on machines without a GPU (see emulated_tests.rs). It is
// compiled with g++ together with common.cuh and every .cu file, with -DATOMIC_EMULATE.
//
// - A launch runs its blocks one after another. Each CUDA thread of a block is a fiber
//   (ucontext) on the calling OS thread, run round-robin by a small scheduler, so barriers cost a
//   context switch rather than an OS wake-up.
// - __syncthreads waits until every fiber of the block has reached the same barrier count;
//   __shfl_sync / __shfl_xor_sync exchange through a per-warp buffer between two warp barriers
//   (every lane of a warp must call them, as the kernels do with FULL_MASK). The kernels' early
//   returns are block-uniform, so a finished fiber never leaves a barrier waiting.
// - __shared__ variables are function statics (one block runs at a time); the dynamic shared
//   memory the launch asks for is a buffer the harness substitutes for `extern __shared__`.
// - Math is the C library's in the same precision (float expf/erff/tanhf, double exp/pow/sincos);
//   results can differ from the GPU's in the last bits, never more.
// What it cannot show: timing, memory-model races the barriers hide, and the GPU's own
// instructions (PTX conversions are replaced by the compiler's _Float16).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <functional>
#include <ucontext.h>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

static dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

static std::vector<unsigned char> emu_dynamic_smem;
static std::vector<uint64_t> emu_exchange;

namespace emu {

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    unsigned block_phase = 0, warp_phase = 0;
    bool done = false;
};

constexpr size_t STACK_BYTES = 256 * 1024;
static std::vector<Fiber> fibers;
static ucontext_t scheduler;
static unsigned current = 0;
static std::function<void()> block_body;

static void yield() { swapcontext(&fibers[current].ctx, &scheduler); }

static void fiber_main() {
    block_body();
    fibers[current].done = true; // then back to the scheduler through uc_link
}

// Waits until every unfinished fiber in [first, first + count) has passed `phase` of the
// counter `which` selects.
static void wait_for(unsigned Fiber::*which, unsigned first, unsigned count) {
    const unsigned phase = ++(fibers[current].*which);
    for (;;) {
        bool all = true;
        for (unsigned t = first; t < first + count; ++t) {
            if (!fibers[t].done && fibers[t].*which < phase) {
                all = false;
                break;
            }
        }
        if (all) {
            return;
        }
        yield();
    }
}

} // namespace emu

[[noreturn]] static inline void __trap() { std::abort(); }

static inline void __syncthreads() { emu::wait_for(&emu::Fiber::block_phase, 0, (unsigned)emu::fibers.size()); }

static inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, sizeof u);
    return u;
}
static inline int __float_as_int(float f) { return (int)__float_as_uint(f); }
static inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }

// sincos, expf, erff, tanhf, pow: the C library's (glibc declares sincos as a GNU extension).
using std::isfinite;
using std::isnan;
// Fibers switch only at barriers and shuffles, so a read-modify-write is atomic as it stands.
template <class T> static T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

// Lane `src` of the calling thread's warp gets `v`'s value from every lane (`xor`: from
// lane ^ src).
template <class T> static T emu_shuffle(T v, int src, bool xor_lanes) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    emu_exchange[(size_t)warp * 32 + lane] = bits;
    emu::wait_for(&emu::Fiber::warp_phase, warp * 32, 32);
    const int from = xor_lanes ? (lane ^ src) : src;
    bits = emu_exchange[(size_t)warp * 32 + (from & 31)];
    emu::wait_for(&emu::Fiber::warp_phase, warp * 32, 32);
    T out;
    memcpy(&out, &bits, sizeof out);
    return out;
}
template <class T> static T __shfl_sync(unsigned, T v, int src) { return emu_shuffle(v, src, false); }
template <class T> static T __shfl_xor_sync(unsigned, T v, int mask) { return emu_shuffle(v, mask, true); }

namespace emu {

// Runs `kernel` over the grid with its arguments read from `args` (one pointer per parameter,
// as cuLaunchKernel takes them).
template <class... P, size_t... I>
void call_kernel(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<P>*>(args[I])...);
}

template <class... P>
int run(void (*kernel)(P...), const unsigned* grid, const unsigned* block, size_t smem, void** args) {
    blockDim = dim3{block[0], block[1], block[2]};
    gridDim = dim3{grid[0], grid[1], grid[2]};
    const unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || threads % 32 != 0 || block[1] != 1 || block[2] != 1) {
        return 1; // the kernels launch 1-D blocks of whole warps
    }
    emu_dynamic_smem.assign(smem + 16, 0);
    emu_exchange.assign(threads, 0);
    if (fibers.size() != threads) {
        fibers = std::vector<Fiber>(threads);
        for (auto& f : fibers) {
            f.stack = std::make_unique<char[]>(STACK_BYTES);
        }
    }
    block_body = [&] { call_kernel(kernel, args, std::index_sequence_for<P...>{}); };
    for (unsigned z = 0; z < grid[2]; ++z) {
        for (unsigned y = 0; y < grid[1]; ++y) {
            for (unsigned x = 0; x < grid[0]; ++x) {
                blockIdx = dim3{x, y, z};
                for (auto& f : fibers) {
                    f.block_phase = f.warp_phase = 0;
                    f.done = false;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.get();
                    f.ctx.uc_stack.ss_size = STACK_BYTES;
                    f.ctx.uc_link = &scheduler;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                for (bool running = true; running;) {
                    running = false;
                    for (unsigned t = 0; t < threads; ++t) {
                        if (!fibers[t].done) {
                            current = t;
                            threadIdx = dim3{t, 0, 0};
                            swapcontext(&scheduler, &fibers[t].ctx);
                            running = running || !fibers[t].done;
                        }
                    }
                }
            }
        }
    }
    return 0;
}

} // namespace emu
