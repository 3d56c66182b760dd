//! The CUDA backend's device state: the context, its one stream, the cuBLAS handle and the
//! kernels compiled at start-up, plus the helpers every op uses (allocation, uploads of small
//! host arguments, launches) and the mapping of driver, NVRTC and cuBLAS failures to
//! [`BackendError::Device`] messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUmemPool_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError};

use super::bias_epilogue::BiasEpilogue;
use super::dense_chunks::UNFUSED_MAX_SCORE_BYTES;
use super::graph::DecodeGraphs;
use super::kernel_cache::KernelCache;
use super::kernels::{self, FILES, KernelImage, Origin, Target};
use super::tensor::{Buffers, CudaTensor, DeviceArray, DeviceBuffer, SharedBufferCache};
use crate::backend::buffer_cache::{BufferStats, DEFAULT_LIMIT_BYTES, size_class};
use crate::backend::{BackendError, Precision, Result};

/// Oldest GPU generation accepted: Volta (7.0). The kernels need warp shuffles with masks and
/// nothing newer; they are compile-checked for 8.0 and 9.0.
const MIN_COMPUTE_CAPABILITY: (i32, i32) = (7, 0);

/// Dynamic shared memory the flash attention kernel needs at the largest head dimension (256):
/// 16 query rows, a K tile of 32 rows padded to d + 1 and a V tile of 32 rows, in floats.
pub(super) const fn flash_smem_bytes(d: usize) -> usize {
    (16 * d + 32 * (d + 1) + 32 * d) * size_of::<f32>()
}

/// cuBLAS's workspace: a fixed buffer set at start-up, so that products never allocate one
/// (inside a graph capture above all) and choose their algorithms the same way whether graphs
/// are on or not. 32 MiB is NVIDIA's advice for Hopper, and enough for every earlier GPU.
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// The largest head dimension the attention kernels take (each lane keeps d / 32 outputs in
/// registers).
pub(super) const ATTN_MAX_D: usize = 256;

/// The last upload of one kind of small argument: its host values and their device copy, so
/// that the same values (every layer's positions, every encoder layer's padding mask and, with
/// the buffer cache reusing addresses, often its attention pointer table) cross the bus once.
/// The copy lives in a buffer of its own, outside the buffer cache, which later values
/// overwrite in stream order when they fit and nothing else holds it. Kept in the cache's pool,
/// it would be held across passes that the pool's first pass saw free for part of the time,
/// leaving the second pass a buffer short.
pub(super) struct LastUpload<T: DeviceRepr>(Mutex<Option<Uploaded<T>>>);

/// Host values and their copy on the device.
type Uploaded<T> = (Vec<T>, Arc<DeviceArray<T>>);

impl<T: DeviceRepr + PartialEq + Clone> LastUpload<T> {
    pub(super) fn new() -> Self {
        Self(Mutex::new(None))
    }
}

/// The CUDA backend on one GPU. All work goes to one stream, in order; host reads
/// (`to_host`) synchronise it, which is also where asynchronous kernel failures surface. Every
/// tensor is stored in the backend's [`Precision`].
pub struct CudaBackend {
    name: String,
    pub(super) precision: Precision,
    ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    /// One-element buffers passed where a kernel takes an optional pointer that is absent (the
    /// kernels are told so by a flag and never read them).
    pub(super) placeholder_u8: CudaSlice<u8>,
    pub(super) placeholder_elem: CudaSlice<u8>,
    /// The rotary positions uploaded last: every layer of a step rotates at the same positions,
    /// so they cross the bus once per step instead of once per layer.
    positions: LastUpload<u32>,
    /// The padding mask uploaded last (every layer of an encoder batch reads the same one).
    pub(super) key_valid: LastUpload<u8>,
    /// The unfused attention's matrix addresses uploaded last.
    pub(super) attention_pointers: LastUpload<u64>,
    /// Decode-step graphs and their staged inputs; `None` until enabled (`graph.rs`).
    pub(super) graphs: Mutex<Option<DecodeGraphs>>,
    /// Decode steps replayed from a graph, and recorded into one (for the metrics).
    pub(super) graph_replays: AtomicU64,
    pub(super) graph_recordings: AtomicU64,
    /// A graph capture is under way on the stream (uploads are refused; buffers come from the
    /// driver's pool, so that the graph owns them, not from `buffers`).
    pub(super) capturing: AtomicBool,
    /// Device buffers that ops dropped, reused for later outputs (`backend::buffer_cache`).
    buffers: SharedBufferCache,
    /// Buffers the upload caches (`LastUpload`) asked the driver for: counted with the buffer
    /// cache's misses in [`CudaBackend::buffer_stats`].
    upload_buffers_allocated: AtomicU64,
    /// Projections with a bias take cuBLASLt's bias epilogue where it can (`bias_epilogue.rs`);
    /// `None` when cuBLASLt cannot be opened. Declared before the workspace it shares with
    /// cuBLAS, so it is dropped first.
    pub(super) bias_epilogue: Option<BiasEpilogue>,
    /// cuBLAS's workspace (alive as long as the handle).
    _blas_workspace: CudaSlice<u8>,
    /// The GPU's multiprocessors (how many blocks a launch needs to fill it).
    pub(super) sm_count: usize,
    /// Dynamic shared memory the flash kernels may use (`allow_flash_smem`): below what head
    /// dimension 256 needs on GPUs with 64 KiB per block (Turing).
    flash_smem_bytes: usize,
    /// Products of a few rows go to the matrix-vector kernel (`gemv.rs`); on unless turned off.
    pub(super) gemv_enabled: AtomicBool,
    /// Decode steps take the grouped-heads decode kernel where it fits (`paged.rs`); on unless
    /// turned off.
    pub(super) grouped_decode_enabled: AtomicBool,
    /// The kernels were built for an architecture with the tensor-core instructions the `_tc`
    /// flash kernels use (8.0 or later: the build, not the GPU, decides whether they were
    /// compiled in or trap) and tensors are stored in half precision, which they multiply.
    pub(super) half_precision_mma: bool,
    /// Prompts that take a flash kernel take its tensor-core form where it fits
    /// ([`CudaBackend::flash_kernel`]); on unless turned off.
    pub(super) tensor_core_flash_enabled: AtomicBool,
    /// Prompts take the unfused cuBLAS attention; on unless turned off (then every dense
    /// prompt takes the flash kernel, as the start-up self-test needs).
    pub(super) unfused_attention_enabled: AtomicBool,
    /// The most bytes of fp32 scores one product of the unfused attention materialises
    /// ([`UNFUSED_MAX_SCORE_BYTES`] unless a test lowers it): larger prompts run in pieces.
    pub(super) unfused_score_limit: AtomicUsize,
    /// Pieces the unfused attention has run (one pair of products each), for tests.
    #[cfg(test)]
    pub(crate) unfused_pieces: AtomicUsize,
    kernel_build: KernelBuild,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `context: error`, with out-of-memory spelled out because it is the failure an operator can act
/// on (smaller batch, smaller model, another GPU).
pub(super) fn driver_err(context: &str, e: DriverError) -> BackendError {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        BackendError::OutOfMemory(format!("{context}: out of GPU memory"))
    } else {
        BackendError::Device(format!("{context}: {e}"))
    }
}

