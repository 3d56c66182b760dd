// The emulated GPU's cuBLAS and cuBLASLt: the column-major products the backend asks for
// (cublasGemmEx, cublasGemmStridedBatchedEx, cublasGemmBatchedEx; cublasLtMatmul with the bias
// epilogue, and the bias-and-GELU one, GELU in its tanh form as PyTorch defines the op that
// takes it), in fp32 arithmetic over fp32, fp16 or bf16 operands, each result rounded once to its
// type, as cuBLAS's COMPUTE_32F defines them. Arguments cuBLAS rejects (a leading dimension
// shorter than a column, a data type or compute type it does not take) are rejected, and every
// operand must lie inside a live allocation. C is read only when beta is not zero, as cuBLAS
// reads it. After a fault (the driver's sticky error) every product fails with
// CUBLAS_STATUS_EXECUTION_FAILED.

#include "emulated_gpu.h"

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <memory>
#include <vector>

namespace {

constexpr int STATUS_SUCCESS = 0;
constexpr int STATUS_INVALID_VALUE = 7;
constexpr int STATUS_EXECUTION_FAILED = 13;
constexpr int STATUS_NOT_SUPPORTED = 15;

constexpr int R_32F = 0;
constexpr int R_16F = 2;
constexpr int R_16BF = 14;
constexpr int COMPUTE_32F = 68;

size_t type_size(int type) { return type == R_32F ? 4 : 2; }

bool known_type(int type) { return type == R_32F || type == R_16F || type == R_16BF; }

float load(const void* base, int type, size_t i) {
    if (type == R_32F) {
        return static_cast<const float*>(base)[i];
    }
    const uint16_t bits = static_cast<const uint16_t*>(base)[i];
    if (type == R_16BF) {
        const uint32_t u = (uint32_t)bits << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}

void store(void* base, int type, size_t i, float v) {
    if (type == R_32F) {
        static_cast<float*>(base)[i] = v;
        return;
    }
    uint16_t bits;
    if (type == R_16BF) {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        bits = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u)
                                                : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    } else {
        const _Float16 h = (_Float16)v;
        std::memcpy(&bits, &h, 2);
    }
    static_cast<uint16_t*>(base)[i] = bits;
}

// One column-major product D = alpha · op(A) · op(B) + beta · C (+ bias[row], then GELU when
// gelu_tanh), with C and D one buffer here (as every caller of the backend uses them).
struct Product {
    bool transa, transb;
    int m, n, k;
    float alpha, beta;
    int a_type, b_type, c_type;
    long long lda, ldb, ldc;
    int bias_type = -1; // no bias
    bool gelu_tanh = false;
};

// Whether the product's arguments are ones cuBLAS takes.
int validate(const Product& p) {
    if (p.m < 0 || p.n < 0 || p.k < 0) {
        return STATUS_INVALID_VALUE;
    }
    if (!known_type(p.a_type) || !known_type(p.c_type) || p.a_type != p.b_type) {
        return STATUS_NOT_SUPPORTED;
    }
    // Operands write their own type or fp32 (COMPUTE_32F's combinations).
    if (p.c_type != p.a_type && p.c_type != R_32F) {
        return STATUS_NOT_SUPPORTED;
    }
    const long long a_rows = p.transa ? p.k : p.m, b_rows = p.transb ? p.n : p.k;
    if (p.lda < (a_rows > 1 ? a_rows : 1) || p.ldb < (b_rows > 1 ? b_rows : 1) || p.ldc < (p.m > 1 ? p.m : 1)) {
        return STATUS_INVALID_VALUE;
    }
    return STATUS_SUCCESS;
}

// The bytes a column-major matrix of `rows` × `cols` with leading dimension `ld` spans.
size_t span(long long rows, long long cols, long long ld, int type) {
    if (rows == 0 || cols == 0) {
        return 0;
    }
    return (size_t)((cols - 1) * ld + rows) * type_size(type);
}

bool operands_in_bounds(const Product& p, const void* a, const void* b, const void* c, const void* bias,
                        const char* what) {
    const auto at = [](const void* x) { return reinterpret_cast<uint64_t>(x); };
    const long long a_rows = p.transa ? p.k : p.m, a_cols = p.transa ? p.m : p.k;
    const long long b_rows = p.transb ? p.n : p.k, b_cols = p.transb ? p.k : p.n;
    const std::string w = what;
    return (p.k == 0 || emulated_gpu::in_bounds(at(a), span(a_rows, a_cols, p.lda, p.a_type), (w + ": A").c_str())) &&
           (p.k == 0 || emulated_gpu::in_bounds(at(b), span(b_rows, b_cols, p.ldb, p.b_type), (w + ": B").c_str())) &&
           emulated_gpu::in_bounds(at(c), span(p.m, p.n, p.ldc, p.c_type), (w + ": C").c_str()) &&
           (p.bias_type < 0 || emulated_gpu::in_bounds(at(bias), (size_t)p.m * type_size(p.bias_type), (w + ": bias").c_str()));
}

void run(const Product& p, const void* a, const void* b, void* c, const void* bias) {
    // op(A) as m rows of k and op(B) as n columns of k, in fp32, so the inner loop is contiguous.
    std::vector<float> ra((size_t)p.m * p.k), cb((size_t)p.n * p.k);
    for (int i = 0; i < p.m; ++i) {
        for (int q = 0; q < p.k; ++q) {
            ra[(size_t)i * p.k + q] = load(a, p.a_type, p.transa ? (size_t)i * p.lda + q : (size_t)q * p.lda + i);
        }
    }
    for (int j = 0; j < p.n; ++j) {
        for (int q = 0; q < p.k; ++q) {
            cb[(size_t)j * p.k + q] = load(b, p.b_type, p.transb ? (size_t)q * p.ldb + j : (size_t)j * p.ldb + q);
        }
    }
    const auto columns = [&](uint64_t first, uint64_t last) {
        for (int j = (int)first; j < (int)last; ++j) {
            for (int i = 0; i < p.m; ++i) {
                float acc = 0.0f;
                const float* x = &ra[(size_t)i * p.k];
                const float* y = &cb[(size_t)j * p.k];
                for (int q = 0; q < p.k; ++q) {
                    acc += x[q] * y[q];
                }
                const size_t at = (size_t)j * p.ldc + i;
                float out = p.alpha * acc;
                if (p.beta != 0.0f) {
                    out += p.beta * load(c, p.c_type, at);
                }
                if (p.bias_type >= 0) {
                    out += load(bias, p.bias_type, (size_t)i);
                }
                if (p.gelu_tanh) {
                    out = 0.5f * out * (1.0f + std::tanh(0.7978845608028654f * (out + 0.044715f * out * out * out)));
                }
                store(c, p.c_type, at, out);
            }
        }
    };
    // Columns of C are independent: a product large enough to repay waking the helper threads
    // spreads them over the host's cores.
    if ((uint64_t)p.m * p.n * p.k >= (1u << 16)) {
        emulated_gpu::parallel_ranges((uint64_t)p.n, columns);
    } else {
        columns(0, (uint64_t)p.n);
    }
}

struct Handle {
    void* stream = nullptr;
};

// Validates `p`, then runs it on the handle's stream for each (A, B, C) `operands` gives at
// execution time (a batch read from device pointer tables is read when it runs, as on a GPU).
int submit(const Handle* h, const Product& p, int compute, int count, const char* what,
           std::function<bool(int, const void**, const void**, void**)> operands) {
    if (emulated_gpu::context_failed()) {
        return STATUS_EXECUTION_FAILED; // a fault has left the context unusable
    }
    if (compute != COMPUTE_32F) {
        return STATUS_NOT_SUPPORTED;
    }
    if (const int s = validate(p); s != STATUS_SUCCESS || count < 0) {
        return s != STATUS_SUCCESS ? s : STATUS_INVALID_VALUE;
    }
    const std::string name = what;
    const bool queued = emulated_gpu::enqueue(h->stream, [p, count, name, operands] {
        for (int i = 0; i < count; ++i) {
            const void *a, *b;
            void* c;
            if (!operands(i, &a, &b, &c) || !operands_in_bounds(p, a, b, c, nullptr, name.c_str())) {
                emulated_gpu::fail_async(name + ": matrix " + std::to_string(i) + " of the batch is out of bounds");
                return;
            }
            run(p, a, b, c, nullptr);
        }
    });
    return queued ? STATUS_SUCCESS : STATUS_EXECUTION_FAILED;
}

Product product(int transa, int transb, int m, int n, int k, const void* alpha, int a_type, long long lda,
                int b_type, long long ldb, const void* beta, int c_type, long long ldc) {
    return Product{transa != 0, transb != 0, m, n, k, *static_cast<const float*>(alpha),
                   *static_cast<const float*>(beta), a_type, b_type, c_type, lda, ldb, ldc};
}

// ----- cuBLASLt

struct MatmulDesc {
    int compute, scale;
    int transa = 0, transb = 0;
    int epilogue = 1; // CUBLASLT_EPILOGUE_DEFAULT
    const void* bias = nullptr;
    int bias_type = -1;
};

struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
};

