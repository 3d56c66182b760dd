//! The CUDA kernel sources (the `.cu` files beside this module, embedded in the binary) and their
//! compilation through NVRTC. The backend compiles every file at start-up for the GPU and its
//! storage precision (a define that sets `elem_t`, see `common.cuh`): to machine code (CUBIN)
//! for the GPU's own architecture when this NVRTC knows it, else to PTX for the driver to
//! finish ([`Target`]). Compiled images go through the on-disk [`KernelCache`] when the worker
//! has one, so a restarted worker skips NVRTC. The NVRTC checks in the tests compile every file
//! for each architecture we ship for in each precision, which needs libnvrtc but no GPU.

use std::ffi::{CStr, CString, c_char, c_int};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use super::kernel_cache::{self, CacheLookup, KernelCache};
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
            "flash_attention_tc32",
            "flash_attention_tc64",
            "flash_attention_tc128",
            "paged_flash_attention_tc32",
            "paged_flash_attention_tc64",
            "paged_flash_attention_tc128",
            "paged_decode_attention",
            "paged_decode_split",
            "decode_merge",
            "paged_decode_grouped",
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
        name: "pooling.cu",
        source: include_str!("kernels/pooling.cu"),
        functions: &["pool_rows"],
    },
    KernelFile {
        name: "sampling.cu",
        source: include_str!("kernels/sampling.cu"),
        functions: &["argmax_rows", "sample_rows"],
    },
];

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

/// What NVRTC produces for a GPU, named by compute capability × 10 (90 for 9.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// Machine code for exactly this architecture (`sm_90`). The driver loads it as it is: no
    /// PTX JIT at start-up, and no dependence on the driver's PTX version, so an NVRTC newer
    /// than the driver (within the CUDA major cudarc loads) still works.
    Cubin(u32),
    /// PTX for this virtual architecture (`compute_90`), which the driver JIT-compiles for the
    /// GPU: for a GPU newer than this NVRTC knows, with the newest architecture it does.
    Ptx(u32),
}

