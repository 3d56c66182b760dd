// A CPU emulator of the CUDA execution model, just enough for this backend's kernels, so that
// tests can run the kernels' own source on machines without a GPU (see emulated_tests.rs). It is
// compiled with g++ together with common.cuh and every .cu file, with -DATOMIC_EMULATE.
//
// - A launch's blocks are spread over host threads (the emulated driver hands each thread ranges
//   of them; emu::run below runs one range). Each CUDA thread of a block is a fiber on its host
//   thread; a fiber that stops at a barrier or shuffle switches straight to the block's next
//   unfinished fiber (round-robin, the scheduler only starting the block and getting it back when
//   it ends), so barriers cost a context switch rather than an OS wake-up. On x86-64 a switch
//   is a few instructions (callee-saved registers pushed, stack pointers swapped); elsewhere it
//   is swapcontext, which also makes a system call for the signal mask. Fibers live across
//   blocks and launches, each running one block's body after another, and never leave their
//   host thread.
// - A fiber finds itself from its stack pointer: stacks are aligned to their size and begin with
//   the fiber's record (its threadIdx and its host thread's block state), so threadIdx, blockIdx,
//   barriers and shuffles cost no thread-local lookup. Only __shared__ variables (function
//   statics per host thread, one block running on a thread at a time) and the host thread's
//   block state, looked up once per range of blocks, are thread_local.
// - __syncthreads waits until every unfinished fiber of the block has arrived (a generation
//   barrier); __shfl_sync / __shfl_xor_sync exchange through a per-warp buffer and one warp
//   barrier, alternating between two buffers so that a lane writing the next exchange never
//   overwrites one a slower lane has still to read (every lane of a warp must call them, as the
//   kernels do with FULL_MASK). The kernels' early returns are block-uniform, so a finished
//   fiber never leaves a barrier waiting.
// - The dynamic shared memory the launch asks for is a buffer the harness substitutes for
//   `extern __shared__` (emu::dynamic_smem), filled with NaN bytes before each block (on a GPU it
//   starts as garbage). Static __shared__ variables are too: they are the kernel library's
//   thread-local storage, which is nothing else but the host thread's block state, so before
//   each block every byte of this thread's copy of it but that state's is set to 0xff (a NaN
//   as a float, a huge count as an integer), where a function static would otherwise keep the
//   previous block's values and hide a read before the first write.
// - __trap (a failed KERNEL_CHECK) ends the launch as on a GPU: its block stops, the launch
//   returns an error (the emulated driver's sticky CUDA_ERROR_LAUNCH_FAILED), and the fibers
//   start over for the next one.
// - Blocks alternate between running their threads in ascending and descending order, so that a
//   thread reading another's write without a barrier between them sees it unwritten in one; and
//   blocks run concurrently, as on a GPU, so one reading another block's output races here too.
// - cp.async copies land only at the issuing thread's next wait, so a tile read before its
//   wait (or before the barrier after every thread's wait) holds what was there before.
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
#include <link.h>
#include <new>
#include <ucontext.h>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local

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

// One warp's shuffle state: two exchange buffers used in turn, and its barrier.
// The most 32-bit words each lane contributes to one warp_gather (an mma's A and B fragments).
constexpr int GATHER_WORDS = 8;

struct Warp {
    uint64_t exchange[2][32];
    uint32_t gathered[2][32][GATHER_WORDS];
    Barrier barrier;
};

struct Fiber;

// What the fibers of one host thread share: the block running there and its scheduler.
struct Host {
    Context scheduler;
    std::vector<Fiber*> fibers; // every fiber ever needed here; a block of N threads uses N
    std::vector<unsigned char> done; // per fiber of the block: whether it has finished it
    dim3 block_idx, block_dim, grid_dim;
    Barrier block_barrier;
    std::vector<Warp> warps;
    std::vector<unsigned char> dynamic_smem;
    void (*body)(void*) = nullptr; // the current launch's kernel call
    void* body_arg = nullptr;
    // This host thread's copy of the library's thread-local storage (the static __shared__
    // variables and the Owner below), found on the first launch; null if it has none.
    unsigned char* tls = nullptr;
    size_t tls_bytes = 0;
    bool tls_found = false;
    bool trapped = false; // a thread of the current block called __trap
    unsigned threads = 0; // of the current block
    bool descending = false; // whether the current block runs its threads last to first
};

