//! The CUDA kernels executed on the CPU: their own `.cu` source, compiled with g++ against
//! `emulator.h` (threads for CUDA threads, barriers for `__syncthreads` and warp shuffles), and
//! launched with the shapes and arguments the backend gives them, against the f64 reference
//! backend. This runs the kernels' indexing, masking, paging, reductions and conversions on
//! every machine with g++, in fp32, fp16 and bf16; what only a GPU shows (timing, its own
//! instructions and memory model) is left to the GPU tests. Without g++ each test prints
//! `SKIPPED`.

use std::ffi::{CString, c_char, c_void};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use cudarc::driver::LaunchConfig;

use super::gemm::Gemm;
use super::gemv::gemv_cfg;
use super::kernels::{self, COMMON, FILES};
use super::ops::{
    AttentionKernel, HeadRows, act_code, attention_cfg, decode_merge_cfg, draw_words, grouped_decode_fits,
    grouped_heads, unfused_plan,
};
use super::paged::{prompt_chunk, prompt_chunks};
use crate::backend::shapes::AttnDims;
use crate::backend::test_util::{
    AttnCase, AttnInputs, PagedCase, Rng, Tol, assert_close, print_skip, sampling_case,
};
use crate::backend::{Activation, Backend, CpuTensor, PagedPlan, Precision, ReferenceBackend, Result};

const SHIM: &str = include_str!("emulator.h");

/// `emu_launch(name, grid, block, smem, args, first, last)`: the blocks `first..last` of the grid.
type LaunchFn =
    unsafe extern "C" fn(*const c_char, *const u32, *const u32, usize, *mut *mut c_void, u64, u64) -> i32;

/// The kernels of one precision compiled for the CPU, loaded from a shared library.
struct Emulator {
    launch: LaunchFn,
    precision: Precision,
}

// SAFETY: the library stays loaded for the life of the process and launches are serialised by
// the mutex around each emulator.
unsafe impl Send for Emulator {}

/// Kernels of the tests' own, for the emulator itself.
/// - probe_static_shared: block 0 writes its static shared array, every block reads it back.
///   On a GPU a later block would read garbage; the emulator refills static shared memory with
///   0xff bytes before each block (a function static would otherwise keep block 0's values).
/// - probe_trap: thread 5 of block `trapping` fails a KERNEL_CHECK between two barriers, while
///   the others wait at them; every thread of a block that completes writes 1.
/// - probe_mma (half precision): one warp's mma_16x8x16 of A [16][16] and B [16][8]
///   (row-major, stored elements) onto C [16][8] (fp32, overwritten with D), each fragment
///   filled and read back as common.cuh lays it out.
/// - probe_ldmatrix (half precision): one warp stages 32 rows of 8 16-bit values (rows 16
///   elements apart) in shared memory; lane l addresses row 7 - l % 8 of matrix l / 8, shifted
///   by `misaligned` elements, and writes the four registers of ldmatrix_x4, then of
///   ldmatrix_x4_trans, as lane-major words.
/// - probe_butterfly: one warp's lanes_sum and lanes_max at every width (the emulator's one-
///   exchange butterflies), each beside the same butterfly written out in __shfl_xor_sync.
/// - probe_cp_async (half precision): each lane of one warp fills its 16 bytes of a shared
///   tile with 7s, then copies 16 bytes of `src` over them by cp_async_16 (lanes 24 and up
///   read none, so zero-fill), reads its own word 0 before waiting, waits, and after a barrier
///   writes its neighbour's (lane ^ 1) 16 bytes; with `leave_pending` every lane returns
///   without waiting.
const PROBES: &str = r#"
extern "C" __global__ void probe_static_shared(unsigned int* out) {
    __shared__ unsigned int seen[64];
    if (blockIdx.x == 0) {
        seen[threadIdx.x] = threadIdx.x + 1;
    }
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = seen[threadIdx.x];
}

