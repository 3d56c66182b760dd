// The emulated GPU's own checks, each run against the library through the driver and NVRTC
// calls the backend makes: that a misuse of device memory a GPU would show only as wrong numbers
// (or not at all) fails here, and that correct use passes. A failure leaves the context with a
// sticky error for good, so every case runs in a child process of its own, forked before the
// library starts its helper threads. Built and run by scripts/emulated-gpu.sh; exits non-zero
// when a case fails.

#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using CUresult = int;
using CUdeviceptr = unsigned long long;

extern "C" {
CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t bytes);
CUresult cuMemFree_v2(CUdeviceptr ptr);
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n);
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n);
CUresult cuCtxSynchronize();
CUresult cuModuleLoadData(void** module, const void* image);
CUresult cuModuleGetFunction(void** function, void* module, const char* name);
CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void* stream, void** params, void** extra);
int nvrtcCreateProgram(void** program, const char* source, const char* name, int headers, const char* const*,
                       const char* const*);
int nvrtcCompileProgram(void* program, int count, const char* const* options);
int nvrtcGetPTXSize(void* program, size_t* size);
int nvrtcGetPTX(void* program, char* out);
}

namespace {

constexpr CUresult SUCCESS = 0;
constexpr CUresult INVALID_VALUE = 1;
constexpr CUresult ILLEGAL_ADDRESS = 700;

// out[i] = from[i], or `value` where `from` is null, for i < n: a kernel with an optional
// pointer, as the backend's have.
const char* const SOURCE = R"(
extern "C" __global__ void fill(float* out, const float* from, int n, float value) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = from != nullptr ? from[i] : value;
    }
}
)";

bool failed = false;

void expect(bool ok, const std::string& what) {
    if (!ok) {
        std::fprintf(stderr, "emulated GPU self-test: FAILED: %s\n", what.c_str());
        failed = true;
    }
}

void* fill_kernel() {
    void* program = nullptr;
    const char* options[] = {"--gpu-architecture=sm_90"};
    size_t size = 0;
    if (nvrtcCreateProgram(&program, SOURCE, "selftest", 0, nullptr, nullptr) != 0 ||
        nvrtcCompileProgram(program, 1, options) != 0 || nvrtcGetPTXSize(program, &size) != 0) {
        return nullptr;
    }
    std::vector<char> image(size);
    void* module = nullptr;
    void* function = nullptr;
    if (nvrtcGetPTX(program, image.data()) != 0 || cuModuleLoadData(&module, image.data()) != SUCCESS ||
        cuModuleGetFunction(&function, module, "fill") != SUCCESS) {
        return nullptr;
    }
    return function;
}

CUresult fill(void* kernel, CUdeviceptr out, CUdeviceptr from, int n, float value) {
    void* params[] = {&out, &from, &n, &value};
    return cuLaunchKernel(kernel, (unsigned)(n + 63) / 64, 1, 1, 64, 1, 1, 0, nullptr, params, nullptr);
}

CUdeviceptr alloc(size_t bytes) {
    CUdeviceptr ptr = 0;
    expect(cuMemAlloc_v2(&ptr, bytes) == SUCCESS, "allocating " + std::to_string(bytes) + " bytes");
    return ptr;
}

void live_views_and_null_pointers_are_accepted(void* kernel) {
    const CUdeviceptr a = alloc(64 * 4), b = alloc(64 * 4);
    std::vector<float> host(64, 2.5f);
    expect(cuMemcpyHtoD_v2(b, host.data(), 64 * 4) == SUCCESS, "a copy into a live buffer");
    expect(fill(kernel, a, 0, 64, 1.0f) == SUCCESS, "a launch with a null optional pointer");
    expect(fill(kernel, a + 16 * 4, b + 16 * 4, 48, 0.0f) == SUCCESS, "a launch with views into live buffers");
    expect(cuCtxSynchronize() == SUCCESS, "synchronising after correct launches");
    expect(cuMemcpyDtoH_v2(host.data(), a, 64 * 4) == SUCCESS, "a copy back");
    for (int i = 0; i < 64; ++i) {
        expect(host[i] == (i < 16 ? 1.0f : 2.5f), "element " + std::to_string(i) + " of the filled buffer");
    }
}