constexpr size_t STACK_BYTES = 256 * 1024;

// A cp.async copy a thread has started and not yet waited for: it lands only at the thread's
// next wait (emu_cp_async_wait_all), so a read of the tile before then sees what was there
// before, as it may on a GPU.
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned src_bytes; // read from src; the rest of the 16 bytes are zero-filled
};

constexpr int MAX_ASYNC_COPIES = 64;

// A fiber's record, at the base of its stack (the lowest addresses; the stack grows down from
// the top, 256 KiB away).
struct Fiber {
    Context context;
    Host* host;
    dim3 thread_idx;
    unsigned shuffles = 0; // which exchange buffer its next shuffle uses
    AsyncCopy copies[MAX_ASYNC_COPIES];
    int copies_pending = 0;
    char* stack = nullptr; // where its context starts (again, after a trap)
    size_t stack_bytes = 0;
};

// The fiber running this code: its stack is aligned to STACK_BYTES, with the record at its base.
// The stack pointer is read in assembly rather than as a local's address: derived from a local,
// the pointer would let the compiler assume it points into that local and cache the record's
// fields across a switch.
static inline Fiber* self() {
    uintptr_t sp;
#if defined(__x86_64__)
    asm("movq %%rsp, %0" : "=r"(sp));
#else
    sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
#endif
    return reinterpret_cast<Fiber*>(sp & ~(uintptr_t)(STACK_BYTES - 1));
}

// What runs after fiber `t` stops: the next unfinished fiber of its block in the block's running
// order, or the scheduler once every fiber has finished; null when `t` is the only one left
// unfinished. Fibers switch to each other directly: through the scheduler, each stop at a barrier
// or shuffle would cost two switches, which is most of the emulation's time.
static Context* next_after(Host& h, unsigned t) {
    for (unsigned k = 1; k < h.threads; ++k) {
        const unsigned u = h.descending ? (t + h.threads - k) % h.threads : (t + k) % h.threads;
        if (!h.done[u]) {
            return &h.fibers[u]->context;
        }
    }
    return h.done[t] ? &h.scheduler : nullptr;
}

static void yield() {
    Fiber* f = self();
    if (Context* next = next_after(*f->host, f->thread_idx.x)) {
        swap_context(f->context, *next);
    }
}

[[noreturn]] static void trap();

// A fiber's life: the current block's body, then finished until the scheduler resumes it for the
// next block (of this launch or a later one).
static void fiber_main() {
    for (;;) {
        Fiber* f = self();
        Host* h = f->host;
        h->body(h->body_arg);
        if (f->copies_pending != 0) {
            std::fprintf(stderr, "emulated GPU: a thread finished its block with cp.async copies it never waited for\n");
            trap();
        }
        h->done[f->thread_idx.x] = 1;
        h->block_barrier.leave();
        h->warps[f->thread_idx.x / 32].barrier.leave();
        yield();
    }
}

// The block state of the calling host thread and its fibers (made on its first launch, kept
// until it exits).
struct Owner {
    Host host;
    ~Owner() {
        for (Fiber* f : host.fibers) {
            std::free(f);
        }
    }
};

static Owner& owner() {
    static thread_local Owner o;
    return o;
}

static Host& host() { return owner().host; }

