// The emulated GPU's NVRTC: "compiling" a kernel file builds it with g++ against emulator.h
// into a shared library (cached by a hash of what was compiled), and the "PTX" or "CUBIN" it
// hands back names that library, which the emulated driver's cuModuleLoadData loads. The
// library exports two functions over the kernels it finds in the source (every
// `__global__ void name(`): `emu_launch`, which runs one over a range of a grid's blocks
// (emulator.h; the driver spreads a launch's ranges over its host threads), and
// `emu_kernel_params`, the size of each of its parameters and whether it is a pointer, so that
// a launch can copy its arguments as cuLaunchKernel does and check that each pointer is live.
//
// Built with EMULATOR_H (the path of emulator.h) and MODULE_DIR (where built libraries go)
// defined by scripts/emulated-gpu.sh.

#include "emulated_gpu.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace {

constexpr int SUCCESS = 0;
constexpr int INVALID_INPUT = 3;
constexpr int INVALID_PROGRAM = 4;
constexpr int INVALID_OPTION = 5;
constexpr int COMPILATION = 6;

struct Program {
    std::string source;
    std::string name;
    std::string log;
    std::string image; // the marker and library path, NUL-terminated
};

uint64_t fnv1a(const std::string& text) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : text) {
        h = (h ^ c) * 1099511628211ull;
    }
    return h;
}

// The C++ translation unit for one kernel file: the emulator, the file's defines, the file
// (dynamic shared memory mapped onto the emulator's buffer) and the two exported functions.
std::string translation_unit(const Program& p, const std::vector<std::string>& defines) {
    std::ostringstream tu;
    tu << "#define ATOMIC_EMULATE 1\n";
    for (const auto& d : defines) {
        const auto eq = d.find('=');
        tu << "#define " << (eq == std::string::npos ? d : d.substr(0, eq) + " " + d.substr(eq + 1)) << "\n";
    }
    tu << "#include \"" << EMULATOR_H << "\"\n";
    std::string source = p.source;
    const std::string dynamic = "extern __shared__ float smem[];";
    const std::string mapped = "float* smem = emu::dynamic_smem();";
    for (size_t at = source.find(dynamic); at != std::string::npos; at = source.find(dynamic, at)) {
        source.replace(at, dynamic.size(), mapped);
    }
    tu << source << "\n";
    std::set<std::string> kernels;
    const std::regex global(R"(__global__\s+void\s+(\w+)\s*\()");
    for (std::sregex_iterator it(p.source.begin(), p.source.end(), global), end; it != end; ++it) {
        kernels.insert((*it)[1]);
    }
    tu << "#line 1 \"emulated-gpu dispatch\"\n"
          "template <class... P> static int emu_param_sizes(void (*)(P...), size_t* sizes, unsigned char* pointers, "
          "int max) {\n"
          "    const size_t all[] = {sizeof(P)..., 0};\n"
          "    const unsigned char pointer[] = {(unsigned char)std::is_pointer<P>::value..., 0};\n"
          "    const int n = (int)sizeof...(P);\n"
          "    if (n > max) return -1;\n"
          "    for (int i = 0; i < n; ++i) { sizes[i] = all[i]; pointers[i] = pointer[i]; }\n"
          "    return n;\n"
          "}\n"
          "extern \"C\" int emu_launch(const char* name, const unsigned* grid, const unsigned* block, size_t smem, "
          "void** args, uint64_t first, uint64_t last) {\n";
    for (const auto& k : kernels) {
        tu << "    if (strcmp(name, \"" << k << "\") == 0) return emu::run(&" << k << ", grid, block, smem, args, first, last);\n";
    }
    tu << "    return 2;\n}\n"
          "extern \"C\" int emu_kernel_params(const char* name, size_t* sizes, unsigned char* pointers, int max) {\n";
    for (const auto& k : kernels) {
        tu << "    if (strcmp(name, \"" << k << "\") == 0) return emu_param_sizes(&" << k << ", sizes, pointers, max);\n";
    }
    tu << "    return -1;\n}\n";
    return tu.str();
}

bool exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

} // namespace

