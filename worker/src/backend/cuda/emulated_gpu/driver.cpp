// The emulated GPU's driver API (libcuda): one device shaped like an H100 (compute capability
// 9.0, 132 multiprocessors, 227 KiB of opt-in shared memory a block), host memory as device
// memory with guard zones, modules that are g++-built kernel libraries (see nvrtc.cpp), and
// stream capture into graphs that replay the recorded work. See emulated_gpu.h for what it checks.

#include "emulated_gpu.h"

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

using CUresult = int;
using CUdeviceptr = unsigned long long;

namespace {

constexpr CUresult SUCCESS = 0;
constexpr CUresult INVALID_VALUE = 1;
constexpr CUresult OUT_OF_MEMORY = 2;
constexpr CUresult INVALID_IMAGE = 200;
constexpr CUresult INVALID_HANDLE = 400;
constexpr CUresult NOT_FOUND = 500;
constexpr CUresult ILLEGAL_ADDRESS = 700;
constexpr CUresult LAUNCH_FAILED = 719;
constexpr CUresult CAPTURE_UNSUPPORTED = 900;
constexpr CUresult CAPTURE_INVALIDATED = 901;

constexpr size_t ALIGN = 256;
constexpr size_t GUARD = 256;
constexpr unsigned char GUARD_BYTE = 0xff; // a NaN, as a read past the end then shows
constexpr unsigned char FRESH_BYTE = 0xff;
constexpr int SHARED_PER_BLOCK = 48 * 1024;
constexpr int SHARED_PER_BLOCK_OPTIN = 232448;

// Where an allocation stands with respect to a capture: made outside one; made inside a capture
// that is still going on, or made and freed (a free node) inside it; after the capture, memory it
// made and freed is the graph's, which only the graph's own work may touch.
enum class Captured { No, Allocated, Freed, GraphOwned };

struct Allocation {
    size_t bytes;
    void* base;
    Captured captured;
    const void* capture = nullptr; // the stream whose capture made it
    // Made inside a capture and not freed there: the graph keeps the memory so that a relaunch
    // can hand out the same address again, so a free by the program does not give it back.
    bool graph_backed = false;
};

// Whether a graph is being launched: its work may touch the memory it owns.
bool replaying = false;

std::map<uint64_t, Allocation>& allocations() {
    static std::map<uint64_t, Allocation> live;
    return live;
}

size_t allocated_bytes = 0;

// Addresses freed and not allocated again, so that a second free says it is one.
std::set<uint64_t>& freed() {
    static std::set<uint64_t> addresses;
    return addresses;
}

// Freed memory is held back, poisoned, before it goes back to the C library: until it does, no
// allocation can get its address, so a launch, copy or product that still uses a freed buffer
// finds its address in no live allocation and fails, rather than silently reading whatever was
// allocated there next. The oldest buffers leave once the held bytes pass the limit.
constexpr size_t QUARANTINE_BYTES = 128ull << 20;

struct Quarantine {
    std::map<uint64_t, size_t> bytes_at; // base -> the buffer's size, to name it in messages
    std::vector<uint64_t> order;         // oldest first
    size_t held = 0;
};

Quarantine& quarantine() {
    static Quarantine q;
    return q;
}

void hold_freed(uint64_t ptr, size_t bytes) {
    Quarantine& q = quarantine();
    std::memset(reinterpret_cast<void*>(ptr), FRESH_BYTE, bytes);
    q.bytes_at[ptr] = bytes;
    q.order.push_back(ptr);
    q.held += bytes + GUARD;
    size_t leaving = 0;
    while (q.held > QUARANTINE_BYTES && leaving < q.order.size()) {
        const uint64_t oldest = q.order[leaving++];
        q.held -= q.bytes_at[oldest] + GUARD;
        q.bytes_at.erase(oldest);
        std::free(reinterpret_cast<void*>(oldest));
    }
    q.order.erase(q.order.begin(), q.order.begin() + (ptrdiff_t)leaving);
}

// The size of the freed buffer still held back that `ptr` points into (its end included), or
// null.
const size_t* freed_buffer_at(uint64_t ptr) {
    const auto& held = quarantine().bytes_at;
    auto it = held.upper_bound(ptr);
    if (it == held.begin()) {
        return nullptr;
    }
    --it;
    return ptr >= it->first && ptr <= it->first + it->second ? &it->second : nullptr;
}

// The compute capability the "GPU" reports: 9.0 unless ATOMIC_EMULATED_GPU_COMPUTE_CAPABILITY
// says another ("6.1", say, for a GPU the backend does not support).
std::pair<int, int> compute_capability() {
    static const std::pair<int, int> cc = [] {
        int major = 9, minor = 0;
        if (const char* text = std::getenv("ATOMIC_EMULATED_GPU_COMPUTE_CAPABILITY")) {
            if (std::sscanf(text, "%d.%d", &major, &minor) != 2) {
                major = 9;
                minor = 0;
            }
        }
        return std::make_pair(major, minor);
    }();
    return cc;
}

// Multiprocessors: 132 (an H100) unless ATOMIC_EMULATED_GPU_SM_COUNT says otherwise. Fewer
// make the decode kernels split a sequence's keys fewer ways, and so emulate faster.
int sm_count() {
    static const int count = [] {
        const char* text = std::getenv("ATOMIC_EMULATED_GPU_SM_COUNT");
        const int n = text ? std::atoi(text) : 0;
        return n > 0 ? n : 132;
    }();
    return count;
}

size_t memory_limit() {
    static const size_t limit = [] {
        const char* mib = std::getenv("ATOMIC_EMULATED_GPU_MEMORY_MIB");
        return (mib ? std::strtoull(mib, nullptr, 10) : 16384ull) << 20;
    }();
    return limit;
}

// The first asynchronous failure, reported by the next synchronisation (CUDA's sticky error).
// From then on the context is unusable, as a GPU's is after a kernel fault: launches,
// allocations, copies and memsets fail with it too, queued or recorded work no longer runs, and
// frees still free but return it.
CUresult sticky = SUCCESS;

// Fault injection, for tests of how the worker fails: while the file ATOMIC_EMULATED_GPU_FAULT_FILE
// names exists, every kernel launch fails as one whose kernel trapped does on a GPU: the kernel
// does not run, and the sticky error becomes CUDA_ERROR_LAUNCH_FAILED. (A kernel that really
// traps, a failed KERNEL_CHECK, gives the same error through emulator.h.)
bool fault_injected() {
    static const std::string path = [] {
        const char* p = std::getenv("ATOMIC_EMULATED_GPU_FAULT_FILE");
        return std::string(p ? p : "");
    }();
    return !path.empty() && access(path.c_str(), F_OK) == 0;
}

bool guard_intact(uint64_t ptr, const Allocation& a) {
    const auto* guard = reinterpret_cast<const unsigned char*>(ptr) + a.bytes;
    for (size_t i = 0; i < GUARD; ++i) {
        if (guard[i] != GUARD_BYTE) {
            emulated_gpu::report("a write past the end of a " + std::to_string(a.bytes) + "-byte buffer (byte " +
                                 std::to_string(i) + " beyond it)");
            return false;
        }
    }
    return true;
}

// Checks every live buffer's guard zone; a broken one is the sticky error.
CUresult check_guards() {
    for (const auto& [ptr, a] : allocations()) {
        if (!guard_intact(ptr, a) && sticky == SUCCESS) {
            sticky = ILLEGAL_ADDRESS;
        }
    }
    return sticky;
}

CUresult allocate(CUdeviceptr* out, size_t bytes, Captured captured, const void* capture) {
    if (out == nullptr) {
        return INVALID_VALUE;
    }
    const size_t payload = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    if (allocated_bytes + payload > memory_limit()) {
        return OUT_OF_MEMORY;
    }
    void* base = std::aligned_alloc(ALIGN, payload + GUARD);
    if (base == nullptr) {
        return OUT_OF_MEMORY;
    }
    std::memset(base, FRESH_BYTE, bytes);
    std::memset(static_cast<unsigned char*>(base) + bytes, GUARD_BYTE, payload + GUARD - bytes);
    const auto ptr = reinterpret_cast<uint64_t>(base);
    allocations()[ptr] = Allocation{bytes, base, captured, capture};
    freed().erase(ptr);
    allocated_bytes += payload;
    *out = ptr;
    return SUCCESS;
}

// Frees `ptr`; `owner` is a graph freeing the memory it owns.
CUresult release(CUdeviceptr ptr, bool owner = false) {
    auto it = allocations().find(ptr);
    if (it == allocations().end()) {
        emulated_gpu::report(freed().count(ptr) ? "a buffer freed twice" : "free of an address never allocated");
        return INVALID_VALUE;
    }
    if (it->second.captured == Captured::GraphOwned && !owner) {
        emulated_gpu::report("a free of memory a graph allocated and freed inside its capture");
        return INVALID_VALUE;
    }
    freed().insert(ptr);
    CUresult result = guard_intact(ptr, it->second) ? SUCCESS : ILLEGAL_ADDRESS;
    allocated_bytes -= (it->second.bytes + ALIGN - 1) / ALIGN * ALIGN;
    if (it->second.graph_backed) {
        std::memset(it->second.base, FRESH_BYTE, it->second.bytes); // kept by the graph, poisoned
    } else {
        hold_freed(ptr, it->second.bytes);
    }
    allocations().erase(it);
    return result != SUCCESS ? result : sticky;
}

// ----- modules and kernels

using LaunchFn = int (*)(const char*, const unsigned*, const unsigned*, size_t, void**, uint64_t, uint64_t);
using ParamsFn = int (*)(const char*, size_t*, unsigned char*, int);

struct Module {
    void* handle;
    LaunchFn launch;
    ParamsFn params;
};

struct Function {
    Module* module;
    std::string name;
    std::vector<size_t> param_sizes;
    std::vector<unsigned char> pointer_params; // per parameter: whether it is a pointer
    int max_dynamic_smem = SHARED_PER_BLOCK;
};

// ----- streams and graphs

// CUstreamCaptureMode's values.
constexpr int CAPTURE_MODE_GLOBAL = 0;
constexpr int CAPTURE_MODE_THREAD_LOCAL = 1;

struct Stream {
    bool capturing = false;
    bool invalidated = false;
    std::vector<std::function<void()>>* recording = nullptr;
    // The capture's mode and the thread that began it: which threads it forbids the calls that
    // could synchronise with its work (see `refuse_unsafe_call`).
    int capture_mode = CAPTURE_MODE_GLOBAL;
    std::thread::id capture_thread;
};

// The streams being captured now.
std::set<Stream*>& captures() {
    static std::set<Stream*> streams;
    return streams;
}

// What a capture recorded, shared by the graph and the executables instantiated from it (CUDA
// lets either be destroyed first). Memory allocated and freed inside the capture is the graph's
// and lives as long as it does; memory allocated inside and not freed there outlives the graph
// and is the program's to free, and the graph cannot be launched again while it is live.
struct Recording {
    std::vector<std::function<void()>> work;
    std::vector<uint64_t> freed_inside;
    std::vector<Allocation> unfreed; // keyed by base, which is the address
    unsigned launches = 0;
    ~Recording() {
        for (uint64_t ptr : freed_inside) {
            release(ptr, true);
        }
        for (const Allocation& a : unfreed) {
            auto it = allocations().find(reinterpret_cast<uint64_t>(a.base));
            if (it != allocations().end()) {
                it->second.graph_backed = false; // still live: the program's free releases it
            } else {
                std::free(a.base);
            }
        }
    }
};

struct Graph {
    std::shared_ptr<Recording> recording;
};

struct GraphExec {
    std::shared_ptr<Recording> recording;
};

Stream default_stream;

Stream* stream_of(void* handle) { return handle ? static_cast<Stream*>(handle) : &default_stream; }

struct Event {
    std::chrono::steady_clock::time_point at;
};

int context_token;

} // namespace