extern "C" __global__ void probe_trap(unsigned int* out, int trapping) {
    __syncthreads();
    KERNEL_CHECK(blockIdx.x != trapping || threadIdx.x != 5);
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

extern "C" __global__ void probe_mma(float* c, const elem_t* a, const elem_t* b) {
#if defined(ATOMIC_HAS_MMA)
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const auto pair = [](elem_t lo, elem_t hi) { return (unsigned int)lo.bits | ((unsigned int)hi.bits << 16); };
    const unsigned int fa[4] = {
        pair(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
        pair(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
        pair(a[g * 16 + 8 + 2 * t], a[g * 16 + 8 + 2 * t + 1]),
        pair(a[(g + 8) * 16 + 8 + 2 * t], a[(g + 8) * 16 + 8 + 2 * t + 1]),
    };
    const unsigned int fb[2] = {
        pair(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
        pair(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]),
    };
    float fc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    mma_16x8x16(fc, fa, fb);
    c[g * 8 + 2 * t] = fc[0];
    c[g * 8 + 2 * t + 1] = fc[1];
    c[(g + 8) * 8 + 2 * t] = fc[2];
    c[(g + 8) * 8 + 2 * t + 1] = fc[3];
#endif
}

extern "C" __global__ void probe_ldmatrix(unsigned int* out, const unsigned short* tile, int misaligned) {
#if defined(ATOMIC_HAS_MMA)
    alignas(16) __shared__ unsigned short rows[32 * 16];
    const int lane = threadIdx.x % 32;
    for (int e = lane; e < 32 * 16; e += 32) {
        rows[e] = tile[e];
    }
    __syncthreads();
    const unsigned short* row = rows + ((lane / 8) * 8 + 7 - lane % 8) * 16 + misaligned;
    unsigned int r[4];
    ldmatrix_x4(r, row);
    for (int i = 0; i < 4; ++i) {
        out[lane * 4 + i] = r[i];
    }
    ldmatrix_x4_trans(r, row);
    for (int i = 0; i < 4; ++i) {
        out[128 + lane * 4 + i] = r[i];
    }
#endif
}

extern "C" __global__ void probe_butterfly(float* out, const float* in) {
    const int lane = threadIdx.x % 32;
    const float v = in[lane];
    int slot = 0;
    for (int width = 1; width <= 32; width *= 2, ++slot) {
        float s = v, mx = v;
        for (int o = width / 2; o > 0; o >>= 1) {
            s += __shfl_xor_sync(FULL_MASK, s, o);
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, o));
        }
        out[(4 * slot) * 32 + lane] = lanes_sum(v, width);
        out[(4 * slot + 1) * 32 + lane] = s;
        out[(4 * slot + 2) * 32 + lane] = width == 32 ? warp_max(v) : lanes_max(v, width);
        out[(4 * slot + 3) * 32 + lane] = mx;
    }
}

extern "C" __global__ void probe_cp_async(unsigned int* out, const unsigned int* src, int leave_pending) {
#if defined(ATOMIC_HAS_MMA)
    alignas(16) __shared__ unsigned int tile[32 * 4];
    const int lane = threadIdx.x % 32;
    for (int e = 0; e < 4; ++e) {
        tile[lane * 4 + e] = 7;
    }
    __syncthreads();
    cp_async_16(tile + lane * 4, src + lane * 4, lane < 24 ? 16 : 0);
    if (leave_pending) {
        return;
    }
    out[128 + lane] = tile[lane * 4];
    cp_async_wait_all();
    __syncthreads();
    for (int e = 0; e < 4; ++e) {
        out[lane * 4 + e] = tile[(lane ^ 1) * 4 + e];
    }
#endif
}
"#;

/// The C++ translation unit: the shim, the shared helpers once, every kernel file (dynamic
/// shared memory mapped to the emulator's buffer), the tests' probe kernels and a dispatch
/// table over the kernel names.
fn source(precision: Precision) -> String {
    let mut src = String::from("#define ATOMIC_EMULATE 1\n");
    if let Some(define) = kernels::precision_define(precision) {
        src.push_str(&format!("#define {}\n", define.trim_start_matches("-D")));
    }
    src.push_str(SHIM);
    src.push_str("\n#line 1 \"common.cuh\"\n");
    src.push_str(COMMON);
    for file in FILES {
        src.push_str(&format!("\n#line 1 \"{}\"\n", file.name));
        src.push_str(&file.source.replace(
            "extern __shared__ float smem[];",
            "float* smem = emu::dynamic_smem();",
        ));
    }
    src.push_str("\n#line 1 \"probe\"\n");
    src.push_str(PROBES);
    src.push_str(
        "\nextern \"C\" int emu_launch(const char* name, const unsigned* grid, const unsigned* block, \
         size_t smem, void** args, uint64_t first, uint64_t last) {\n",
    );
    for name in FILES.iter().flat_map(|f| f.functions).chain(&[
        "probe_static_shared",
        "probe_trap",
        "probe_mma",
        "probe_ldmatrix",
        "probe_butterfly",
        "probe_cp_async",
    ]) {
        src.push_str(&format!(
            "    if (strcmp(name, \"{name}\") == 0) return emu::run(&{name}, grid, block, smem, args, first, last);\n"
        ));
    }
    src.push_str("    return 2;\n}\n");
    src
}

fn build(precision: Precision) -> std::result::Result<Emulator, String> {
    let dir = std::env::temp_dir().join(format!("atomic-cuda-emulator-{precision}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let (src, lib) = (dir.join("kernels.cpp"), dir.join("libkernels.so"));
    std::fs::write(&src, source(precision)).map_err(|e| e.to_string())?;
    let out = Command::new("g++")
        .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .map_err(|e| format!("g++ not runnable ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "g++ failed on the emulated kernels ({precision}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let path = CString::new(lib.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: loading a library we just built; its static initialisers only set up the shim's
    // globals. The handle is never closed, so the function pointer stays valid.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!("dlopen {} failed", lib.display()));
    }
    // SAFETY: as above; the symbol is the `extern "C"` dispatcher with the `LaunchFn` signature.
    let symbol = unsafe { libc::dlsym(handle, c"emu_launch".as_ptr()) };
    if symbol.is_null() {
        return Err("emu_launch missing from the emulated kernels".into());
    }
    // SAFETY: see above.
    let launch = unsafe { std::mem::transmute::<*mut c_void, LaunchFn>(symbol) };
    // The loaded library no longer needs its file.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Emulator { launch, precision })
}

/// The emulator for `precision` (built once per test process), or `None` after saying why
/// `test` skips. A g++ that fails on the kernels is a test failure, not a skip.
fn emulator(test: &str, precision: Precision) -> Option<MutexGuard<'static, Emulator>> {
    type Slot = OnceLock<std::result::Result<Mutex<Emulator>, String>>;
    static SLOTS: [Slot; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let have_gxx = Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_gxx {
        print_skip(
            test,
            "g++ not found; the CUDA kernels cannot be emulated on the CPU",
        );
        return None;
    }
    let slot = &SLOTS[Precision::ALL.iter().position(|&p| p == precision).unwrap_or(0)];
    match slot.get_or_init(|| build(precision).map(Mutex::new)) {
        Ok(m) => Some(m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())),
        Err(e) => panic!("{e}"),
    }
}

/// A kernel's arguments as `cuLaunchKernel` takes them: one pointer per parameter, each to a
/// slot holding the value (a device pointer is a host pointer here). The slots are 8 bytes, read
/// by the kernel as its parameter's type (little-endian, so an `int` is the low half).
#[derive(Default)]
struct Args(Vec<u64>);

impl Args {
    fn buf<T>(mut self, data: &mut [T]) -> Self {
        self.0.push(data.as_mut_ptr() as u64);
        self
    }

    /// `data` as the first argument, before those already given.
    fn buf_first<T>(mut self, data: &mut [T]) -> Self {
        self.0.insert(0, data.as_mut_ptr() as u64);
        self
    }

    fn int(mut self, v: usize) -> Self {
        let v = i32::try_from(v).expect("test sizes fit an int");
        self.0.push(u64::from(v as u32));
        self
    }

    fn signed(mut self, v: i32) -> Self {
        self.0.push(u64::from(v as u32));
        self
    }

    fn float(mut self, v: f32) -> Self {
        self.0.push(u64::from(v.to_bits()));
        self
    }
}

impl Emulator {
    fn launch(&self, name: &str, grid: (usize, usize, usize), block: usize, smem: usize, args: Args) {
        let rc = self.try_launch(name, grid, block, smem, args);
        assert_eq!(rc, 0, "emulated launch of {name} failed ({rc})");
    }

    /// [`Emulator::launch`], returning the emulator's status: 0, or why the launch failed.
    fn try_launch(
        &self,
        name: &str,
        grid: (usize, usize, usize),
        block: usize,
        smem: usize,
        mut args: Args,
    ) -> i32 {
        let name_c = CString::new(name).expect("kernel name");
        let grid = [grid.0 as u32, grid.1 as u32, grid.2 as u32];
        let blocks = grid.iter().map(|&g| u64::from(g)).product();
        let block = [block as u32, 1, 1];
        let mut pointers: Vec<*mut c_void> = args.0.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        // SAFETY: the arguments follow the kernel's parameter list (the tests mirror the
        // backend's launches) and every buffer holds what the kernel indexes.
        unsafe {
            (self.launch)(
                name_c.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                smem,
                pointers.as_mut_ptr(),
                0,
                blocks,
            )
        }
    }

    /// A launch with the backend's own launch shape.
    fn launch_cfg(&self, name: &str, cfg: &LaunchConfig, args: Args) {
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        assert_eq!((b.1, b.2), (1, 1), "the kernels use 1-D blocks");
        let grid = (g.0 as usize, g.1 as usize, g.2 as usize);
        self.launch(name, grid, b.0 as usize, cfg.shared_mem_bytes as usize, args);
    }

    /// Host data as the kernels store it.
    fn store(&self, data: &[f32]) -> Vec<u8> {
        self.precision.encode(data)
    }

    fn load(&self, bytes: &[u8]) -> Vec<f32> {
        self.precision.decode(bytes)
    }

    /// Four roundings of the precision (relative and absolute), or the fp32 tolerance of the GPU
    /// tests.
    fn tol(&self) -> Tol {
        match self.precision {
            Precision::F32 => Tol {
                atol: 1e-5,
                rtol: 1e-4,
            },
            Precision::F16 => Tol {
                atol: 4.0 / 2048.0,
                rtol: 4.0 / 2048.0,
            },
            Precision::Bf16 => Tol {
                atol: 4.0 / 256.0,
                rtol: 4.0 / 256.0,
            },
        }
    }
}

fn reference(data: &[f32], shape: &[usize]) -> CpuTensor {
    ReferenceBackend.from_host(data, shape).expect("reference input")
}

fn host(t: Result<CpuTensor>) -> Vec<f32> {
    ReferenceBackend
        .to_host(&t.expect("reference op"))
        .expect("to_host")
}

/// How many of a list of attention cases to emulate in precision `p`: all of them in fp32; in
/// fp16 and bf16, whose kernels differ only in their loads and stores, the first five (which
/// cover padding, GQA, causal prompts, decode over a cache and sliding windows), since every
/// emulated warp shuffle is a pair of context switches.
fn cases_for(p: Precision, all: usize) -> usize {
    if p == Precision::F32 { all } else { all.min(5) }
}

/// The `layer_norm` kernel over `x [rows, d]`, with the residual and the product's bias when
/// given, as `CudaBackend::norm_launch` passes them (absent ones as flags over a placeholder).
fn emulated_layer_norm(
    emu: &Emulator,
    x: &[f32],
    (rows, d): (usize, usize),
    (residual, bias): (Option<&[f32]>, Option<&[f32]>),
    (gamma, beta): (&[f32], &[f32]),
) -> Vec<f32> {
    let (mut xd, mut gd, mut bd) = (emu.store(x), emu.store(gamma), emu.store(beta));
    let mut rd = emu.store(residual.unwrap_or(&[0.0]));
    let mut pbd = emu.store(bias.unwrap_or(&[0.0]));
    let mut out = vec![0u8; xd.len()];
    let args = Args::default()
        .buf(&mut out)
        .buf(&mut xd)
        .buf(&mut rd)
        .int(usize::from(residual.is_some()))
        .buf(&mut pbd)
        .int(usize::from(bias.is_some()))
        .buf(&mut gd)
        .buf(&mut bd)
        .int(rows)
        .int(d)
        .float(1e-5);
    emu.launch("layer_norm", (rows, 1, 1), 256, 0, args);
    emu.load(&out)
}

/// The launch shape of the elementwise kernels (as `launch::elementwise_cfg`).
fn elementwise_grid(n: usize) -> (usize, usize, usize) {
    (n.div_ceil(256).clamp(1, 1 << 16), 1, 1)
}

/// The device form of a paged plan, as `CudaBackend::prepare_paged_plan` builds it.
fn paged_indices(plan: &PagedPlan) -> (Vec<i32>, Vec<u32>, Vec<u32>) {
    let (mut meta, mut tables, mut q_start) = (Vec::new(), Vec::new(), 0);
    for s in &plan.seqs {
        meta.extend([
            q_start as i32,
            s.q_len as i32,
            s.k_len as i32,
            tables.len() as i32,
        ]);
        q_start += s.q_len;
        tables.extend_from_slice(&s.blocks);
    }
    (meta, tables, plan.new_slots())
}

/// The device buffers the paged attention kernels read: queries, key and value pools (stored
/// elements), and the plan's per-sequence metadata and block tables (see [`paged_indices`]).
struct PagedBuffers<'a> {
    q: &'a mut [u8],
    keys: &'a mut [u8],
    values: &'a mut [u8],
    meta: &'a mut [i32],
    tables: &'a mut [u32],
}

/// A paged attention kernel's arguments as `CudaBackend::paged_attention_queries` passes them:
/// every kernel takes the same list after `dest`, where it writes.
fn paged_attention_args<T>(dest: &mut [T], b: PagedBuffers<'_>, c: &PagedCase, seqs: usize) -> Args {
    Args::default()
        .buf(dest)
        .buf(b.q)
        .buf(b.keys)
        .buf(b.values)
        .buf(b.meta)
        .buf(b.tables)
        .int(seqs)
        .int(c.block_size)
        .int(c.window.unwrap_or(0))
        .int(c.heads)
        .int(c.kv_heads)
        .int(c.d)
        .float(1.0 / (c.d as f32).sqrt())
}

#[test]
fn emulated_paged_attention_matches_reference_for_both_kernels() {
    for p in Precision::ALL {
        let Some(emu) = emulator("emulated_paged_attention_matches_reference_for_both_kernels", p) else {
            return;
        };
        let mut rng = Rng::new(201);
        for c in PagedCase::COMMON
            .into_iter()
            .take(cases_for(p, PagedCase::COMMON.len()))
        {
            let mut inputs = c.inputs(&mut rng);
            inputs.round_to(p);
            // The reference: write, then attend, in f64.
            let r = ReferenceBackend;
            let paged = r.prepare_paged(&inputs.plan).unwrap();
            let mut want_keys = reference(&inputs.keys, &inputs.pool_shape);
            let mut want_values = reference(&inputs.values, &inputs.pool_shape);
            r.write_paged(
                &mut want_keys,
                &reference(&inputs.new_keys, &c.new_shape()),
                &paged,
            )
            .unwrap();
            r.write_paged(
                &mut want_values,
                &reference(&inputs.new_values, &c.new_shape()),
                &paged,
            )
            .unwrap();
            let want = host(r.paged_attention(
                &reference(&inputs.q, &c.q_shape()),
                &want_keys,
                &want_values,
                &paged,
            ));

            let (mut meta, mut tables, mut slots) = paged_indices(&inputs.plan);
            let (mut keys, mut values) = (emu.store(&inputs.keys), emu.store(&inputs.values));
            let (mut new_keys, mut new_values) = (emu.store(&inputs.new_keys), emu.store(&inputs.new_values));
            let [tokens, heads, d] = c.q_shape();
            let width = c.kv_heads * d;
            for (pool, new) in [(&mut keys, &mut new_keys), (&mut values, &mut new_values)] {
                let args = Args::default()
                    .buf(pool)
                    .buf(new)
                    .buf(&mut slots)
                    .int(tokens)
                    .int(width);
                emu.launch("kv_write", elementwise_grid(tokens * width), 256, 0, args);
            }
            assert_eq!(emu.load(&keys), want_keys.data(), "{c:?} ({p}): key pool");
            assert_eq!(emu.load(&values), want_values.data(), "{c:?} ({p}): value pool");

            let mut q = emu.store(&inputs.q);
            let seqs = inputs.plan.seqs.len();
            let max_q = inputs.plan.seqs.iter().map(|s| s.q_len).max().unwrap_or(0);
            for (kernel, shape) in [
                ("paged_flash_attention", AttentionKernel::Flash),
                ("paged_decode_attention", AttentionKernel::Decode),
            ] {
                let cfg = attention_cfg(shape, max_q, (heads, c.kv_heads), seqs, d);
                let mut out = emu.store(&vec![f32::NAN; tokens * heads * d]);
                let buffers = PagedBuffers {
                    q: &mut q,
                    keys: &mut keys,
                    values: &mut values,
                    meta: &mut meta,
                    tables: &mut tables,
                };
                emu.launch_cfg(kernel, &cfg, paged_attention_args(&mut out, buffers, &c, seqs));
                assert_close(
                    &format!("{kernel} {c:?} ({p})"),
                    &emu.load(&out),
                    &want,
                    emu.tol(),
                );
            }
        }
    }
}

/// A dense attention case's inputs rounded to precision `p`, and the f64 reference's output.
fn dense_case(c: &AttnCase, p: Precision, rng: &mut Rng) -> (AttnInputs, Vec<f32>) {
    dense_case_of(c, p, c.inputs(rng))
}

/// [`dense_case`] of given inputs.
fn dense_case_of(c: &AttnCase, p: Precision, inputs: AttnInputs) -> (AttnInputs, Vec<f32>) {
    let AttnInputs { q, k, v, valid } = inputs;
    let (q, k, v) = (p.round(&q), p.round(&k), p.round(&v));
    let (qs, ks) = (c.q_shape(), c.kv_shape());
    let want = host(ReferenceBackend.attention(
        &reference(&q, &qs),
        &reference(&k, &ks),
        &reference(&v, &ks),
        &c.mask(&valid),
    ));
    (AttnInputs { q, k, v, valid }, want)
}

/// The device buffers the dense attention kernels read: queries, keys, values (stored
/// elements) and the padding mask as bytes (never empty, as the backend's placeholder).
struct DenseBuffers<'a> {
    q: &'a mut [u8],
    k: &'a mut [u8],
    v: &'a mut [u8],
    valid: &'a mut [u8],
}

/// A dense attention kernel's arguments as `CudaBackend::attention_with` passes them.
fn dense_attention_args(dest: &mut [u8], b: DenseBuffers<'_>, c: &AttnCase) -> Args {
    Args::default()
        .buf(dest)
        .buf(b.q)
        .buf(b.k)
        .buf(b.v)
        .buf(b.valid)
        .int(usize::from(c.padding))
        .signed(c.causal.map_or(-1, |o| o as i32))
        .int(c.batch)
        .int(c.s_q)
        .int(c.s_k)
        .int(c.heads)
        .int(c.kv_heads)
        .int(c.d)
        .float(1.0 / (c.d as f32).sqrt())
}

#[test]
fn emulated_dense_attention_matches_reference_for_both_kernels() {
    for p in Precision::ALL {
        let Some(emu) = emulator("emulated_dense_attention_matches_reference_for_both_kernels", p) else {
            return;
        };
        let mut rng = Rng::new(202);
        for c in AttnCase::COMMON
            .into_iter()
            .take(cases_for(p, AttnCase::COMMON.len()))
        {
            let (AttnInputs { q, k, v, valid }, want) = dense_case(&c, p, &mut rng);
            let (mut qd, mut kd, mut vd) = (emu.store(&q), emu.store(&k), emu.store(&v));
            let mut valid_u8: Vec<u8> = valid.iter().map(|&b| u8::from(b)).collect();
            valid_u8.push(0); // never empty, as the backend's placeholder
            let d = c.d;
            for (kernel, shape) in [
                ("flash_attention", AttentionKernel::Flash),
                ("decode_attention", AttentionKernel::Decode),
            ] {
                let cfg = attention_cfg(shape, c.s_q, (c.heads, c.kv_heads), c.batch, d);
                let mut out = emu.store(&vec![f32::NAN; q.len()]);
                let buffers = DenseBuffers {
                    q: &mut qd,
                    k: &mut kd,
                    v: &mut vd,
                    valid: &mut valid_u8,
                };
                emu.launch_cfg(kernel, &cfg, dense_attention_args(&mut out, buffers, &c));
                assert_close(
                    &format!("{kernel} {c:?} ({p})"),
                    &emu.load(&out),
                    &want,
                    emu.tol(),
                );
            }
        }
    }
}

/// cuBLAS's batched product over matrices given by address as its documentation defines it:
/// column-major matrices with leading dimensions, `op(X)` the transpose when asked,
/// `C = op(A) · op(B)` for each matrix of the batch (in f64, stored as f32 like an fp32 result).
/// Addresses are element offsets into `a`, `b` and `c`. It checks the unfused attention's
/// product descriptors without a GPU.
fn cublas_reference(
    g: &Gemm,
    (a, a_at): (&[f32], &[usize]),
    (b, b_at): (&[f32], &[usize]),
    (c, c_at): (&mut [f32], &[usize]),
) {
    let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
    let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
    for ((&a0, &b0), &c0) in a_at.iter().zip(b_at).zip(c_at) {
        for j in 0..n {
            for i in 0..m {
                let sum: f64 = (0..k)
                    .map(|p| {
                        let av = if g.transa {
                            a[a0 + p + i * lda]
                        } else {
                            a[a0 + i + p * lda]
                        };
                        let bv = if g.transb {
                            b[b0 + j + p * ldb]
                        } else {
                            b[b0 + p + j * ldb]
                        };
                        f64::from(av) * f64::from(bv)
                    })
                    .sum();
                c[c0 + i + j * ldc] = sum as f32;
            }
        }
    }
}

/// The unfused attention as `CudaBackend::attention_unfused_into` runs it: the products
/// through `unfused_plan`'s descriptors and addresses evaluated as cuBLAS defines them around
/// the emulated masked softmax, on q, k and v read through `views` from `(q, k, v)`, into
/// `out` where `out_rows` says (rounded to the precision, as the product stores it), with a
/// sliding window over the causal mask when given.
fn emulated_unfused_into(
    emu: &Emulator,
    c: &AttnCase,
    (q, k, v): (&[f32], &[f32], &[f32]),
    views: [HeadRows; 4],
    (valid, window): (&[bool], Option<usize>),
    out: &mut [f32],
) {
    let p = emu.precision;
    let dims = AttnDims {
        batch: c.batch,
        s_q: c.s_q,
        s_k: c.s_k,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.d,
    };
    let plan = unfused_plan(&dims, views).expect("plan");
    let bh = c.batch * c.heads;
    let mut scores = vec![f32::NAN; bh * c.s_q * c.s_k];
    cublas_reference(
        &plan.scores,
        (k, &plan.k),
        (q, &plan.q),
        (&mut scores, &plan.scores_at),
    );
    let mut valid_u8: Vec<u8> = valid.iter().map(|&b| u8::from(b)).collect();
    valid_u8.push(0); // never empty, as the backend's placeholder
    let mut probs = emu.store(&vec![f32::NAN; bh * c.s_q * c.s_k]);
    let args = Args::default()
        .buf(&mut probs)
        .buf(&mut scores)
        .buf(&mut valid_u8)
        .int(usize::from(c.padding))
        .signed(c.causal.map_or(-1, |o| o as i32))
        .int(window.unwrap_or(0))
        .int(bh * c.s_q)
        .int(c.s_q)
        .int(c.s_k)
        .int(c.heads)
        .float(1.0 / (c.d as f32).sqrt());
    emu.launch("attn_softmax", (bh * c.s_q, 1, 1), 256, 0, args);
    cublas_reference(
        &plan.values,
        (v, &plan.v),
        (&emu.load(&probs), &plan.probs_at),
        (out, &plan.out_at),
    );
    let rounded = p.round(out);
    out.copy_from_slice(&rounded);
}

/// [`emulated_unfused_into`] into a dense `[batch, s_q, heads, d]` output.
fn emulated_unfused(
    emu: &Emulator,
    c: &AttnCase,
    qkv: (&[f32], &[f32], &[f32]),
    [qv, kv, vv]: [HeadRows; 3],
    valid: &[bool],
) -> Vec<f32> {
    let mut out = vec![f32::NAN; c.batch * c.s_q * c.heads * c.d];
    let out_rows = HeadRows::dense(c.s_q, c.heads, c.d);
    emulated_unfused_into(emu, c, qkv, [qv, kv, vv, out_rows], (valid, None), &mut out);
    out
}

#[test]
fn emulated_unfused_attention_matches_reference() {
    // Dense q, k and v, and the three inside one fused projection (BERT), against the f64
    // reference attention.
    for p in [Precision::F32, Precision::Bf16] {
        let Some(emu) = emulator("emulated_unfused_attention_matches_reference", p) else {
            return;
        };
        let mut rng = Rng::new(208);
        for c in AttnCase::COMMON
            .into_iter()
            .take(cases_for(p, AttnCase::COMMON.len()))
        {
            let (AttnInputs { q, k, v, valid }, want) = dense_case(&c, p, &mut rng);
            let views = [
                HeadRows::dense(c.s_q, c.heads, c.d),
                HeadRows::dense(c.s_k, c.kv_heads, c.d),
                HeadRows::dense(c.s_k, c.kv_heads, c.d),
            ];
            let got = emulated_unfused(&emu, &c, (&q, &k, &v), views, &valid);
            assert_close(&format!("unfused attention {c:?} ({p})"), &got, &want, emu.tol());

            if c.s_q == c.s_k && c.heads == c.kv_heads {
                // The same q, k and v interleaved per token as a fused projection.
                let hd = c.heads * c.d;
                let qkv: Vec<f32> = (0..c.batch * c.s_q)
                    .flat_map(|t| [&q, &k, &v].map(|x| x[t * hd..(t + 1) * hd].to_vec()).concat())
                    .collect();
                let views = [0, 1, 2].map(|part| HeadRows::fused_qkv(part, c.s_q, c.heads, c.d));
                let got = emulated_unfused(&emu, &c, (&qkv, &qkv, &qkv), views, &valid);
                assert_close(
                    &format!("unfused attention from qkv {c:?} ({p})"),
                    &got,
                    &want,
                    emu.tol(),
                );
            }
        }
    }
}

#[test]
fn emulated_paged_prompts_through_the_unfused_path_match_reference() {
    // A step of prompts (one fresh, one after a cache) with a sequence decoding between them
    // (grouped heads; blocks scattered over the pool), as `CudaBackend::paged_prompts_unfused`
    // runs it: the decode kernel over every sequence's first query, then each prompt's keys and
    // values gathered out of the pools by the emulated kernel and the unfused attention in
    // query chunks (a small score limit, so that the prompts split into several) writing their
    // rows of the step's output, against the reference's paged attention. Once without and
    // once with a sliding window of 7 (shorter than the prompts, so the later chunks multiply
    // only their window's keys).
    let unwindowed = PagedCase {
        seqs: &[(13, 13), (1, 20), (6, 40)],
        heads: 4,
        kv_heads: 2,
        d: 16,
        block_size: 16,
        window: None,
    };
    let windowed = PagedCase {
        window: Some(7),
        ..unwindowed
    };
    for (p, c) in [Precision::F32, Precision::Bf16]
        .into_iter()
        .flat_map(|p| [(p, unwindowed), (p, windowed)])
    {
        let Some(emu) = emulator(
            "emulated_paged_prompts_through_the_unfused_path_match_reference",
            p,
        ) else {
            return;
        };
        let mut rng = Rng::new(209);
        let mut inputs = c.inputs(&mut rng);
        for x in [&mut inputs.keys, &mut inputs.values, &mut inputs.q] {
            *x = p.round(x);
        }
        let r = ReferenceBackend;
        let paged = r.prepare_paged(&inputs.plan).unwrap();
        let want = host(r.paged_attention(
            &reference(&inputs.q, &c.q_shape()),
            &reference(&inputs.keys, &inputs.pool_shape),
            &reference(&inputs.values, &inputs.pool_shape),
            &paged,
        ));

        let (mut meta, mut tables, _) = paged_indices(&inputs.plan);
        let (mut keys, mut values) = (emu.store(&inputs.keys), emu.store(&inputs.values));
        let [tokens, heads, d] = c.q_shape();
        let width = c.kv_heads * d;
        // The decode kernel over every sequence's first query (the decoding sequence's row,
        // and each prompt's first, which its products write again).
        let seqs = inputs.plan.seqs.len();
        let mut q_dev = emu.store(&inputs.q);
        let mut first_rows = emu.store(&vec![f32::NAN; tokens * heads * d]);
        let buffers = PagedBuffers {
            q: &mut q_dev,
            keys: &mut keys,
            values: &mut values,
            meta: &mut meta,
            tables: &mut tables,
        };
        let args = paged_attention_args(&mut first_rows, buffers, &c, seqs);
        let cfg = attention_cfg(AttentionKernel::Decode, 1, (heads, c.kv_heads), seqs, d);
        emu.launch_cfg("paged_decode_attention", &cfg, args);
        let mut out = emu.load(&first_rows);
        for (b, s) in inputs.plan.seqs.iter().enumerate() {
            if s.q_len == 1 {
                continue;
            }
            let (q_start, table_start) = (meta[4 * b] as usize, meta[4 * b + 3] as usize);
            let n = s.k_len * width;
            let (mut k_dense, mut v_dense) = (emu.store(&vec![f32::NAN; n]), emu.store(&vec![f32::NAN; n]));
            let args = Args::default()
                .buf(&mut k_dense)
                .buf(&mut v_dense)
                .buf(&mut keys)
                .buf(&mut values)
                .buf(&mut tables)
                .int(table_start)
                .int(c.block_size)
                .int(s.k_len)
                .int(width);
            emu.launch("paged_gather", elementwise_grid(n), 256, 0, args);
            let (k_dense, v_dense) = (emu.load(&k_dense), emu.load(&v_dense));
            // Scores of at most 5 queries at a time.
            let limit = 5 * heads * s.k_len * size_of::<f32>();
            let chunks = prompt_chunks(s.q_len, s.k_len, heads, limit);
            assert_eq!(chunks.len(), s.q_len.div_ceil(5), "{chunks:?}");
            for chunk in chunks {
                let pc = prompt_chunk(
                    q_start,
                    (s.q_len, s.k_len),
                    chunk,
                    (heads, c.kv_heads, d),
                    c.window,
                );
                let case = AttnCase {
                    batch: pc.dims.batch,
                    s_q: pc.dims.s_q,
                    s_k: pc.dims.s_k,
                    heads,
                    kv_heads: c.kv_heads,
                    d,
                    padding: false,
                    causal: Some(pc.causal_offset),
                };
                emulated_unfused_into(
                    &emu,
                    &case,
                    (&inputs.q, &k_dense, &v_dense),
                    [pc.rows, pc.kv_rows, pc.kv_rows, pc.rows],
                    (&[], c.window),
                    &mut out,
                );
            }
        }
        assert_close(
            &format!("paged prompts, unfused {c:?} ({p})"),
            &out,
            &want,
            emu.tol(),
        );
    }
}

#[test]
fn emulated_split_and_grouped_decode_match_the_reference() {
    // Each decode case's keys split across 1, 2, 3 and 7 blocks (more splits than keys for the
    // short caches, so some splits see nothing), by the per-head split kernel and, where it
    // takes the head dimension, the grouped-heads kernel, merged, against the f64 reference.
    for p in [Precision::F32, Precision::Bf16] {
        let Some(emu) = emulator("emulated_split_and_grouped_decode_match_the_reference", p) else {
            return;
        };
        let mut rng = Rng::new(207);
        for c in PagedCase::DECODE {
            let mut inputs = c.inputs(&mut rng);
            for v in [&mut inputs.keys, &mut inputs.values, &mut inputs.q] {
                *v = p.round(v);
            }
            // The pools as the step finds them (its own keys already written): the decode
            // kernels only read them.
            let r = ReferenceBackend;
            let paged = r.prepare_paged(&inputs.plan).unwrap();
            let (pool_keys, pool_values) = (
                reference(&inputs.keys, &inputs.pool_shape),
                reference(&inputs.values, &inputs.pool_shape),
            );
            let want = host(r.paged_attention(
                &reference(&inputs.q, &c.q_shape()),
                &pool_keys,
                &pool_values,
                &paged,
            ));
            let (mut meta, mut tables, _) = paged_indices(&inputs.plan);
            let (mut keys, mut values, mut q) = (
                emu.store(&inputs.keys),
                emu.store(&inputs.values),
                emu.store(&inputs.q),
            );
            let [tokens, heads, d] = c.q_shape();
            let seqs = inputs.plan.seqs.len();
            let (heads_per_block, _) = grouped_heads(heads, c.kv_heads);
            for splits in [1, 2, 3, 7] {
                let grouped = AttentionKernel::GroupedDecode { splits };
                let kernels = [
                    ("paged_decode_split", AttentionKernel::SplitDecode { splits }),
                    ("paged_decode_grouped", grouped),
                ];
                for (kernel, shape) in kernels {
                    if kernel == "paged_decode_grouped" && !grouped_decode_fits(d) {
                        continue;
                    }
                    let mut out = emu.store(&vec![f32::NAN; tokens * heads * d]);
                    let mut partials = vec![f32::NAN; seqs * heads * splits * (d + 2)];
                    let buffers = PagedBuffers {
                        q: &mut q,
                        keys: &mut keys,
                        values: &mut values,
                        meta: &mut meta,
                        tables: &mut tables,
                    };
                    let cfg = attention_cfg(shape, 1, (heads, c.kv_heads), seqs, d);
                    if kernel == "paged_decode_grouped" {
                        // Its output and partials first, then the split kernel's list, then
                        // the heads a block serves.
                        let args = paged_attention_args(&mut partials, buffers, &c, seqs)
                            .buf_first(&mut out)
                            .int(heads_per_block);
                        emu.launch_cfg(kernel, &cfg, args);
                    } else {
                        emu.launch_cfg(
                            kernel,
                            &cfg,
                            paged_attention_args(&mut partials, buffers, &c, seqs),
                        );
                    }
                    // One grouped split writes the output itself; the rest merge.
                    if kernel != "paged_decode_grouped" || splits > 1 {
                        let args = Args::default()
                            .buf(&mut out)
                            .buf(&mut partials)
                            .buf(&mut meta)
                            .int(seqs)
                            .int(splits)
                            .int(heads)
                            .int(d);
                        emu.launch_cfg("decode_merge", &decode_merge_cfg(heads, seqs), args);
                    }
                    assert_close(
                        &format!("{kernel} ({splits} splits) {c:?} ({p})"),
                        &emu.load(&out),
                        &want,
                        emu.tol(),
                    );
                }
            }
        }
    }
}

#[test]
fn emulated_sampling_draws_what_the_host_draws() {
    for p in Precision::ALL {
        let Some(emu) = emulator("emulated_sampling_draws_what_the_host_draws", p) else {
            return;
        };
        let mut rng = Rng::new(203);
        for &(rows, vocab) in &[(1, 1), (4, 17), (9, 300), (9, 32000)] {
            let (mut x, draws) = sampling_case(&mut rng, rows, vocab, |x| p.round(x));
            if vocab > 17 {
                x[7] = f32::NAN; // never drawn, never the argmax
                x[vocab + 3] = f32::NEG_INFINITY;
            }
            let want = ReferenceBackend
                .sample_rows(&reference(&x, &[rows, vocab]), &draws)
                .unwrap();
            let mut xd = emu.store(&x);
            let mut words = draw_words(&draws);
            let mut ids = vec![u32::MAX; rows];
            let args = Args::default()
                .buf(&mut ids)
                .buf(&mut xd)
                .buf(&mut words)
                .int(rows)
                .int(vocab);
            emu.launch("sample_rows", (rows, 1, 1), 256, 0, args);
            assert_eq!(ids, want, "sample_rows [{rows}, {vocab}] ({p})");

            let want: Vec<u32> = x.chunks(vocab).map(crate::sampling::argmax).collect();
            let mut ids = vec![u32::MAX; rows];
            let args = Args::default().buf(&mut ids).buf(&mut xd).int(rows).int(vocab);
            emu.launch("argmax_rows", (rows, 1, 1), 256, 0, args);
            assert_eq!(ids, want, "argmax_rows [{rows}, {vocab}] ({p})");
        }
    }
}

#[test]
fn emulated_row_kernels_match_reference() {
    for p in Precision::ALL {
        let Some(emu) = emulator("emulated_row_kernels_match_reference", p) else {
            return;
        };
        let tol = emu.tol();
        let r = ReferenceBackend;
        let mut rng = Rng::new(204);
        let (rows, d) = (5, 300);
        let x = p.round(&rng.vec(rows * d, 2.0));
        let res = p.round(&rng.vec(rows * d, 2.0));
        let w = p.round(&rng.vec(d, 1.0));
        let b = p.round(&rng.vec(d, 0.5));
        let (mut xd, mut bd) = (emu.store(&x), emu.store(&b));

        // The residual sum, rounded as layer_norm stores it before its statistics.
        let sum = p.round(&x.iter().zip(&res).map(|(a, b)| a + b).collect::<Vec<f32>>());

        // layer_norm with a residual.
        let want = host(r.layer_norm(
            &reference(&sum, &[rows, d]),
            &reference(&w, &[d]),
            &reference(&b, &[d]),
            1e-5,
        ));
        let out = emulated_layer_norm(&emu, &x, (rows, d), (Some(&res), None), (&w, &b));
        assert_close(&format!("layer_norm + residual ({p})"), &out, &want, tol);

        // With the product's bias folded in: x + bias + residual rounded once, then the norm.
        let product_bias = p.round(&rng.vec(d, 1.0));
        let biased: Vec<f32> = (0..rows * d)
            .map(|i| x[i] + product_bias[i % d] + res[i])
            .collect();
        let want = host(r.layer_norm(
            &reference(&p.round(&biased), &[rows, d]),
            &reference(&w, &[d]),
            &reference(&b, &[d]),
            1e-5,
        ));
        let out = emulated_layer_norm(&emu, &x, (rows, d), (Some(&res), Some(&product_bias)), (&w, &b));
        assert_close(&format!("layer_norm + bias + residual ({p})"), &out, &want, tol);

        // softmax over rows, with a fully masked row.
        let mut sx = x.clone();
        sx[d..2 * d].fill(f32::NEG_INFINITY);
        let want = host(r.softmax_rows(&reference(&sx, &[rows, d])));
        let (mut sd, mut out) = (emu.store(&sx), vec![0u8; xd.len()]);
        let args = Args::default().buf(&mut out).buf(&mut sd).int(rows).int(d);
        emu.launch("softmax_rows", (rows, 1, 1), 256, 0, args);
        assert_close(&format!("softmax ({p})"), &emu.load(&out), &want, tol);

        // swiglu over [rows, 2 * 150].
        let want = host(r.swiglu(&reference(&x, &[rows, d])));
        let mut out = vec![0u8; xd.len() / 2];
        let args = Args::default().buf(&mut out).buf(&mut xd).int(rows).int(d / 2);
        emu.launch("swiglu", elementwise_grid(rows * d / 2), 256, 0, args);
        assert_close(&format!("swiglu ({p})"), &emu.load(&out), &want, tol);

        // qkv_rope: [tokens, (heads + 2 kv_heads) * head_dim] split and rotated.
        let (tokens, heads, kv_heads, hd) = (3, 4, 2, 50);
        let qkv = p.round(&rng.vec(tokens * (heads + 2 * kv_heads) * hd, 2.0));
        let positions = [0usize, 17, 4095];
        let (wq, wk, wv) = r
            .split_qkv_rope(
                &reference(&qkv, &[tokens, (heads + 2 * kv_heads) * hd]),
                (heads, kv_heads),
                &positions,
                1e4,
            )
            .unwrap();
        let mut qkv_d = emu.store(&qkv);
        let mut pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let mut q = vec![0u8; tokens * heads * hd * p.bytes()];
        let (mut k, mut v) = (
            vec![0u8; tokens * kv_heads * hd * p.bytes()],
            vec![0u8; tokens * kv_heads * hd * p.bytes()],
        );
        let args = Args::default()
            .buf(&mut q)
            .buf(&mut k)
            .buf(&mut v)
            .buf(&mut qkv_d)
            .buf(&mut pos)
            .int(tokens)
            .int(heads)
            .int(kv_heads)
            .int(hd)
            .float(1e4);
        emu.launch("qkv_rope", (tokens, 1, 1), 128, 0, args);
        assert_close(&format!("qkv_rope q ({p})"), &emu.load(&q), wq.data(), tol);
        assert_close(&format!("qkv_rope k ({p})"), &emu.load(&k), wk.data(), tol);
        assert_eq!(emu.load(&v), wv.data(), "qkv_rope v ({p})");

        // The linear epilogue: bias plus each activation, in place.
        for (code, act) in [
            (1, crate::backend::Activation::Gelu),
            (2, crate::backend::Activation::GeluTanh),
            (3, crate::backend::Activation::Silu),
        ] {
            let y = p.round(&rng.vec(rows * d, 3.0));
            let biased = reference(
                &host(r.add(
                    &reference(&y, &[rows, d]),
                    &reference(&b.repeat(rows), &[rows, d]),
                )),
                &[rows, d],
            );
            let want = host(match act {
                crate::backend::Activation::Gelu => r.gelu(&biased),
                crate::backend::Activation::GeluTanh => r.gelu_tanh(&biased),
                _ => r.silu_mul(&biased, &reference(&vec![1.0; rows * d], &[rows, d])),
            });
            let mut yd = emu.store(&y);
            let args = Args::default()
                .buf(&mut yd)
                .buf(&mut bd)
                .int(1)
                .int(rows)
                .int(d)
                .signed(code);
            emu.launch("bias_act", elementwise_grid(rows * d), 256, 0, args);
            assert_close(&format!("bias_act {act:?} ({p})"), &emu.load(&yd), &want, tol);
        }
    }
}

#[test]
fn emulated_pooling_matches_reference() {
    // Four sequences of a padded batch: full, one real token, padding in the middle (the last
    // valid token is not the last position before the padding), and none valid; a hidden size
    // that is not a multiple of the block, every mode, with and without normalising.
    let (batch, seq, h) = (4, 6, 300);
    let valid: Vec<bool> = [
        [true; 6],
        [true, false, false, false, false, false],
        [true, true, false, true, false, false],
        [false; 6],
    ]
    .concat();
    for p in Precision::ALL {
        let Some(emu) = emulator("emulated_pooling_matches_reference", p) else {
            return;
        };
        let mut rng = Rng::new(207);
        let x = p.round(&rng.vec(batch * seq * h, 2.0));
        let mut xd = emu.store(&x);
        let mut flags: Vec<u8> = valid.iter().map(|&v| u8::from(v)).collect();
        // Sums of up to six values in fp32, the output not rounded to the storage precision:
        // fp32's tolerance in every precision.
        let tol = Tol {
            atol: 1e-5,
            rtol: 1e-5,
        };
        for pooling in crate::backend::Pooling::ALL {
            for normalize in [false, true] {
                let want =
                    crate::backend::pooling::pool_host(&x, &valid, (batch, seq, h), pooling, normalize);
                let mut out = vec![0f32; batch * h];
                let args = Args::default()
                    .buf(&mut out)
                    .buf(&mut xd)
                    .buf(&mut flags)
                    .int(seq)
                    .int(h)
                    .signed(super::ops::pooling_code(pooling))
                    .int(usize::from(normalize));
                emu.launch("pool_rows", (batch, 1, 1), 256, h * 4, args);
                assert_close(
                    &format!("pool {pooling:?} normalize {normalize} ({p})"),
                    &out,
                    &want,
                    tol,
                );
            }
        }
    }
}

#[test]
fn emulated_elementwise_and_gather_kernels_match_reference() {
    for p in Precision::ALL {
        let Some(emu) = emulator("emulated_elementwise_and_gather_kernels_match_reference", p) else {
            return;
        };
        let tol = emu.tol();
        let r = ReferenceBackend;
        let mut rng = Rng::new(205);
        let n = 1000;
        let (a, b) = (p.round(&rng.vec(n, 4.0)), p.round(&rng.vec(n, 4.0)));
        let (mut ad, mut bd) = (emu.store(&a), emu.store(&b));
        let (ra, rb) = (reference(&a, &[n]), reference(&b, &[n]));
        let binary = [
            ("add", host(r.add(&ra, &rb))),
            ("silu_mul", host(r.silu_mul(&ra, &rb))),
        ];
        for (kernel, want) in binary {
            let mut out = vec![0u8; ad.len()];
            let args = Args::default().buf(&mut out).buf(&mut ad).buf(&mut bd).int(n);
            emu.launch(kernel, elementwise_grid(n), 256, 0, args);
            assert_close(&format!("{kernel} ({p})"), &emu.load(&out), &want, tol);
        }
        for (kernel, want) in [
            ("gelu_erf", host(r.gelu(&ra))),
            ("gelu_tanh", host(r.gelu_tanh(&ra))),
        ] {
            let mut out = vec![0u8; ad.len()];
            let args = Args::default().buf(&mut out).buf(&mut ad).int(n);
            emu.launch(kernel, elementwise_grid(n), 256, 0, args);
            assert_close(&format!("{kernel} ({p})"), &emu.load(&out), &want, tol);
        }

        // Row kernels without the fused parts: RMS norm, layer norm without a residual.
        let (rows, d) = (4, 96);
        let x = p.round(&rng.vec(rows * d, 2.0));
        let (w, bias) = (p.round(&rng.vec(d, 1.0)), p.round(&rng.vec(d, 0.5)));
        let (mut xd, mut wd) = (emu.store(&x), emu.store(&w));
        let want = host(r.rms_norm(&reference(&x, &[rows, d]), &reference(&w, &[d]), 1e-6));
        let mut out = vec![0u8; xd.len()];
        let args = Args::default()
            .buf(&mut out)
            .buf(&mut xd)
            .buf(&mut wd)
            .int(rows)
            .int(d)
            .float(1e-6);
        emu.launch("rms_norm", (rows, 1, 1), 256, 0, args);
        assert_close(&format!("rms_norm ({p})"), &emu.load(&out), &want, tol);
        let want = host(r.layer_norm(
            &reference(&x, &[rows, d]),
            &reference(&w, &[d]),
            &reference(&bias, &[d]),
            1e-5,
        ));
        let out = emulated_layer_norm(&emu, &x, (rows, d), (None, None), (&w, &bias));
        assert_close(&format!("layer_norm ({p})"), &out, &want, tol);

        // Gathers and splits move stored values exactly.
        let (vocab, width, max_pos) = (50, 33, 40);
        let (table, pos_table) = (
            p.round(&rng.vec(vocab * width, 1.0)),
            p.round(&rng.vec(max_pos * width, 1.0)),
        );
        let ids: Vec<u32> = (0..300).map(|_| rng.below(vocab) as u32).collect();
        let positions: Vec<u32> = (0..300).map(|i| (i % max_pos) as u32).collect();
        let block = width.min(256).next_multiple_of(32);
        let (mut td, mut pd) = (emu.store(&table), emu.store(&pos_table));
        let (mut ids_d, mut pos_d) = (ids.clone(), positions.clone());
        let want = host(r.embedding(&ids, &reference(&table, &[vocab, width])));
        let mut out = vec![0u8; ids.len() * width * p.bytes()];
        let args = Args::default()
            .buf(&mut out)
            .buf(&mut td)
            .buf(&mut ids_d)
            .int(ids.len())
            .int(vocab)
            .int(width);
        emu.launch("embedding", (ids.len(), 1, 1), block, 0, args);
        assert_eq!(emu.load(&out), want, "embedding ({p})");
        let want = host(r.add(
            &reference(&want, &[ids.len(), width]),
            &reference(
                &host(r.embedding(&positions, &reference(&pos_table, &[max_pos, width]))),
                &[ids.len(), width],
            ),
        ));
        let mut out = vec![0u8; ids.len() * width * p.bytes()];
        let args = Args::default()
            .buf(&mut out)
            .buf(&mut td)
            .buf(&mut ids_d)
            .buf(&mut pd)
            .buf(&mut pos_d)
            .int(ids.len())
            .int(vocab)
            .int(max_pos)
            .int(width);
        emu.launch("embedding_add", (ids.len(), 1, 1), block, 0, args);
        assert_close(&format!("embedding_add ({p})"), &emu.load(&out), &want, tol);

        let (rows, d, start, piece) = (7, 37, 10, 20);
        let x = p.round(&rng.vec(rows * d, 1.0));
        let want: Vec<f32> = x
            .chunks(d)
            .flat_map(|row| row[start..start + piece].to_vec())
            .collect();
        let mut xd = emu.store(&x);
        let mut out = vec![0u8; rows * piece * p.bytes()];
        let args = Args::default()
            .buf(&mut out)
            .buf(&mut xd)
            .int(rows)
            .int(d)
            .int(start)
            .int(piece);
        emu.launch("split_columns", elementwise_grid(rows * piece), 256, 0, args);
        assert_eq!(emu.load(&out), want, "split_columns ({p})");

        // Rotary embeddings alone, at positions far into a long context.
        let (t, heads, hd) = (5, 3, 64);
        let x = p.round(&rng.vec(t * heads * hd, 2.0));
        let positions: Vec<usize> = (0..t).map(|_| rng.below(131_072)).collect();
        let want = host(r.rope(&reference(&x, &[t, heads, hd]), &positions, 500_000.0));
        let (mut xd, mut pos) = (
            emu.store(&x),
            positions.iter().map(|&q| q as u32).collect::<Vec<u32>>(),
        );
        let mut out = vec![0u8; xd.len()];
        let args = Args::default()
            .buf(&mut out)
            .buf(&mut xd)
            .buf(&mut pos)
            .int(t)
            .int(heads)
            .int(hd)
            .float(500_000.0);
        emu.launch("rope", (t, 1, 1), 128, 0, args);
        assert_close(&format!("rope ({p})"), &emu.load(&out), &want, tol);
    }
}

/// The tolerance of a product of `k` terms in precision `p` whose inputs are stored values:
/// fp32 as the GPU tests hold cuBLAS to; in half precision the output's one rounding, plus
/// `2 sqrt(k)` roundings absolute for outputs that cancel towards zero.
fn product_tol(p: Precision, k: usize) -> Tol {
    match p {
        Precision::F32 => Tol {
            atol: 1e-4,
            rtol: 1e-4,
        },
        _ => {
            let u = if p == Precision::F16 {
                1.0 / 2048.0
            } else {
                1.0 / 256.0
            };
            Tol {
                atol: u * (4.0 + 2.0 * (k as f32).sqrt()),
                rtol: 4.0 * u,
            }
        }
    }
}

#[test]
fn emulated_gemv_matches_the_compositions() {
    for p in Precision::ALL {
        let Some(emu) = emulator("emulated_gemv_matches_the_compositions", p) else {
            return;
        };
        let r = ReferenceBackend;
        let mut rng = Rng::new(206);
        // Rows 1 to 4; k from one vector load to more than one pass of the block's warps
        // (2048 elements) and not a multiple of the 256 a warp reads at once; outputs that
        // leave the last block partly empty.
        for &(rows, k, n) in &[(1, 8, 3), (2, 264, 9), (3, 520, 5), (4, 2056, 6), (1, 4096, 1)] {
            let x = p.round(&rng.vec(rows * k, 2.0));
            let norm = p.round(&rng.vec(k, 1.0));
            let w = p.round(&rng.vec(2 * n * k, 0.3));
            let bias = p.round(&rng.vec(2 * n, 1.0));
            let residual = p.round(&rng.vec(rows * n, 2.0));
            let (rx, rnorm) = (reference(&x, &[rows, k]), reference(&norm, &[k]));
            let (rw_plain, rw_gate_up) = (reference(&w[..n * k], &[n, k]), reference(&w, &[2 * n, k]));
            let rb_plain = reference(&bias[..n], &[n]);
            let tol = product_tol(p, k);
            let (mut xd, mut nd, mut wd, mut bd) =
                (emu.store(&x), emu.store(&norm), emu.store(&w), emu.store(&bias));
            // (what, norm, bias, accumulate onto the residual, swiglu, activation, the
            // reference)
            let cases = [
                (
                    "linear +bias",
                    false,
                    true,
                    false,
                    false,
                    Activation::Identity,
                    host(r.linear(&rx, &rw_plain, Some(&rb_plain))),
                ),
                (
                    "rms_norm_linear +bias",
                    true,
                    true,
                    false,
                    false,
                    Activation::Identity,
                    host(r.rms_norm_linear(&rx, &rnorm, 1e-6, &rw_plain, Some(&rb_plain))),
                ),
                (
                    "linear_add",
                    false,
                    false,
                    true,
                    false,
                    Activation::Identity,
                    host(r.linear_add(&rx, &rw_plain, None, reference(&residual, &[rows, n]))),
                ),
                (
                    "rms_norm_swiglu",
                    true,
                    false,
                    false,
                    true,
                    Activation::Identity,
                    host(r.rms_norm_swiglu(&rx, &rnorm, 1e-6, &rw_gate_up)),
                ),
                (
                    "swiglu +bias (both halves)",
                    false,
                    true,
                    false,
                    true,
                    Activation::Identity,
                    host(r.swiglu(&reference(
                        &host(r.linear(&rx, &rw_gate_up, Some(&reference(&bias, &[2 * n])))),
                        &[rows, 2 * n],
                    ))),
                ),
                (
                    "linear +bias gelu (tanh)",
                    false,
                    true,
                    false,
                    false,
                    Activation::GeluTanh,
                    host(r.linear_act(&rx, &rw_plain, Some(&rb_plain), Activation::GeluTanh)),
                ),
                (
                    "linear gelu (erf)",
                    false,
                    false,
                    false,
                    false,
                    Activation::Gelu,
                    host(r.linear_act(&rx, &rw_plain, None, Activation::Gelu)),
                ),
                (
                    "linear +bias silu",
                    false,
                    true,
                    false,
                    false,
                    Activation::Silu,
                    host(r.linear_act(&rx, &rw_plain, Some(&rb_plain), Activation::Silu)),
                ),
            ];
            for (what, has_norm, has_bias, accumulate, swiglu, act, want) in cases {
                let mut out = if accumulate {
                    emu.store(&residual)
                } else {
                    emu.store(&vec![f32::NAN; rows * n])
                };
                let args = Args::default()
                    .buf(&mut out)
                    .buf(&mut xd)
                    .buf(&mut wd)
                    .buf(&mut nd)
                    .int(usize::from(has_norm))
                    .float(1e-6)
                    .buf(&mut bd)
                    .int(usize::from(has_bias))
                    .int(usize::from(accumulate))
                    .int(usize::from(swiglu))
                    .int(act_code(act) as usize)
                    .int(rows)
                    .int(n)
                    .int(k);
                emu.launch_cfg("gemv", &gemv_cfg(n, swiglu), args);
                assert_close(
                    &format!("gemv {what} {rows}x{k}x{n} ({p})"),
                    &emu.load(&out),
                    &want,
                    tol,
                );
            }
        }
    }
}

#[test]
fn emulated_qkv_rope_paged_writes_the_pools() {
    for p in Precision::ALL {
        let Some(emu) = emulator("emulated_qkv_rope_paged_writes_the_pools", p) else {
            return;
        };
        let tol = emu.tol();
        let r = ReferenceBackend;
        let mut rng = Rng::new(207);
        for c in [PagedCase::COMMON[1], PagedCase::COMMON[3], PagedCase::COMMON[6]] {
            let mut inputs = c.inputs(&mut rng);
            inputs.keys = p.round(&inputs.keys);
            inputs.values = p.round(&inputs.values);
            let [tokens, heads, d] = c.q_shape();
            let kvh = c.kv_heads;
            let qkv = p.round(&rng.vec(tokens * (heads + 2 * kvh) * d, 2.0));
            let positions: Vec<usize> = (0..tokens).map(|_| rng.below(4096)).collect();
            // The reference: split and rotate, then write k and v into copies of the pools.
            let paged = r.prepare_paged(&inputs.plan).unwrap();
            let (wq, wk, wv) = r
                .split_qkv_rope(
                    &reference(&qkv, &[tokens, (heads + 2 * kvh) * d]),
                    (heads, kvh),
                    &positions,
                    1e4,
                )
                .unwrap();
            let mut want_keys = reference(&inputs.keys, &inputs.pool_shape);
            let mut want_values = reference(&inputs.values, &inputs.pool_shape);
            r.write_paged(&mut want_keys, &wk, &paged).unwrap();
            r.write_paged(&mut want_values, &wv, &paged).unwrap();

            let (_, _, mut slots) = paged_indices(&inputs.plan);
            let (mut keys, mut values) = (emu.store(&inputs.keys), emu.store(&inputs.values));
            let mut qkv_d = emu.store(&qkv);
            let mut pos: Vec<u32> = positions.iter().map(|&q| q as u32).collect();
            let mut q = emu.store(&vec![f32::NAN; tokens * heads * d]);
            let args = Args::default()
                .buf(&mut q)
                .buf(&mut keys)
                .buf(&mut values)
                .buf(&mut qkv_d)
                .buf(&mut pos)
                .buf(&mut slots)
                .int(tokens)
                .int(heads)
                .int(kvh)
                .int(d)
                .float(1e4);
            emu.launch("qkv_rope_paged", (tokens, 1, 1), 128, 0, args);
            assert_close(
                &format!("qkv_rope_paged q {c:?} ({p})"),
                &emu.load(&q),
                wq.data(),
                tol,
            );
            assert_close(
                &format!("qkv_rope_paged keys {c:?} ({p})"),
                &emu.load(&keys),
                want_keys.data(),
                tol,
            );
            assert_eq!(
                emu.load(&values),
                want_values.data(),
                "qkv_rope_paged values {c:?} ({p})"
            );
        }
    }
}

#[test]
fn emulated_tensor_core_flash_matches_reference() {
    // The tensor-core flash kernels, dense and paged, in the two precisions they multiply,
    // against the f64 reference within the emulator's four roundings: the probabilities are
    // rounded once more than the SIMT kernel rounds them (to the storage type, for the
    // product with the values), well inside that bound.
    for p in [Precision::F16, Precision::Bf16] {
        let Some(emu) = emulator("emulated_tensor_core_flash_matches_reference", p) else {
            return;
        };
        let mut rng = Rng::new(203);
        let mut cases: Vec<(AttnCase, AttnInputs, Vec<f32>)> = AttnCase::TENSOR_CORE
            .iter()
            .map(|c| {
                let (inputs, want) = dense_case(c, p, &mut rng);
                (*c, inputs, want)
            })
            .collect();
        let (left_padded, padded) = AttnCase::TENSOR_CORE_LEFT_PADDED;
        let inputs = left_padded.leading_padding_inputs(&mut rng, padded);
        let (inputs, want) = dense_case_of(&left_padded, p, inputs);
        cases.push((left_padded, inputs, want));
        for (c, AttnInputs { q, k, v, valid }, want) in cases {
            let (mut qd, mut kd, mut vd) = (emu.store(&q), emu.store(&k), emu.store(&v));
            let mut valid_u8: Vec<u8> = valid.iter().map(|&b| u8::from(b)).collect();
            valid_u8.push(0);
            let kernel = format!("flash_attention_tc{}", c.d);
            let cfg = attention_cfg(
                AttentionKernel::TensorCoreFlash,
                c.s_q,
                (c.heads, c.kv_heads),
                c.batch,
                c.d,
            );
            let mut out = emu.store(&vec![f32::NAN; q.len()]);
            let buffers = DenseBuffers {
                q: &mut qd,
                k: &mut kd,
                v: &mut vd,
                valid: &mut valid_u8,
            };
            emu.launch_cfg(&kernel, &cfg, dense_attention_args(&mut out, buffers, &c));
            assert_close(
                &format!("{kernel} {c:?} ({p})"),
                &emu.load(&out),
                &want,
                emu.tol(),
            );
        }
        for c in PagedCase::TENSOR_CORE {
            // The pools as the step leaves them (its new rows written by the reference; the
            // paged test above checks kv_write), then attention over them.
            let inputs = c.inputs(&mut rng);
            let r = ReferenceBackend;
            let paged = r.prepare_paged(&inputs.plan).unwrap();
            let mut pools = Vec::new();
            for (pool, new) in [
                (&inputs.keys, &inputs.new_keys),
                (&inputs.values, &inputs.new_values),
            ] {
                let mut written = reference(&p.round(pool), &inputs.pool_shape);
                r.write_paged(&mut written, &reference(&p.round(new), &c.new_shape()), &paged)
                    .unwrap();
                pools.push(written);
            }
            let q = p.round(&inputs.q);
            let want = host(r.paged_attention(&reference(&q, &c.q_shape()), &pools[0], &pools[1], &paged));

            let (mut meta, mut tables, _) = paged_indices(&inputs.plan);
            let (mut keys, mut values) = (emu.store(pools[0].data()), emu.store(pools[1].data()));
            let mut qd = emu.store(&q);
            let seqs = inputs.plan.seqs.len();
            let max_q = inputs.plan.seqs.iter().map(|s| s.q_len).max().unwrap_or(0);
            let kernel = format!("paged_flash_attention_tc{}", c.d);
            let cfg = attention_cfg(
                AttentionKernel::TensorCoreFlash,
                max_q,
                (c.heads, c.kv_heads),
                seqs,
                c.d,
            );
            let mut out = emu.store(&vec![f32::NAN; q.len()]);
            let buffers = PagedBuffers {
                q: &mut qd,
                keys: &mut keys,
                values: &mut values,
                meta: &mut meta,
                tables: &mut tables,
            };
            emu.launch_cfg(&kernel, &cfg, paged_attention_args(&mut out, buffers, &c, seqs));
            assert_close(
                &format!("{kernel} {c:?} ({p})"),
                &emu.load(&out),
                &want,
                emu.tol(),
            );
        }
    }
}

#[test]
fn the_tensor_core_flash_kernels_refuse_fp32() {
    // The host launches them only in half precision; in fp32 they trap rather than read
    // 4-byte elements as 2-byte ones.
    let Some(emu) = emulator("the_tensor_core_flash_kernels_refuse_fp32", Precision::F32) else {
        return;
    };
    let c = AttnCase::TENSOR_CORE[1];
    let n = c.batch * c.s_q * c.heads * c.d;
    let (mut q, mut k, mut v) = (
        emu.store(&vec![0.5; n]),
        emu.store(&vec![0.5; n]),
        emu.store(&vec![0.5; n]),
    );
    let mut valid = vec![0u8];
    let mut out = emu.store(&vec![0.0; n]);
    let cfg = attention_cfg(
        AttentionKernel::TensorCoreFlash,
        c.s_q,
        (c.heads, c.kv_heads),
        c.batch,
        c.d,
    );
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    let buffers = DenseBuffers {
        q: &mut q,
        k: &mut k,
        v: &mut v,
        valid: &mut valid,
    };
    let rc = emu.try_launch(
        "flash_attention_tc64",
        (g.0 as usize, g.1 as usize, g.2 as usize),
        b.0 as usize,
        cfg.shared_mem_bytes as usize,
        dense_attention_args(&mut out, buffers, &c),
    );
    assert_ne!(rc, 0, "the fp32 build of a tensor-core kernel must trap");
}

#[test]
fn the_emulated_mma_follows_the_ptx_fragment_layout() {
    // probe_mma lays A (16 x 16), B (16 x 8) and C out in fragments as common.cuh says PTX's
    // mma.m16n8k16 takes them, runs mma_16x8x16 and writes D back through the same layout:
    // D must be A B + C, each element in its place. A lane or register the emulator took
    // from the wrong place would move or mix elements.
    for p in [Precision::F16, Precision::Bf16] {
        let Some(emu) = emulator("the_emulated_mma_follows_the_ptx_fragment_layout", p) else {
            return;
        };
        let mut rng = Rng::new(204);
        let (a, b) = (p.round(&rng.vec(16 * 16, 2.0)), p.round(&rng.vec(16 * 8, 2.0)));
        let c: Vec<f32> = (0..16 * 8).map(|i| i as f32 * 0.25).collect();
        let (mut ad, mut bd, mut cd) = (emu.store(&a), emu.store(&b), c.clone());
        emu.launch(
            "probe_mma",
            (1, 1, 1),
            32,
            0,
            Args::default().buf(&mut cd).buf(&mut ad).buf(&mut bd),
        );
        let want: Vec<f32> = (0..16 * 8)
            .map(|i| {
                let (row, col) = (i / 8, i % 8);
                let dot: f64 = (0..16)
                    .map(|k| f64::from(a[row * 16 + k]) * f64::from(b[k * 8 + col]))
                    .sum();
                (dot + f64::from(c[i])) as f32
            })
            .collect();
        let tol = Tol {
            atol: 1e-5,
            rtol: 1e-5,
        };
        assert_close(&format!("probe_mma ({p})"), &cd, &want, tol);
    }
}

#[test]
fn the_emulated_ldmatrix_follows_the_ptx_layout() {
    // Register i of lane 4g + t holds M_i[g][2t, 2t+1] (ldmatrix) or M_i[2t, 2t+1][g] (.trans),
    // the lower element in the low half, where row r of matrix i is the row lane 8i + r
    // addressed (here row 7 - r of the staged matrix i: the address picks the row, not the
    // lane number). Rows must be 16-byte aligned.
    let Some(emu) = emulator("the_emulated_ldmatrix_follows_the_ptx_layout", Precision::F16) else {
        return;
    };
    // Distinct values: element c of staged row s is 1000 + 16 s + c (padding 0xffff).
    let staged = |s: usize, c: usize| (1000 + 16 * s + c) as u32;
    let mut tile: Vec<u16> = (0..32 * 16)
        .map(|e| {
            if e % 16 < 8 {
                staged(e / 16, e % 16) as u16
            } else {
                u16::MAX
            }
        })
        .collect();
    let mut out = vec![0u32; 256];
    emu.launch(
        "probe_ldmatrix",
        (1, 1, 1),
        32,
        0,
        Args::default().buf(&mut out).buf(&mut tile).int(0),
    );
    // M_i[r][c]: the row lane 8i + r addressed.
    let m = |i: usize, r: usize, c: usize| staged(8 * i + 7 - r, c);
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for i in 0..4 {
            let plain = m(i, g, 2 * t) | m(i, g, 2 * t + 1) << 16;
            let trans = m(i, 2 * t, g) | m(i, 2 * t + 1, g) << 16;
            assert_eq!(out[lane * 4 + i], plain, "ldmatrix_x4: lane {lane}, register {i}");
            assert_eq!(
                out[128 + lane * 4 + i],
                trans,
                "ldmatrix_x4_trans: lane {lane}, register {i}"
            );
        }
    }
    let rc = emu.try_launch(
        "probe_ldmatrix",
        (1, 1, 1),
        32,
        0,
        Args::default().buf(&mut out).buf(&mut tile).int(1),
    );
    assert_ne!(rc, 0, "rows that are not 16-byte aligned must trap");
}

#[test]
fn the_emulated_butterflies_add_in_the_shuffles_order() {
    let Some(emu) = emulator(
        "the_emulated_butterflies_add_in_the_shuffles_order",
        Precision::F32,
    ) else {
        return;
    };
    // Magnitudes from 1e-3 to 1e5 and both signs, so that fp32 sums depend on their order.
    let mut rng = Rng::new(29);
    let mut input: Vec<f32> = (0..32)
        .map(|_| {
            let magnitude = 10f32.powf(rng.next() * 4.0 + 1.0);
            if rng.next() < 0.0 { -magnitude } else { magnitude }
        })
        .collect();
    let mut out = vec![0f32; 24 * 32];
    emu.launch(
        "probe_butterfly",
        (1, 1, 1),
        32,
        0,
        Args::default().buf(&mut out).buf(&mut input),
    );
    let row = |r: usize| &out[r * 32..(r + 1) * 32];
    let mut order_matters = false;
    for (slot, width) in [1usize, 2, 4, 8, 16, 32].into_iter().enumerate() {
        for lane in 0..32 {
            let (got, want) = (row(4 * slot)[lane], row(4 * slot + 1)[lane]);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "lanes_sum width {width}, lane {lane}: {got} against the shuffles' {want}"
            );
            let group = &input[lane / width * width..][..width];
            let in_order = group.iter().fold(0f32, |a, &x| a + x);
            order_matters |= in_order.to_bits() != want.to_bits();
            let exact: f64 = group.iter().map(|&x| f64::from(x)).sum();
            assert!(
                (f64::from(got) - exact).abs()
                    <= 1e-5 * group.iter().map(|&x| f64::from(x.abs())).sum::<f64>(),
                "lanes_sum width {width}, lane {lane}: {got} against {exact}"
            );
            let (got, want) = (row(4 * slot + 2)[lane], row(4 * slot + 3)[lane]);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "lanes_max width {width}, lane {lane}"
            );
            let max = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(got, max, "lanes_max width {width}, lane {lane}");
        }
    }
    assert!(order_matters, "the inputs must make the order of the sums show");
}

