// A CPU emulator of the CUDA execution model, just enough for this backend's kernels, so that
// tests can run the kernels' own source on machines without a GPU (see emulated_tests.rs). It is
// compiled with g++ together with common.cuh and every .cu file, with -DATOMIC_EMULATE.
//
// - A launch runs its blocks one after another. Each CUDA thread of a block is a fiber on the
//   calling OS thread, run round-robin by a small scheduler, so barriers cost a context switch
//   rather than an OS wake-up. On x86-64 a switch is a few instructions (callee-saved registers
//   pushed, stack pointers swapped); elsewhere it is swapcontext, which also makes a system call
//   for the signal mask. Fibers live across blocks and launches, each running one block's body
//   after another.
// - __syncthreads waits until every unfinished fiber of the block has arrived (a generation
//   barrier); __shfl_sync / __shfl_xor_sync exchange through a per-warp buffer between two warp barriers
//   (every lane of a warp must call them, as the kernels do with FULL_MASK). The kernels' early
//   returns are block-uniform, so a finished fiber never leaves a barrier waiting.
// - __shared__ variables are function statics (one block runs at a time); the dynamic shared
//   memory the launch asks for is a buffer the harness substitutes for `extern __shared__`,
//   filled with NaN bytes before each block (on a GPU it starts as garbage).
// - Blocks alternate between running their threads in ascending and descending order, so that a
//   thread reading another's write without a barrier between them sees it unwritten in one.
// - Math is the C library's in the same precision (float expf/erff/tanhf, double exp/pow/sincos);
//   results can differ from the GPU's in the last bits, never more.
// What it cannot show: timing, memory-model races the barriers hide, and the GPU's own
// instructions (PTX conversions are replaced by the compiler's _Float16).

#include <algorithm>
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

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer in *save_sp, and
// continues on the stack at load_sp, popping what was saved there (hidden: each kernel library
// has its own copy).
extern "C" __attribute__((visibility("hidden"))) void emu_swap_stacks(void** save_sp, void* load_sp);
asm(".text\n"
    ".globl emu_swap_stacks\n"
    ".hidden emu_swap_stacks\n"
    ".type emu_swap_stacks, @function\n"
    "emu_swap_stacks:\n"
    "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbx\n    popq %rbp\n"
    "    ret\n"
    ".size emu_swap_stacks, .-emu_swap_stacks\n");

struct Context {
    void* sp = nullptr;
};

// A context that starts `entry` (which never returns) on `stack`: the frame emu_swap_stacks
// pops, then `entry` as its return address, entered with the stack aligned as after a call.
static void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
    *--top = 0; // entry's return address: it never returns
    *--top = reinterpret_cast<uint64_t>(entry);
    for (int i = 0; i < 6; ++i) {
        *--top = 0; // rbp, rbx, r12-r15
    }
    c.sp = top;
}

static void swap_context(Context& from, Context& to) { emu_swap_stacks(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};

static void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr; // entry never returns
    makecontext(&c.uc, entry, 0);
}

static void swap_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Fiber {
    Context context;
    std::unique_ptr<char[]> stack;
    bool done = false;
};

constexpr size_t STACK_BYTES = 256 * 1024;
// Every fiber ever needed (the largest block so far); a launch of N threads uses the first N.
static std::vector<std::unique_ptr<Fiber>> fibers;
static Context scheduler;
static unsigned current = 0;
static std::function<void()> block_body;

// A barrier over the unfinished fibers of a group (the block, or one warp): the last to arrive
// opens it for the others by starting a new generation, so a barrier costs each fiber a switch
// or two rather than a scan of the group. A fiber that finishes leaves its groups, which opens a
// barrier the rest already wait at (the kernels' early returns are block-uniform, so that is
// only the defensive case).
struct Barrier {
    unsigned live = 0, arrived = 0, generation = 0;
    void leave() {
        --live;
        if (arrived > 0 && arrived == live) {
            arrived = 0;
            ++generation;
        }
    }
};
static Barrier block_barrier;
static std::vector<Barrier> warp_barriers;

static void yield() { swap_context(fibers[current]->context, scheduler); }

// A fiber's life: the current block's body, then finished until the scheduler resumes it for the
// next block (of this launch or a later one).
static void fiber_main() {
    for (;;) {
        block_body();
        fibers[current]->done = true;
        block_barrier.leave();
        warp_barriers[current / 32].leave();
        yield();
    }
}

// Runs fiber `t` until it yields at a barrier or finishes its block.
static void switch_to(unsigned t) {
    current = t;
    swap_context(scheduler, fibers[t]->context);
}

// Waits at `b` until every unfinished fiber of its group has arrived.
static void wait_at(Barrier& b) {
    const unsigned generation = b.generation;
    if (++b.arrived == b.live) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == generation) {
        yield();
    }
}

} // namespace emu

[[noreturn]] static inline void __trap() { std::abort(); }

static inline void __syncthreads() { emu::wait_at(emu::block_barrier); }

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
    emu::wait_at(emu::warp_barriers[warp]);
    const int from = xor_lanes ? (lane ^ src) : src;
    bits = emu_exchange[(size_t)warp * 32 + (from & 31)];
    emu::wait_at(emu::warp_barriers[warp]);
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
    while (fibers.size() < threads) {
        auto f = std::make_unique<Fiber>();
        // Not value-initialised: the stack's pages are touched only as deep as a kernel goes.
        f->stack.reset(new char[STACK_BYTES]);
        make_context(f->context, f->stack.get(), STACK_BYTES, fiber_main);
        fibers.push_back(std::move(f));
    }
    block_body = [&] { call_kernel(kernel, args, std::index_sequence_for<P...>{}); };
    for (unsigned z = 0; z < grid[2]; ++z) {
        for (unsigned y = 0; y < grid[1]; ++y) {
            for (unsigned x = 0; x < grid[0]; ++x) {
                blockIdx = dim3{x, y, z};
                for (unsigned t = 0; t < threads; ++t) {
                    fibers[t]->done = false;
                }
                block_barrier = Barrier{threads, 0, 0};
                warp_barriers.assign(threads / 32, Barrier{32, 0, 0});
                // Dynamic shared memory starts as garbage on a GPU: NaN bytes here, every block.
                std::fill(emu_dynamic_smem.begin(), emu_dynamic_smem.end(), 0xff);
                // Every other block runs its threads in descending order, so that a read of
                // another thread's write with no barrier between them fails in one of the two.
                const bool descending = (x + y + z) % 2 == 1;
                for (bool running = true; running;) {
                    running = false;
                    for (unsigned i = 0; i < threads; ++i) {
                        const unsigned t = descending ? threads - 1 - i : i;
                        if (!fibers[t]->done) {
                            threadIdx = dim3{t, 0, 0};
                            switch_to(t);
                            running = running || !fibers[t]->done;
                        }
                    }
                }
            }
        }
    }
    return 0;
}

} // namespace emu