namespace emulated_gpu {

std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}

void report(const std::string& message) { std::fprintf(stderr, "emulated GPU: %s\n", message.c_str()); }

void fail_async(const std::string& message) {
    report(message);
    if (sticky == SUCCESS) {
        sticky = ILLEGAL_ADDRESS;
    }
}

// Why [ptr, ptr + bytes) does not lie inside one live allocation, or empty when it does: the
// check of in_bounds without its message, for callers that name the access only on failure.
std::string out_of_bounds(uint64_t ptr, size_t bytes) {
    auto& live = allocations();
    auto it = live.upper_bound(ptr);
    if (it != live.begin()) {
        --it;
        if (ptr >= it->first && ptr + bytes <= it->first + it->second.bytes) {
            if (it->second.captured == Captured::GraphOwned && !replaying) {
                return "memory a graph allocated and freed inside its capture";
            }
            return "";
        }
        if (ptr >= it->first && ptr < it->first + it->second.bytes) {
            return std::to_string(bytes) + " bytes at offset " + std::to_string(ptr - it->first) + " of a " +
                   std::to_string(it->second.bytes) + "-byte buffer reach past its end";
        }
    }
    if (const size_t* freed_bytes = freed_buffer_at(ptr)) {
        return "address is in a " + std::to_string(*freed_bytes) + "-byte buffer already freed";
    }
    return "address is not in a live allocation";
}