#[test]
fn emulated_async_copies_land_at_the_wait() {
    let Some(emu) = emulator("emulated_async_copies_land_at_the_wait", Precision::F16) else {
        return;
    };
    let mut src: Vec<u32> = (0..128).map(|e| 1000 + e).collect();
    let mut out = vec![0u32; 160];
    emu.launch(
        "probe_cp_async",
        (1, 1, 1),
        32,
        0,
        Args::default().buf(&mut out).buf(&mut src).int(0),
    );
    for lane in 0..32 {
        assert_eq!(
            out[128 + lane],
            7,
            "lane {lane}: a copy must not land before its wait (the emulator's tiles would \
             otherwise hide a missing wait)"
        );
        let other = lane ^ 1;
        for e in 0..4 {
            let want = if other < 24 { src[other * 4 + e] } else { 0 };
            assert_eq!(
                out[lane * 4 + e],
                want,
                "lane {lane} reads lane {other}'s word {e} after the wait and barrier"
            );
        }
    }
    let rc = emu.try_launch(
        "probe_cp_async",
        (1, 1, 1),
        32,
        0,
        Args::default().buf(&mut out).buf(&mut src).int(1),
    );
    assert_ne!(rc, 0, "a thread that ends with copies in flight must trap");
}

#[test]
fn the_emulator_refills_static_shared_memory_before_each_block() {
    let Some(emu) = emulator(
        "the_emulator_refills_static_shared_memory_before_each_block",
        Precision::F32,
    ) else {
        return;
    };
    // Three blocks of 64 threads, all on this host thread: the second and third must not see
    // the first one's values (nor the second the third's, in the emulator's block order).
    let mut out = vec![0u32; 3 * 64];
    emu.launch(
        "probe_static_shared",
        (3, 1, 1),
        64,
        0,
        Args::default().buf(&mut out),
    );
    let written: Vec<u32> = (1..=64).collect();
    assert_eq!(&out[..64], &written[..], "block 0 reads what it wrote");
    assert!(
        out[64..].iter().all(|&v| v == u32::MAX),
        "later blocks read static shared memory as garbage (0xff bytes): {:?}",
        &out[64..72]
    );
}