// Whether the layouts of D = op(A) · op(B) + C agree with each other (shapes and types), as
// both the heuristic and cublasLtMatmul check.
bool layouts_agree(const MatmulDesc& m, const Layout& a, const Layout& b, const Layout& c, const Layout& d) {
    const uint64_t rows_a = m.transa ? a.cols : a.rows, inner_a = m.transa ? a.rows : a.cols;
    const uint64_t inner_b = m.transb ? b.cols : b.rows, cols_b = m.transb ? b.rows : b.cols;
    return inner_a == inner_b && rows_a == d.rows && cols_b == d.cols && c.rows == d.rows && c.cols == d.cols &&
           a.type == b.type && c.type == d.type;
}

constexpr int EPILOGUE_DEFAULT = 1;
constexpr int EPILOGUE_BIAS = 4;
constexpr int EPILOGUE_GELU_BIAS = 36;

} // namespace

using emulated_gpu::lock;
using Guard = std::lock_guard<std::recursive_mutex>;

extern "C" {

int cublasCreate_v2(void** handle) {
    *handle = new Handle();
    return STATUS_SUCCESS;
}

int cublasDestroy_v2(void* handle) {
    delete static_cast<Handle*>(handle);
    return STATUS_SUCCESS;
}

int cublasSetStream_v2(void* handle, void* stream) {
    static_cast<Handle*>(handle)->stream = stream;
    return STATUS_SUCCESS;
}

int cublasGetStream_v2(void* handle, void** stream) {
    *stream = static_cast<Handle*>(handle)->stream;
    return STATUS_SUCCESS;
}

int cublasSetWorkspace_v2(void*, void* workspace, size_t bytes) {
    Guard g(lock());
    return emulated_gpu::in_bounds(reinterpret_cast<uint64_t>(workspace), bytes, "cublasSetWorkspace")
               ? STATUS_SUCCESS
               : STATUS_INVALID_VALUE;
}

int cublasSetMathMode(void*, int) { return STATUS_SUCCESS; }

const char* cublasGetStatusString(int status) {
    switch (status) {
    case STATUS_SUCCESS: return "the operation completed successfully";
    case STATUS_INVALID_VALUE: return "an unsupported value or parameter was passed to the function";
    case STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    default: return "unknown cuBLAS status";
    }
}

const char* cublasGetStatusName(int status) {
    switch (status) {
    case STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* a,
                 int a_type, int lda, const void* b, int b_type, int ldb, const void* beta, void* c, int c_type,
                 int ldc, int compute, int) {
    Guard g(lock());
    const Product p = product(transa, transb, m, n, k, alpha, a_type, lda, b_type, ldb, beta, c_type, ldc);
    return submit(static_cast<Handle*>(handle), p, compute, 1, "cublasGemmEx",
                  [a, b, c](int, const void** x, const void** y, void** z) {
                      *x = a, *y = b, *z = c;
                      return true;
                  });
}

int cublasGemmStridedBatchedEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha,
                               const void* a, int a_type, int lda, long long stride_a, const void* b, int b_type,
                               int ldb, long long stride_b, const void* beta, void* c, int c_type, int ldc,
                               long long stride_c, int count, int compute, int) {
    Guard g(lock());
    const Product p = product(transa, transb, m, n, k, alpha, a_type, lda, b_type, ldb, beta, c_type, ldc);
    const size_t sa = type_size(a_type), sb = type_size(b_type), sc = type_size(c_type);
    return submit(static_cast<Handle*>(handle), p, compute, count, "cublasGemmStridedBatchedEx",
                  [=](int i, const void** x, const void** y, void** z) {
                      *x = static_cast<const char*>(a) + (size_t)(i * stride_a) * sa;
                      *y = static_cast<const char*>(b) + (size_t)(i * stride_b) * sb;
                      *z = static_cast<char*>(c) + (size_t)(i * stride_c) * sc;
                      return true;
                  });
}

int cublasGemmBatchedEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha,
                        const void* const* a, int a_type, int lda, const void* const* b, int b_type, int ldb,
                        const void* beta, void* const* c, int c_type, int ldc, int count, int compute, int) {
    Guard g(lock());
    const Product p = product(transa, transb, m, n, k, alpha, a_type, lda, b_type, ldb, beta, c_type, ldc);
    const auto table = [count](const void* t) {
        return emulated_gpu::in_bounds(reinterpret_cast<uint64_t>(t), (size_t)count * 8, "cublasGemmBatchedEx: table");
    };
    if (count > 0 && (!table(a) || !table(b) || !table(c))) {
        return STATUS_INVALID_VALUE;
    }
    return submit(static_cast<Handle*>(handle), p, compute, count, "cublasGemmBatchedEx",
                  [=](int i, const void** x, const void** y, void** z) {
                      *x = a[i], *y = b[i], *z = c[i];
                      return true;
                  });
}