bool in_bounds(uint64_t ptr, size_t bytes, const char* what) {
    const std::string why = out_of_bounds(ptr, bytes);
    if (!why.empty()) {
        report(std::string(what) + ": " + why);
    }
    return why.empty();
}

bool enqueue(void* stream, std::function<void()> work) {
    Stream* s = stream_of(stream);
    if (s->capturing) {
        if (s->invalidated) {
            return false;
        }
        s->recording->push_back(std::move(work));
        return true;
    }
    // Work queued behind a fault never runs (the calls that queue it have already failed,
    // except cuBLAS's, which check context_failed).
    if (sticky == SUCCESS) {
        work();
    }
    return true;
}

bool context_failed() { return sticky != SUCCESS; }

bool capturing(void* stream) { return stream_of(stream)->capturing; }

void invalidate_capture(void* stream) { stream_of(stream)->invalidated = true; }

} // namespace emulated_gpu

using emulated_gpu::lock;
using Guard = std::lock_guard<std::recursive_mutex>;

namespace {

// CUDA forbids "potentially unsafe" calls (synchronous allocation, free, copy and memset, event
// synchronisation) while a capture that covers the calling thread is under way: one begun in
// global mode on any thread, or in thread-local mode on this one. A call on the whole context
// (`whole_context`: its synchronisation) is forbidden while any capture is under way, whatever
// its mode or thread (CUDA's programming guide on stream capture). Such a call fails with
// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidates that capture. `SUCCESS` when none
// forbids it.
CUresult refuse_unsafe_call(const char* call, bool whole_context = false) {
    for (Stream* s : captures()) {
        const bool covers = whole_context || s->capture_mode == CAPTURE_MODE_GLOBAL ||
                            (s->capture_mode == CAPTURE_MODE_THREAD_LOCAL && s->capture_thread == std::this_thread::get_id());
        if (covers) {
            emulated_gpu::report(std::string(call) + " while a stream capture forbids it (an unsafe call inside a capture)");
            s->invalidated = true;
            return CAPTURE_UNSUPPORTED;
        }
    }
    return SUCCESS;
}

// The name and description of each result the stand-ins return, as cuGetErrorName and
// cuGetErrorString give them.
struct ErrorText {
    CUresult code;
    const char* name;
    const char* text;
};

const ErrorText& error_text(CUresult error) {
    static const ErrorText known[] = {
        {SUCCESS, "CUDA_SUCCESS", "no error"},
        {INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
        {OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
        {INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
        {INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
        {NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
        {ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
        {LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
        {CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
        {CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED", "operation failed due to a previous error during capture"},
    };
    static const ErrorText unknown{-1, "CUDA_ERROR_UNKNOWN", "unknown error"};
    for (const ErrorText& e : known) {
        if (e.code == error) {
            return e;
        }
    }
    return unknown;
}

// A synchronisation point: what a capture cannot contain, and where asynchronous errors surface.
CUresult synchronise(void* stream) {
    if (emulated_gpu::capturing(stream)) {
        emulated_gpu::invalidate_capture(stream);
        return CAPTURE_UNSUPPORTED;
    }
    return check_guards();
}

std::string launch_shape(const Function* f, const unsigned grid[3], const unsigned block[3], size_t smem) {
    return f->name + " <<<(" + std::to_string(grid[0]) + "," + std::to_string(grid[1]) + "," +
           std::to_string(grid[2]) + "), (" + std::to_string(block[0]) + "," + std::to_string(block[1]) + "," +
           std::to_string(block[2]) + "), " + std::to_string(smem) + ">>>";
}

} // namespace

extern "C" {

CUresult cuInit(unsigned) { return SUCCESS; }

CUresult cuDriverGetVersion(int* version) {
    *version = 13000;
    return SUCCESS;
}

CUresult cuDeviceGetCount(int* count) {
    *count = 1;
    return SUCCESS;
}

CUresult cuDeviceGet(int* device, int ordinal) {
    if (ordinal != 0) {
        return INVALID_VALUE;
    }
    *device = 0;
    return SUCCESS;
}

CUresult cuDeviceGetName(char* name, int len, int) {
    if (compute_capability() == std::make_pair(9, 0)) {
        std::snprintf(name, (size_t)len, "Atomic emulated GPU (H100-shaped)");
    } else {
        std::snprintf(name, (size_t)len, "Atomic emulated GPU");
    }
    return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = memory_limit();
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, int) {
    switch (attribute) {
    case 1: *value = 1024; return SUCCESS;                    // max threads per block
    case 8: *value = SHARED_PER_BLOCK; return SUCCESS;        // shared memory per block
    case 10: *value = 32; return SUCCESS;                     // warp size
    case 16: *value = sm_count(); return SUCCESS;             // multiprocessors
    case 75: *value = compute_capability().first; return SUCCESS;  // compute capability major
    case 76: *value = compute_capability().second; return SUCCESS; // minor
    case 97: *value = SHARED_PER_BLOCK_OPTIN; return SUCCESS; // opt-in shared memory per block
    case 115: *value = 1; return SUCCESS;                     // memory pools supported
    default: *value = 0; return SUCCESS;
    }
}

CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &context_token;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(int) { return SUCCESS; }
CUresult cuDevicePrimaryCtxRelease(int) { return SUCCESS; }

CUresult cuCtxSetCurrent(void*) { return SUCCESS; }

CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = &context_token;
    return SUCCESS;
}

CUresult cuCtxPushCurrent_v2(void*) { return SUCCESS; }
CUresult cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) {
        *ctx = &context_token;
    }
    return SUCCESS;
}

CUresult cuCtxSynchronize() {
    Guard g(lock());
    if (CUresult refused = refuse_unsafe_call("cuCtxSynchronize", true); refused != SUCCESS) {
        return refused;
    }
    return check_guards();
}

CUresult cuGetErrorString(CUresult error, const char** text) {
    *text = error_text(error).text;
    return SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char** text) {
    *text = error_text(error).name;
    return SUCCESS;
}

// ----- memory

CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    Guard g(lock());
    *total = memory_limit();
    *free = memory_limit() - allocated_bytes;
    return SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t bytes) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (CUresult refused = refuse_unsafe_call("cuMemAlloc"); refused != SUCCESS) {
        return refused;
    }
    return allocate(out, bytes, Captured::No, nullptr);
}

CUresult cuMemAllocAsync(CUdeviceptr* out, size_t bytes, void* stream) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    // Inside a capture: an allocation node, at this address for the graph's life.
    Stream* s = stream_of(stream);
    return s->capturing ? allocate(out, bytes, Captured::Allocated, s) : allocate(out, bytes, Captured::No, nullptr);
}

CUresult cuMemFree_v2(CUdeviceptr ptr) {
    Guard g(lock());
    if (CUresult refused = refuse_unsafe_call("cuMemFree"); refused != SUCCESS) {
        return refused;
    }
    return release(ptr);
}

CUresult cuMemFreeAsync(CUdeviceptr ptr, void* stream) {
    Guard g(lock());
    Stream* s = stream_of(stream);
    if (s->capturing) {
        auto it = allocations().find(ptr);
        if (it == allocations().end()) {
            emulated_gpu::report("free inside a capture of an address that is not a live allocation");
            return INVALID_VALUE;
        }
        if (s->invalidated) {
            return CAPTURE_INVALIDATED;
        }
        if (it->second.captured != Captured::No && it->second.capture != s) {
            emulated_gpu::report("a buffer of another stream's capture is freed inside this one");
            s->invalidated = true;
            return CAPTURE_UNSUPPORTED;
        }
        switch (it->second.captured) {
        case Captured::No:
        case Captured::GraphOwned:
            // A free node of memory the graph did not allocate: each replay would free it again.
            emulated_gpu::report("a buffer allocated outside a capture is freed inside it");
            s->invalidated = true;
            return CAPTURE_UNSUPPORTED;
        case Captured::Freed:
            emulated_gpu::report("a buffer freed twice inside a capture");
            return INVALID_VALUE;
        case Captured::Allocated:
            it->second.captured = Captured::Freed; // a free node; the memory is the graph's
            return SUCCESS;
        }
    }
    return release(ptr);
}

CUresult cuMemsetD8_v2(CUdeviceptr ptr, unsigned char value, size_t n) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (CUresult refused = refuse_unsafe_call("cuMemsetD8"); refused != SUCCESS) {
        return refused;
    }
    if (!emulated_gpu::in_bounds(ptr, n, "cuMemsetD8")) {
        return INVALID_VALUE;
    }
    std::memset(reinterpret_cast<void*>(ptr), value, n);
    return SUCCESS;
}

CUresult cuMemsetD8Async(CUdeviceptr ptr, unsigned char value, size_t n, void* stream) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (!emulated_gpu::in_bounds(ptr, n, "cuMemsetD8Async")) {
        return INVALID_VALUE;
    }
    return emulated_gpu::enqueue(stream, [=] { std::memset(reinterpret_cast<void*>(ptr), value, n); }) ? SUCCESS : CAPTURE_INVALIDATED;
}

CUresult cuMemsetD32Async(CUdeviceptr ptr, unsigned value, size_t n, void* stream) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (!emulated_gpu::in_bounds(ptr, n * 4, "cuMemsetD32Async")) {
        return INVALID_VALUE;
    }
    return emulated_gpu::enqueue(stream, [=] {
        auto* p = reinterpret_cast<unsigned*>(ptr);
        for (size_t i = 0; i < n; ++i) {
            p[i] = value;
        }
    }) ? SUCCESS : CAPTURE_INVALIDATED;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (emulated_gpu::capturing(stream)) {
        // Every host buffer here is pageable, and CUDA cannot capture a copy from pageable
        // memory.
        emulated_gpu::report("a host-to-device copy inside a capture");
        emulated_gpu::invalidate_capture(stream);
        return CAPTURE_UNSUPPORTED;
    }
    if (!emulated_gpu::in_bounds(dst, n, "cuMemcpyHtoDAsync")) {
        return INVALID_VALUE;
    }
    return emulated_gpu::enqueue(stream, [=] { std::memcpy(reinterpret_cast<void*>(dst), src, n); }) ? SUCCESS : CAPTURE_INVALIDATED;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    Guard g(lock());
    if (CUresult refused = refuse_unsafe_call("cuMemcpyHtoD"); refused != SUCCESS) {
        return refused;
    }
    return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (emulated_gpu::capturing(stream)) {
        emulated_gpu::invalidate_capture(stream);
        return CAPTURE_UNSUPPORTED;
    }
    if (!emulated_gpu::in_bounds(src, n, "cuMemcpyDtoHAsync")) {
        return INVALID_VALUE;
    }
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (CUresult refused = refuse_unsafe_call("cuMemcpyDtoH"); refused != SUCCESS) {
        return refused;
    }
    if (!emulated_gpu::in_bounds(src, n, "cuMemcpyDtoH")) {
        return INVALID_VALUE;
    }
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return check_guards();
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (!emulated_gpu::in_bounds(dst, n, "cuMemcpyDtoDAsync (destination)") ||
        !emulated_gpu::in_bounds(src, n, "cuMemcpyDtoDAsync (source)")) {
        return INVALID_VALUE;
    }
    return emulated_gpu::enqueue(stream, [=] {
        std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    }) ? SUCCESS : CAPTURE_INVALIDATED;
}

CUresult cuDeviceGetDefaultMemPool(void** pool, int) {
    static int pool_token;
    *pool = &pool_token;
    return SUCCESS;
}

CUresult cuMemPoolSetAttribute(void*, int, void*) { return SUCCESS; }
CUresult cuMemPoolTrimTo(void*, size_t) { return SUCCESS; }

// ----- modules and launches

CUresult cuModuleLoadData(void** module, const void* image) {
    Guard g(lock());
    // The "NVRTC" output names the kernel library: "\x7fELF" (CUBIN) or "//" (PTX), then
    // "atomic-emulated:" and the library's path.
    const char* text = static_cast<const char*>(image);
    const char* marker = std::strstr(text + 4, "atomic-emulated:");
    if (marker == nullptr || marker > text + 8) {
        emulated_gpu::report("cuModuleLoadData: not a module of the emulated NVRTC");
        return INVALID_IMAGE;
    }
    std::string path(marker + std::strlen("atomic-emulated:"));
    while (!path.empty() && (path.back() == '\n' || path.back() == '\0')) {
        path.pop_back();
    }
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
        emulated_gpu::report(std::string("cuModuleLoadData: ") + dlerror());
        return INVALID_IMAGE;
    }
    auto launch = reinterpret_cast<LaunchFn>(dlsym(handle, "emu_launch"));
    auto params = reinterpret_cast<ParamsFn>(dlsym(handle, "emu_kernel_params"));
    if (launch == nullptr || params == nullptr) {
        return INVALID_IMAGE;
    }
    *module = new Module{handle, launch, params};
    return SUCCESS;
}