void a_launch_on_a_freed_buffer_faults(void* kernel) {
    const CUdeviceptr a = alloc(1024 * 4);
    expect(cuMemFree_v2(a) == SUCCESS, "a free");
    fill(kernel, a, 0, 1024, 1.0f);
    expect(cuCtxSynchronize() == ILLEGAL_ADDRESS, "a kernel given a freed buffer must fault");
}

void freed_addresses_are_not_handed_out_again(void*) {
    // Each freed buffer is held back, so no later allocation of its size gets its address.
    std::vector<CUdeviceptr> freed;
    for (int i = 0; i < 64; ++i) {
        const CUdeviceptr a = alloc(4096);
        for (CUdeviceptr f : freed) {
            expect(a != f, "allocation " + std::to_string(i) + " reuses a freed address");
        }
        expect(cuMemFree_v2(a) == SUCCESS, "a free");
        freed.push_back(a);
    }
}

void a_copy_from_a_freed_buffer_fails(void*) {
    const CUdeviceptr a = alloc(256);
    float host[64];
    expect(cuMemFree_v2(a) == SUCCESS, "a free");
    expect(cuMemcpyDtoH_v2(host, a, sizeof host) != SUCCESS, "a copy from a freed buffer must fail");
}

void a_second_free_fails(void*) {
    const CUdeviceptr a = alloc(256);
    expect(cuMemFree_v2(a) == SUCCESS, "the first free");
    expect(cuMemFree_v2(a) == INVALID_VALUE, "a second free of a buffer must fail");
}

void a_copy_past_the_end_fails(void*) {
    const CUdeviceptr a = alloc(100);
    std::vector<unsigned char> host(101);
    expect(cuMemcpyHtoD_v2(a, host.data(), 101) != SUCCESS, "a copy of 101 bytes into 100 must fail");
    expect(cuMemcpyHtoD_v2(a, host.data(), 100) == SUCCESS, "a copy of 100 bytes into 100");
}

void a_kernel_writing_past_the_end_faults(void* kernel) {
    const CUdeviceptr a = alloc(63 * 4);
    fill(kernel, a, 0, 64, 1.0f); // one float past the end, into the guard zone
    expect(cuCtxSynchronize() == ILLEGAL_ADDRESS, "a kernel writing past its buffer must fault");
}

} // namespace

int main() {
    const struct {
        const char* name;
        void (*run)(void*);
    } cases[] = {
        {"live views and null pointers are accepted", live_views_and_null_pointers_are_accepted},
        {"a launch on a freed buffer faults", a_launch_on_a_freed_buffer_faults},
        {"freed addresses are not handed out again", freed_addresses_are_not_handed_out_again},
        {"a copy from a freed buffer fails", a_copy_from_a_freed_buffer_fails},
        {"a second free fails", a_second_free_fails},
        {"a copy past the end fails", a_copy_past_the_end_fails},
        {"a kernel writing past the end faults", a_kernel_writing_past_the_end_faults},
    };
    int failures = 0;
    for (const auto& c : cases) {
        std::fflush(nullptr);
        const pid_t child = fork();
        if (child == 0) {
            void* kernel = fill_kernel();
            expect(kernel != nullptr, "building the fill kernel");
            if (kernel != nullptr) {
                c.run(kernel);
            }
            std::fflush(nullptr);
            _exit(failed ? 1 : 0);
        }
        int status = 0;
        const bool passed = child > 0 && waitpid(child, &status, 0) == child && WIFEXITED(status) &&
                            WEXITSTATUS(status) == 0;
        std::printf("emulated GPU self-test: %s: %s\n", c.name, passed ? "ok" : "FAILED");
        failures += passed ? 0 : 1;
    }
    return failures == 0 ? 0 : 1;
}