// ----- cuBLASLt

int cublasLtCreate(void** handle) {
    *handle = new Handle();
    return STATUS_SUCCESS;
}

int cublasLtDestroy(void* handle) {
    delete static_cast<Handle*>(handle);
    return STATUS_SUCCESS;
}

int cublasLtMatmulDescCreate(void** desc, int compute, int scale) {
    *desc = new MatmulDesc{compute, scale};
    return STATUS_SUCCESS;
}

int cublasLtMatmulDescDestroy(void* desc) {
    delete static_cast<MatmulDesc*>(desc);
    return STATUS_SUCCESS;
}

int cublasLtMatmulDescSetAttribute(void* desc, int attribute, const void* value, size_t bytes) {
    auto* d = static_cast<MatmulDesc*>(desc);
    const auto int32 = [&](int* field) {
        if (bytes != 4) {
            return STATUS_INVALID_VALUE;
        }
        std::memcpy(field, value, 4);
        return STATUS_SUCCESS;
    };
    switch (attribute) {
    case 3: return int32(&d->transa);
    case 4: return int32(&d->transb);
    case 7: return int32(&d->epilogue);
    case 8: // bias pointer
        if (bytes != sizeof(void*)) {
            return STATUS_INVALID_VALUE;
        }
        std::memcpy(&d->bias, value, sizeof(void*));
        return STATUS_SUCCESS;
    case 26: return int32(&d->bias_type);
    default: return STATUS_NOT_SUPPORTED; // not an attribute the backend sets
    }
}

int cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (!known_type(type) || ld < (int64_t)rows) {
        return STATUS_INVALID_VALUE;
    }
    *layout = new Layout{type, rows, cols, ld};
    return STATUS_SUCCESS;
}

int cublasLtMatrixLayoutDestroy(void* layout) {
    delete static_cast<Layout*>(layout);
    return STATUS_SUCCESS;
}

int cublasLtMatmulPreferenceCreate(void** pref) {
    *pref = new uint64_t(0);
    return STATUS_SUCCESS;
}

int cublasLtMatmulPreferenceDestroy(void* pref) {
    delete static_cast<uint64_t*>(pref);
    return STATUS_SUCCESS;
}

int cublasLtMatmulPreferenceSetAttribute(void* pref, int attribute, const void* value, size_t bytes) {
    if (attribute != 1 || bytes != 8) { // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
        return STATUS_INVALID_VALUE;
    }
    std::memcpy(pref, value, 8);
    return STATUS_SUCCESS;
}

// The heuristic result as cuBLASLt lays it out: a 64-byte algorithm, the workspace it needs, its
// state, its waves and reserved words.
struct HeuristicResult {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

int cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c, void* d, void*, int requested,
                                   HeuristicResult* results, int* found) {
    const auto* m = static_cast<MatmulDesc*>(desc);
    const auto *la = static_cast<Layout*>(a), *lb = static_cast<Layout*>(b), *lc = static_cast<Layout*>(c),
               *ld = static_cast<Layout*>(d);
    if (requested < 1 || m->compute != COMPUTE_32F || m->scale != R_32F) {
        return STATUS_INVALID_VALUE;
    }
    if (m->epilogue != EPILOGUE_DEFAULT && m->epilogue != EPILOGUE_BIAS && m->epilogue != EPILOGUE_GELU_BIAS) {
        return STATUS_NOT_SUPPORTED;
    }
    if (!layouts_agree(*m, *la, *lb, *lc, *ld)) {
        return STATUS_INVALID_VALUE;
    }
    std::memset(results, 0, sizeof(HeuristicResult));
    results->state = STATUS_SUCCESS;
    results->waves = 1.0f;
    *found = 1;
    return STATUS_SUCCESS;
}