/// `buf` read as `len` values of `T` (`what` names it in the error, which only a buffer
/// shorter than asked for could give).
fn array_in<T: DeviceRepr>(buf: DeviceBuffer, what: &str, len: usize) -> Result<DeviceArray<T>> {
    DeviceArray::new(buf, len)
        .ok_or_else(|| BackendError::Device(format!("allocating {what}: a buffer shorter than {len} values")))
}

/// Gives cuBLAS a workspace of [`CUBLAS_WORKSPACE_BYTES`]; the buffer must outlive the handle.
fn set_blas_workspace(blas: &CudaBlas, stream: &Arc<CudaStream>) -> Result<CudaSlice<u8>> {
    // SAFETY: cuBLAS only uses it as scratch space, in stream order.
    let workspace = unsafe { stream.alloc::<u8>(CUBLAS_WORKSPACE_BYTES) }
        .map_err(|e| driver_err("allocating the cuBLAS workspace", e))?;
    let ptr = {
        let (ptr, _sync) = workspace.device_ptr(stream);
        ptr
    };
    // SAFETY: a live device allocation of the stated size on the handle's device, kept by the
    // backend for as long as the handle.
    unsafe {
        cudarc::cublas::sys::cublasSetWorkspace_v2(
            *blas.handle(),
            ptr as *mut std::ffi::c_void,
            CUBLAS_WORKSPACE_BYTES,
        )
    }
    .result()
    .map_err(|e| BackendError::Device(format!("setting the cuBLAS workspace: {e:?}")))?;
    Ok(workspace)
}