CUresult cuModuleUnload(void*) {
    // The module and its library stay: a recorded graph may still launch its functions.
    return SUCCESS;
}

CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
    Guard g(lock());
    auto* m = static_cast<Module*>(module);
    size_t sizes[64];
    unsigned char pointers[64];
    const int count = m->params(name, sizes, pointers, 64);
    if (count < 0) {
        return NOT_FOUND;
    }
    *function = new Function{m, name, std::vector<size_t>(sizes, sizes + count),
                             std::vector<unsigned char>(pointers, pointers + count)};
    return SUCCESS;
}

CUresult cuFuncSetAttribute(void* function, int attribute, int value) {
    Guard g(lock());
    auto* f = static_cast<Function*>(function);
    if (attribute == 8) { // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > SHARED_PER_BLOCK_OPTIN) {
            return INVALID_VALUE;
        }
        f->max_dynamic_smem = value;
    }
    return SUCCESS;
}

CUresult cuFuncGetAttribute(int* value, int attribute, void* function) {
    auto* f = static_cast<Function*>(function);
    switch (attribute) {
    case 0: *value = 1024; return SUCCESS; // max threads per block
    case 8: *value = f->max_dynamic_smem; return SUCCESS;
    default: *value = 0; return SUCCESS;
    }
}

CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void* stream, void** params, void** extra) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    auto* f = static_cast<Function*>(function);
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    const unsigned threads = bx * by * bz;
    if (extra != nullptr || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535 || threads == 0 ||
        threads > 1024 || (int)smem > f->max_dynamic_smem) {
        emulated_gpu::report("invalid launch " + launch_shape(f, grid, block, smem));
        return INVALID_VALUE;
    }
    if (threads % 32 != 0 || by != 1 || bz != 1) {
        emulated_gpu::report("the emulator runs 1-D blocks of whole warps only: " + launch_shape(f, grid, block, smem));
        return INVALID_VALUE;
    }
    // The arguments are copied now, as cuLaunchKernel does: the caller's may be gone by the time
    // a recorded launch replays.
    size_t total = 0;
    std::vector<size_t> offsets;
    for (size_t s : f->param_sizes) {
        total = (total + 15) / 16 * 16;
        offsets.push_back(total);
        total += s;
    }
    auto blob = std::make_shared<std::vector<unsigned char>>(total + 16);
    for (size_t i = 0; i < f->param_sizes.size(); ++i) {
        std::memcpy(blob->data() + offsets[i], params[i], f->param_sizes[i]);
    }
    return emulated_gpu::enqueue(stream, [f, blob, offsets, gx, gy, gz, bx, smem] {
        std::vector<void*> args;
        for (size_t o : offsets) {
            args.push_back(blob->data() + o);
        }
        const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, 1, 1};
        // Every pointer argument is null or points into live memory (its end included, for an
        // empty view): a freed or never-allocated address faults here, as it may on a GPU, and
        // the kernel does not run. Checked as the launch runs, so a graph's replay checks too.
        for (size_t i = 0; i < offsets.size(); ++i) {
            uint64_t ptr = 0;
            if (f->pointer_params[i]) {
                std::memcpy(&ptr, args[i], sizeof ptr);
            }
            if (ptr == 0) {
                continue;
            }
            if (const std::string why = emulated_gpu::out_of_bounds(ptr, 0); !why.empty()) {
                emulated_gpu::report(launch_shape(f, grid, block, smem) + ", argument " + std::to_string(i) + ": " +
                                     why);
                if (sticky == SUCCESS) {
                    sticky = ILLEGAL_ADDRESS;
                }
                return;
            }
        }
        if (fault_injected()) {
            if (sticky == SUCCESS) {
                emulated_gpu::report("injected fault (ATOMIC_EMULATED_GPU_FAULT_FILE exists): " +
                                     launch_shape(f, grid, block, smem) + " traps");
                sticky = LAUNCH_FAILED;
            }
            return;
        }
        std::atomic<bool> failed{false};
        emulated_gpu::parallel_ranges((uint64_t)gx * gy * gz, [&](uint64_t first, uint64_t last) {
            if (f->module->launch(f->name.c_str(), grid, block, smem, args.data(), first, last) != 0) {
                failed = true;
            }
        });
        if (failed && sticky == SUCCESS) {
            emulated_gpu::report("launch failed: " + launch_shape(f, grid, block, smem));
            sticky = LAUNCH_FAILED;
        }
    }) ? SUCCESS : CAPTURE_INVALIDATED;
}

