//! The CUDA kernel sources (the `.cu` files beside this module, embedded in the binary) and their
//! compilation to PTX through NVRTC. The backend compiles every file once at start-up for the
//! GPU's architecture and its storage precision (a define that sets `elem_t`, see
//! `common.cuh`); the NVRTC check in the tests compiles them for each architecture we ship for
//! in each precision, which needs libnvrtc but no GPU.

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::backend::{BackendError, Precision, Result};

/// Prepended to every source: reductions and the device-side shape check.
pub(crate) const COMMON: &str = include_str!("kernels/common.cuh");

/// One `.cu` file: an op family compiled as one module.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    /// The `extern "C"` kernels the backend loads from it.
    pub functions: &'static [&'static str],
}

pub(crate) const FILES: &[KernelFile] = &[
    KernelFile {
        name: "embedding.cu",
        source: include_str!("kernels/embedding.cu"),
        functions: &["embedding", "embedding_add"],
    },
    KernelFile {
        name: "norm.cu",
        source: include_str!("kernels/norm.cu"),
        functions: &["layer_norm", "rms_norm"],
    },
    KernelFile {
        name: "activation.cu",
        source: include_str!("kernels/activation.cu"),
        functions: &["add", "gelu_erf", "gelu_tanh", "silu_mul", "swiglu", "bias_act"],
    },
    KernelFile {
        name: "softmax.cu",
        source: include_str!("kernels/softmax.cu"),
        functions: &["softmax_rows"],
    },
    KernelFile {
        name: "attention.cu",
        source: include_str!("kernels/attention.cu"),
        functions: &[
            "flash_attention",
            "decode_attention",
            "paged_flash_attention",
            "paged_decode_attention",
            "paged_decode_split",
            "decode_merge",
            "attn_softmax",
            "kv_write",
            "paged_gather",
        ],
    },
    KernelFile {
        name: "rope.cu",
        source: include_str!("kernels/rope.cu"),
        functions: &["rope", "qkv_rope", "qkv_rope_paged"],
    },
    KernelFile {
        name: "layout.cu",
        source: include_str!("kernels/layout.cu"),
        functions: &["split_columns"],
    },
    KernelFile {
        name: "gemv.cu",
        source: include_str!("kernels/gemv.cu"),
        functions: &["gemv"],
    },
    KernelFile {
        name: "sampling.cu",
        source: include_str!("kernels/sampling.cu"),
        functions: &["argmax_rows", "sample_rows"],
    },
];

/// The NVRTC virtual architecture for a compute capability, e.g. `compute_90` for 9.0.
pub(crate) fn virtual_arch(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// Whether libnvrtc can be loaded (cudarc panics on first use when it cannot).
pub(crate) fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The define that selects the kernels' storage type.
pub(crate) fn precision_define(precision: Precision) -> Option<&'static str> {
    match precision {
        Precision::F32 => None,
        Precision::F16 => Some("-DATOMIC_F16"),
        Precision::Bf16 => Some("-DATOMIC_BF16"),
    }
}

/// Compiles one file to PTX for `arch` (e.g. `compute_80`) with tensors stored in `precision`.
/// The error carries NVRTC's log, which names the line and the problem.
pub(crate) fn compile(file: &KernelFile, arch: &str, precision: Precision) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(BackendError::Device(
            "NVRTC (libnvrtc.so) not found on the library path; it is needed to compile the CUDA kernels"
                .into(),
        ));
    }
    let opts = CompileOptions {
        name: Some(file.name.to_string()),
        // Full-precision division and square root (the defaults, stated because fp32 results
        // are compared with the CPU backend at 1e-5); no fast-math intrinsics.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        options: [format!("--gpu-architecture={arch}"), "--std=c++17".into()]
            .into_iter()
            .chain(precision_define(precision).map(str::to_owned))
            .collect(),
        ..Default::default()
    };
    // `#line` keeps NVRTC's messages pointing at the right file and line.
    let source = format!(
        "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}",
        file.name, file.source
    );
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => BackendError::Device(format!(
            "NVRTC failed to compile {} for {arch} ({precision}):\n{}",
            file.name,
            log.to_string_lossy()
        )),
        other => BackendError::Device(format!(
            "NVRTC failed on {} for {arch} ({precision}): {other}",
            file.name
        )),
    })
}