extern "C" {

const char* nvrtcGetErrorString(int result) {
    switch (result) {
    case SUCCESS: return "NVRTC_SUCCESS";
    case INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
    case INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
    case INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
    case COMPILATION: return "NVRTC_ERROR_COMPILATION";
    default: return "NVRTC_ERROR_INTERNAL_ERROR";
    }
}

int nvrtcVersion(int* major, int* minor) {
    *major = 13;
    *minor = 0;
    return SUCCESS;
}

int nvrtcGetNumSupportedArchs(int* count) {
    *count = 2;
    return SUCCESS;
}

int nvrtcGetSupportedArchs(int* archs) {
    archs[0] = 80;
    archs[1] = 90;
    return SUCCESS;
}

int nvrtcCreateProgram(void** program, const char* source, const char* name, int headers, const char* const*,
                       const char* const*) {
    if (program == nullptr || source == nullptr) {
        return INVALID_INPUT;
    }
    if (headers != 0) {
        return INVALID_INPUT; // the backend prepends its header; nothing else is included
    }
    *program = new Program{source, name ? name : "default_program", "", ""};
    return SUCCESS;
}

int nvrtcDestroyProgram(void** program) {
    if (program == nullptr || *program == nullptr) {
        return INVALID_PROGRAM;
    }
    delete static_cast<Program*>(*program);
    *program = nullptr;
    return SUCCESS;
}

int nvrtcCompileProgram(void* program, int count, const char* const* options) {
    auto* p = static_cast<Program*>(program);
    if (p == nullptr) {
        return INVALID_PROGRAM;
    }
    std::vector<std::string> defines;
    bool cubin = false;
    std::string standard = "c++17"; // NVRTC's default
    for (int i = 0; i < count; ++i) {
        const std::string o = options[i];
        if (o.rfind("-D", 0) == 0) {
            defines.push_back(o.substr(2));
        } else if (o.rfind("--gpu-architecture=", 0) == 0) {
            cubin = o.find("sm_") != std::string::npos;
        } else if (o.rfind("--std=", 0) == 0) {
            standard = o.substr(6); // g++ compiles the file in the standard NVRTC was asked for
        } else if (o != "--prec-div=true" && o != "--prec-sqrt=true") {
            p->log = "the emulated NVRTC does not know the option " + o;
            return INVALID_OPTION;
        }
    }
    const std::string tu = "// -std=" + standard + "\n" + translation_unit(*p, defines);
    // The key covers the emulator the unit includes as well as the unit.
    std::stringstream emulator;
    emulator << std::ifstream(EMULATOR_H).rdbuf();
    char hash[17];
    std::snprintf(hash, sizeof hash, "%016llx", (unsigned long long)fnv1a(emulator.str() + tu));
    const std::string dir = MODULE_DIR;
    const std::string stem = dir + "/" + p->name + "-" + hash;
    const std::string lib = stem + ".so";
    if (!exists(lib)) {
        mkdir(dir.c_str(), 0755);
        // Named per process and compilation: threads of one process may build the same file.
        static std::atomic<unsigned> compilations{0};
        const std::string unique = stem + "." + std::to_string(getpid()) + "." + std::to_string(compilations++);
        const std::string cpp = unique + ".cpp", log = unique + ".log", partial = unique + ".so";
        std::ofstream(cpp) << tu;
        const std::string cmd = "g++ -std=" + standard + " -O1 -shared -fPIC -pthread -w -o '" + partial + "' '" + cpp +
                                "' >'" + log + "' 2>&1 && mv '" + partial + "' '" + lib + "'";
        if (std::system(cmd.c_str()) != 0) {
            std::ifstream in(log);
            std::stringstream text;
            text << in.rdbuf();
            p->log = "g++ failed on the emulated " + p->name + ":\n" + text.str();
            return COMPILATION;
        }
        std::remove(cpp.c_str());
        std::remove(log.c_str());
    }
    p->image = std::string(cubin ? "\x7f" "ELF" : "//  ") + "atomic-emulated:" + lib + "\n";
    p->image.push_back('\0');
    return SUCCESS;
}

int nvrtcGetProgramLogSize(void* program, size_t* size) {
    *size = static_cast<Program*>(program)->log.size() + 1;
    return SUCCESS;
}

int nvrtcGetProgramLog(void* program, char* log) {
    const auto& text = static_cast<Program*>(program)->log;
    std::memcpy(log, text.c_str(), text.size() + 1);
    return SUCCESS;
}

int nvrtcGetPTXSize(void* program, size_t* size) {
    *size = static_cast<Program*>(program)->image.size();
    return SUCCESS;
}

int nvrtcGetPTX(void* program, char* out) {
    const auto& image = static_cast<Program*>(program)->image;
    std::memcpy(out, image.data(), image.size());
    return SUCCESS;
}

int nvrtcGetCUBINSize(void* program, size_t* size) { return nvrtcGetPTXSize(program, size); }

int nvrtcGetCUBIN(void* program, char* out) { return nvrtcGetPTX(program, out); }

} // extern "C"