// ----- streams, events

CUresult cuStreamCreate(void** stream, unsigned) {
    *stream = new Stream();
    return SUCCESS;
}

CUresult cuStreamCreateWithPriority(void** stream, unsigned, int) { return cuStreamCreate(stream, 0); }

CUresult cuStreamDestroy_v2(void* stream) {
    Guard g(lock());
    if (stream != nullptr) {
        captures().erase(static_cast<Stream*>(stream));
        delete static_cast<Stream*>(stream);
    }
    return SUCCESS;
}

CUresult cuStreamSynchronize(void* stream) {
    Guard g(lock());
    return synchronise(stream);
}

CUresult cuStreamQuery(void* stream) { return cuStreamSynchronize(stream); }

CUresult cuStreamWaitEvent(void*, void*, unsigned) { return SUCCESS; }

CUresult cuEventCreate(void** event, unsigned) {
    *event = new Event{std::chrono::steady_clock::now()};
    return SUCCESS;
}

CUresult cuEventDestroy_v2(void* event) {
    delete static_cast<Event*>(event);
    return SUCCESS;
}

CUresult cuEventRecord(void* event, void* stream) {
    Guard g(lock());
    auto* e = static_cast<Event*>(event);
    return emulated_gpu::enqueue(stream, [e] { e->at = std::chrono::steady_clock::now(); }) ? SUCCESS : CAPTURE_INVALIDATED;
}