/// One file's kernels by name, and where its image came from.
type LoadedFile = (Vec<(&'static str, CudaFunction)>, Origin);

/// Loads one file's kernels, compiled through the cache. An image from the cache that the
/// driver refuses (a damaged entry whose frame survived, say) is compiled afresh before giving
/// up, so a bad cache never stops a worker that could start without it.
fn load_file(
    ctx: &Arc<CudaContext>,
    file: &kernels::KernelFile,
    target: Target,
    precision: Precision,
    cache: Option<&KernelCache>,
    gpu: &str,
) -> Result<LoadedFile> {
    let (image, origin) = kernels::compile_cached(file, target, precision, cache)?;
    let loaded = load_image(ctx, file, image, gpu);
    match (loaded, origin) {
        (Err(e), Origin::Cache) => {
            tracing::warn!(file = file.name, error = %e, "the driver refused a cached kernel image; compiling it again");
            let image = kernels::compile(file, target, precision)?;
            Ok((load_image(ctx, file, image, gpu)?, Origin::Nvrtc))
        }
        (loaded, origin) => Ok((loaded?, origin)),
    }
}

/// Loads one compiled file into `ctx` and looks up its kernels.
fn load_image(
    ctx: &Arc<CudaContext>,
    file: &kernels::KernelFile,
    image: KernelImage,
    gpu: &str,
) -> Result<Vec<(&'static str, CudaFunction)>> {
    let target = image.target;
    let module = ctx
        .load_module(image.into_module())
        .map_err(|e| driver_err(&format!("loading {} ({target}) on {gpu}", file.name), e))?;
    file.functions
        .iter()
        .map(|&name| {
            module
                .load_function(name)
                .map(|f| (name, f))
                .map_err(|e| driver_err(&format!("finding kernel {name} in {}", file.name), e))
        })
        .collect()
}

/// The self-test's fallback, apart from the GPU: `run` once; where it fails and the tensor-core
/// flash kernels were in use, `turn_off` them and `run` again. `Ok(Some(why))`: the second run
/// passed, and `why` is the first one's failure.
fn with_flash_fallback(
    tensor_cores_in_use: bool,
    mut run: impl FnMut() -> Result<()>,
    turn_off: impl FnOnce(),
) -> Result<Option<String>> {
    match run() {
        Ok(()) => Ok(None),
        Err(first) if tensor_cores_in_use => {
            turn_off();
            run().map(|()| Some(first.to_string())).map_err(|again| {
                BackendError::Device(format!(
                    "{first}; with the tensor-core flash kernels off: {again}"
                ))
            })
        }
        Err(e) => Err(e),
    }
}

/// The unfused dense attention turned off for as long as this lives, the previous setting put
/// back when it is dropped, on every path out (an error or a panic of the checks it guards).
/// Not for concurrent use: two overlapping guards restore in the order they drop.
struct UnfusedAttentionOff<'a> {
    backend: &'a CudaBackend,
    was: bool,
}

impl<'a> UnfusedAttentionOff<'a> {
    fn new(backend: &'a CudaBackend) -> Self {
        let was = backend.set_unfused_attention(false);
        Self { backend, was }
    }
}

impl Drop for UnfusedAttentionOff<'_> {
    fn drop(&mut self) {
        self.backend.set_unfused_attention(self.was);
    }
}

/// How the kernels were built at start-up, for the worker's log and the benchmark.
#[derive(Clone, Debug)]
pub struct KernelBuild {
    /// What NVRTC produced, e.g. "CUBIN for sm_90".
    pub target: String,
    /// NVRTC's version, e.g. "13.0".
    pub nvrtc: String,
    /// Files read from the cache and files compiled.
    pub from_cache: usize,
    pub compiled: usize,
    /// The cache folder, when there is one.
    pub cache_dir: Option<PathBuf>,
    /// Wall time of compiling (or reading) and loading every file.
    pub seconds: f64,
}

fn library_missing(what: &str, lib: &str) -> BackendError {
    BackendError::Device(format!(
        "{what} ({lib}) not found on the library path; the CUDA backend cannot start"
    ))
}