// Finds the calling thread's copy of this library's thread-local storage (of the loaded object
// whose segments hold this function's code) for h.
static void find_tls(Host& h) {
    h.tls_found = true;
    struct Search {
        ElfW(Addr) code;
        Host* host;
    } search{reinterpret_cast<ElfW(Addr)>(&find_tls), &h};
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) {
            auto* s = static_cast<Search*>(data);
            bool ours = false;
            size_t tls_bytes = 0;
            for (int i = 0; i < info->dlpi_phnum; ++i) {
                const ElfW(Phdr)& seg = info->dlpi_phdr[i];
                const ElfW(Addr) start = info->dlpi_addr + seg.p_vaddr;
                ours = ours || (seg.p_type == PT_LOAD && s->code >= start && s->code < start + seg.p_memsz);
                if (seg.p_type == PT_TLS) {
                    tls_bytes = seg.p_memsz;
                }
            }
            if (!ours) {
                return 0;
            }
            s->host->tls = static_cast<unsigned char*>(info->dlpi_tls_data);
            s->host->tls_bytes = info->dlpi_tls_data != nullptr ? tls_bytes : 0;
            return 1;
        },
        &search);
}

// Sets every byte of the calling host thread's static __shared__ variables to 0xff: all of the
// library's thread-local storage but the Owner (the block state), which lives there too. So no
// other thread_local may be added to this header or the kernels: it would be overwritten
// before every block. (The Owner's initialisation guard, if the compiler keeps one there, is
// overwritten with 0xff, which still reads as initialised.)
static void poison_static_shared(Host& h) {
    if (!h.tls_found) {
        find_tls(h);
        const auto* keep = reinterpret_cast<const unsigned char*>(&owner());
        const char* problem = h.tls == nullptr ? "no thread-local storage of the kernel library was found"
                              : keep < h.tls || keep + sizeof(Owner) > h.tls + h.tls_bytes
                                  ? "the block state is not in the kernel library's thread-local storage"
                                  : nullptr;
        if (problem != nullptr) {
            std::fprintf(stderr, "emulated GPU: %s; static shared memory is not refilled\n", problem);
            h.tls = nullptr;
        }
    }
    if (h.tls == nullptr) {
        return;
    }
    unsigned char* keep = reinterpret_cast<unsigned char*>(&owner());
    unsigned char* end = h.tls + h.tls_bytes;
    std::memset(h.tls, 0xff, (size_t)(keep - h.tls));
    std::memset(keep + sizeof(Owner), 0xff, (size_t)(end - (keep + sizeof(Owner))));
}

// A fiber's memory: STACK_BYTES aligned to its size, its record at the base. There is no guard
// page (each would be a mapping of its own, and a process holds thousands of fibers): a kernel
// overflowing its stack, at least 190 KiB where the kernels use a few, would overwrite the
// record and crash in the scheduler.
static void add_fiber(Host& h) {
    void* stack = std::aligned_alloc(STACK_BYTES, STACK_BYTES);
    if (stack == nullptr) {
        std::fprintf(stderr, "emulated GPU: no memory for a fiber's stack\n");
        std::abort();
    }
    // Only the record is written: the stack's pages are touched only as deep as a kernel goes.
    Fiber* f = new (stack) Fiber{};
    f->host = &h;
    // Every stack is aligned to its size, so fibers' stack tops would fall in the same cache
    // sets: each starts below its top by its own offset (up to 64 KiB), a line and a page apart.
    const size_t n = h.fibers.size(), color = n % 64 * 64 + n / 64 % 16 * 4096;
    f->stack = static_cast<char*>(stack) + sizeof(Fiber);
    f->stack_bytes = STACK_BYTES - sizeof(Fiber) - color;
    make_context(f->context, f->stack, f->stack_bytes, fiber_main);
    h.fibers.push_back(f);
}

// __trap: the calling fiber's block stops where it is, as a GPU aborts the launch. The fiber
// goes back to the scheduler for good, which abandons the block and starts its fibers' stacks
// afresh (the kernels keep nothing on their stacks that needs destroying).
[[noreturn]] static void trap() {
    Fiber* f = self();
    f->host->trapped = true;
    swap_context(f->context, f->host->scheduler);
    std::abort(); // never resumed
}