CUresult cuEventRecordWithFlags(void* event, void* stream, unsigned) { return cuEventRecord(event, stream); }

CUresult cuEventSynchronize(void*) {
    Guard g(lock());
    if (CUresult refused = refuse_unsafe_call("cuEventSynchronize"); refused != SUCCESS) {
        return refused;
    }
    return check_guards();
}

CUresult cuEventQuery(void*) { return SUCCESS; }

CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    const auto d = static_cast<Event*>(end)->at - static_cast<Event*>(start)->at;
    *ms = std::chrono::duration<float, std::milli>(d).count();
    return SUCCESS;
}

CUresult cuEventElapsedTime(float* ms, void* start, void* end) { return cuEventElapsedTime_v2(ms, start, end); }

// ----- capture and graphs

CUresult cuStreamBeginCapture_v2(void* stream, int mode) {
    Guard g(lock());
    Stream* s = stream_of(stream);
    if (s->capturing || mode < CAPTURE_MODE_GLOBAL || mode > 2) {
        return INVALID_VALUE;
    }
    s->capture_mode = mode;
    s->capture_thread = std::this_thread::get_id();
    captures().insert(s);
    s->capturing = true;
    s->invalidated = false;
    s->recording = new std::vector<std::function<void()>>();
    return SUCCESS;
}