impl CudaBackend {
    /// Opens GPU `ordinal` in fp32; see [`CudaBackend::with_precision`].
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_precision(ordinal, Precision::F32)
    }

    /// Opens GPU `ordinal` with tensors stored in `precision`, compiling every kernel; see
    /// [`CudaBackend::with_kernel_cache`].
    pub fn with_precision(ordinal: usize, precision: Precision) -> Result<Self> {
        Self::with_kernel_cache(ordinal, precision, None)
    }

    /// Opens GPU `ordinal` with tensors stored in `precision`: loads the driver, NVRTC and cuBLAS
    /// libraries, creates the stream and builds every kernel for this GPU and precision, reading
    /// and filling the compiled-kernel cache in `kernel_cache` when given (a folder that cannot
    /// be used is a warning, not a failure). Fails (never panics) when a library is missing,
    /// there is no such GPU, the GPU is too old, or a kernel does not compile.
    pub fn with_kernel_cache(
        ordinal: usize,
        precision: Precision,
        kernel_cache: Option<&Path>,
    ) -> Result<Self> {
        // cudarc panics on first use of a library it cannot load, so look for each one first.
        // SAFETY: these only try to dlopen the libraries; no symbol is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(library_missing("the NVIDIA driver library", "libcuda.so"));
        }
        if !kernels::nvrtc_available() {
            return Err(library_missing("NVRTC", "libnvrtc.so"));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(library_missing("cuBLAS", "libcublas.so"));
        }
        let count = CudaContext::device_count().map_err(|e| driver_err("CUDA initialisation", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(BackendError::Device(format!(
                "CUDA device {ordinal} requested, but {count} device(s) found"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err(&format!("opening cuda:{ordinal}"), e))?;
        let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_err("reading the compute capability", e))?;
        if (major, minor) < MIN_COMPUTE_CAPABILITY {
            return Err(BackendError::Device(format!(
                "{gpu} (cuda:{ordinal}) has compute capability {major}.{minor}; at least {}.{} is needed",
                MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
            )));
        }
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_err("reading the multiprocessor count", e))?
            .max(1) as usize;
        // SAFETY: every buffer of this backend is allocated, used and freed on its one stream
        // (cuBLAS is bound to the same stream), so the per-buffer events cudarc records to order
        // work across streams are not needed; turned off before any allocation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_err("creating a stream", e))?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| BackendError::Device(format!("creating the cuBLAS handle: {e}")))?;
        let blas_workspace = set_blas_workspace(&blas, &stream)?;
        let workspace_ptr = {
            let (ptr, _sync) = blas_workspace.device_ptr(&stream);
            ptr
        };
        let bias_epilogue = BiasEpilogue::new(precision, (workspace_ptr, CUBLAS_WORKSPACE_BYTES))
            .inspect_err(
                |why| tracing::warn!(%why, "biases are added in a pass of their own after each product"),
            )
            .ok();

        let supported = kernels::supported_archs()?;
        let target = Target::for_gpu(major, minor, &supported)
            .map_err(|e| BackendError::Device(format!("{gpu} (cuda:{ordinal}): {e}")))?;
        let (nvrtc_major, nvrtc_minor) = kernels::nvrtc_version()?;
        let cache = kernel_cache.and_then(|dir| match KernelCache::open(dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot use the kernel cache folder; compiling every kernel");
                None
            }
        });
        let started = std::time::Instant::now();
        // Each file compiles (NVRTC) and loads on its own thread: compiling is CPU work of up
        // to a second a file, and a worker scaled up from zero waits for all of it before it
        // is ready.
        let loaded: Vec<Result<LoadedFile>> = std::thread::scope(|scope| {
            let handles: Vec<_> = FILES
                .iter()
                .map(|file| scope.spawn(|| load_file(&ctx, file, target, precision, cache.as_ref(), &gpu)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(BackendError::Device(
                            "a kernel compilation thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        let mut functions = HashMap::new();
        let mut from_cache = 0;
        for file in loaded {
            let (kernels, origin) = file?;
            functions.extend(kernels);
            from_cache += usize::from(origin == Origin::Cache);
        }
        let kernel_build = KernelBuild {
            target: target.to_string(),
            nvrtc: format!("{nvrtc_major}.{nvrtc_minor}"),
            from_cache,
            compiled: FILES.len() - from_cache,
            cache_dir: cache.map(|c| c.dir().to_path_buf()),
            seconds: started.elapsed().as_secs_f64(),
        };
        let mut backend = Self {
            name: format!("cuda:{ordinal}"),
            precision,
            placeholder_u8: stream
                .alloc_zeros::<u8>(1)
                .map_err(|e| driver_err("allocating", e))?,
            placeholder_elem: stream
                .alloc_zeros::<u8>(4)
                .map_err(|e| driver_err("allocating", e))?,
            ctx,
            stream,
            blas,
            kernels: functions,
            positions: LastUpload::new(),
            key_valid: LastUpload::new(),
            attention_pointers: LastUpload::new(),
            graphs: Mutex::new(None),
            graph_replays: AtomicU64::new(0),
            graph_recordings: AtomicU64::new(0),
            capturing: AtomicBool::new(false),
            buffers: Arc::new(Mutex::new(Buffers::new(DEFAULT_LIMIT_BYTES))),
            upload_buffers_allocated: AtomicU64::new(0),
            bias_epilogue,
            _blas_workspace: blas_workspace,
            sm_count,
            flash_smem_bytes: 0,
            gemv_enabled: AtomicBool::new(true),
            grouped_decode_enabled: AtomicBool::new(true),
            half_precision_mma: target.arch_number() >= 80 && precision != Precision::F32,
            tensor_core_flash_enabled: AtomicBool::new(true),
            unfused_attention_enabled: AtomicBool::new(true),
            unfused_score_limit: AtomicUsize::new(UNFUSED_MAX_SCORE_BYTES),
            #[cfg(test)]
            unfused_pieces: AtomicUsize::new(0),
            kernel_build,
        };
        backend.flash_smem_bytes = backend.allow_flash_smem()?;
        backend.keep_freed_memory()?;
        Ok(backend)
    }

    /// Whether every tensor's buffer starts on a 16-byte boundary, as the kernels' vector
    /// loads need (allocations do; the check keeps the loads safe whatever a tensor's origin).
    pub(super) fn aligned_16(&self, tensors: &[&CudaTensor]) -> bool {
        tensors.iter().all(|t| {
            let (ptr, _sync) = t.buf.device_ptr(&self.stream);
            ptr % 16 == 0
        })
    }

    /// The start-up self-test ([`selftest::check`]) on this GPU in `precision`, then its
    /// attention checks again with the unfused attention off, the only way small shapes reach
    /// the dense flash kernel (which serves dense prompts only with that path off, or a prompt
    /// so long that one query's scores pass 256 MiB; paged prompts of under 16 tokens take its
    /// paged form in the first run).
    ///
    /// Where it fails while the tensor-core flash kernels are in use, they are turned off and
    /// the whole test run again: a GPU on which they compute wrongly still serves, on the SIMT
    /// flash kernel (verified the same way), with a warning that names the failure. A failure
    /// with them off, or one that leaves the context unusable, stops the start-up as before.
    ///
    /// [`selftest::check`]: crate::backend::selftest::check
    pub fn self_test(&self, precision: Precision) -> Result<()> {
        let tensor_cores_in_use =
            self.half_precision_mma && self.tensor_core_flash_enabled.load(Ordering::Relaxed);
        let run = || {
            crate::backend::selftest::check(self, precision)?;
            let _flash_only = UnfusedAttentionOff::new(self);
            crate::backend::selftest::check_attention(self, precision)
                .map_err(|e| BackendError::Device(format!("{e} (dense attention through the flash kernel)")))
        };
        let fallback = with_flash_fallback(tensor_cores_in_use, run, || {
            self.set_tensor_core_flash(false);
        })?;
        if let Some(why) = fallback {
            tracing::warn!(
                error = %why,
                "the tensor-core flash kernels failed the start-up self-test; prompts take the SIMT flash kernel"
            );
        }
        Ok(())
    }

    /// Turns the unfused dense attention on or off (on by default); off, every dense prompt
    /// takes the flash kernel. Returns the previous setting. For the self-test and tests.
    pub(crate) fn set_unfused_attention(&self, enabled: bool) -> bool {
        self.unfused_attention_enabled.swap(enabled, Ordering::Relaxed)
    }

    /// Turns the tensor-core flash kernels on or off (on by default where they fit); off,
    /// prompts that take a flash kernel take the SIMT one. Returns the previous setting. For
    /// tests and benchmarks, which compare the two.
    pub fn set_tensor_core_flash(&self, enabled: bool) -> bool {
        self.tensor_core_flash_enabled.swap(enabled, Ordering::Relaxed)
    }

    /// Whether a tensor-core flash kernel serves prompts at head dimension `head_dim` on this
    /// GPU and precision (unless turned off): fp16 or bf16 on compute capability 8.0 or later,
    /// at head dimensions 32, 64 and 128.
    pub fn tensor_core_flash_fits(&self, head_dim: usize) -> bool {
        self.half_precision_mma && super::ops::TC_FLASH_HEAD_DIMS.contains(&head_dim)
    }

    /// Sets the bytes of fp32 scores one piece of the unfused attention may hold (at most
    /// [`UNFUSED_MAX_SCORE_BYTES`]), so that tests cut small prompts into pieces as large
    /// ones are cut; returns the previous limit.
    #[cfg(test)]
    pub(crate) fn set_unfused_score_limit(&self, bytes: usize) -> usize {
        self.unfused_score_limit
            .swap(bytes.min(UNFUSED_MAX_SCORE_BYTES), Ordering::Relaxed)
    }

    /// How the kernels were built at start-up.
    pub fn kernel_build(&self) -> &KernelBuild {
        &self.kernel_build
    }

    /// The GPU's name as the driver reports it.
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Kernels may use at most 48 KiB of dynamic shared memory unless they opt in to more; flash
    /// attention at head dimension 256 needs ~80 KiB (Volta and Ampere on allow more, Turing
    /// 64 KiB). Returns the bytes opted in to.
    fn allow_flash_smem(&self) -> Result<usize> {
        let need = flash_smem_bytes(ATTN_MAX_D);
        let limit = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| driver_err("reading the shared memory limit", e))?;
        let bytes = need.min(limit.max(0) as usize);
        for name in ["flash_attention", "paged_flash_attention"] {
            let f = self.kernel(name)?;
            // SAFETY: the function handle is valid for the life of its module, which it keeps
            // alive.
            unsafe {
                cudarc::driver::result::function::set_function_attribute(
                    f.cu_function(),
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            }
            .map_err(|e| driver_err(&format!("raising {name}'s shared memory limit"), e))?;
        }
        Ok(bytes)
    }

    /// An error naming the limit when a flash kernel at head dimension `d` needs more shared
    /// memory than this GPU gives a block, instead of the launch failure it would be.
    pub(super) fn check_flash_smem(&self, op: &'static str, d: usize) -> Result<()> {
        let need = flash_smem_bytes(d);
        if need > self.flash_smem_bytes {
            return Err(crate::backend::shapes::err(
                op,
                format!(
                    "head_dim {d} needs {need} bytes of shared memory in the flash attention kernel; {} allows {} per block",
                    self.name, self.flash_smem_bytes
                ),
            ));
        }
        Ok(())
    }

    /// What the buffer cache does not serve (new shapes, weights, graph captures) comes from
    /// the device's default memory pool (stream-ordered `cuMemAllocAsync`). By default the pool
    /// hands freed memory back to the driver whenever the stream synchronises, so those
    /// allocations would map memory afresh; with an unlimited release threshold freed blocks
    /// stay in the pool and are suballocated again. The worker owns its GPU, so holding its peak
    /// working set is the intended trade.
    fn keep_freed_memory(&self) -> Result<()> {
        let pools = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
            .map_err(|e| driver_err("reading memory pool support", e))?;
        if pools == 0 {
            return Ok(()); // cudarc allocates synchronously then; nothing to tune
        }
        let mut pool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        // SAFETY: plain driver calls on this context's device with valid out-pointers; the
        // attribute takes a u64.
        unsafe {
            cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device())
                .result()
                .map_err(|e| driver_err("finding the default memory pool", e))?;
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()
            .map_err(|e| driver_err("keeping freed memory in the pool", e))
        }
    }

    pub(super) fn kernel(&self, name: &'static str) -> Result<&CudaFunction> {
        self.kernels
            .get(name)
            .ok_or_else(|| BackendError::Device(format!("kernel {name} was not loaded")))
    }

    /// An uninitialised tensor; every op writes all of its output.
    pub(super) fn alloc(&self, shape: Vec<usize>) -> Result<CudaTensor> {
        let bytes = shape.iter().product::<usize>().max(1) * self.precision.bytes();
        let buf = self.alloc_bytes("a tensor", bytes)?;
        Ok(CudaTensor { buf, shape })
    }

    /// A zeroed tensor of exactly the bytes its shape needs, from the driver: for what lives as
    /// long as a model (key/value pools), which a size class could round up by an eighth.
    pub(super) fn alloc_zeros(&self, shape: Vec<usize>) -> Result<CudaTensor> {
        let bytes = shape.iter().product::<usize>().max(1) * self.precision.bytes();
        let mut buf = self.alloc_exact("a zeroed tensor", bytes)?;
        self.stream
            .memset_zeros(&mut *buf)
            .map_err(|e| driver_err(&format!("zeroing {bytes} bytes"), e))?;
        Ok(CudaTensor { buf, shape })
    }

    /// At least `bytes` of uninitialised device memory: an idle buffer of the cache when one of
    /// the size class fits, else the class's size from the driver. Inside a graph capture
    /// always `bytes` from the driver, which makes it graph memory: a cached buffer written by
    /// a recorded kernel could be handed to another tensor before the graph is replayed.
    pub(super) fn alloc_bytes(&self, what: &str, bytes: usize) -> Result<DeviceBuffer> {
        if self.capturing.load(Ordering::Relaxed) {
            let slice = self.driver_alloc(what, bytes)?;
            return Ok(DeviceBuffer::new(slice, None));
        }
        let reused = self.lock_buffers().cache.take(bytes);
        let slice = match reused {
            Some((_, slice)) => slice,
            None => match self.driver_alloc(what, size_class(bytes)) {
                // The class's rounding (up to an eighth) may be what does not fit; the buffer
                // is then not kept when dropped.
                Err(BackendError::OutOfMemory(_)) if size_class(bytes) != bytes => {
                    self.driver_alloc(what, bytes)?
                }
                other => other?,
            },
        };
        Ok(DeviceBuffer::new(slice, Some(self.buffers.clone())))
    }

    /// Exactly `bytes` of uninitialised device memory from the driver (weights, key/value
    /// pools: allocated once, where rounding would waste memory). Kept by the cache when
    /// dropped only if `bytes` happens to be a size class.
    pub(super) fn alloc_exact(&self, what: &str, bytes: usize) -> Result<DeviceBuffer> {
        let slice = self.driver_alloc(what, bytes)?;
        let home = (!self.capturing.load(Ordering::Relaxed)).then(|| self.buffers.clone());
        Ok(DeviceBuffer::new(slice, home))
    }

    /// `bytes` from the driver's pool (see `retry_out_of_memory`).
    fn driver_alloc(&self, what: &str, bytes: usize) -> Result<CudaSlice<u8>> {
        self.retry_out_of_memory(&format!("allocating {what} of {bytes} bytes"), || {
            // SAFETY: the callers overwrite every byte they read.
            unsafe { self.stream.alloc::<u8>(bytes) }
        })
    }

    /// `attempt()`, and when the driver is out of memory, once more after the buffer cache's
    /// idle buffers are freed (not inside a graph capture, where the frees would be recorded
    /// into the graph instead of done). Every allocation of the backend goes through here, so
    /// that memory the cache holds idle never makes one fail.
    pub(super) fn retry_out_of_memory<T>(
        &self,
        what: &str,
        attempt: impl Fn() -> std::result::Result<T, DriverError>,
    ) -> Result<T> {
        match attempt() {
            Ok(value) => Ok(value),
            Err(e)
                if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY
                    && !self.capturing.load(Ordering::Relaxed)
                    && self.free_idle_buffers() =>
            {
                attempt().map_err(|e| driver_err(what, e))
            }
            Err(e) => Err(driver_err(what, e)),
        }
    }

    /// Frees every idle buffer of the cache (to the driver's pool, where any size can reuse
    /// them); whether there were any.
    pub(super) fn free_idle_buffers(&self) -> bool {
        let idle = self.lock_buffers().cache.drain();
        if idle.is_empty() {
            return false;
        }
        tracing::warn!(
            freed = idle.len(),
            "out of GPU memory; freeing the idle cached buffers and trying again"
        );
        drop(idle);
        true
    }

    fn lock_buffers(&self) -> std::sync::MutexGuard<'_, Buffers> {
        self.buffers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a graph capture on the stream as begun (after `begin_capture`): allocations then
    /// bypass the buffer cache (`alloc_bytes`), buffers dropped are held for the graph
    /// (`Buffers`), uploads are refused.
    pub(super) fn begin_capturing(&self) {
        self.capturing.store(true, Ordering::Relaxed);
        self.lock_buffers().capturing = true;
    }

    /// Marks the capture as ended (after `end_capture`); returns the buffers dropped during it,
    /// which its graph may read: the graph keeps them, or, if it failed, they go back to the
    /// cache (`give_back_buffers`).
    pub(super) fn end_capturing(&self) -> Vec<CudaSlice<u8>> {
        self.capturing.store(false, Ordering::Relaxed);
        let mut buffers = self.lock_buffers();
        buffers.capturing = false;
        std::mem::take(&mut buffers.held_by_capture)
    }

    /// Gives `held` back to the buffer cache (they are free for any later kernel).
    pub(super) fn give_back_buffers(&self, held: Vec<CudaSlice<u8>>) {
        let mut evicted = Vec::new();
        {
            let mut buffers = self.lock_buffers();
            for slice in held {
                let size = slice.len();
                evicted.extend(buffers.cache.give_back(size, slice));
            }
        }
        drop(evicted);
    }

    /// The error a drop saved (cudarc keeps the last failed free of a `Drop` and returns it from
    /// the next call that binds the context), taken so that the next call does not fail with it.
    pub(super) fn take_saved_error(&self) -> std::result::Result<(), DriverError> {
        self.ctx.check_err()
    }

    /// Keeps at most `bytes` of idle device memory for reuse from now on (0: none, every
    /// dropped buffer goes back to the driver's pool).
    pub fn set_buffer_cache_limit(&self, bytes: usize) {
        let evicted = self.lock_buffers().cache.set_limit(bytes);
        drop(evicted);
    }

    /// The buffer cache's counts: how many allocations were served by a reused buffer and how
    /// many went to the driver, and what is idle now. The misses include the buffers the
    /// upload caches allocated; exact-size buffers (weights, key/value pools, graph staging) and
    /// allocations inside a graph capture are not counted.
    pub fn buffer_stats(&self) -> BufferStats {
        let mut stats = self.lock_buffers().cache.stats();
        stats.missed += self.upload_buffers_allocated.load(Ordering::Relaxed);
        stats
    }

    /// The precision tensors are stored in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Copies a small host argument (ids, positions, a mask) to the device, into a buffer of
    /// the buffer cache. Refused inside a graph capture, which cannot record a copy from
    /// pageable memory (a graphed step's inputs are staged before it, see `graph.rs`).
    pub(super) fn upload<T: DeviceRepr>(&self, what: &str, data: &[T]) -> Result<DeviceArray<T>> {
        self.check_upload(what, data.len())?;
        let array = self.alloc_array(what, data.len())?;
        self.copy_to_array(what, &array, data)?;
        Ok(array)
    }

    /// What every upload refuses: nothing to copy, or a graph capture under way.
    fn check_upload(&self, what: &str, len: usize) -> Result<()> {
        if len == 0 {
            return Err(BackendError::Device(format!("{what}: nothing to upload")));
        }
        if self.capturing.load(Ordering::Relaxed) {
            return Err(BackendError::Device(format!(
                "uploading {what} inside a graph capture"
            )));
        }
        Ok(())
    }

    /// Room for `len` values of `T`, uninitialised, from the buffer cache.
    pub(super) fn alloc_array<T: DeviceRepr>(&self, what: &str, len: usize) -> Result<DeviceArray<T>> {
        let bytes = len.max(1) * size_of::<T>();
        array_in(self.alloc_bytes(what, bytes)?, what, len)
    }

    /// [`CudaBackend::alloc_array`] at its exact size from the driver: the fixed buffers decode
    /// graphs stage their inputs in, which live as long as the graphs.
    pub(super) fn alloc_staging<T: DeviceRepr>(&self, what: &str, len: usize) -> Result<DeviceArray<T>> {
        let bytes = len.max(1) * size_of::<T>();
        array_in(self.alloc_exact(what, bytes)?, what, len)
    }

    /// Copies `src` into the start of `dst`, in stream order: after every kernel queued before
    /// that reads `dst`, before every kernel queued after.
    pub(super) fn copy_to_array<T: DeviceRepr>(
        &self,
        what: &str,
        dst: &DeviceArray<T>,
        src: &[T],
    ) -> Result<()> {
        if src.len() > dst.len() {
            return Err(BackendError::Device(format!(
                "copying {what}: {} values for a buffer of {}",
                src.len(),
                dst.len()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let (ptr, _sync) = dst.bytes().device_ptr(&self.stream);
        // SAFETY: `dst` is a live allocation of at least `src.len()` values of `T`; the copy is
        // queued on the backend's one stream, which orders it against every kernel that uses
        // `dst`; a copy from pageable host memory has read `src` by the time it returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(ptr, src, self.stream.cu_stream()) }
            .map_err(|e| driver_err(&format!("copying {what} to the GPU"), e))
    }

    /// `positions` on the device: the staged copy of a graphed decode step, else the last upload
    /// when they are the same, else an upload through the positions' cache
    /// ([`CudaBackend::upload_unless_same`]).
    pub(super) fn upload_positions(&self, positions: &[u32]) -> Result<Arc<DeviceArray<u32>>> {
        if let Some(staged) = self.staged_positions(positions) {
            return Ok(staged);
        }
        self.upload_unless_same(&self.positions, "positions", positions)
    }

    /// `data` on the device: the copy `last` holds when it holds these values, else `last`'s
    /// buffer overwritten with them when they fit it and no caller still holds it (the copy is
    /// queued after the kernels that read the old values), else a new buffer that replaces it
    /// (the old one is freed in stream order, after the kernels queued to read it). Refused
    /// inside a graph capture, like `upload`.
    pub(super) fn upload_unless_same<T: DeviceRepr + PartialEq + Clone>(
        &self,
        last: &LastUpload<T>,
        what: &str,
        data: &[T],
    ) -> Result<Arc<DeviceArray<T>>> {
        // Inside a capture even the last upload will not do: a later upload overwrites or
        // frees it while the graph still reads it.
        self.check_upload(what, data.len())?;
        let mut slot = last.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((host, dev)) = slot.as_ref()
            && host.as_slice() == data
        {
            return Ok(dev.clone());
        }
        // Taken out, so that a failed copy leaves no stale values behind.
        let reusable = slot.take().and_then(|(_, dev)| Arc::into_inner(dev));
        let array = match reusable.and_then(|array| array.with_len(data.len())) {
            Some(array) => array,
            None => self.alloc_upload_buffer::<T>(what, data.len())?,
        };
        self.copy_to_array(what, &array, data)?;
        let dev = Arc::new(array);
        *slot = Some((data.to_vec(), dev.clone()));
        Ok(dev)
    }

    /// A buffer of its own for an upload cache: room for `len` values of `T`, rounded up to a
    /// power of two (at least 256 bytes) so that slowly growing uploads rarely replace it; from
    /// the driver, and freed to it, never through the buffer cache. (Such a free inside a graph
    /// capture would be recorded into the graph; none happens there, since uploads are refused
    /// inside a capture and only they replace these buffers.)
    fn alloc_upload_buffer<T: DeviceRepr>(&self, what: &str, len: usize) -> Result<DeviceArray<T>> {
        let bytes = (len.max(1) * size_of::<T>()).next_power_of_two().max(256);
        let slice = self.driver_alloc(what, bytes)?;
        self.upload_buffers_allocated.fetch_add(1, Ordering::Relaxed);
        array_in(DeviceBuffer::new(slice, None), what, len)
    }

    /// [`CudaBackend::upload_positions`] from the host's positions, each checked to fit the
    /// kernels' 32-bit index.
    pub(super) fn positions_on_device(
        &self,
        op: &'static str,
        positions: &[usize],
    ) -> Result<Arc<DeviceArray<u32>>> {
        let pos = positions
            .iter()
            .map(|&p| {
                u32::try_from(p)
                    .map_err(|_| crate::backend::shapes::err(op, format!("position {p} is too large")))
            })
            .collect::<Result<Vec<u32>>>()?;
        self.upload_positions(&pos)
    }

    /// Makes the context current on the calling thread. Kernel launches and copies do this
    /// themselves; cuBLAS calls do not, and the backend may be used from another thread than the
    /// one that created it.
    pub(super) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("making the CUDA context current", e))
    }

    /// Waits until all work queued on the backend's stream has finished. Ops never need it
    /// (host reads synchronise by themselves); it is public so that benchmarks can stop a clock
    /// only once the GPU is done, and so that an asynchronous kernel failure can be surfaced at
    /// a chosen point.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("waiting for the GPU (an earlier kernel may have failed)", e))
    }

    pub(crate) fn backend_name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A self-test run that fails its first `failures` calls, counting them all.
    fn runs(failures: usize, calls: &Cell<usize>) -> impl FnMut() -> Result<()> + '_ {
        move || {
            calls.set(calls.get() + 1);
            if calls.get() <= failures {
                Err(BackendError::Device(format!("run {} wrong", calls.get())))
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn a_passing_self_test_keeps_the_tensor_cores() {
        let (calls, turned_off) = (Cell::new(0), Cell::new(false));
        let out = with_flash_fallback(true, runs(0, &calls), || turned_off.set(true));
        assert!(matches!(out, Ok(None)), "{out:?}");
        assert_eq!((calls.get(), turned_off.get()), (1, false));
    }

    #[test]
    fn a_tensor_core_failure_falls_back_and_says_why() {
        let (calls, turned_off) = (Cell::new(0), Cell::new(false));
        let out = with_flash_fallback(true, runs(1, &calls), || turned_off.set(true));
        match out {
            Ok(Some(why)) => assert!(why.contains("run 1 wrong"), "{why}"),
            other => panic!("expected the fallback, got {other:?}"),
        }
        assert_eq!((calls.get(), turned_off.get()), (2, true));
    }

    #[test]
    fn a_failure_with_the_tensor_cores_off_stops_the_start() {
        let (calls, turned_off) = (Cell::new(0), Cell::new(false));
        let out = with_flash_fallback(true, runs(2, &calls), || turned_off.set(true));
        let message = out.expect_err("both runs failed").to_string();
        assert!(
            message.contains("run 1 wrong") && message.contains("with the tensor-core flash kernels off: "),
            "{message}"
        );
        assert!(message.contains("run 2 wrong"), "{message}");
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn without_the_tensor_cores_a_failure_is_not_retried() {
        let (calls, turned_off) = (Cell::new(0), Cell::new(false));
        let out = with_flash_fallback(false, runs(1, &calls), || turned_off.set(true));
        assert!(out.is_err());
        assert_eq!((calls.get(), turned_off.get()), (1, false));
    }
}