// Runs the current block from fiber `t` until every fiber has finished it or one has trapped.
static void switch_to(Host& h, unsigned t) {
    swap_context(h.scheduler, h.fibers[t]->context);
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

// The block's dynamic shared memory (what `extern __shared__ float smem[]` names on a GPU).
static inline float* dynamic_smem() { return reinterpret_cast<float*>(self()->host->dynamic_smem.data()); }

} // namespace emu

#define threadIdx (emu::self()->thread_idx)
#define blockIdx (emu::self()->host->block_idx)
#define blockDim (emu::self()->host->block_dim)
#define gridDim (emu::self()->host->grid_dim)

[[noreturn]] static inline void __trap() { emu::trap(); }

static inline void __syncthreads() { emu::wait_at(emu::self()->host->block_barrier); }

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
// A real atomic: blocks run concurrently on host threads (the kernels add integers only).
template <class T> static T atomicAdd(T* address, T value) {
    static_assert(std::is_integral_v<T>, "the emulator's atomicAdd takes integers");
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

// Lane `src` of the calling thread's warp gets `v`'s value from every lane (`xor`: from
// lane ^ src).
template <class T> static T emu_shuffle(T v, int src, bool xor_lanes) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    emu::Fiber* f = emu::self();
    const unsigned lane = f->thread_idx.x % 32;
    emu::Warp& w = f->host->warps[f->thread_idx.x / 32];
    uint64_t* exchange = w.exchange[f->shuffles++ % 2];
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    exchange[lane] = bits;
    emu::wait_at(w.barrier);
    const unsigned from = xor_lanes ? (lane ^ (unsigned)src) : (unsigned)src;
    bits = exchange[from & 31];
    T out;
    memcpy(&out, &bits, sizeof out);
    return out;
}
// Every lane of the calling thread's warp contributes `n` words (`mine`) and receives all 32
// lanes' (`all[lane * n + i]`): how the emulated mma instruction (common.cuh) sees the whole
// warp's fragments. Same double buffering as emu_shuffle, whose counter it shares.
static inline void emu_warp_gather(const uint32_t* mine, int n, uint32_t* all) {
    if (n < 0 || n > emu::GATHER_WORDS) {
        emu::trap();
    }
    emu::Fiber* f = emu::self();
    const unsigned lane = f->thread_idx.x % 32;
    emu::Warp& w = f->host->warps[f->thread_idx.x / 32];
    uint32_t(*exchange)[emu::GATHER_WORDS] = w.gathered[f->shuffles++ % 2];
    memcpy(exchange[lane], mine, sizeof(uint32_t) * n);
    emu::wait_at(w.barrier);
    for (int l = 0; l < 32; ++l) {
        memcpy(all + l * n, exchange[l], sizeof(uint32_t) * n);
    }
}
// The xor butterfly of common.cuh's lanes_sum (`max`: lanes_max) over aligned groups of `width`
// lanes, from one exchange of the warp's values. w[m] holds what lane (lane ^ m) holds after
// each step, so a step of offset o combines w[m] with w[m + o] (its partner, lane ^ m ^ o), own
// value first as in `v += shfl_xor(v, o)`: the result is bit for bit the shuffles'.
static inline float emu_butterfly(float v, int width, bool max) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        emu::trap();
    }
    uint32_t mine = 0, all[32];
    memcpy(&mine, &v, sizeof v);
    emu_warp_gather(&mine, 1, all);
    const unsigned lane = emu::self()->thread_idx.x % 32;
    float w[32];
    for (int m = 0; m < width; ++m) {
        memcpy(&w[m], &all[lane ^ (unsigned)m], sizeof(float));
    }
    for (int o = width / 2; o > 0; o >>= 1) {
        for (int m = 0; m < o; ++m) {
            w[m] = max ? fmaxf(w[m], w[m + o]) : w[m] + w[m + o];
        }
    }
    return w[0];
}
// cp.async (common.cuh's cp_async_16 and cp_async_wait_all): a copy is recorded and made only
// at the thread's next wait, so that a kernel reading a staged tile without waiting, or without
// a barrier after every thread's wait, reads the tile's previous contents and fails its
// comparison.
static inline void emu_cp_async(void* dst, const void* src, int src_bytes) {
    emu::Fiber* f = emu::self();
    if (f->copies_pending == emu::MAX_ASYNC_COPIES || (src_bytes != 0 && src_bytes != 16) ||
        reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
        emu::trap(); // PTX's cp.async.cg copies 16 aligned bytes
    }
    f->copies[f->copies_pending++] = emu::AsyncCopy{dst, src, (unsigned)src_bytes};
}
static inline void emu_cp_async_wait_all() {
    emu::Fiber* f = emu::self();
    for (int i = 0; i < f->copies_pending; ++i) {
        const emu::AsyncCopy c = f->copies[i];
        memcpy(c.dst, c.src, c.src_bytes);
        memset(static_cast<char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
    }
    f->copies_pending = 0;
}
template <class T> static T __shfl_sync(unsigned, T v, int src) { return emu_shuffle(v, src, false); }
template <class T> static T __shfl_xor_sync(unsigned, T v, int mask) { return emu_shuffle(v, mask, true); }

namespace emu {

// Runs `kernel` over the blocks [first, last) of the grid, numbered x fastest, then y, then z,
// on the calling host thread, with its arguments read from `args` (one pointer per parameter,
// as cuLaunchKernel takes them).
template <class... P, size_t... I>
void call_kernel(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<P>*>(args[I])...);
}

template <class... P>
int run(void (*kernel)(P...), const unsigned* grid, const unsigned* block, size_t smem, void** args,
        uint64_t first, uint64_t last) {
    const unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || threads % 32 != 0 || block[1] != 1 || block[2] != 1) {
        return 1; // the kernels launch 1-D blocks of whole warps
    }
    if (last > (uint64_t)grid[0] * grid[1] * grid[2] || first > last) {
        return 1;
    }
    Host& h = host();
    h.block_dim = dim3{block[0], block[1], block[2]};
    h.grid_dim = dim3{grid[0], grid[1], grid[2]};
    h.dynamic_smem.assign(smem + 16, 0);
    while (h.fibers.size() < threads) {
        add_fiber(h);
    }
    struct Call {
        void (*kernel)(P...);
        void** args;
        static void invoke(void* self) {
            auto* c = static_cast<Call*>(self);
            call_kernel(c->kernel, c->args, std::index_sequence_for<P...>{});
        }
    } call{kernel, args};
    h.body = &Call::invoke;
    h.body_arg = &call;
    for (uint64_t b = first; b < last; ++b) {
        const unsigned x = (unsigned)(b % grid[0]), y = (unsigned)(b / grid[0] % grid[1]),
                       z = (unsigned)(b / grid[0] / grid[1]);
        h.block_idx = dim3{x, y, z};
        h.done.assign(threads, 0);
        for (unsigned t = 0; t < threads; ++t) {
            h.fibers[t]->thread_idx = dim3{t, 0, 0};
            h.fibers[t]->shuffles = 0;
        }
        h.block_barrier = Barrier{threads, 0, 0};
        h.warps.assign(threads / 32, Warp{{}, {}, Barrier{32, 0, 0}});
        // Shared memory starts as garbage on a GPU: NaN bytes here, every block.
        std::fill(h.dynamic_smem.begin(), h.dynamic_smem.end(), 0xff);
        poison_static_shared(h);
        // Every other block runs its threads in descending order, so that a read of another
        // thread's write with no barrier between them fails in one of the two.
        h.threads = threads;
        h.descending = (x + y + z) % 2 == 1;
        switch_to(h, h.descending ? threads - 1 : 0);
        if (h.trapped) {
            // The launch fails (the driver makes that its sticky error) and the rest of this
            // range never runs; the block's fibers start over for the next launch.
            h.trapped = false;
            for (unsigned t = 0; t < threads; ++t) {
                make_context(h.fibers[t]->context, h.fibers[t]->stack, h.fibers[t]->stack_bytes, fiber_main);
                h.fibers[t]->copies_pending = 0;
            }
            return 3;
        }
    }
    return 0;
}

} // namespace emu
