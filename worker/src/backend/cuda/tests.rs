//! Tests of the CUDA backend.
//!
//! - NVRTC: every `.cu` file compiles to PTX for compute_80 and compute_90 and to CUBIN for
//!   sm_80 and sm_90, and exports the kernels the backend loads; compiled images go through the
//!   kernel cache. Needs libnvrtc (see `scripts/fetch-nvrtc.sh`), not a GPU.
//! - GPU: every operation against the `f64` reference backend over seeded random inputs and odd
//!   shapes (batch 1 and larger, sequence lengths that are not multiples of the attention tiles,
//!   padding masks with fully masked rows, causal offsets, grouped-query heads, head dimensions
//!   that are not multiples of 32). Without a GPU each prints `SKIPPED <test>: ...` and returns.
//!
//! Tolerances are stated per test with the reason; fp32 throughout, so they are the CPU backend's.

use std::sync::{Mutex, MutexGuard, OnceLock};

use super::kernel_cache::KernelCache;
use super::kernels::{self, FILES, KernelImage, Origin, Target};
use super::ops::{
    AttentionKernel, MAX_DECODE_SPLITS, POOL_MAX_HIDDEN, decode_splits, grouped_decode_fits, grouped_heads,
};
use super::paged::{ChunkKeys, UNFUSED_MIN_PROMPT, chunk_keys};
use super::{CudaBackend, CudaTensor};
use crate::backend::test_util::{
    AttnCase, AttnInputs, EXACT, PagedCase, PagedInputs, ProjectionInputs, Rng, Tol, assert_close,
    print_skip, sampling_case,
};
use crate::backend::{
    Activation, AttentionMask, Backend, BackendError, CpuTensor, DecodeStep, PagedPlan, PagedSeq, Pooling,
    Precision, ReferenceBackend, Result,
};
use crate::sampling::TokenDraw;

// ---------------------------------------------------------------------------------------------
// NVRTC (no GPU needed)

/// The architectures the kernels must compile for: A100 (8.0) and H100 (9.0).
const ARCHS: [u32; 2] = [80, 90];

fn nvrtc_or_skip(test: &str) -> bool {
    if kernels::nvrtc_available() {
        return true;
    }
    print_skip(
        test,
        "libnvrtc not found; run scripts/fetch-nvrtc.sh and put the folder it prints on LD_LIBRARY_PATH",
    );
    false
}

/// As [`nvrtc_or_skip`], for the tests that read NVRTC's output as PTX or CUBIN: the emulated
/// GPU's stand-in NVRTC (`ATOMIC_EMULATED_GPU`) builds host libraries in their place.
fn real_nvrtc_or_skip(test: &str) -> bool {
    if std::env::var_os("ATOMIC_EMULATED_GPU").is_some() {
        print_skip(
            test,
            "the emulated GPU's NVRTC builds host code, not PTX or CUBIN (CI runs this with the real libnvrtc)",
        );
        return false;
    }
    nvrtc_or_skip(test)
}

/// Compiles every file for `target` in `precision`, each on a thread of its own, all at once,
/// as `CudaBackend::with_kernel_cache` builds them at start-up (NVRTC takes concurrent
/// programs; this is where that is exercised without a GPU).
fn compile_all(target: Target, precision: Precision) -> Vec<KernelImage> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = FILES
            .iter()
            .map(|file| scope.spawn(move || kernels::compile(file, target, precision)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("compile thread")
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    })
}

#[test]
fn every_kernel_file_compiles_to_ptx() {
    if !real_nvrtc_or_skip("every_kernel_file_compiles_to_ptx") {
        return;
    }
    for (arch, precision) in ARCHS.into_iter().flat_map(|a| Precision::ALL.map(|p| (a, p))) {
        for (file, image) in FILES.iter().zip(compile_all(Target::Ptx(arch), precision)) {
            let text = image.ptx_text().expect("PTX is text");
            assert!(
                text.contains(&format!(".target sm_{arch}")),
                "{} ({precision}): PTX not for sm_{arch}",
                file.name
            );
            for f in file.functions {
                assert!(
                    text.contains(&format!(".entry {f}(")),
                    "{} ({precision}): kernel {f} missing from the PTX for compute_{arch}",
                    file.name
                );
            }
        }
    }
}

