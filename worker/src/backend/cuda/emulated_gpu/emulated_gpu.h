// The emulated GPU: stand-ins for libcuda, libnvrtc, libcublas and libcublasLt, built into one
// shared library (scripts/emulated-gpu.sh) that the backend loads under those names, so that the
// whole CUDA backend — its host code, descriptors, buffer cache, graphs and the kernels' own
// source — runs end to end on a machine without a GPU. It owns no CUDA semantics beyond what the
// backend relies on, and it checks what a GPU would only show as wrong numbers or a crash:
//
// - device memory is host memory; a fresh allocation is filled with 0xff bytes (a NaN in fp32,
//   fp16 and bf16), so a kernel or product that reads what nothing wrote shows NaNs, and each
//   allocation is followed by a guard zone whose bytes are checked at every synchronisation and
//   free, so a write past a buffer's end is reported with the buffer's size;
// - copies and cuBLAS operands must lie inside one live allocation (a copy or product that
//   reaches past its buffer is an error naming the call, not a silent overrun), and a kernel's
//   pointer arguments must be null or point into one (a launch given a freed buffer faults);
//   freed memory is held back, poisoned, before the C library gets it back (up to 128 MiB),
//   so no allocation is handed a freed address that a stale use could still reach;
// - an asynchronous failure (a kernel that failed, a broken guard zone) is the context's sticky
//   error: the next synchronisation returns it, and from then on launches, allocations, copies,
//   memsets and cuBLAS products fail with it and queued or recorded work no longer runs, as on a
//   GPU whose context a kernel fault has left unusable;
// - the stream is executed in host order at the call (one stream, as the backend uses), except
//   while it is being captured: then work is recorded into the graph and run at each launch of
//   the instantiated graph; synchronising, copying to the host or copying from (pageable) host
//   memory inside a capture invalidates it, as it does on a GPU, and so do the calls CUDA forbids
//   while a capture covers the calling thread (synchronous allocation, free, copy and memset,
//   event synchronisation; global mode covers every thread, thread-local mode the one that
//   began it), and a context synchronisation from any thread while any capture is under way
//   (event queries and per-thread capture modes are not modelled); memory a capture allocated and
//   freed is the graph's, which nothing outside the graph may touch, and memory it allocated and
//   did not free keeps its address for the graph's relaunches, which wait until it is freed;
// - kernels are the .cu files compiled by g++ against emulator.h (the "NVRTC" here), so they run
//   with CUDA's grid, block, barrier and shuffle semantics, their blocks spread over the host's
//   cores (parallel.cpp; ATOMIC_EMULATED_GPU_THREADS=1 runs them one at a time).
//
// Variables change the "GPU": ATOMIC_EMULATED_GPU_MEMORY_MIB (its memory, 16384 by default),
// ATOMIC_EMULATED_GPU_COMPUTE_CAPABILITY ("9.0") and ATOMIC_EMULATED_GPU_FAULT_FILE (while the
// file it names exists, every kernel launch fails as a trapping kernel's does) for tests of how
// the worker fails, and
// ATOMIC_EMULATED_GPU_SM_COUNT (132) for whole-model runs that need not split decode attention
// as many ways as an H100 would.
//
// What it cannot show: timing, the GPU's own instructions and rounding in the last bits, races
// that barriers hide, and cuBLAS's choice of algorithm (products here are plain fp32 loops).

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <mutex>
#include <string>

namespace emulated_gpu {

// Every call into the library takes this lock: the kernels' emulator state and the registry of
// allocations are shared, and the backend's one stream runs in host order anyway.
std::recursive_mutex& lock();

// Whether [ptr, ptr + bytes) lies inside one live allocation; `what` names the access in the
// message printed when it does not (which says so when the address is a freed buffer's).
bool in_bounds(uint64_t ptr, size_t bytes, const char* what);

// Runs `work` on the stream now, or records it when the stream is being captured; false (and
// nothing recorded) when the capture is no longer valid, where CUDA fails every call.
[[nodiscard]] bool enqueue(void* stream, std::function<void()> work);

// Whether `stream` is being captured; used by the calls a capture cannot record.
bool capturing(void* stream);

// Marks the capture of `stream` invalid (what a GPU does on a synchronisation inside it).
void invalidate_capture(void* stream);

// Whether the context has a sticky error: a fault has left it unusable, so every call fails.
bool context_failed();

// Reports an error found while executing recorded or queued work; it becomes the sticky error,
// which the next synchronisation and every later launch, allocation and copy return.
void fail_async(const std::string& message);

// Runs body(first, last) over ranges that cover [0, count), on the calling thread and the
// library's helper threads at once, and returns when every range has run.
void parallel_ranges(uint64_t count, const std::function<void(uint64_t, uint64_t)>& body);

// Prints an emulator diagnostic to stderr, prefixed so that it stands out in test output.
void report(const std::string& message);

} // namespace emulated_gpu