impl Target {
    /// The target for a GPU of compute capability `major.minor`, given the architectures this
    /// NVRTC compiles for (`nvrtcGetSupportedArchs`, e.g. `[75, 80, 86, 89, 90, 100, 120]`).
    pub(crate) fn for_gpu(major: i32, minor: i32, supported: &[i32]) -> Result<Target> {
        let gpu = major * 10 + minor;
        if supported.contains(&gpu) {
            return Ok(Target::Cubin(gpu as u32));
        }
        match supported.iter().copied().filter(|&a| a < gpu).max() {
            // Same major: PTX of an older minor runs on it. A newer major: PTX is the only
            // form the driver can carry forward.
            Some(arch) => Ok(Target::Ptx(arch as u32)),
            None => Err(BackendError::Device(format!(
                "the GPU has compute capability {major}.{minor}, older than every architecture \
                 this NVRTC compiles for ({})",
                supported
                    .iter()
                    .map(|a| format!("{}.{}", a / 10, a % 10))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The architecture as compute capability × 10, whichever form is built for it.
    pub(crate) fn arch_number(self) -> u32 {
        match self {
            Target::Cubin(a) | Target::Ptx(a) => a,
        }
    }

    /// NVRTC's `--gpu-architecture` value: `sm_90` or `compute_90`.
    pub(crate) fn arch(self) -> String {
        match self {
            Target::Cubin(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cubin(_) => write!(f, "CUBIN for {}", self.arch()),
            Target::Ptx(_) => write!(f, "PTX for {}", self.arch()),
        }
    }
}

fn nvrtc_err(what: &str, e: nvrtc::NvrtcError) -> BackendError {
    BackendError::Device(format!("NVRTC {what}: {e:?}"))
}

/// The architectures this NVRTC compiles for, as compute capability × 10.
pub(crate) fn supported_archs() -> Result<Vec<i32>> {
    let mut count: c_int = 0;
    // SAFETY: writes one int; NVRTC needs no initialisation.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(|e| nvrtc_err("listing architectures", e))?;
    let mut archs = vec![0 as c_int; count.max(0) as usize];
    // SAFETY: `archs` holds the `count` ints NVRTC writes.
    unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| nvrtc_err("listing architectures", e))?;
    Ok(archs)
}

/// NVRTC's version, `(major, minor)`.
pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: writes two ints.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_err("reading its version", e))?;
    Ok((major, minor))
}

/// One file as NVRTC is given it: the source with the common header in front and the options.
/// Both, with NVRTC's version, make the file's cache key.
fn program_inputs(file: &KernelFile, target: Target, precision: Precision) -> (String, Vec<String>) {
    // `#line` keeps NVRTC's messages pointing at the right file and line.
    let source = format!(
        "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}",
        file.name, file.source
    );
    // Full-precision division and square root (the defaults, stated because fp32 results are
    // compared with the CPU backend at 1e-5); no fast-math intrinsics.
    let options = [
        format!("--gpu-architecture={}", target.arch()),
        "--std=c++17".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
    ]
    .into_iter()
    .chain(precision_define(precision).map(str::to_owned))
    .collect();
    (source, options)
}

/// A compiled file: CUBIN (an ELF image) or PTX text with its terminating NUL, as the driver's
/// `cuModuleLoadData` takes either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KernelImage {
    pub target: Target,
    pub bytes: Vec<u8>,
}

impl KernelImage {
    /// Checks that `bytes` have the shape of `target`'s output, so that a damaged cache entry
    /// is never handed to the driver: an ELF header for CUBIN; for PTX, text ending in exactly
    /// one NUL (the driver reads it as a C string).
    pub(crate) fn new(target: Target, bytes: Vec<u8>) -> std::result::Result<Self, String> {
        match target {
            Target::Cubin(_) if !bytes.starts_with(b"\x7fELF") => {
                return Err("not an ELF image".into());
            }
            Target::Ptx(_) if bytes.last() != Some(&0) || bytes[..bytes.len() - 1].contains(&0) => {
                return Err("not NUL-terminated PTX text".into());
            }
            _ => {}
        }
        Ok(Self { target, bytes })
    }

    /// The PTX text (without its NUL), or `None` for CUBIN.
    #[cfg(test)]
    pub(crate) fn ptx_text(&self) -> Option<&str> {
        match self.target {
            Target::Ptx(_) => std::str::from_utf8(&self.bytes[..self.bytes.len() - 1]).ok(),
            Target::Cubin(_) => None,
        }
    }

    /// The image as cudarc's module loader takes it.
    pub(crate) fn into_module(self) -> cudarc::nvrtc::Ptx {
        cudarc::nvrtc::Ptx::from_binary(self.bytes)
    }
}

/// An NVRTC program, destroyed on drop.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program` and destroyed only here. A failure to free is
        // not worth a panic in a destructor.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

/// Reads one of NVRTC's outputs: `size` gives its length, `get` fills it.
fn read_output(
    program: &Program,
    size: unsafe fn(nvrtc_sys::nvrtcProgram, *mut usize) -> nvrtc_sys::nvrtcResult,
    get: unsafe fn(nvrtc_sys::nvrtcProgram, *mut c_char) -> nvrtc_sys::nvrtcResult,
) -> std::result::Result<Vec<u8>, nvrtc::NvrtcError> {
    let mut len = 0usize;
    // SAFETY: a compiled program; `size` writes one usize.
    unsafe { size(program.0, &mut len) }.result()?;
    let mut out = vec![0u8; len];
    // SAFETY: `out` holds the `len` bytes `get` writes.
    unsafe { get(program.0, out.as_mut_ptr().cast()) }.result()?;
    Ok(out)
}

/// Compiles one file for `target` with tensors stored in `precision`. The error carries
/// NVRTC's log, which names the line and the problem.
pub(crate) fn compile(file: &KernelFile, target: Target, precision: Precision) -> Result<KernelImage> {
    if !nvrtc_available() {
        return Err(BackendError::Device(
            "NVRTC (libnvrtc.so) not found on the library path; it is needed to compile the CUDA kernels"
                .into(),
        ));
    }
    let failed = |what: String| {
        BackendError::Device(format!(
            "NVRTC failed on {} for {} ({precision}): {what}",
            file.name,
            target.arch()
        ))
    };
    let (source, options) = program_inputs(file, target, precision);
    let source = CString::new(source).map_err(|_| failed("the source holds a NUL byte".into()))?;
    let name = CString::new(file.name).map_err(|_| failed("the file name holds a NUL byte".into()))?;
    let program = Program(
        nvrtc::create_program(&source, Some(&name))
            .map_err(|e| failed(format!("creating the program: {e:?}")))?,
    );
    // SAFETY: a live program; the options outlive the call.
    if let Err(e) = unsafe { nvrtc::compile_program(program.0, &options) } {
        // SAFETY: a live program.
        let log = unsafe { nvrtc::get_program_log(program.0) }
            .ok()
            // SAFETY: NVRTC's log is NUL-terminated.
            .map(|log| {
                unsafe { CStr::from_ptr(log.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        return Err(BackendError::Device(format!(
            "NVRTC failed to compile {} for {} ({precision}): {e:?}\n{log}",
            file.name,
            target.arch()
        )));
    }
    let bytes = match target {
        Target::Cubin(_) => read_output(&program, nvrtc_sys::nvrtcGetCUBINSize, nvrtc_sys::nvrtcGetCUBIN),
        Target::Ptx(_) => read_output(&program, nvrtc_sys::nvrtcGetPTXSize, nvrtc_sys::nvrtcGetPTX),
    }
    .map_err(|e| failed(format!("reading its output: {e:?}")))?;
    KernelImage::new(target, bytes).map_err(failed)
}

/// Where a file's image came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Cache,
    Nvrtc,
}

/// The cache entry and key of one file: a new NVRTC, source, option or precision is a new key,
/// so a stale image is never used.
fn cache_entry(file: &KernelFile, target: Target, precision: Precision, nvrtc: (i32, i32)) -> (String, u64) {
    let (source, options) = program_inputs(file, target, precision);
    let version = format!("nvrtc {}.{}", nvrtc.0, nvrtc.1);
    let mut parts: Vec<&[u8]> = vec![version.as_bytes(), source.as_bytes()];
    parts.extend(options.iter().map(|o| o.as_bytes()));
    let stem = file.name.trim_end_matches(".cu");
    (
        kernel_cache::entry_prefix(stem, &format!("{precision}-{}", target.arch())),
        kernel_cache::key(&parts),
    )
}

/// [`compile`] through `cache`: a valid entry is returned as it is; a missing or damaged one
/// is compiled and stored. The cache is an optimisation, so its failures are warnings (a
/// read-only or full disk costs the compile, never the start).
pub(crate) fn compile_cached(
    file: &KernelFile,
    target: Target,
    precision: Precision,
    cache: Option<&KernelCache>,
) -> Result<(KernelImage, Origin)> {
    let Some(cache) = cache else {
        return Ok((compile(file, target, precision)?, Origin::Nvrtc));
    };
    let (prefix, key) = cache_entry(file, target, precision, nvrtc_version()?);
    match cache.get(&prefix, key) {
        CacheLookup::Hit(bytes) => match KernelImage::new(target, bytes) {
            Ok(image) => return Ok((image, Origin::Cache)),
            Err(why) => tracing::warn!(file = file.name, %why, "ignoring a damaged kernel cache entry"),
        },
        CacheLookup::Damaged(why) => {
            tracing::warn!(file = file.name, %why, "ignoring a damaged kernel cache entry")
        }
        CacheLookup::Miss => {}
    }
    let image = compile(file, target, precision)?;
    if let Err(e) = cache.put(&prefix, key, &image.bytes) {
        tracing::warn!(file = file.name, error = %e, dir = %cache.dir().display(), "could not store a compiled kernel in the cache");
    }
    Ok((image, Origin::Nvrtc))
}