CUresult cuStreamBeginCapture(void* stream, int mode) { return cuStreamBeginCapture_v2(stream, mode); }

CUresult cuStreamIsCapturing(void* stream, int* status) {
    Guard g(lock());
    Stream* s = stream_of(stream);
    *status = !s->capturing ? 0 : s->invalidated ? 2 : 1;
    return SUCCESS;
}

CUresult cuStreamEndCapture(void* stream, void** graph) {
    Guard g(lock());
    Stream* s = stream_of(stream);
    if (!s->capturing) {
        return INVALID_VALUE;
    }
    s->capturing = false;
    captures().erase(s);
    std::unique_ptr<std::vector<std::function<void()>>> recorded(s->recording);
    s->recording = nullptr;
    auto recording = std::make_shared<Recording>();
    recording->work = std::move(*recorded);
    std::vector<uint64_t> discarded;
    for (auto& [ptr, a] : allocations()) {
        if (a.capture != s || (a.captured != Captured::Allocated && a.captured != Captured::Freed)) {
            continue;
        }
        if (a.captured == Captured::Freed) {
            if (s->invalidated) {
                discarded.push_back(ptr); // no graph: its free node frees it now
            } else {
                a.captured = Captured::GraphOwned;
                recording->freed_inside.push_back(ptr);
            }
        } else {
            a.captured = Captured::No;
            a.graph_backed = !s->invalidated;
            if (a.graph_backed) {
                recording->unfreed.push_back(a);
            }
        }
        a.capture = nullptr;
    }
    for (uint64_t ptr : discarded) {
        release(ptr);
    }
    if (s->invalidated) {
        *graph = nullptr;
        return CAPTURE_INVALIDATED;
    }
    *graph = new Graph{std::move(recording)};
    return SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    if (graph == nullptr) {
        return INVALID_VALUE;
    }
    *exec = new GraphExec{static_cast<Graph*>(graph)->recording};
    return SUCCESS;
}