/// The function names an ELF image's symbol table holds (`.symtab` entries named in its
/// `.strtab`), read with nothing but the ELF64 layout.
fn elf_function_symbols(image: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes([image[o], image[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(image[o..o + 4].try_into().expect("4 bytes")) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(image[o..o + 8].try_into().expect("8 bytes")) as usize;
    assert_eq!(image[4], 2, "ELF64");
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let mut names = Vec::new();
    for i in 0..shnum {
        let sh = section(i);
        const SHT_SYMTAB: usize = 2;
        if u32_at(sh + 4) != SHT_SYMTAB {
            continue;
        }
        let (offset, size, link, entsize) = (
            u64_at(sh + 0x18),
            u64_at(sh + 0x20),
            u32_at(sh + 0x28),
            u64_at(sh + 0x38),
        );
        let strtab = u64_at(section(link) + 0x18);
        for sym in (offset..offset + size).step_by(entsize.max(1)) {
            const STT_FUNC: u8 = 2;
            if image[sym + 4] & 0xf != STT_FUNC {
                continue;
            }
            let start = strtab + u32_at(sym);
            let len = image[start..]
                .iter()
                .position(|&b| b == 0)
                .expect("NUL-terminated name");
            names.push(String::from_utf8_lossy(&image[start..start + len]).into_owned());
        }
    }
    names
}

#[test]
fn every_kernel_file_compiles_to_cubin() {
    if !real_nvrtc_or_skip("every_kernel_file_compiles_to_cubin") {
        return;
    }
    // What the backend loads on an A100 or H100: machine code, no PTX JIT in the driver.
    for (arch, precision) in ARCHS.into_iter().flat_map(|a| Precision::ALL.map(|p| (a, p))) {
        for (file, image) in FILES.iter().zip(compile_all(Target::Cubin(arch), precision)) {
            assert!(
                image.bytes.starts_with(b"\x7fELF"),
                "{}: not an ELF image",
                file.name
            );
            let symbols = elf_function_symbols(&image.bytes);
            for f in file.functions {
                assert!(
                    symbols.iter().any(|s| s == f),
                    "{} ({precision}): kernel {f} missing from the CUBIN for sm_{arch}: {symbols:?}",
                    file.name
                );
            }
        }
    }
}

#[test]
fn this_nvrtc_targets_the_architectures_we_ship_for() {
    if !nvrtc_or_skip("this_nvrtc_targets_the_architectures_we_ship_for") {
        return;
    }
    let supported = kernels::supported_archs().expect("supported architectures");
    for arch in ARCHS {
        assert!(supported.contains(&(arch as i32)), "{arch} not in {supported:?}");
        // So an A100 or H100 gets machine code.
        let (major, minor) = (arch as i32 / 10, arch as i32 % 10);
        assert_eq!(
            Target::for_gpu(major, minor, &supported).expect("target"),
            Target::Cubin(arch)
        );
    }
    let (major, _) = kernels::nvrtc_version().expect("version");
    assert!(major >= 12, "NVRTC {major}");
}

#[test]
fn compiling_through_the_cache_skips_nvrtc_and_survives_damage() {
    if !nvrtc_or_skip("compiling_through_the_cache_skips_nvrtc_and_survives_damage") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("atomic-kernel-cache-nvrtc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = KernelCache::open(&dir).expect("cache");
    let file = FILES.iter().find(|f| f.name == "layout.cu").expect("layout.cu");
    let target = Target::Cubin(90);
    let build = |precision| kernels::compile_cached(file, target, precision, Some(&cache)).expect("compile");

    let (first, origin) = build(Precision::Bf16);
    assert_eq!(origin, Origin::Nvrtc, "an empty cache compiles");
    let (second, origin) = build(Precision::Bf16);
    assert_eq!(
        (origin, &second),
        (Origin::Cache, &first),
        "the second start reads the cache"
    );
    // Another precision is another entry.
    assert_eq!(build(Precision::F16).1, Origin::Nvrtc);
    assert_eq!(build(Precision::F16).1, Origin::Cache);

    // A damaged entry (here every entry of the folder, one byte changed) is compiled again and
    // replaced, never handed on.
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    for path in &entries {
        let mut data = std::fs::read(path).expect("read");
        let middle = data.len() / 2;
        data[middle] ^= 1;
        std::fs::write(path, data).expect("write");
    }
    let (repaired, origin) = build(Precision::Bf16);
    assert_eq!(origin, Origin::Nvrtc);
    assert!(repaired.bytes.starts_with(b"\x7fELF"));
    assert_eq!(build(Precision::Bf16).1, Origin::Cache);

    // Without a cache, always NVRTC.
    assert_eq!(
        kernels::compile_cached(file, target, Precision::Bf16, None)
            .expect("compile")
            .1,
        Origin::Nvrtc
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_target_is_machine_code_when_nvrtc_knows_the_gpu_and_ptx_otherwise() {
    let nvrtc_13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];
    assert_eq!(Target::for_gpu(9, 0, &nvrtc_13).unwrap(), Target::Cubin(90));
    assert_eq!(Target::for_gpu(8, 6, &nvrtc_13).unwrap(), Target::Cubin(86));
    // A GPU newer than NVRTC: PTX of the newest architecture below it, for the driver's JIT.
    let nvrtc_12_4 = [50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90];
    assert_eq!(Target::for_gpu(10, 0, &nvrtc_12_4).unwrap(), Target::Ptx(90));
    assert_eq!(Target::for_gpu(8, 8, &nvrtc_12_4).unwrap(), Target::Ptx(87));
    // Older than everything NVRTC knows: a clear error naming both.
    let err = Target::for_gpu(7, 0, &nvrtc_13).unwrap_err().to_string();
    assert!(err.contains("7.0") && err.contains("7.5, 8.0"), "{err}");
    assert_eq!(Target::Cubin(90).arch(), "sm_90");
    assert_eq!(Target::Ptx(80).arch(), "compute_80");
    // Both forms name the architecture the kernels were built for (the tensor-core kernels
    // are compiled in from 80 on).
    assert_eq!(Target::Cubin(90).arch_number(), 90);
    assert_eq!(Target::Ptx(75).arch_number(), 75);
}

#[test]
fn images_of_the_wrong_shape_are_refused() {
    assert!(KernelImage::new(Target::Cubin(90), b"\x7fELF\x02rest".to_vec()).is_ok());
    assert!(KernelImage::new(Target::Cubin(90), b"//ptx\0".to_vec()).is_err());
    assert!(KernelImage::new(Target::Ptx(90), b".version 8.0\0".to_vec()).is_ok());
    assert!(KernelImage::new(Target::Ptx(90), b".version 8.0".to_vec()).is_err());
    assert!(KernelImage::new(Target::Ptx(90), b".ver\0sion\0".to_vec()).is_err());
    assert!(KernelImage::new(Target::Ptx(90), Vec::new()).is_err());
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    if !nvrtc_or_skip("compile_errors_carry_the_nvrtc_log") {
        return;
    }
    let broken = kernels::KernelFile {
        name: "broken.cu",
        source: "extern \"C\" __global__ void broken(float* out) { out[0] = undeclared_name; }\n",
        functions: &["broken"],
    };
    for target in [Target::Ptx(80), Target::Cubin(90)] {
        let err = kernels::compile(&broken, target, Precision::Bf16)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.cu")
                && err.contains("undeclared_name")
                && err.contains(&target.arch())
                && err.contains("bf16"),
            "{err}"
        );
    }
}

#[test]
fn every_cu_file_is_in_the_kernel_table() {
    // A new .cu file that is not listed would never be compiled, loaded or checked.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/backend/cuda/kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .expect("kernels folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = FILES.iter().map(|f| f.name.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    // And every kernel a file defines is in its list: an unlisted one is never loaded, so the
    // op that launches it fails at run time ("kernel ... was not loaded").
    for file in FILES {
        let mut defined: Vec<&str> = file
            .source
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .filter_map(|rest| rest.split('(').next())
            .collect();
        defined.sort_unstable();
        let mut listed = file.functions.to_vec();
        listed.sort_unstable();
        assert_eq!(defined, listed, "{}: kernels defined vs listed", file.name);
    }
}

/// The arguments of a macro call or a parameter list, given the text after its opening
/// parenthesis: split at the commas outside nested brackets, up to the closing parenthesis.
fn top_level_args(after_paren: &str) -> Vec<&str> {
    let (mut depth, mut start, mut args) = (0usize, 0, Vec::new());
    for (i, ch) in after_paren.char_indices() {
        match ch {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth > 0 => depth -= 1,
            ')' => {
                args.push(&after_paren[start..i]);
                break;
            }
            ',' if depth == 0 => {
                args.push(&after_paren[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    args.into_iter()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

#[test]
fn every_launch_passes_as_many_arguments_as_its_kernel_takes() {
    // Without a GPU nothing else checks the ops' launches against the kernels' signatures (the
    // emulated tests restate the arguments): a missing or extra argument shifts every later one.
    let mut params = std::collections::HashMap::new();
    for file in FILES {
        for rest in file.source.split("extern \"C\" __global__ void ").skip(1) {
            let (name, after) = rest.split_once('(').expect("a parameter list");
            params.insert(name.trim(), top_level_args(after).len());
        }
    }
    let sources = [
        ("ops.rs", include_str!("ops.rs")),
        ("gemv.rs", include_str!("gemv.rs")),
        ("paged.rs", include_str!("paged.rs")),
        ("graph.rs", include_str!("graph.rs")),
    ];
    let mut launched = std::collections::BTreeSet::new();
    for (file, source) in sources {
        // Kernels launched through a local macro whose body launches `$name`.
        let through_macro: Vec<&str> = source
            .split("attn!(\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        for call in source.split("launch!(").skip(1) {
            let args = top_level_args(call);
            assert!(args.len() >= 3, "{file}: a launch without self, name and shape");
            let names = match args[1] {
                "$name" => through_macro.clone(),
                literal => vec![literal.trim_matches('"')],
            };
            assert!(!names.is_empty(), "{file}: a `$name` launch with no attn! call");
            for name in names {
                let want = params
                    .get(name)
                    .unwrap_or_else(|| panic!("{file}: launches {name}, which no .cu file defines"));
                assert_eq!(args.len() - 3, *want, "{file}: arguments of {name}");
                launched.insert(name);
            }
        }
    }
    let mut unlaunched: Vec<&str> = params.keys().copied().filter(|k| !launched.contains(k)).collect();
    unlaunched.sort_unstable();
    assert!(unlaunched.is_empty(), "kernels no op launches: {unlaunched:?}");
}

// ---------------------------------------------------------------------------------------------
// GPU

/// Says why `test` skips without a GPU and returns `None`; under the emulated GPU
/// (`scripts/emulated-gpu.sh` sets `ATOMIC_EMULATED_GPU`) a GPU that does not open fails the test.
fn skip_without_gpu<T>(test: &str, why: &str) -> Option<T> {
    assert!(
        std::env::var_os("ATOMIC_EMULATED_GPU").is_none(),
        "{test}: the emulated GPU did not open: {why}"
    );
    print_skip(test, &format!("no CUDA device ({why})"));
    None
}

/// The GPU backend shared by the tests (kernels compile once), or why there is none. Tests take
/// the lock so that their launches and cuBLAS calls do not interleave on the one stream.
fn gpu(test: &str) -> Option<MutexGuard<'static, CudaBackend>> {
    static GPU: OnceLock<std::result::Result<Mutex<CudaBackend>, String>> = OnceLock::new();
    match GPU.get_or_init(|| CudaBackend::new(0).map(Mutex::new).map_err(|e| e.to_string())) {
        Ok(m) => Some(m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
        Err(e) => skip_without_gpu(test, e),
    }
}

/// A GPU backend storing tensors in `precision` (one per precision, shared like [`gpu`]).
fn gpu_in(test: &str, precision: Precision) -> Option<MutexGuard<'static, CudaBackend>> {
    type Shared = OnceLock<std::result::Result<Mutex<CudaBackend>, String>>;
    static GPUS: [Shared; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = &GPUS[Precision::ALL.iter().position(|&p| p == precision).unwrap_or(0)];
    match slot.get_or_init(|| {
        CudaBackend::with_precision(0, precision)
            .map(Mutex::new)
            .map_err(|e| e.to_string())
    }) {
        Ok(m) => Some(m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
        Err(e) => skip_without_gpu(test, e),
    }
}

/// CUDA's rule for synchronous calls during a stream capture, which the decode graphs rely on
/// (they capture in thread-local mode) and which the emulated GPU enforces: while a thread-local
/// capture is under way, a synchronous allocation or a context synchronisation on the thread
/// that began it fails and invalidates the capture, and a synchronous allocation and free on
/// another thread do not touch it. On a GPU this checks the rule the emulated GPU was written
/// to.
#[test]
fn gpu_a_thread_local_capture_forbids_synchronous_calls_on_its_thread_only() {
    use cudarc::driver::result::{self, stream::StreamKind};
    use cudarc::driver::sys::CUstreamCaptureMode;
    let test = "gpu_a_thread_local_capture_forbids_synchronous_calls_on_its_thread_only";
    // Every shared backend held, so that no other test opens one, or synchronises, while a
    // capture is under way (a context synchronisation from any thread would break it).
    let Some(_gpu) = gpu(test) else {
        return;
    };
    let _all: Vec<_> = Precision::ALL.iter().filter_map(|&p| gpu_in(test, p)).collect();
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    ctx.bind_to_thread().unwrap();
    let stream = result::stream::create(StreamKind::NonBlocking).unwrap();
    let capture = || {
        // SAFETY: a live stream of the bound context.
        unsafe {
            result::stream::begin_capture(stream, CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        }
        .unwrap();
    };
    // SAFETY (both): a live stream of the bound context, whose capture this test began.
    let end = || unsafe { result::stream::end_capture(stream) };
    let forget = |graph: cudarc::driver::sys::CUgraph| {
        if !graph.is_null() {
            // SAFETY: a graph the capture just made, used nowhere else.
            unsafe { result::graph::destroy(graph) }.unwrap();
        }
    };

    // Another thread allocates and frees freely.
    capture();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ctx.bind_to_thread().unwrap();
                // SAFETY: 256 bytes from the driver, freed at once.
                let ptr =
                    unsafe { result::malloc_sync(256) }.expect("a synchronous allocation on another thread");
                unsafe { result::free_sync(ptr) }.expect("a synchronous free on another thread");
            })
            .join()
            .unwrap();
    });
    forget(end().expect("the capture after another thread's synchronous calls"));

    // This thread may not: each call fails and ends the capture in failure.
    type Call<'a> = &'a dyn Fn() -> std::result::Result<(), cudarc::driver::DriverError>;
    // SAFETY: no memory is used; what a success allocates is freed.
    let allocate: Call =
        &|| unsafe { result::malloc_sync(256).map(|ptr| result::free_sync(ptr).unwrap_or(())) };
    let synchronise: Call = &|| ctx.synchronize();
    for (what, call) in [
        ("a synchronous allocation", allocate),
        ("a context synchronisation", synchronise),
    ] {
        capture();
        assert!(call().is_err(), "{what} inside this thread's capture succeeded");
        match end() {
            Ok(graph) => {
                forget(graph);
                panic!("the capture survived {what} on its thread");
            }
            Err(e) => assert_eq!(
                e.0,
                cudarc::driver::sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                "ending the capture after {what}"
            ),
        }
    }
    // SAFETY: the stream is idle and used nowhere else.
    unsafe { result::stream::destroy(stream) }.unwrap();
}

#[test]
fn decode_splits_fill_the_gpu_from_the_launch_shape_alone() {
    // 132 multiprocessors (an H100): batch 1 of 32 heads splits 9 ways (288 blocks >= 264);
    // batch 32 fills the GPU unsplit; never more than the maximum.
    assert_eq!(decode_splits(132, 32, 1), 9);
    assert_eq!(decode_splits(132, 32, 4), 3);
    assert_eq!(decode_splits(132, 32, 32), 1);
    assert_eq!(decode_splits(132, 1, 1), MAX_DECODE_SPLITS);
    assert_eq!(
        decode_splits(1, 0, 0),
        2,
        "degenerate shapes still give a valid count"
    );
    for (heads, seqs) in [(1, 1), (12, 3), (32, 8), (64, 64)] {
        let s = decode_splits(108, heads, seqs);
        assert!((1..=MAX_DECODE_SPLITS).contains(&s));
        assert!(
            s == MAX_DECODE_SPLITS || s * heads * seqs >= 216,
            "{heads} x {seqs}: {s}"
        );
    }
}

#[test]
fn grouped_decode_tiles_a_key_heads_query_heads_evenly() {
    // (heads, kv_heads) -> (heads per block, tiles): at most four heads a block, tiles even.
    for ((heads, kv_heads), want) in [
        ((32, 4), (4, 2)), // TinyLlama: 8 per key head, two tiles of 4
        ((32, 8), (4, 1)), // Llama 3 8B
        ((12, 4), (3, 1)),
        ((6, 1), (3, 2)),
        ((7, 1), (4, 2)),   // 4 + 3
        ((12, 12), (1, 1)), // multi-head: one head a block
        ((64, 1), (4, 16)),
    ] {
        assert_eq!(grouped_heads(heads, kv_heads), want, "{heads} over {kv_heads}");
        let (per_block, tiles) = want;
        let group = heads / kv_heads;
        assert!(per_block <= 4 && per_block * tiles >= group && per_block * (tiles - 1) < group);
    }
    for d in [8, 16, 32, 64, 128, 256] {
        assert!(grouped_decode_fits(d), "{d}");
    }
    for d in [0, 4, 24, 48, 80, 96, 512] {
        assert!(!grouped_decode_fits(d), "{d}");
    }
}

#[test]
fn a_prompt_chunk_reads_the_keys_its_queries_see() {
    // A prompt of 10 after 30 cached keys; queries 4..8 sit at positions 34..38.
    let all = chunk_keys(10, 40, (4, 4), None);
    assert_eq!(
        all,
        ChunkKeys {
            first: 0,
            count: 38,
            causal_offset: 34
        }
    );
    // A window of 8: position 34 sees 27..=34, so keys 27 .. 38.
    let windowed = chunk_keys(10, 40, (4, 4), Some(8));
    assert_eq!(
        windowed,
        ChunkKeys {
            first: 27,
            count: 11,
            causal_offset: 7
        }
    );
    // A window wider than the history starts at key 0, as without one.
    assert_eq!(chunk_keys(10, 40, (4, 4), Some(100)), all);
    // A fresh prompt's first chunk.
    assert_eq!(
        chunk_keys(5, 5, (0, 5), Some(3)),
        ChunkKeys {
            first: 0,
            count: 5,
            causal_offset: 0
        }
    );
    // Every query of a chunk sees exactly its window inside the chunk's keys.
    for (q_len, k_len, first, count, w) in [(10, 40, 4, 4, 8), (13, 13, 5, 5, 7), (6, 40, 0, 6, 1)] {
        let c = chunk_keys(q_len, k_len, (first, count), Some(w));
        for i in 0..count {
            let pos = k_len - q_len + first + i;
            let (lo, hi) = ((pos + 1).saturating_sub(w), pos + 1); // absolute, as the paged kernels
            let end = c.causal_offset + i + 1;
            let begin = end.saturating_sub(w);
            assert_eq!(
                (c.first + begin, c.first + end),
                (lo, hi),
                "query {i} of {q_len}/{k_len}"
            );
            assert!(c.first + c.count <= k_len);
        }
    }
}

#[test]
fn new_reports_a_missing_gpu_as_an_error() {
    // On any machine: either GPU 0 opens, or the failure is a Device error with a reason; and
    // an ordinal past the last GPU is always an error, never a panic.
    match CudaBackend::new(0) {
        Ok(b) => assert_eq!(b.name(), "cuda:0"),
        Err(e) => assert!(matches!(e, BackendError::Device(ref m) if !m.is_empty()), "{e}"),
    }
    let err = CudaBackend::new(10_000).map(|_| ()).unwrap_err();
    assert!(matches!(err, BackendError::Device(_)), "{err}");
}

#[test]
fn a_second_start_reads_every_kernel_from_the_cache() {
    let Some(_shared) = gpu("a_second_start_reads_every_kernel_from_the_cache") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("atomic-kernel-cache-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let open = || CudaBackend::with_kernel_cache(0, Precision::Bf16, Some(&dir)).expect("open cuda:0");
    let x: Vec<f32> = (0..96).map(|i| (i as f32 - 48.0) / 16.0).collect();
    let gelu = |b: &CudaBackend| {
        let t = b.from_host(&x, &[3, 32]).expect("upload");
        b.to_host(&b.gelu(&t).expect("gelu")).expect("download")
    };
    let first = open();
    let build = first.kernel_build().clone();
    let compiled_seconds = build.seconds;
    assert_eq!((build.from_cache, build.compiled), (0, FILES.len()), "{build:?}");
    assert!(
        build.target.starts_with("CUBIN"),
        "an H100/H200 gets machine code: {build:?}"
    );
    let expected = gelu(&first);
    drop(first);
    let second = open();
    let build = second.kernel_build().clone();
    assert_eq!((build.from_cache, build.compiled), (FILES.len(), 0), "{build:?}");
    assert_eq!(
        gelu(&second),
        expected,
        "the cached kernels compute what the compiled ones did"
    );
    eprintln!(
        "kernel build: compiled in {compiled_seconds:.3} s, from the cache in {:.3} s",
        build.seconds
    );
    let _ = std::fs::remove_dir_all(&dir);
}

type Inputs<'a> = &'a [(&'a [f32], &'a [usize])];

/// Uploads the inputs to `b`, runs `op` and brings back the output's shape and values.
fn run<B: Backend>(
    b: &B,
    inputs: Inputs<'_>,
    op: impl Fn(&B, &[B::Tensor]) -> Result<B::Tensor>,
) -> (Vec<usize>, Vec<f32>) {
    let ts: Vec<B::Tensor> = inputs
        .iter()
        .map(|(d, s)| b.from_host(d, s).expect("input"))
        .collect();
    let out = op(b, &ts).unwrap_or_else(|e| panic!("{}: {e}", b.name()));
    (b.shape(&out).to_vec(), b.to_host(&out).expect("to_host"))
}

/// Runs the same expression on the reference backend and on the GPU and compares the results.
/// (A macro because the closure must be instantiated for two tensor types.)
macro_rules! compare {
    ($gpu:expr, $what:expr, $tol:expr, $inputs:expr, |$be:ident, $t:ident| $body:expr) => {{
        let (want_shape, want) = run(&ReferenceBackend, $inputs, |$be, $t: &[CpuTensor]| $body);
        let (shape, got) = run(&*$gpu, $inputs, |$be, $t: &[CudaTensor]| $body);
        assert_eq!(shape, want_shape, "{}: shape", $what);
        assert_close(&$what, &got, &want, $tol);
    }};
}

#[test]
fn gpu_linear_and_matmul_match_reference() {
    let Some(g) = gpu("gpu_linear_and_matmul_match_reference") else {
        return;
    };
    // fp32 products of up to k = 384 terms against f64: ~1e-6 relative per term, cuBLAS may sum
    // in another order than the CPU; as the CPU backend's tests.
    let tol = Tol {
        atol: 1e-4,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(101);
    for &(n, k, m) in &[
        (1, 1, 1),
        (3, 17, 5),
        (17, 384, 65),
        (65, 384, 1536),
        (5, 64, 3),
        (1, 768, 2304),
    ] {
        let (x, w, b) = (rng.vec(n * k, 1.0), rng.vec(m * k, 1.0), rng.vec(m, 1.0));
        let inputs: Inputs<'_> = &[(&x, &[n, k]), (&w, &[m, k]), (&b, &[m])];
        compare!(g, format!("linear {n}x{k}x{m} +bias"), tol, inputs, |be, t| be
            .linear(&t[0], &t[1], Some(&t[2])));
        compare!(g, format!("linear {n}x{k}x{m}"), tol, inputs, |be, t| be
            .linear(&t[0], &t[1], None));
    }
    let (x, w) = (rng.vec(2 * 3 * 17, 1.0), rng.vec(5 * 17, 1.0));
    compare!(
        g,
        "linear rank 3",
        tol,
        &[(&x, &[2, 3, 17]), (&w, &[5, 17])],
        |be, t| be.linear(&t[0], &t[1], None)
    );
    for &(b, n, k, m) in &[
        (1, 1, 1, 1),
        (5, 3, 17, 65),
        (1, 65, 384, 17),
        (5, 128, 32, 128),
        (3, 17, 1, 9),
    ] {
        let (x, y) = (rng.vec(b * n * k, 1.0), rng.vec(b * k * m, 1.0));
        compare!(
            g,
            format!("matmul {b}x{n}x{k}x{m}"),
            tol,
            &[(&x, &[b, n, k]), (&y, &[b, k, m])],
            |be, t| be.matmul(&t[0], &t[1])
        );
    }
    let (x, y) = (rng.vec(17 * 9, 1.0), rng.vec(9 * 4, 1.0));
    compare!(
        g,
        "matmul rank 2",
        tol,
        &[(&x, &[17, 9]), (&y, &[9, 4])],
        |be, t| be.matmul(&t[0], &t[1])
    );
}

/// The reference backend's separate activation op that a fused epilogue must equal.
type RefActivation = fn(&ReferenceBackend, &CpuTensor) -> Result<CpuTensor>;

#[test]
fn gpu_fused_linear_activation_matches_reference() {
    let Some(g) = gpu("gpu_fused_linear_activation_matches_reference") else {
        return;
    };
    // The product's tolerance (above); the activations add ~2 ulp.
    let tol = Tol {
        atol: 1e-4,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(102);
    let (n, k, m) = (33, 96, 130);
    let (x, w, b) = (rng.vec(n * k, 1.0), rng.vec(m * k, 0.3), rng.vec(m, 1.0));
    let want_of = |act: RefActivation| {
        run(
            &ReferenceBackend,
            &[(&x, &[n, k]), (&w, &[m, k]), (&b, &[m])],
            |be, t| act(be, &be.linear(&t[0], &t[1], Some(&t[2]))?),
        )
        .1
    };
    let cases: [(Activation, RefActivation); 3] = [
        (Activation::Gelu, |be, t| be.gelu(t)),
        (Activation::GeluTanh, |be, t| be.gelu_tanh(t)),
        (Activation::Silu, |be, t| {
            be.silu_mul(t, &be.from_host(&vec![1.0; t.data().len()], t.shape())?)
        }),
    ];
    for (act, reference) in cases {
        let (_, got) = run(&*g, &[(&x, &[n, k]), (&w, &[m, k]), (&b, &[m])], |be, t| {
            be.linear_act(&t[0], &t[1], Some(&t[2]), act)
        });
        assert_close(&format!("linear_act {act:?}"), &got, &want_of(reference), tol);
    }
    // SwiGLU on a fused gate/up row: against the reference's composition (split + silu_mul).
    let elementwise = Tol {
        atol: 2e-6,
        rtol: 1e-5,
    };
    for &(rows, half) in &[(1, 1), (3, 17), (33, 4096)] {
        let x = rng.vec(rows * 2 * half, 4.0);
        compare!(
            g,
            format!("swiglu [{rows}, {}]", 2 * half),
            elementwise,
            &[(&x, &[rows, 2 * half])],
            |be, t| be.swiglu(&t[0])
        );
    }
}

#[test]
fn gpu_folded_projections_match_their_compositions() {
    let Some(g) = gpu("gpu_folded_projections_match_their_compositions") else {
        return;
    };
    // The norm before the product, the bias, an activation, SwiGLU and the residual add after
    // it, through the
    // matrix-vector kernel (up to four rows, k a multiple of 8) and through cuBLAS (the kernel
    // switched off, five rows, or k = 17), each against the reference's composition. The
    // product's fp32 tolerance (k up to 2056 terms).
    let tol = Tol {
        atol: 2e-4,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(103);
    for gemv in [true, false] {
        g.set_gemv(gemv);
        for &(rows, k, m) in &[
            (1, 8, 3),
            (1, 2056, 37),
            (2, 264, 130),
            (3, 17, 5),
            (4, 512, 1),
            (5, 96, 33),
        ] {
            let projection = ProjectionInputs::new(&mut rng, rows, k, m);
            let inputs: Inputs<'_> = &projection.inputs();
            let (residual, residual_shape) = inputs[4];
            let what = |op: &str| format!("{op} {rows}x{k}x{m} (gemv {gemv})");
            compare!(g, what("linear +bias"), tol, inputs, |be, t| be.linear(
                &t[0],
                &t[2],
                Some(&t[3])
            ));
            for act in [Activation::Gelu, Activation::GeluTanh, Activation::Silu] {
                compare!(
                    g,
                    what(&format!("linear_act {act:?} +bias")),
                    tol,
                    inputs,
                    |be, t| be.linear_act(&t[0], &t[2], Some(&t[3]), act)
                );
            }
            compare!(g, what("rms_norm_linear"), tol, inputs, |be, t| be
                .rms_norm_linear(&t[0], &t[1], 1e-6, &t[2], Some(&t[3])));
            compare!(g, what("rms_norm_swiglu"), tol, inputs, |be, t| be
                .rms_norm_swiglu(&t[0], &t[1], 1e-6, &t[5]));
            compare!(g, what("linear_add +bias"), tol, inputs, |be, t| be.linear_add(
                &t[0],
                &t[2],
                Some(&t[3]),
                be.from_host(residual, residual_shape)?
            ));
            compare!(g, what("linear_add"), tol, inputs, |be, t| be.linear_add(
                &t[0],
                &t[2],
                None,
                be.from_host(residual, residual_shape)?
            ));
        }
    }
    g.set_gemv(true);
    let (x, w) = (g.zeros(&[2, 8]).unwrap(), g.zeros(&[3, 8]).unwrap());
    assert!(
        g.linear_add(&x, &w, None, g.zeros(&[2, 4]).unwrap()).is_err(),
        "a residual of another shape is an error"
    );
    let odd = g.zeros(&[3, 8]).unwrap();
    assert!(
        g.rms_norm_swiglu(&x, &g.zeros(&[8]).unwrap(), 1e-6, &odd)
            .is_err(),
        "a gate/up weight of odd height has no halves"
    );
}

#[test]
fn gpu_elementwise_ops_match_reference() {
    let Some(g) = gpu("gpu_elementwise_ops_match_reference") else {
        return;
    };
    // erff, tanhf and expf are within 2 ulp; as the CPU backend's tests.
    let tol = Tol {
        atol: 2e-6,
        rtol: 1e-5,
    };
    let mut rng = Rng::new(103);
    for &shape in &[&[1usize][..], &[3, 17], &[65, 1536], &[5, 7, 9], &[1 << 20]] {
        let n = shape.iter().product();
        let (a, b) = (rng.vec(n, 6.0), rng.vec(n, 6.0));
        let one: Inputs<'_> = &[(&a, shape)];
        let two: Inputs<'_> = &[(&a, shape), (&b, shape)];
        compare!(g, format!("add {shape:?}"), tol, two, |be, t| be
            .add(&t[0], &t[1]));
        compare!(g, format!("silu_mul {shape:?}"), tol, two, |be, t| be
            .silu_mul(&t[0], &t[1]));
        compare!(g, format!("gelu {shape:?}"), tol, one, |be, t| be.gelu(&t[0]));
        compare!(g, format!("gelu_tanh {shape:?}"), tol, one, |be, t| be
            .gelu_tanh(&t[0]));
    }
}

/// Buffers that ops drop are handed to later ops (`backend::buffer_cache`): a dropped output's
/// memory serves the next output of its size class, at once and without a synchronisation (the
/// kernels queued before the drop still read it first: stream order), and a limit of 0 keeps
/// nothing. Every result is checked on the host, so a buffer reused too early shows up as a
/// wrong value.
/// An upload cache (`LastUpload`: positions, padding masks, pointer tables) keeps its values in
/// a buffer of its own: the same values again are the same copy; new values that fit overwrite
/// that buffer only when no caller still holds it (a held copy keeps its values); values that do
/// not fit get a new buffer, which counts as a driver request.
#[test]
fn gpu_an_upload_cache_overwrites_its_buffer_only_when_nothing_holds_it() {
    use super::context::LastUpload;
    use cudarc::driver::DevicePtr;
    use std::sync::Arc;
    let Some(g) = gpu("gpu_an_upload_cache_overwrites_its_buffer_only_when_nothing_holds_it") else {
        return;
    };
    let last = LastUpload::<u32>::new();
    let addr = |a: &super::tensor::DeviceArray<u32>| a.bytes().device_ptr(&g.stream).0;
    let read = |a: &super::tensor::DeviceArray<u32>| g.stream.clone_dtoh(&a.view().unwrap()).unwrap();

    let first = g.upload_unless_same(&last, "values", &[1, 2, 3]).unwrap();
    let again = g.upload_unless_same(&last, "values", &[1, 2, 3]).unwrap();
    assert!(Arc::ptr_eq(&first, &again), "the same values were uploaded again");
    drop(again);
    let missed = g.buffer_stats().missed;
    // `first` is still held: new values go to another buffer, and `first` keeps its own.
    let second = g.upload_unless_same(&last, "values", &[4, 5, 6]).unwrap();
    assert_ne!(addr(&second), addr(&first), "a held upload was overwritten");
    assert_eq!(read(&first), [1, 2, 3]);
    assert_eq!(read(&second), [4, 5, 6]);
    assert_eq!(
        g.buffer_stats().missed,
        missed + 1,
        "the new buffer is a driver request"
    );
    drop(first);
    // Nothing but the cache holds `second`'s buffer once the caller drops it: it is overwritten.
    let second_addr = addr(&second);
    drop(second);
    let third = g.upload_unless_same(&last, "values", &[7, 8]).unwrap();
    assert_eq!(addr(&third), second_addr, "a free upload buffer was not reused");
    assert_eq!(third.len(), 2);
    assert_eq!(read(&third), [7, 8]);
    assert_eq!(
        g.buffer_stats().missed,
        missed + 1,
        "an overwrite asked the driver"
    );
    drop(third);
    // 100 values do not fit the 256-byte buffer: a new one.
    let long: Vec<u32> = (0..100).collect();
    let fourth = g.upload_unless_same(&last, "values", &long).unwrap();
    assert_eq!(read(&fourth), long);
    assert_eq!(g.buffer_stats().missed, missed + 2);
}

#[test]
fn gpu_dropped_outputs_are_reused_in_stream_order() {
    use cudarc::driver::DevicePtr;
    let Some(g) = gpu("gpu_dropped_outputs_are_reused_in_stream_order") else {
        return;
    };
    let addr = |t: &CudaTensor| t.buf.device_ptr(&g.stream).0;
    let n = 1 << 22;
    let data = Rng::new(107).vec(n, 3.0);
    let x = g.from_host(&data, &[n]).unwrap();
    let doubled: Vec<f32> = data.iter().map(|v| v + v).collect();

    let first = g.add(&x, &x).unwrap();
    let first_addr = addr(&first);
    drop(first);
    let before = g.buffer_stats();
    let second = g.add(&x, &x).unwrap();
    let after = g.buffer_stats();
    assert_eq!(
        addr(&second),
        first_addr,
        "the dropped output's buffer was not reused"
    );
    assert_eq!((after.reused, after.missed), (before.reused + 1, before.missed));
    assert_eq!(g.to_host(&second).unwrap(), doubled);

    // `sum` reads `gelu` after `gelu` is dropped and its buffer rewritten by `third`: all are
    // queued before any finishes, so only stream order keeps `sum` right.
    let gelu = g.gelu(&x).unwrap();
    let sum = g.add(&gelu, &x).unwrap();
    let gelu_addr = addr(&gelu);
    drop(gelu);
    let third = g.add(&x, &x).unwrap();
    assert_eq!(addr(&third), gelu_addr, "the dropped gelu buffer was not reused");
    let want_sum = ReferenceBackend
        .add(
            &ReferenceBackend
                .gelu(&CpuTensor::new(data.clone(), vec![n]))
                .unwrap(),
            &CpuTensor::new(data.clone(), vec![n]),
        )
        .unwrap();
    assert_close(
        "gelu + x read before its buffer was reused",
        &g.to_host(&sum).unwrap(),
        want_sum.data(),
        Tol {
            atol: 2e-6,
            rtol: 1e-5,
        },
    );
    assert_eq!(g.to_host(&third).unwrap(), doubled);
    drop((second, third, sum));

    g.set_buffer_cache_limit(0);
    let before = g.buffer_stats();
    let off = g.add(&x, &x).unwrap();
    let after = g.buffer_stats();
    assert_eq!(after.reused, before.reused, "a limit of 0 kept a buffer");
    assert_eq!(after.idle_bytes, 0);
    assert_eq!(g.to_host(&off).unwrap(), doubled);
    g.set_buffer_cache_limit(crate::backend::buffer_cache::DEFAULT_LIMIT_BYTES);
}

/// A decode-graph capture that the driver invalidates (a copy to host memory inside it), with a
/// buffer then freed inside the invalidated capture, falls back to the plain step: the tokens
/// are the plain step's, that batch size is not graphed, and the stream works afterwards. (A
/// free failing inside the capture leaves an error that cudarc hands to the next call; were it
/// handed to `end_capture`, the capture would never end and every later op would fail.)
#[test]
fn gpu_a_failed_capture_falls_back_and_leaves_the_stream_usable() {
    let test = "gpu_a_failed_capture_falls_back_and_leaves_the_stream_usable";
    // A backend of its own: graphs stay on for the rest of a backend's life.
    let g = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            skip_without_gpu::<()>(test, &e.to_string());
            return;
        }
    };
    g.enable_decode_graphs(4);
    let seq = |k_len, block| PagedSeq {
        q_len: 1,
        k_len,
        blocks: vec![block],
    };
    let plan = PagedPlan {
        block_size: 4,
        window: None,
        seqs: vec![seq(3, 0), seq(2, 1)],
    };
    let _staged = g.prepare_paged(&plan).unwrap();
    let rows = [0.1, 0.9, 0.3, 0.2, 0.5, 0.1, 0.7, 0.0];
    let logits = g.from_host(&rows, &[2, 4]).unwrap();
    let mut calls = 0;
    let mut forward = || -> crate::Result<CudaTensor> {
        calls += 1;
        let out = g.add(&logits, &logits)?;
        if calls == 1 {
            let _ = g.to_host(&out);
            return Err(BackendError::Device("a planted failure inside the capture".into()).into());
        }
        Ok(out)
    };
    let step = DecodeStep { key: 7, ids: &[3, 5] };
    let tokens = g
        .forward_and_sample(Some(step), &[TokenDraw::GREEDY; 2], &mut forward)
        .unwrap();
    assert_eq!(calls, 2, "the step ran once in the capture and once plainly");
    assert_eq!(tokens, vec![1, 2], "the plain step's greedy tokens");
    assert!(
        g.decode_graph_batches().is_empty(),
        "the failed batch size was recorded"
    );
    let doubled: Vec<f32> = rows.iter().map(|v| v + v).collect();
    assert_eq!(g.to_host(&g.add(&logits, &logits).unwrap()).unwrap(), doubled);
}

#[test]
fn gpu_norms_match_reference() {
    let Some(g) = gpu("gpu_norms_match_reference") else {
        return;
    };
    // Row statistics reduced in fp32 over up to 4096 values (block tree order): ~1e-6 relative
    // on normalised outputs of order 1.
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-5,
    };
    let mut rng = Rng::new(104);
    for &rows in &[1, 3, 17, 65] {
        for &d in &[1, 8, 33, 384, 768, 4096] {
            let (x, r) = (rng.vec(rows * d, 3.0), rng.vec(rows * d, 3.0));
            let (gm, b) = (rng.vec(d, 2.0), rng.vec(d, 1.0));
            let inputs: Inputs<'_> = &[(&x, &[rows, d]), (&r, &[rows, d]), (&gm, &[d]), (&b, &[d])];
            let what = format!("[{rows}, {d}]");
            compare!(g, format!("layer_norm {what}"), tol, inputs, |be, t| be
                .layer_norm(&t[0], &t[2], &t[3], 1e-12));
            compare!(g, format!("add_layer_norm {what}"), tol, inputs, |be, t| be
                .add_layer_norm(&t[0], &t[1], &t[2], &t[3], 1e-5));
            compare!(g, format!("rms_norm {what}"), tol, inputs, |be, t| be
                .rms_norm(&t[0], &t[2], 1e-6));
        }
    }
    // The output projection folded in front, its bias added inside the norm's pass (BERT): a
    // product over k = 96 terms first, so the matrix products' 1e-4.
    let product_tol = Tol {
        atol: 1e-4,
        rtol: 1e-4,
    };
    for &(rows, k, d) in &[(1, 96, 8), (3, 96, 384), (65, 96, 768)] {
        let (x, w, bias, r) = (
            rng.vec(rows * k, 1.0),
            rng.vec(d * k, 0.2),
            rng.vec(d, 1.0),
            rng.vec(rows * d, 3.0),
        );
        let (gm, b) = (rng.vec(d, 2.0), rng.vec(d, 1.0));
        let inputs: Inputs<'_> = &[
            (&x, &[rows, k]),
            (&w, &[d, k]),
            (&bias, &[d]),
            (&r, &[rows, d]),
            (&gm, &[d]),
            (&b, &[d]),
        ];
        compare!(
            g,
            format!("linear_add_layer_norm [{rows}, {k}] -> {d}"),
            product_tol,
            inputs,
            |be, t| be.linear_add_layer_norm(&t[0], &t[1], Some(&t[2]), &t[3], (&t[4], &t[5]), 1e-5)
        );
        compare!(
            g,
            format!("linear_add_layer_norm [{rows}, {k}] -> {d}, no bias"),
            product_tol,
            inputs,
            |be, t| be.linear_add_layer_norm(&t[0], &t[1], None, &t[3], (&t[4], &t[5]), 1e-5)
        );
    }
}

#[test]
fn gpu_softmax_matches_reference_and_masks() {
    let Some(g) = gpu("gpu_softmax_matches_reference_and_masks") else {
        return;
    };
    // expf within 2 ulp, sums of up to 32000 terms in fp32.
    let tol = Tol {
        atol: 1e-6,
        rtol: 1e-5,
    };
    let mut rng = Rng::new(105);
    for &(rows, d) in &[(1, 1), (3, 17), (65, 128), (17, 1000), (2, 32000)] {
        let mut x = rng.vec(rows * d, 20.0);
        for _ in 0..rows * d / 4 {
            x[rng.below(rows * d)] = f32::NEG_INFINITY;
        }
        compare!(
            g,
            format!("softmax [{rows}, {d}]"),
            tol,
            &[(&x, &[rows, d])],
            |be, t| be.softmax_rows(&t[0])
        );
    }
    let inf = f32::NEG_INFINITY;
    let (_, out) = run(
        &*g,
        &[(&[inf, inf, inf, 0.0, 1000.0, -1000.0], &[2, 3])],
        |be, t| be.softmax_rows(&t[0]),
    );
    assert_eq!(
        out,
        vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "a fully masked row gives zeros"
    );
}

#[test]
fn gpu_embedding_and_split_copy_exactly() {
    let Some(g) = gpu("gpu_embedding_and_split_copy_exactly") else {
        return;
    };
    let mut rng = Rng::new(106);
    let table = rng.vec(50 * 33, 1.0);
    let ids: Vec<u32> = (0..1500).map(|_| rng.below(50) as u32).collect();
    compare!(g, "embedding", EXACT, &[(&table, &[50, 33])], |be, t| be
        .embedding(&ids, &t[0]));
    let t = g.from_host(&table, &[50, 33]).unwrap();
    let err = g.embedding(&[3, 50], &t).unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::OutOfRange {
                index: 50,
                len: 50,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(g.shape(&g.embedding(&[], &t).unwrap()), &[0, 33]);

    // Gather plus learned positions in one pass equals gather + gather + add.
    let pos_table = rng.vec(40 * 33, 1.0);
    let positions: Vec<usize> = (0..ids.len()).map(|i| i % 40).collect();
    let pos_ids: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let (_, want) = run(
        &ReferenceBackend,
        &[(&table, &[50, 33]), (&pos_table, &[40, 33])],
        |be, t| be.add(&be.embedding(&ids, &t[0])?, &be.embedding(&pos_ids, &t[1])?),
    );
    let (_, got) = run(&*g, &[(&table, &[50, 33]), (&pos_table, &[40, 33])], |be, t| {
        be.embedding_add(&ids, &t[0], &positions, &t[1])
    });
    assert_close("embedding_add", &got, &want, EXACT);

    let x = rng.vec(3 * 5 * 37, 1.0);
    for (i, w) in [[10usize, 20, 7], [37, 0, 0], [1, 35, 1]].iter().enumerate() {
        let (_, got) = run(&*g, &[(&x, &[3, 5, 37])], |be, t| {
            let parts = be.split_last(&t[0], w)?;
            let host: Vec<f32> = parts.iter().flat_map(|p| be.to_host(p).unwrap()).collect();
            be.from_host(&host, &[host.len()])
        });
        let (_, want) = run(&ReferenceBackend, &[(&x, &[3, 5, 37])], |be, t| {
            let parts = be.split_last(&t[0], w)?;
            let host: Vec<f32> = parts.iter().flat_map(|p| be.to_host(p).unwrap()).collect();
            be.from_host(&host, &[host.len()])
        });
        assert_close(&format!("split_last case {i}"), &got, &want, EXACT);
    }
    let r = g
        .reshape(g.from_host(&x, &[3, 5, 37]).unwrap(), &[15, 37])
        .unwrap();
    assert_eq!(g.shape(&r), &[15, 37]);
    assert_eq!(g.to_host(&r).unwrap(), x);

    // The benchmark's device-to-device copy: same shape and bits, empty tensors included.
    let c = g.copy(&r).unwrap();
    g.synchronize().unwrap();
    assert_eq!(g.shape(&c), &[15, 37]);
    assert_eq!(g.to_host(&c).unwrap(), x);
    let empty = g.copy(&g.from_host(&[], &[0, 4]).unwrap()).unwrap();
    assert_eq!(g.shape(&empty), &[0, 4]);
    assert!(g.to_host(&empty).unwrap().is_empty());
}

#[test]
fn gpu_rope_matches_reference() {
    let Some(g) = gpu("gpu_rope_matches_reference") else {
        return;
    };
    // Angles, sines and cosines in double as the reference; only the final fp32 products differ.
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-5,
    };
    let mut rng = Rng::new(107);
    for &(t, h, d, theta) in &[
        (1, 1, 8, 10_000.0),
        (17, 12, 32, 10_000.0),
        (65, 9, 64, 1_000_000.0),
        (3, 2, 2, 500.0),
        (5, 32, 128, 500_000.0),
    ] {
        let x = rng.vec(t * h * d, 2.0);
        let positions: Vec<usize> = (0..t).map(|_| rng.below(131_072)).collect();
        compare!(
            g,
            format!("rope [{t}, {h}, {d}]"),
            tol,
            &[(&x, &[t, h, d])],
            |be, ts| be.rope(&ts[0], &positions, theta)
        );
    }
}

#[test]
fn gpu_split_qkv_rope_matches_split_and_rope() {
    let Some(g) = gpu("gpu_split_qkv_rope_matches_split_and_rope") else {
        return;
    };
    // The fused kernel against the reference's split + rope (angles in double on both sides).
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-5,
    };
    let mut rng = Rng::new(110);
    for &(t, heads, kv_heads, d) in &[(1, 1, 1, 2), (17, 12, 4, 64), (5, 32, 8, 128), (3, 9, 3, 80)] {
        let qkv = rng.vec(t * (heads + 2 * kv_heads) * d, 2.0);
        let positions: Vec<usize> = (0..t).map(|_| rng.below(131_072)).collect();
        let inputs: Inputs<'_> = &[(&qkv, &[t, (heads + 2 * kv_heads) * d])];
        let what = format!("split_qkv_rope [{t}, {heads}+2x{kv_heads}, {d}]");
        compare!(g, format!("{what} q"), tol, inputs, |be, x| Ok(be
            .split_qkv_rope(&x[0], (heads, kv_heads), &positions, 10_000.0)?
            .0));
        compare!(g, format!("{what} k"), tol, inputs, |be, x| Ok(be
            .split_qkv_rope(&x[0], (heads, kv_heads), &positions, 10_000.0)?
            .1));
        compare!(g, format!("{what} v"), EXACT, inputs, |be, x| Ok(be
            .split_qkv_rope(&x[0], (heads, kv_heads), &positions, 10_000.0)?
            .2));
    }
    let odd = g.from_host(&[0.0; 12], &[1, 12]).unwrap();
    assert!(
        g.split_qkv_rope(&odd, (2, 1), &[0], 1e4).is_err(),
        "12 is not 4 heads of even width"
    );
    assert!(
        g.split_qkv_rope(&odd, (1, 1), &[0, 1], 1e4).is_err(),
        "one position per token"
    );
}

#[test]
fn gpu_split_qkv_rope_paged_writes_what_split_and_write_do() {
    let Some(g) = gpu("gpu_split_qkv_rope_paged_writes_what_split_and_write_do") else {
        return;
    };
    // One kernel (rotate, then write k and v into their pool rows) against the two-step path
    // on the same GPU: the same rotation code, so q and both pools must be equal exactly.
    let mut rng = Rng::new(111);
    for c in PagedCase::COMMON {
        let inputs = c.inputs(&mut rng);
        let [tokens, heads, d] = c.q_shape();
        let qkv = rng.vec(tokens * (heads + 2 * c.kv_heads) * d, 2.0);
        let positions: Vec<usize> = (0..tokens).map(|_| rng.below(4096)).collect();
        let x = g
            .from_host(&qkv, &[tokens, (heads + 2 * c.kv_heads) * d])
            .unwrap();
        let paged = g.prepare_paged(&inputs.plan).unwrap();
        let pools = || {
            (
                g.from_host(&inputs.keys, &inputs.pool_shape).unwrap(),
                g.from_host(&inputs.values, &inputs.pool_shape).unwrap(),
            )
        };
        let (mut keys, mut values) = pools();
        let q = g
            .split_qkv_rope_paged(
                &x,
                (heads, c.kv_heads),
                &positions,
                1e4,
                &mut keys,
                &mut values,
                &paged,
            )
            .unwrap();
        let (mut want_keys, mut want_values) = pools();
        let (want_q, k, v) = g
            .split_qkv_rope(&x, (heads, c.kv_heads), &positions, 1e4)
            .unwrap();
        g.write_paged(&mut want_keys, &k, &paged).unwrap();
        g.write_paged(&mut want_values, &v, &paged).unwrap();
        let host = |t: &CudaTensor| g.to_host(t).unwrap();
        assert_eq!(host(&q), host(&want_q), "{c:?}: q");
        assert_eq!(host(&keys), host(&want_keys), "{c:?}: key pool");
        assert_eq!(host(&values), host(&want_values), "{c:?}: value pool");
    }
}

#[test]
fn gpu_argmax_matches_the_host_sampler() {
    let Some(g) = gpu("gpu_argmax_matches_the_host_sampler") else {
        return;
    };
    let mut rng = Rng::new(108);
    for &(rows, vocab) in &[(1, 1), (3, 17), (7, 32000), (2, 151_936)] {
        let mut x = rng.vec(rows * vocab, 10.0);
        if vocab > 17 {
            // A tie between two far-apart positions: the first must win.
            let top = x.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
            x[vocab - 1] = top;
            x[5] = top;
        }
        let t = g.from_host(&x, &[rows, vocab]).unwrap();
        let got = g.argmax_rows(&t).unwrap();
        let want: Vec<u32> = x.chunks(vocab).map(crate::sampling::argmax).collect();
        assert_eq!(got, want, "argmax [{rows}, {vocab}]");
    }
    let t = g
        .from_host(&[f32::NAN, 1.0, 3.0, f32::NAN, 3.0, -1.0], &[1, 6])
        .unwrap();
    assert_eq!(
        g.argmax_rows(&t).unwrap(),
        vec![2],
        "NaN never wins; first of the tied maxima"
    );
}

#[test]
fn gpu_sampling_draws_what_the_host_draws() {
    for p in Precision::ALL {
        let Some(g) = gpu_in("gpu_sampling_draws_what_the_host_draws", p) else {
            return;
        };
        // The same draw gives the same token unless its uniform or top-p falls within rounding
        // (~1e-13 relative) of a boundary between two tokens: never in practice.
        let mut rng = Rng::new(141);
        for &(rows, vocab) in &[(1, 1), (4, 17), (9, 32000), (18, 1000), (3, 151_936)] {
            let (x, draws) = sampling_case(&mut rng, rows, vocab, |x| p.round(x));
            let t = g.from_host(&x, &[rows, vocab]).unwrap();
            let got = g.sample_rows(&t, &draws).unwrap();
            let want = ReferenceBackend
                .sample_rows(&ReferenceBackend.from_host(&x, &[rows, vocab]).unwrap(), &draws)
                .unwrap();
            assert_eq!(got, want, "{p}: sample_rows [{rows}, {vocab}]");
        }
        // Masked and NaN logits are never drawn; rows with nothing finite give the argmax.
        let inf = f32::NEG_INFINITY;
        let x = [
            inf,
            f32::NAN,
            0.5,
            inf,
            0.4,
            /* row 2 */ inf,
            inf,
            inf,
            inf,
            inf,
        ];
        let t = g.from_host(&x, &[2, 5]).unwrap();
        for u in [0.0, 0.3, 0.6, 0.999_999] {
            let draw = TokenDraw::uncut(1.0, u);
            let got = g.sample_rows(&t, &[draw, draw]).unwrap();
            assert!(got[0] == 2 || got[0] == 4, "{p}: {got:?}");
            assert_eq!(got[1], 0, "{p}: an all -inf row");
        }
        let cut = TokenDraw {
            top_k: 1,
            top_p: 0.5,
            ..TokenDraw::uncut(1.0, 0.5)
        };
        assert_eq!(
            g.sample_rows(&t, &[cut, cut]).unwrap(),
            [2, 0],
            "{p}: cut, NaN, -inf"
        );
        assert!(g.sample_rows(&t, &[cut]).is_err(), "one draw per row");
    }
}

/// A dense attention op on the GPU.
type Attend<'m> = Box<dyn Fn(&CudaBackend, &[CudaTensor]) -> Result<CudaTensor> + 'm>;

/// Every way the GPU computes dense attention, by name: both fused kernels and the unfused
/// path through cuBLAS.
fn attention_paths<'m>(mask: &'m AttentionMask<'m>) -> [(&'static str, Attend<'m>); 3] {
    [
        (
            "flash",
            Box::new(move |be, t| be.attention_with(&t[0], &t[1], &t[2], mask, AttentionKernel::Flash)),
        ),
        (
            "decode",
            Box::new(move |be, t| be.attention_with(&t[0], &t[1], &t[2], mask, AttentionKernel::Decode)),
        ),
        (
            "unfused",
            Box::new(move |be, t| be.attention_unfused_dense(&t[0], &t[1], &t[2], mask)),
        ),
    ]
}

#[test]
fn gpu_attention_matches_reference_for_all_paths() {
    let Some(g) = gpu("gpu_attention_matches_reference_for_all_paths") else {
        return;
    };
    // fp32 dot products of up to 256 terms and an online softmax (rescaled running sums) against
    // f64: as the CPU backend's attention tests.
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-4,
    };
    // Beyond the common cases: flash tiles are 16 queries x 32 keys, so lengths straddle those;
    // head dims include ones that are not multiples of 32 (each lane owns d / 32 dims) and the
    // maximum, 256.
    let gpu_cases = [
        AttnCase::new(2, 33, 31, 4, 2, 80, true, None), // d = 80; s_k one short of a tile
        AttnCase::new(1, 47, 129, 8, 1, 128, false, Some(82)), // multi-query, cache, partial last tiles
        AttnCase::new(2, 16, 32, 2, 2, 256, true, None), // largest head dim, exact tiles
        AttnCase::new(1, 3, 300, 32, 8, 128, false, Some(297)), // Llama-like decode of 3 tokens
    ];
    let mut rng = Rng::new(109);
    for c in AttnCase::COMMON.into_iter().chain(gpu_cases) {
        let AttnInputs { q, k, v, valid } = c.inputs(&mut rng);
        let mask = c.mask(&valid);
        let (qs, ks) = (c.q_shape(), c.kv_shape());
        let inputs: Inputs<'_> = &[(&q, &qs), (&k, &ks), (&v, &ks)];
        let (_, want) = run(&ReferenceBackend, inputs, |be, t| {
            be.attention(&t[0], &t[1], &t[2], &mask)
        });
        for (path, attend) in attention_paths(&mask) {
            let what = format!(
                "{path} attention q {qs:?} k {ks:?} padding {} causal {:?}",
                c.padding, c.causal
            );
            let (shape, got) = run(&*g, inputs, attend);
            assert_eq!(shape, qs, "{what}");
            assert_close(&what, &got, &want, tol);
            if c.padding {
                let row0 = &got[..c.s_q * c.heads * c.d];
                assert!(
                    row0.iter().all(|&x| x == 0.0),
                    "{what}: a fully masked batch row must give zeros"
                );
            }
            assert!(got.iter().all(|x| x.is_finite()), "{what}: NaN or inf");
        }
        // The trait method (which picks the kernel) agrees too.
        compare!(g, format!("attention q {qs:?}"), tol, inputs, |be, t| be
            .attention(&t[0], &t[1], &t[2], &mask));
    }
    // Head dims past the fused kernels' register budget are a shape error for them, not a
    // launch failure; the trait's attention takes such a prompt through the unfused products.
    let big: Vec<f32> = (0..2 * 264).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    let shape = [1, 2, 1, 264];
    let t = g.from_host(&big, &shape).unwrap();
    for kernel in [AttentionKernel::Flash, AttentionKernel::Decode] {
        assert!(
            matches!(
                g.attention_with(&t, &t, &t, &AttentionMask::none(), kernel),
                Err(BackendError::Shape { .. })
            ),
            "{kernel:?} attention of head dim 264"
        );
    }
    let inputs: Inputs<'_> = &[(&big, &shape), (&big, &shape), (&big, &shape)];
    compare!(g, "attention of head dim 264", tol, inputs, |be, t| be.attention(
        &t[0],
        &t[1],
        &t[2],
        &AttentionMask::none()
    ));
}

#[test]
fn gpu_attention_from_a_fused_projection_matches_reference() {
    let Some(g) = gpu("gpu_attention_from_a_fused_projection_matches_reference") else {
        return;
    };
    // BERT's attention read straight out of its fused q/k/v projection (the unfused path with
    // the projection's row stride, and the split path for one token), against the reference's
    // split + attention; with padding, as encoder batches have.
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(112);
    for &(batch, seq, heads, d) in &[(1, 1, 2, 8), (2, 7, 3, 16), (3, 33, 12, 64), (2, 20, 4, 80)] {
        let qkv = rng.vec(batch * seq * 3 * heads * d, 2.0);
        // The last sequence is padded after its first token.
        let valid: Vec<bool> = (0..batch * seq).map(|i| i < (batch - 1) * seq + 1).collect();
        let mask = AttentionMask::padding(&valid);
        compare!(
            g,
            format!("attention_qkv batch {batch} seq {seq} heads {heads} d {d}"),
            tol,
            &[(&qkv, &[batch * seq, 3 * heads * d])],
            |be, t| be.attention_qkv(&t[0], (batch, heads), &mask)
        );
    }
    let odd = g.zeros(&[6, 3 * 2 * 8]).unwrap();
    assert!(
        g.attention_qkv(&odd, (4, 2), &AttentionMask::none()).is_err(),
        "6 rows are not 4 sequences of equal length"
    );
}

/// The unfused attention's score limit lowered to `bytes` for as long as it lives.
struct ScoreLimit<'a>(&'a CudaBackend, usize);

impl<'a> ScoreLimit<'a> {
    fn new(g: &'a CudaBackend, bytes: usize) -> Self {
        Self(g, g.set_unfused_score_limit(bytes))
    }
}

impl Drop for ScoreLimit<'_> {
    fn drop(&mut self) {
        self.0.set_unfused_score_limit(self.1);
    }
}

/// The pieces the unfused attention has run so far.
fn pieces(g: &CudaBackend) -> usize {
    g.unfused_pieces.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn gpu_prompts_past_the_score_limit_run_in_pieces() {
    let Some(g) = gpu("gpu_prompts_past_the_score_limit_run_in_pieces") else {
        return;
    };
    // The unfused attention with its score limit lowered so that these small prompts are cut
    // as a 32 x 512 BERT batch is under the real one: into pieces of whole sequences (one and
    // two a piece), and into runs of one sequence's queries (limits below one sequence's
    // scores), through the trait's attention and through attention_qkv, against the
    // reference, counting the pieces that ran. Random padding per sequence and causal offsets
    // check each piece's part of the mask.
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-4,
    };
    let cases = [
        AttnCase::new(5, 17, 17, 12, 4, 32, true, None),
        AttnCase::new(5, 13, 13, 9, 3, 32, true, Some(0)),
        AttnCase::new(2, 5, 20, 4, 4, 8, false, Some(15)),
        AttnCase::new(3, 9, 9, 2, 2, 16, true, None),
    ];
    let mut rng = Rng::new(143);
    for c in cases {
        let (per_seq, per_query) = (c.heads * c.s_q * c.s_k * 4, c.heads * c.s_k * 4);
        let AttnInputs { q, k, v, valid } = c.inputs(&mut rng);
        let mask = c.mask(&valid);
        let (qs, ks) = (c.q_shape(), c.kv_shape());
        let inputs: Inputs<'_> = &[(&q, &qs), (&k, &ks), (&v, &ks)];
        for (limit, expected) in [
            (per_seq, c.batch),
            (2 * per_seq, c.batch.div_ceil(2)),
            (2 * per_query, c.batch * c.s_q.div_ceil(2)),
            (1, c.batch * c.s_q),
        ] {
            let _limit = ScoreLimit::new(&g, limit);
            let before = pieces(&g);
            compare!(
                g,
                format!("attention {c:?} in pieces of at most {limit} bytes"),
                tol,
                inputs,
                |be, t| be.attention(&t[0], &t[1], &t[2], &mask)
            );
            assert_eq!(
                pieces(&g) - before,
                expected,
                "{c:?} with a limit of {limit} bytes"
            );
        }
    }
    // BERT's fused projection, padded, in pieces of one sequence and of 3 queries.
    let (batch, seq, heads, d) = (3, 11, 4, 16);
    let qkv = rng.vec(batch * seq * 3 * heads * d, 2.0);
    let valid: Vec<bool> = (0..batch * seq).map(|i| i % seq < seq - i / seq * 3).collect();
    let mask = AttentionMask::padding(&valid);
    for (limit, expected) in [(heads * seq * seq * 4, batch), (3 * heads * seq * 4, batch * 4)] {
        let _limit = ScoreLimit::new(&g, limit);
        let before = pieces(&g);
        compare!(
            g,
            format!("attention_qkv in pieces of at most {limit} bytes"),
            tol,
            &[(&qkv, &[batch * seq, 3 * heads * d])],
            |be, t| be.attention_qkv(&t[0], (batch, heads), &mask)
        );
        assert_eq!(
            pieces(&g) - before,
            expected,
            "attention_qkv with a limit of {limit} bytes"
        );
    }
}

/// A paged step on one backend: the pools after writing the new keys and values, then the
/// attention output (by `attend`, which picks the kernel).
fn paged_step<B: Backend>(
    b: &B,
    inputs: &PagedInputs,
    c: &PagedCase,
    attend: impl Fn(&B, &B::Tensor, &B::Tensor, &B::Tensor, &B::Paged) -> Result<B::Tensor>,
) -> [Vec<f32>; 3] {
    let step = || -> Result<[Vec<f32>; 3]> {
        let paged = b.prepare_paged(&inputs.plan)?;
        let mut keys = b.from_host(&inputs.keys, &inputs.pool_shape)?;
        let mut values = b.from_host(&inputs.values, &inputs.pool_shape)?;
        b.write_paged(&mut keys, &b.from_host(&inputs.new_keys, &c.new_shape())?, &paged)?;
        b.write_paged(
            &mut values,
            &b.from_host(&inputs.new_values, &c.new_shape())?,
            &paged,
        )?;
        let q = b.from_host(&inputs.q, &c.q_shape())?;
        let out = attend(b, &q, &keys, &values, &paged)?;
        assert_eq!(b.shape(&out), c.q_shape());
        Ok([b.to_host(&out)?, b.to_host(&keys)?, b.to_host(&values)?])
    };
    step().unwrap_or_else(|e| panic!("{c:?} on {}: {e}", b.name()))
}

#[test]
fn gpu_paged_attention_matches_reference_for_both_kernels() {
    let Some(g) = gpu("gpu_paged_attention_matches_reference_for_both_kernels") else {
        return;
    };
    // As the dense attention test: fp32 against f64.
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-4,
    };
    // Beyond the common cases: a Llama-sized decode batch over long scattered caches, a long
    // windowed prompt whose window starts mid-tile, and many short sequences in one launch.
    const LONG: &[(usize, usize)] = &[(1, 300), (1, 511), (1, 1), (1, 129)];
    const WINDOWED: &[(usize, usize)] = &[(45, 100), (1, 77)];
    const MANY: &[(usize, usize)] = &[(2, 2); 40];
    let gpu_cases = [
        PagedCase {
            seqs: LONG,
            heads: 32,
            kv_heads: 8,
            d: 128,
            block_size: 16,
            window: None,
        },
        PagedCase {
            seqs: WINDOWED,
            heads: 8,
            kv_heads: 2,
            d: 64,
            block_size: 16,
            window: Some(37),
        },
        PagedCase {
            seqs: MANY,
            heads: 4,
            kv_heads: 4,
            d: 32,
            block_size: 16,
            window: None,
        },
    ];
    let mut rng = Rng::new(121);
    for c in PagedCase::COMMON.into_iter().chain(gpu_cases) {
        let inputs = c.inputs(&mut rng);
        let [want, want_keys, want_values] = paged_step(&ReferenceBackend, &inputs, &c, |b, q, k, v, p| {
            b.paged_attention(q, k, v, p)
        });
        for kernel in [AttentionKernel::Flash, AttentionKernel::Decode] {
            let [got, keys, values] = paged_step(&*g, &inputs, &c, |b, q, k, v, p| {
                b.paged_attention_with(q, k, v, p, kernel)
            });
            let what = format!("{kernel:?} paged attention {c:?}");
            assert_close(&what, &got, &want, tol);
            assert_close(&format!("{what}: key pool"), &keys, &want_keys, EXACT);
            assert_close(&format!("{what}: value pool"), &values, &want_values, EXACT);
        }
        let [got, ..] = paged_step(&*g, &inputs, &c, |b, q, k, v, p| b.paged_attention(q, k, v, p));
        assert_close(&format!("paged attention {c:?}"), &got, &want, tol);
        // Steps with prompts (windowed too) also go through cuBLAS (which the trait method
        // picks for them once a prompt is long enough), decoding sequences beside them through
        // the decode kernel.
        if c.seqs.iter().any(|&(q, _)| q > 1) {
            let [got, ..] = paged_step(&*g, &inputs, &c, |b, q, k, v, p| {
                b.paged_prompts_unfused(q, k, v, p)
            });
            assert_close(&format!("unfused paged attention {c:?}"), &got, &want, tol);
        }
    }
    // Decode steps with each sequence's keys split across blocks, then merged, by the per-head
    // and (where it takes the head dimension) the grouped-heads kernel.
    for c in PagedCase::DECODE {
        let inputs = c.inputs(&mut rng);
        let [want, ..] = paged_step(&ReferenceBackend, &inputs, &c, |b, q, k, v, p| {
            b.paged_attention(q, k, v, p)
        });
        for splits in [1, 2, 5, MAX_DECODE_SPLITS] {
            let grouped = AttentionKernel::GroupedDecode { splits };
            let kernels = [AttentionKernel::SplitDecode { splits }, grouped];
            for kernel in kernels
                .into_iter()
                .filter(|k| k != &grouped || grouped_decode_fits(c.d))
            {
                let [got, ..] = paged_step(&*g, &inputs, &c, |b, q, k, v, p| {
                    b.paged_attention_with(q, k, v, p, kernel)
                });
                assert_close(&format!("{kernel:?} {c:?}"), &got, &want, tol);
            }
        }
    }
    // The split and grouped kernels refuse a step with a prompt in it, the grouped kernel a
    // head dimension it does not take.
    let upload = |c: &PagedCase, rng: &mut Rng| {
        let inputs = c.inputs(rng);
        let paged = g.prepare_paged(&inputs.plan).unwrap();
        let q = g.from_host(&inputs.q, &c.q_shape()).unwrap();
        let pool = g.from_host(&inputs.keys, &inputs.pool_shape).unwrap();
        (paged, q, pool)
    };
    let c = PagedCase::COMMON[2];
    let (paged, q, pool) = upload(&c, &mut rng);
    let grouped = AttentionKernel::GroupedDecode { splits: 2 };
    for kernel in [AttentionKernel::SplitDecode { splits: 2 }, grouped] {
        assert!(
            g.paged_attention_with(&q, &pool, &pool, &paged, kernel).is_err(),
            "a prompt through {kernel:?}"
        );
    }
    let c = PagedCase::DECODE[2]; // d = 80
    let (paged, q, pool) = upload(&c, &mut rng);
    let grouped = AttentionKernel::GroupedDecode { splits: 1 };
    assert!(
        g.paged_attention_with(&q, &pool, &pool, &paged, grouped).is_err(),
        "d = 80 grouped"
    );
    // The trait method still serves it (the per-head kernels).
    assert!(g.paged_attention(&q, &pool, &pool, &paged).is_ok());
    // A table naming a block past the pool is refused before any launch.
    let c = PagedCase::COMMON[1];
    let inputs = c.inputs(&mut rng);
    let paged = g.prepare_paged(&inputs.plan).unwrap();
    let short = [(inputs.plan.blocks_needed() - 1) * c.block_size, c.kv_heads, c.d];
    let mut pool = g.zeros(&short).unwrap();
    let new = g.zeros(&c.new_shape()).unwrap();
    assert!(matches!(
        g.write_paged(&mut pool, &new, &paged),
        Err(BackendError::OutOfRange { .. })
    ));
}

/// The unit roundoff of a precision: the largest relative error of one rounding to nearest.
fn unit_roundoff(p: Precision) -> f32 {
    match p {
        Precision::F32 => f32::EPSILON / 2.0,
        Precision::F16 => 1.0 / 2048.0,
        Precision::Bf16 => 1.0 / 256.0,
    }
}

/// Runs `op` on the reference backend over the inputs rounded to `p` (what the GPU stores) and
/// on the GPU backend of precision `p`, and compares.
fn compare_rounded(
    g: &CudaBackend,
    what: &str,
    tol: Tol,
    inputs: Inputs<'_>,
    op_ref: impl Fn(&ReferenceBackend, &[CpuTensor]) -> Result<CpuTensor>,
    op_gpu: impl Fn(&CudaBackend, &[CudaTensor]) -> Result<CudaTensor>,
) {
    let p = g.precision();
    let rounded: Vec<Vec<f32>> = inputs.iter().map(|(d, _)| p.round(d)).collect();
    let rounded_inputs: Vec<(&[f32], &[usize])> = rounded
        .iter()
        .zip(inputs)
        .map(|(d, (_, s))| (d.as_slice(), *s))
        .collect();
    let (want_shape, want) = run(&ReferenceBackend, &rounded_inputs, op_ref);
    let (shape, got) = run(g, inputs, op_gpu);
    assert_eq!(shape, want_shape, "{what} ({p}): shape");
    assert_close(&format!("{what} ({p})"), &got, &want, tol);
}

/// Both sides of [`compare_rounded`] from one expression (instantiated for each tensor type).
macro_rules! compare_in {
    ($g:expr, $what:expr, $tol:expr, $inputs:expr, |$be:ident, $t:ident| $body:expr) => {
        compare_rounded(
            $g,
            &$what,
            $tol,
            $inputs,
            |$be, $t: &[CpuTensor]| $body,
            |$be, $t: &[CudaTensor]| $body,
        )
    };
}

#[test]
fn gpu_passes_the_start_up_self_test() {
    for p in Precision::ALL {
        let Some(g) = gpu_in("gpu_passes_the_start_up_self_test", p) else {
            return;
        };
        let tensor_cores = || {
            g.tensor_core_flash_enabled
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let tensor_cores_before = tensor_cores();
        g.self_test(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        // The self-test would pass with the tensor-core flash kernels failing it, by turning
        // them off: here that is a failure.
        assert_eq!(
            tensor_cores(),
            tensor_cores_before,
            "{p}: the tensor-core flash kernels failed the self-test (it turned them off)"
        );
        // With the matrix-vector kernel and the bias epilogue off, the same ops through cuBLAS
        // and separate kernels.
        g.set_gemv(false);
        g.set_bias_epilogue(false);
        let off = g.self_test(p);
        g.set_gemv(true);
        g.set_bias_epilogue(true);
        off.unwrap_or_else(|e| panic!("{p}, gemv and bias epilogue off: {e}"));
    }
}

#[test]
fn gpu_bias_epilogue_matches_the_bias_pass() {
    // Products with a bias, with and without a residual, and through GELU's tanh form (GPT-2's
    // MLP), through cuBLASLt's epilogues and through cuBLAS plus the bias_act pass, each
    // against the reference in every precision. The shapes: BERT's QKV and FFN-down at 128
    // tokens, 6 rows (above the matrix-vector kernel's), and an odd width that cuBLASLt may
    // refuse (the fallback must then answer).
    let aligned = [(128, 768, 2304), (128, 3072, 768), (6, 64, 48)];
    for p in Precision::ALL {
        let test = "gpu_bias_epilogue_matches_the_bias_pass";
        let Some(g) = gpu_in(test, p) else {
            return;
        };
        let g = &*g;
        g.set_bias_epilogue(true);
        if !g.bias_epilogue_enabled() {
            print_skip(
                test,
                "cuBLASLt did not open (libcublasLt missing?); see the worker's warning",
            );
            return;
        }
        let u = unit_roundoff(p);
        let mut rng = Rng::new(141);
        for epilogue in [true, false] {
            g.set_bias_epilogue(epilogue);
            let (planned_before, _) = g.bias_epilogue_plans();
            for &(n, k, m) in aligned.iter().chain(&[(9, 96, 130)]) {
                let (x, w, b) = (rng.vec(n * k, 1.0), rng.vec(m * k, 0.3), rng.vec(m, 1.0));
                let residual = rng.vec(n * m, 2.0);
                let inputs: Inputs<'_> = &[(&x, &[n, k]), (&w, &[m, k]), (&b, &[m]), (&residual, &[n, m])];
                // The bias pass stores the product before adding the bias (one more rounding,
                // of the product's size, which grows as sqrt(k)); fp32 as the cuBLAS tests.
                let tol = match p {
                    Precision::F32 => Tol {
                        atol: 2e-4,
                        rtol: 1e-4,
                    },
                    _ => Tol {
                        atol: u * (4.0 + 2.0 * (k as f32).sqrt()),
                        rtol: 4.0 * u,
                    },
                };
                let what = |op: &str| format!("{op} {n}x{k}x{m} (epilogue {epilogue})");
                compare_in!(g, what("linear +bias"), tol, inputs, |be, t| be.linear(
                    &t[0],
                    &t[1],
                    Some(&t[2])
                ));
                compare_in!(g, what("linear_add +bias"), tol, inputs, |be, t| {
                    let residual = be.from_host(&p.round(&residual), &[n, m])?;
                    be.linear_add(&t[0], &t[1], Some(&t[2]), residual)
                });
                compare_in!(g, what("linear_act +bias gelu (tanh)"), tol, inputs, |be, t| be
                    .linear_act(&t[0], &t[1], Some(&t[2]), Activation::GeluTanh));
            }
            if epilogue {
                // Each aligned shape, with and without a residual, must have been taken: a
                // refusal would leave the fallback doing the work unseen.
                // GELU's epilogue is required only in half precision, what is served for
                // speed; cuBLASLt may refuse it in fp32, where the bias pass (checked above)
                // answers.
                let fused = [(false, false), (true, false)]
                    .into_iter()
                    .chain((p != Precision::F32).then_some((false, true)));
                for &shape in &aligned {
                    for (accumulate, gelu_tanh) in fused.clone() {
                        assert_eq!(
                            g.bias_epilogue_plan(shape, accumulate, gelu_tanh),
                            Some(true),
                            "{p}: cuBLASLt did not plan {shape:?} (accumulate {accumulate}, gelu {gelu_tanh})"
                        );
                    }
                }
            } else {
                assert_eq!(
                    g.bias_epilogue_plans().0,
                    planned_before,
                    "{p}: the epilogue was off"
                );
            }
        }
        g.set_bias_epilogue(true);
    }
}

#[test]
fn gpu_tensor_core_flash_matches_reference() {
    for p in [Precision::F16, Precision::Bf16] {
        let Some(g) = gpu_in("gpu_tensor_core_flash_matches_reference", p) else {
            return;
        };
        let g = &*g;
        if !g.tensor_core_flash_fits(64) {
            print_skip(
                "gpu_tensor_core_flash_matches_reference",
                "this GPU has no mma.m16n8k16 (compute capability below 8.0)",
            );
            return;
        }
        // As the other half-precision ops: four roundings against f64 on the rounded inputs
        // (the probabilities are rounded for their product with the values, one of them).
        let u = unit_roundoff(p);
        let tol = Tol {
            atol: 4.0 * u,
            rtol: 4.0 * u,
        };
        let mut rng = Rng::new(143);
        let tc = AttentionKernel::TensorCoreFlash;
        let mut cases: Vec<(AttnCase, AttnInputs)> = AttnCase::TENSOR_CORE
            .iter()
            .map(|c| (*c, c.inputs(&mut rng)))
            .collect();
        let (left_padded, padded) = AttnCase::TENSOR_CORE_LEFT_PADDED;
        cases.push((left_padded, left_padded.leading_padding_inputs(&mut rng, padded)));
        for (c, AttnInputs { q, k, v, valid }) in cases {
            let mask = c.mask(&valid);
            let (qs, ks) = (c.q_shape(), c.kv_shape());
            let inputs: Inputs<'_> = &[(&q, &qs), (&k, &ks), (&v, &ks)];
            compare_rounded(
                g,
                &format!("tensor-core flash attention {c:?}"),
                tol,
                inputs,
                |be, t| be.attention(&t[0], &t[1], &t[2], &mask),
                |be, t| be.attention_with(&t[0], &t[1], &t[2], &mask, tc),
            );
            // attention_flash takes it where it fits, and the SIMT kernel once turned off.
            let (_, direct) = run(g, inputs, |be, t| {
                be.attention_with(&t[0], &t[1], &t[2], &mask, tc)
            });
            let (_, picked) = run(g, inputs, |be, t| be.attention_flash(&t[0], &t[1], &t[2], &mask));
            assert_eq!(
                picked, direct,
                "{c:?} ({p}): attention_flash takes the tensor-core kernel"
            );
            let was = g.set_tensor_core_flash(false);
            let (_, simt) = run(g, inputs, |be, t| be.attention_flash(&t[0], &t[1], &t[2], &mask));
            let (_, flash) = run(g, inputs, |be, t| {
                be.attention_with(&t[0], &t[1], &t[2], &mask, AttentionKernel::Flash)
            });
            g.set_tensor_core_flash(was);
            assert_eq!(
                simt, flash,
                "{c:?} ({p}): turned off, attention_flash takes the SIMT kernel"
            );
        }
        for c in PagedCase::TENSOR_CORE {
            let mut inputs = c.inputs(&mut rng);
            inputs.round_to(p);
            let [want, ..] = paged_step(&ReferenceBackend, &inputs, &c, |b, q, k, v, pg| {
                b.paged_attention(q, k, v, pg)
            });
            let [got, ..] = paged_step(g, &inputs, &c, |b, q, k, v, pg| {
                b.paged_attention_with(q, k, v, pg, tc)
            });
            assert_close(
                &format!("tensor-core paged attention {c:?} ({p})"),
                &got,
                &want,
                tol,
            );
            // Steps whose prompts are all short keep a flash kernel: this one.
            if c.seqs.iter().all(|&(q, _)| q < UNFUSED_MIN_PROMPT) {
                let [picked, ..] =
                    paged_step(g, &inputs, &c, |b, q, k, v, pg| b.paged_attention(q, k, v, pg));
                assert_eq!(
                    picked, got,
                    "{c:?} ({p}): a short-prompt step takes the tensor-core kernel"
                );
            }
        }
        // Head dimensions it is not built for are shape errors, not launches.
        let t = g.from_host(&[0.5; 2 * 80], &[1, 2, 1, 80]).unwrap();
        assert!(
            matches!(
                g.attention_with(&t, &t, &t, &AttentionMask::none(), tc),
                Err(BackendError::Shape { .. })
            ),
            "{p}: tensor-core flash at d = 80"
        );
    }
    // In fp32 it refuses before launching.
    let Some(g) = gpu("gpu_tensor_core_flash_matches_reference") else {
        return;
    };
    let t = g.from_host(&[0.5; 2 * 64], &[1, 2, 1, 64]).unwrap();
    let err = g
        .attention_with(
            &t,
            &t,
            &t,
            &AttentionMask::none(),
            AttentionKernel::TensorCoreFlash,
        )
        .unwrap_err();
    assert!(err.to_string().contains("fp16 or bf16"), "{err}");
}

#[test]
fn gpu_the_unfused_attention_off_takes_the_flash_kernel() {
    // What the start-up self-test relies on to check the dense flash kernel: with the unfused
    // path off, a prompt small enough for it gives the flash kernel's result bit for bit (the
    // unfused path sums in another order, so it would differ).
    let Some(g) = gpu("gpu_the_unfused_attention_off_takes_the_flash_kernel") else {
        return;
    };
    let mut rng = Rng::new(142);
    let (batch, seq, heads, d) = (2, 37, 4, 64);
    let n = batch * seq * heads * d;
    let (q, k, v) = (rng.vec(n, 1.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
    let shape = [batch, seq, heads, d];
    let (q, k, v) = (
        g.from_host(&q, &shape).unwrap(),
        g.from_host(&k, &shape).unwrap(),
        g.from_host(&v, &shape).unwrap(),
    );
    let valid: Vec<bool> = (0..batch * seq).map(|i| i < seq + 20).collect();
    let mask = AttentionMask::padding(&valid);
    let flash = g.to_host(&g.attention_flash(&q, &k, &v, &mask).unwrap()).unwrap();
    let was = g.set_unfused_attention(false);
    let forced = g.attention(&q, &k, &v, &mask).and_then(|t| g.to_host(&t));
    g.set_unfused_attention(was);
    assert_eq!(forced.unwrap(), flash, "attention with the unfused path off");
}

#[test]
fn gpu_pooling_matches_reference() {
    // BERT-base's hidden size at 128 tokens (a block strides over several columns per thread),
    // a single-token batch and the widest row the kernel takes, with padding of every kind (a
    // sequence without valid tokens too), every mode, normalised or not. The rows come back in
    // fp32 whatever the storage precision, so in every precision they are held to fp32's
    // tolerance against the reference over the stored (rounded) states: a row rounded to
    // fp16 or bf16 on the way would fail. Then a row one wider than the kernel takes, which is
    // pooled on the host.
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-5,
    };
    for p in Precision::ALL {
        let Some(g) = gpu_in("gpu_pooling_matches_reference", p) else {
            return;
        };
        let g = &*g;
        let mut rng = Rng::new(151);
        for &(batch, seq, h) in &[(5, 128, 768), (2, 1, 384), (2, 3, POOL_MAX_HIDDEN)] {
            let valid: Vec<bool> = (0..batch * seq)
                .map(|i| {
                    let (b, t) = (i / seq, i % seq);
                    // Sequence b holds its first seq / (b + 1) tokens; the last one has a gap,
                    // and in the first shape the fourth has none at all.
                    let holds = t < (seq / (b + 1)).max(1) && !(b == batch - 1 && t == 1);
                    holds && !(batch == 5 && b == 3)
                })
                .collect();
            let hidden = p.round(&rng.vec(batch * seq * h, 2.0));
            let uploaded = g.from_host(&hidden, &[batch, seq, h]).unwrap();
            for pooling in Pooling::ALL {
                for normalize in [false, true] {
                    let what = format!("pool {pooling:?} normalize {normalize} [{batch}, {seq}, {h}] ({p})");
                    let want = crate::backend::pooling::pool_host(
                        &hidden,
                        &valid,
                        (batch, seq, h),
                        pooling,
                        normalize,
                    );
                    let got = g
                        .pool_to_host(&uploaded, &valid, pooling, normalize)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_close(&what, &got, &want, tol);
                }
            }
        }
        let hidden = g.zeros(&[2, 3, 4]).unwrap();
        assert!(
            g.pool_to_host(&hidden, &[true; 5], Pooling::Mean, false).is_err(),
            "{p}: flags for another batch"
        );
        // Wider than the kernel takes: pooled on the host, the same values.
        let h = POOL_MAX_HIDDEN + 1;
        let states = p.round(&rng.vec(2 * h, 1.0));
        let wide = g.from_host(&states, &[1, 2, h]).unwrap();
        let got = g.pool_to_host(&wide, &[true, true], Pooling::Mean, true).unwrap();
        let want = crate::backend::pooling::pool_host(&states, &[true, true], (1, 2, h), Pooling::Mean, true);
        assert_close(&format!("pool wider than the kernel ({p})"), &got, &want, tol);
    }
}

#[test]
fn gpu_half_precision_ops_match_reference() {
    for p in [Precision::F16, Precision::Bf16] {
        let Some(g) = gpu_in("gpu_half_precision_ops_match_reference", p) else {
            return;
        };
        let g = &*g;
        // The reference runs in f64 on the same rounded inputs, so the differences are the GPU's
        // roundings of what it stores: one per output element for most ops (relative u, the unit
        // roundoff), plus intermediates that are stored too (a residual sum before its norm, a
        // product before its bias and activation). Four roundings' worth, relative and absolute
        // (for values of order 1 that cancel towards zero), bounds every op below; a wrong
        // conversion, layout or index is off by far more.
        let u = unit_roundoff(p);
        let tol = Tol {
            atol: 4.0 * u,
            rtol: 4.0 * u,
        };
        let mut rng = Rng::new(131);

        // Uploads round to nearest even, downloads widen exactly.
        let x = rng.vec(1000, 100.0);
        let t = g.from_host(&x, &[10, 100]).unwrap();
        assert_eq!(g.to_host(&t).unwrap(), p.round(&x), "{p}: round trip");

        for &(n, k, m) in &[(3, 17, 5), (17, 384, 65), (65, 384, 1536)] {
            let (x, w, b) = (rng.vec(n * k, 1.0), rng.vec(m * k, 1.0), rng.vec(m, 1.0));
            let inputs: Inputs<'_> = &[(&x, &[n, k]), (&w, &[m, k]), (&b, &[m])];
            // The product is stored before the bias is added: where the bias cancels it, that
            // rounding (u times the product, whose size grows as sqrt(k)) is absolute.
            let linear_tol = Tol {
                atol: u * (4.0 + 2.0 * (k as f32).sqrt()),
                rtol: 4.0 * u,
            };
            compare_in!(g, format!("linear {n}x{k}x{m}"), linear_tol, inputs, |be, t| be
                .linear(&t[0], &t[1], Some(&t[2])));
        }
        let (x, y) = (rng.vec(5 * 3 * 17 * 2, 1.0), rng.vec(5 * 17 * 65 * 2, 1.0));
        compare_in!(
            g,
            "matmul",
            tol,
            &[(&x[..5 * 3 * 17], &[5, 3, 17]), (&y[..5 * 17 * 65], &[5, 17, 65])],
            |be, t| be.matmul(&t[0], &t[1])
        );

        let (a, b) = (rng.vec(4099, 3.0), rng.vec(4099, 3.0));
        let inputs: Inputs<'_> = &[(&a, &[4099]), (&b, &[4099])];
        compare_in!(g, "add", tol, inputs, |be, t| be.add(&t[0], &t[1]));
        compare_in!(g, "silu_mul", tol, inputs, |be, t| be.silu_mul(&t[0], &t[1]));
        compare_in!(g, "gelu", tol, inputs, |be, t| be.gelu(&t[0]));
        compare_in!(g, "gelu_tanh", tol, inputs, |be, t| be.gelu_tanh(&t[0]));
        let x = rng.vec(9 * 2 * 700, 4.0);
        compare_in!(g, "swiglu", tol, &[(&x, &[9, 1400])], |be, t| be.swiglu(&t[0]));
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Silu] {
            let (x, w, b) = (rng.vec(17 * 96, 1.0), rng.vec(130 * 96, 0.3), rng.vec(130, 1.0));
            let inputs: Inputs<'_> = &[(&x, &[17, 96]), (&w, &[130, 96]), (&b, &[130])];
            let linear_tol = Tol {
                atol: u * (4.0 + 2.0 * 96f32.sqrt()),
                rtol: 4.0 * u,
            };
            compare_in!(g, format!("linear_act {act:?}"), linear_tol, inputs, |be, t| be
                .linear_act(&t[0], &t[1], Some(&t[2]), act));
        }

        // The folded projections: through the matrix-vector kernel (1 and 3 rows; one rounding
        // of the output) and through cuBLAS (6 rows; the normalised rows and the product are
        // stored too), both within the product's bound above, doubled for SwiGLU's product of
        // two projections.
        for &(rows, k, m) in &[(1, 264, 37), (3, 96, 130), (6, 96, 33)] {
            let projection = ProjectionInputs::new(&mut rng, rows, k, m);
            let inputs: Inputs<'_> = &projection.inputs();
            let (residual, residual_shape) = inputs[4];
            let linear_tol = Tol {
                atol: u * (4.0 + 2.0 * (k as f32).sqrt()),
                rtol: 4.0 * u,
            };
            let swiglu_tol = Tol {
                atol: 2.0 * linear_tol.atol,
                rtol: 2.0 * linear_tol.rtol,
            };
            let what = |op: &str| format!("{op} {rows}x{k}x{m}");
            compare_in!(g, what("rms_norm_linear"), linear_tol, inputs, |be, t| be
                .rms_norm_linear(&t[0], &t[1], 1e-6, &t[2], Some(&t[3])));
            compare_in!(g, what("rms_norm_swiglu"), swiglu_tol, inputs, |be, t| be
                .rms_norm_swiglu(&t[0], &t[1], 1e-6, &t[5]));
            compare_in!(g, what("linear_add"), linear_tol, inputs, |be, t| be.linear_add(
                &t[0],
                &t[2],
                Some(&t[3]),
                be.from_host(&p.round(residual), residual_shape)?
            ));
        }

        let (rows, d) = (7, 384);
        let (x, r, gamma, beta) = (
            rng.vec(rows * d, 1.0),
            rng.vec(rows * d, 1.0),
            rng.vec(d, 1.0),
            rng.vec(d, 0.5),
        );
        let inputs: Inputs<'_> = &[(&x, &[rows, d]), (&r, &[rows, d]), (&gamma, &[d]), (&beta, &[d])];
        compare_in!(g, "layer_norm", tol, inputs, |be, t| be
            .layer_norm(&t[0], &t[2], &t[3], 1e-5));
        compare_in!(g, "rms_norm", tol, inputs, |be, t| be
            .rms_norm(&t[0], &t[2], 1e-6));
        // The residual sum is stored before its statistics (as in PyTorch at this precision):
        // the sum of the stored inputs, rounded, is what the reference normalises.
        let (xr, rr) = (p.round(&x), p.round(&r));
        let sum = p.round(&xr.iter().zip(&rr).map(|(a, b)| a + b).collect::<Vec<f32>>());
        let (_, want) = run(
            &ReferenceBackend,
            &[(&sum, &[rows, d]), (&gamma, &[d]), (&beta, &[d])],
            |be, t| {
                let (gamma, beta) = (
                    be.from_host(&p.round(&gamma), &[d])?,
                    be.from_host(&p.round(&beta), &[d])?,
                );
                be.layer_norm(&t[0], &gamma, &beta, 1e-5)
            },
        );
        let (_, got) = run(g, inputs, |be, t| {
            be.add_layer_norm(&t[0], &t[1], &t[2], &t[3], 1e-5)
        });
        assert_close(&format!("add_layer_norm ({p})"), &got, &want, tol);

        let x = rng.vec(5 * 1000, 8.0);
        compare_in!(g, "softmax", tol, &[(&x, &[5, 1000])], |be, t| be
            .softmax_rows(&t[0]));

        let table = rng.vec(50 * 33, 1.0);
        let ids: Vec<u32> = (0..300).map(|_| rng.below(50) as u32).collect();
        compare_in!(g, "embedding", EXACT, &[(&table, &[50, 33])], |be, t| be
            .embedding(&ids, &t[0]));

        let x = rng.vec(17 * 12 * 64, 2.0);
        let positions: Vec<usize> = (0..17).map(|_| rng.below(4096)).collect();
        compare_in!(g, "rope", tol, &[(&x, &[17, 12, 64])], |be, t| be
            .rope(&t[0], &positions, 10_000.0));
        let qkv = rng.vec(17 * 16 * 64, 2.0);
        for part in 0..3 {
            compare_in!(
                g,
                format!("split_qkv_rope part {part}"),
                tol,
                &[(&qkv, &[17, 16 * 64])],
                |be, t| {
                    let (q, k, v) = be.split_qkv_rope(&t[0], (12, 2), &positions, 10_000.0)?;
                    Ok([q, k, v].into_iter().nth(part).expect("three parts"))
                }
            );
        }

        for c in AttnCase::COMMON {
            let AttnInputs { q, k, v, valid } = c.inputs(&mut rng);
            let mask = c.mask(&valid);
            let (qs, ks) = (c.q_shape(), c.kv_shape());
            let inputs: Inputs<'_> = &[(&q, &qs), (&k, &ks), (&v, &ks)];
            for (path, attend) in attention_paths(&mask) {
                compare_rounded(
                    g,
                    &format!("{path} attention {c:?}"),
                    tol,
                    inputs,
                    |be, t| be.attention(&t[0], &t[1], &t[2], &mask),
                    attend,
                );
            }
        }

        for c in PagedCase::COMMON {
            let mut inputs = c.inputs(&mut rng);
            inputs.round_to(p);
            let [want, want_keys, want_values] =
                paged_step(&ReferenceBackend, &inputs, &c, |b, q, k, v, pg| {
                    b.paged_attention(q, k, v, pg)
                });
            let [got, keys, values] =
                paged_step(g, &inputs, &c, |b, q, k, v, pg| b.paged_attention(q, k, v, pg));
            assert_close(&format!("paged attention {c:?} ({p})"), &got, &want, tol);
            assert_eq!((keys, values), (want_keys, want_values), "{c:?} ({p}): pools");
        }

        // Argmax over the stored (rounded) logits: rounding can make ties, the first wins.
        let x = rng.vec(3 * 32000, 10.0);
        let t = g.from_host(&x, &[3, 32000]).unwrap();
        let want: Vec<u32> = p.round(&x).chunks(32000).map(crate::sampling::argmax).collect();
        assert_eq!(g.argmax_rows(&t).unwrap(), want, "{p}: argmax");
    }
}

#[test]
fn gpu_shape_mismatches_are_errors() {
    let Some(g) = gpu("gpu_shape_mismatches_are_errors") else {
        return;
    };
    let t = |shape: &[usize]| g.from_host(&vec![0.5; shape.iter().product()], shape).unwrap();
    assert!(g.from_host(&[1.0, 2.0, 3.0], &[2, 2]).is_err());
    assert!(g.linear(&t(&[3, 4]), &t(&[5, 3]), None).is_err());
    assert!(g.matmul(&t(&[2, 3, 4]), &t(&[3, 4, 5])).is_err());
    assert!(g.add(&t(&[2, 3]), &t(&[3, 2])).is_err());
    assert!(g.layer_norm(&t(&[2, 3]), &t(&[2]), &t(&[3]), 1e-5).is_err());
    assert!(g.rope(&t(&[2, 1, 3]), &[0, 1], 1e4).is_err());
    let (q, kv) = (t(&[1, 2, 4, 8]), t(&[1, 3, 3, 8]));
    assert!(g.attention(&q, &kv, &kv, &AttentionMask::none()).is_err());
    // Empty tensors are fine and stay empty.
    let e = g.from_host(&[], &[0, 5]).unwrap();
    assert_eq!(g.to_host(&g.gelu(&e).unwrap()).unwrap(), Vec::<f32>::new());
}