#[test]
fn a_trap_fails_the_launch_and_the_emulator_runs_the_next_one() {
    let Some(emu) = emulator(
        "a_trap_fails_the_launch_and_the_emulator_runs_the_next_one",
        Precision::F32,
    ) else {
        return;
    };
    // On a GPU a failed KERNEL_CHECK aborts the launch (the context's sticky error); here the
    // launch returns an error instead of the process aborting, and the trapped block's fibers,
    // stopped at a barrier and in the check, start over for the next launch.
    let mut out = vec![0u32; 3 * 64];
    let rc = emu.try_launch(
        "probe_trap",
        (3, 1, 1),
        64,
        0,
        Args::default().buf(&mut out).signed(1),
    );
    assert_ne!(rc, 0, "a trapping launch must fail");
    assert!(out[..64].iter().all(|&v| v == 1), "block 0 ran before the trap");
    assert!(
        out[64..].iter().all(|&v| v == 0),
        "no thread of the trapped block or after it wrote"
    );
    let mut again = vec![0u32; 3 * 64];
    emu.launch(
        "probe_trap",
        (3, 1, 1),
        64,
        0,
        Args::default().buf(&mut again).signed(-1),
    );
    assert!(
        again.iter().all(|&v| v == 1),
        "the launch after a trap runs every block"
    );
}