CUresult cuGraphLaunch(void* exec, void* stream) {
    Guard g(lock());
    if (sticky != SUCCESS) {
        return sticky;
    }
    if (emulated_gpu::capturing(stream)) {
        return CAPTURE_UNSUPPORTED;
    }
    Recording& r = *static_cast<GraphExec*>(exec)->recording;
    if (r.launches++ > 0) {
        for (const Allocation& a : r.unfreed) {
            if (allocations().count(reinterpret_cast<uint64_t>(a.base))) {
                emulated_gpu::report("a graph launched again while memory it allocated is not freed");
                return INVALID_VALUE;
            }
        }
        // Its allocation nodes hand out the same addresses again.
        for (const Allocation& a : r.unfreed) {
            std::memset(a.base, FRESH_BYTE, a.bytes);
            allocations()[reinterpret_cast<uint64_t>(a.base)] = a;
            allocated_bytes += (a.bytes + ALIGN - 1) / ALIGN * ALIGN;
        }
    }
    replaying = true;
    // A replay stops at a fault, as a GPU's stream does: later work never runs.
    for (auto& work : r.work) {
        if (sticky != SUCCESS) {
            break;
        }
        work();
    }
    replaying = false;
    return SUCCESS;
}

CUresult cuGraphExecDestroy(void* exec) {
    Guard g(lock());
    delete static_cast<GraphExec*>(exec);
    return SUCCESS;
}

CUresult cuGraphDestroy(void* graph) {
    Guard g(lock());
    delete static_cast<Graph*>(graph);
    return SUCCESS;
}

} // extern "C"