int cublasLtMatmul(void*, void* desc, const void* alpha, const void* a, void* la, const void* b, void* lb,
                   const void* beta, const void* c, void* lc, void* d, void* ld, const void*, void* workspace,
                   size_t workspace_bytes, void* stream) {
    Guard g(lock());
    const auto* m = static_cast<MatmulDesc*>(desc);
    const auto *A = static_cast<Layout*>(la), *B = static_cast<Layout*>(lb), *C = static_cast<Layout*>(lc),
               *D = static_cast<Layout*>(ld);
    if (emulated_gpu::context_failed()) {
        return STATUS_EXECUTION_FAILED; // a fault has left the context unusable
    }
    if (c != d || C->ld != D->ld || C->type != D->type) {
        emulated_gpu::report("cublasLtMatmul: C and D differ (the emulator takes them as one buffer)");
        return STATUS_NOT_SUPPORTED;
    }
    if (workspace_bytes > 0 &&
        !emulated_gpu::in_bounds(reinterpret_cast<uint64_t>(workspace), workspace_bytes, "cublasLtMatmul: workspace")) {
        return STATUS_INVALID_VALUE;
    }
    // Checked here too, not only by the heuristic, as cublasLtMatmul does.
    if (!layouts_agree(*m, *A, *B, *C, *D)) {
        return STATUS_INVALID_VALUE;
    }
    if (m->bias_type >= 0 && m->bias_type != D->type) {
        return STATUS_NOT_SUPPORTED;
    }
    const int k = (int)(m->transa ? A->rows : A->cols);
    Product p{m->transa != 0, m->transb != 0, (int)D->rows, (int)D->cols, k,
              *static_cast<const float*>(alpha), *static_cast<const float*>(beta), A->type, B->type, D->type,
              A->ld, B->ld, D->ld};
    if (m->epilogue == EPILOGUE_BIAS || m->epilogue == EPILOGUE_GELU_BIAS) {
        if (m->bias == nullptr) {
            return STATUS_INVALID_VALUE;
        }
        p.bias_type = m->bias_type < 0 ? D->type : m->bias_type;
        p.gelu_tanh = m->epilogue == EPILOGUE_GELU_BIAS;
    }
    if (const int s = validate(p); s != STATUS_SUCCESS) {
        return s;
    }
    const void* bias = m->bias;
    if (!operands_in_bounds(p, a, b, d, bias, "cublasLtMatmul")) {
        return STATUS_INVALID_VALUE;
    }
    const bool queued = emulated_gpu::enqueue(stream, [p, a, b, d, bias] { run(p, a, b, d, bias); });
    return queued ? STATUS_SUCCESS : STATUS_EXECUTION_FAILED;
}

} // extern "C"
