//! The worker's side of the GPU benchmark (issue 5, "Performance"): the CUDA backend in each
//! storage precision asked for (fp32, fp16 and bf16 by default) on the random models
//! `worker/bench/gpu_models.py` writes, measured the way `worker/bench/gpu_torch.py` measures
//! PyTorch on the same GPU, so that the report can set each precision against PyTorch's own.
//! Before the speed, the `accuracy` section checks the whole models against PyTorch's fp32
//! outputs, which `worker/bench/gpu_reference.py` stores next to them (see [`accuracy`]).
//!
//! ```sh
//! cargo build --release -p atomic-worker --features cuda --example gpu_bench
//! gpu_bench MODELS_DIR [--seconds 3] [--max-steps 256]
//!     [--only accuracy,copy,matmul,encoders,decode] [--precisions fp32,fp16,bf16]
//! ```
//!
//! `scripts/bench-gpu.sh` runs both sides and prints the ratios. Output: one JSON object per
//! line on stdout (`"bench"` says what it is: `device`, `accuracy`, `copy`, `matmul`, `encoder`,
//! `model`, `decode`, `op`, `error`, and `check` for `--check`; every line measured on a backend
//! names its precision in `"dtype"`);
//! progress goes to stderr. Every timed region ends with a device synchronisation (or a host
//! read, which synchronises), so queued work is never left out.
//!
//! Each precision gets a backend of its own, opened only once the previous one has been dropped
//! with every tensor and model on it, so one precision's GPU memory never crowds the next.
//! Within a precision the sections run one after another. A section that fails, or a backend
//! that does not open, prints an `error` line and the rest still run, so a single GPU session
//! gets every figure that can be had. The exit status is non-zero when anything failed,
//! including a model outside its accuracy bounds.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use atomic_worker::ModelDir;
use atomic_worker::backend::buffer_cache::DEFAULT_LIMIT_BYTES;
use atomic_worker::backend::cuda::GEMV_MAX_ROWS;
use atomic_worker::backend::{
    Activation, AttentionMask, Backend, CudaBackend, CudaTensor, PagedPlan, PagedSeq, Pooling, Precision,
};
use atomic_worker::config::{BertConfig, LlamaConfig, ModelConfig};
use atomic_worker::models::bert::{Batch, Bert};
use atomic_worker::models::decoder::CausalLm;
use atomic_worker::models::kv_cache::{BLOCK_SIZE, KvCache};
use atomic_worker::models::llama::Llama;
use atomic_worker::sampling::TokenDraw;
use clap::Parser;
use serde_json::{Value, json};

/// The sections, in the order they run (`--only` picks some): correctness first, so that a
/// wrong model is known before its speed is.
const SECTIONS: [&str; 5] = ["accuracy", "copy", "matmul", "encoders", "decode"];

/// Folder names under MODELS_DIR, as `gpu_models.py` writes them.
const ENCODERS: [&str; 2] = ["bert-base", "minilm"];
const DECODER: &str = "llama-1b";

/// Decode: a short prompt per sequence, then single-token steps.
const PROMPT: usize = 16;

/// The sizes the sections run at.
struct Workload {
    /// Encoders: this many sequences of `enc_seq` tokens.
    enc_batch: usize,
    enc_seq: usize,
    /// Decode batch sizes.
    decode_batches: &'static [usize],
    /// The prompt whose attention the decode section times through both prompt paths.
    prefill_prompt: usize,
    /// Bytes copied to measure device bandwidth.
    copy_bytes: usize,
    /// The side of the square matrix product, and how long it is timed.
    matmul_n: usize,
    matmul_budget: Duration,
    /// Time spent measuring each single op (after a warm-up call).
    op_budget: Duration,
}

/// The issue's workload, matched by PyTorch's side: 32 sequences of 128 tokens; decode at
/// batch 1 and 32 (and a 512-token prompt's attention); a 1 GiB copy (far larger than any cache, so it runs at the memory's speed);
/// an 8192-square product (what cuBLAS reaches at its best).
const FULL: Workload = Workload {
    enc_batch: 32,
    enc_seq: 128,
    decode_batches: &[1, 32],
    prefill_prompt: 512,
    copy_bytes: 1 << 30,
    matmul_n: 8192,
    matmul_budget: Duration::from_secs(1),
    op_budget: Duration::from_millis(150),
};

/// `--smoke`: every section at tiny sizes, so that the whole benchmark runs in a minute on the
/// emulated GPU (scripts/emulated-gpu.sh) against the tiny fixtures. Its figures mean nothing;
/// that it runs through means a GPU session's benchmark will not stop on the benchmark's own
/// code.
const SMOKE: Workload = Workload {
    enc_batch: 2,
    enc_seq: 16,
    decode_batches: &[1, 2],
    prefill_prompt: 20,
    copy_bytes: 1 << 20,
    matmul_n: 64,
    matmul_budget: Duration::from_millis(1),
    op_budget: Duration::from_millis(1),
};

/// The workload chosen at start (`--smoke` or not); global so that the sections, which many
/// functions share, need not carry it.
static WORKLOAD: OnceLock<&'static Workload> = OnceLock::new();

fn workload() -> &'static Workload {
    WORKLOAD.get().copied().unwrap_or(&FULL)
}

#[derive(Parser)]
#[command(about = "GPU benchmark of the worker's CUDA backend (JSON lines on stdout)")]
struct Args {
    /// Folder holding the model folders written by worker/bench/gpu_models.py.
    models: PathBuf,
    /// Seconds of timed work per throughput figure (after warm-up).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Most decode steps per timed run (the context grows by one per step).
    #[arg(long, default_value_t = 256)]
    max_steps: usize,
    /// Comma-separated sections to run: accuracy, copy, matmul, encoders, decode (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Comma-separated storage precisions to measure (fp32, fp16, bf16), in the order given,
    /// each on a backend of its own.
    #[arg(long, value_delimiter = ',', default_values_t = Precision::ALL)]
    precisions: Vec<Precision>,
    /// Only open and validate the model folders and say whether each holds the accuracy
    /// section's reference (no GPU needed), then exit.
    #[arg(long)]
    check: bool,
    /// Tiny sizes for a dry run of every section (on the emulated GPU, with the tiny fixtures
    /// as the models); the figures mean nothing.
    #[arg(long)]
    smoke: bool,
}

fn main() -> ExitCode {
    // Printed here rather than returned from `main`, so that a missing GPU or library reads as
    // one line and not as a backtrace (which RUST_BACKTRACE would add to a returned error).
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(unknown) = args.only.iter().find(|o| !SECTIONS.contains(&o.as_str())) {
        bail!(
            "--only: unknown section {unknown:?} (sections: {})",
            SECTIONS.join(", ")
        );
    }
    let _ = WORKLOAD.set(if args.smoke { &SMOKE } else { &FULL });
    if args.check {
        return check_models(&args.models);
    }
    let mut failed = Vec::new();
    let mut device_shown = false;
    for precision in distinct(&args.precisions) {
        // Dropped at the end of the iteration; the sections drop their tensors and models
        // before returning, so the GPU memory is free before the next precision opens.
        let backend = match open_backend(args.device, precision) {
            Ok(backend) => backend,
            Err(e) => {
                report_failure(precision, "open", &e);
                failed.push(format!("{precision} open"));
                continue;
            }
        };
        if !device_shown {
            emit(json!({
                "bench": "device", "impl": "atomic", "name": backend.device_name(),
                "ordinal": args.device, "smoke": args.smoke,
            }));
            device_shown = true;
        }
        let build = backend.kernel_build();
        emit(json!({
            "bench": "kernels", "impl": "atomic", "dtype": precision.to_string(),
            "target": build.target, "nvrtc": build.nvrtc, "files": build.compiled + build.from_cache,
            "ms": build.seconds * 1e3,
        }));
        // The worker's start-up self-test, as `serve` runs it: a failure is reported (and
        // fails the run) but the sections still run, since their figures say where it goes wrong.
        let started = Instant::now();
        let selftest = backend.self_test(precision);
        emit(json!({
            "bench": "selftest", "impl": "atomic", "dtype": precision.to_string(),
            "ok": selftest.is_ok(), "ms": started.elapsed().as_secs_f64() * 1e3,
            "message": selftest.as_ref().err().map(ToString::to_string),
        }));
        if let Err(e) = selftest {
            report_failure(precision, "selftest", &anyhow::anyhow!(e));
            failed.push(format!("{precision} selftest"));
        }
        let sections = run_sections(&backend, args);
        failed.extend(sections.into_iter().map(|name| format!("{precision} {name}")));
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The precisions in the order given, each once: measuring one twice would only print its
/// lines twice.
fn distinct(precisions: &[Precision]) -> Vec<Precision> {
    let mut out = Vec::with_capacity(precisions.len());
    for &p in precisions {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

fn open_backend(device: usize, precision: Precision) -> anyhow::Result<CudaBackend> {
    CudaBackend::with_precision(device, precision).map_err(|e| {
        anyhow::anyhow!(
            "cannot open cuda:{device} in {precision}: {e} (the CUDA 13 libraries libcuda, libnvrtc \
             and libcublas must be on LD_LIBRARY_PATH; scripts/bench-gpu.sh puts the pip nvidia-* \
             packages' folders there)"
        )
    })
}

/// Runs the wanted sections on `backend`, each on its own: one that fails prints an `error`
/// line and the rest still run. Returns the names of those that failed.
fn run_sections(backend: &CudaBackend, args: &Args) -> Vec<&'static str> {
    let precision = backend.precision();
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut failed = Vec::new();
    let mut section = |name: &'static str, run: &dyn Fn() -> anyhow::Result<()>| {
        if !wanted(name) {
            return;
        }
        eprintln!("gpu_bench: {precision} {name}");
        let started = Instant::now();
        if let Err(e) = run() {
            report_failure(precision, name, &e);
            failed.push(name);
        }
        eprintln!(
            "gpu_bench: {precision} {name} took {:.1} s",
            started.elapsed().as_secs_f64()
        );
    };
    section("accuracy", &|| accuracy::run(backend, &args.models));
    section("copy", &|| copy_bandwidth(backend));
    section("matmul", &|| big_matmul(backend));
    section("encoders", &|| {
        // Each model on its own: one that fails must not cost the other's figures.
        let errors: Vec<String> = ENCODERS
            .iter()
            .filter_map(|name| {
                let result = encoder(backend, &args.models.join(name), name, args.seconds);
                result.err().map(|e| format!("{name}: {e:#}"))
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("; "))
        }
    });
    section("decode", &|| decode(backend, &args.models.join(DECODER), args));
    failed
}

/// Says on stderr, and in an `error` line for the report, that `section` (or `open`, the
/// backend itself) failed in `precision`.
fn report_failure(precision: Precision, section: &str, e: &anyhow::Error) {
    let message = format!("{e:#}");
    eprintln!("gpu_bench: {precision} {section} failed: {message}");
    emit(json!({
        "bench": "error", "impl": "atomic", "dtype": precision.to_string(), "section": section,
        "message": message,
    }));
}

/// One result line.
fn emit(v: Value) {
    println!("{v}");
}

/// Deterministic values in [-0.5, 0.5): the benchmark needs finite, varied data, not a
/// distribution (PyTorch's side draws its own).
fn data(n: usize) -> Vec<f32> {
    let mut s: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn upload(b: &CudaBackend, shape: &[usize]) -> anyhow::Result<CudaTensor> {
    let n = shape.iter().product();
    Ok(b.from_host(&data(n), shape)?)
}

/// Mean microseconds per call of `f`, called back to back as a model calls its ops (so launch
/// overhead counts, and the GPU overlaps consecutive calls as it would in a forward pass): one
/// warm-up call, one timed call to size the run, then enough calls to fill `budget`, ending
/// with a synchronisation.
fn time_op(
    b: &CudaBackend,
    budget: Duration,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    b.synchronize()?;
    let t = Instant::now();
    f()?;
    b.synchronize()?;
    let one = t.elapsed().as_secs_f64().max(1e-7);
    let iters = ((budget.as_secs_f64() / one) as usize).clamp(3, 2000);
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    b.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
}

/// Device-to-device copy bandwidth of a 1 GiB tensor in the backend's precision, counting bytes
/// read and written (as PyTorch's side does), plus upload bandwidth from pageable host memory:
/// the device bytes over the time `from_host` takes, which in fp16/bf16 includes rounding on the
/// host, so it is what an upload costs the worker rather than the bus's speed alone.
fn copy_bandwidth(b: &CudaBackend) -> anyhow::Result<()> {
    let n = workload().copy_bytes / b.precision().bytes();
    let host = vec![0.0f32; n];
    let t = Instant::now();
    let x = b.from_host(&host, &[n])?;
    b.synchronize()?;
    let h2d = t.elapsed().as_secs_f64();
    let us = time_op(b, Duration::from_millis(500), || {
        drop(b.copy(&x)?);
        Ok(())
    })?;
    emit(json!({
        "bench": "copy", "impl": "atomic", "dtype": b.precision().to_string(), "bytes": workload().copy_bytes,
        "d2d_gbs": 2.0 * workload().copy_bytes as f64 / us / 1e3,
        "h2d_gbs": workload().copy_bytes as f64 / h2d / 1e9,
    }));
    Ok(())
}

/// The backend's `linear` (cublasGemmEx in the backend's precision with fp32 accumulation; no
/// TF32 in fp32) on a large square product: the best TFLOP/s the worker's products reach in this
/// precision, to set beside PyTorch's peak in the same precision.
fn big_matmul(b: &CudaBackend) -> anyhow::Result<()> {
    let n = workload().matmul_n;
    let x = upload(b, &[n, n])?;
    let w = upload(b, &[n, n])?;
    let us = time_op(b, workload().matmul_budget, || {
        drop(b.linear(&x, &w, None)?);
        Ok(())
    })?;
    let flops = 2.0 * (n as f64).powi(3);
    emit(json!({
        "bench": "matmul", "impl": "atomic", "dtype": b.precision().to_string(), "n": n,
        "us": us, "tflops": flops / us / 1e6,
    }));
    Ok(())
}

/// Ids as the CPU MiniLM benchmark makes them: [CLS] random words [SEP], below `vocab`.
fn encoder_batch(vocab: usize) -> Batch {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    // Words from id 1000 on, as in BERT's vocabulary; a tiny model's (--smoke) from its middle.
    let first = 1000.min(vocab / 2);
    let words = (vocab - first).max(1) as u64;
    let mut ids = Vec::with_capacity(workload().enc_batch * workload().enc_seq);
    for _ in 0..workload().enc_batch {
        ids.push(101);
        for _ in 1..workload().enc_seq - 1 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ids.push((first as u64 + seed % words) as u32);
        }
        ids.push(102);
    }
    Batch {
        batch: workload().enc_batch,
        seq: workload().enc_seq,
        type_ids: vec![0; ids.len()],
        valid: vec![true; ids.len()],
        ids,
    }
}

fn open(folder: &Path) -> anyhow::Result<ModelDir> {
    ModelDir::open(folder).with_context(|| {
        format!(
            "opening {} (generate it with worker/bench/gpu_models.py)",
            folder.display()
        )
    })
}

/// Sentences/s of `Bert::embed` (forward pass, then pooling and normalisation on the GPU as the
/// folder's pooling config says and the pooled rows to the host: what the worker's encoder
/// thread does per batch, and what PyTorch's side does; `"path": "embed"`), then of the forward
/// pass alone, its hidden states left on the GPU (`"path": "forward"`, with cuBLASLt's bias
/// epilogue and without), then the forward pass's ops one by one.
fn encoder(b: &CudaBackend, folder: &Path, name: &str, seconds: f64) -> anyhow::Result<()> {
    let dir = open(folder)?;
    let ModelConfig::Bert(config) = &dir.config else {
        bail!("{}: not a BERT model", folder.display())
    };
    let model = Bert::load(b, config, &dir.weights, &dir.tensor_prefix)?;
    let batch = encoder_batch(config.vocab_size);
    for _ in 0..3 {
        model.embed(b, &batch, &dir.pooling)?;
    }
    let started = Instant::now();
    let mut runs = 0;
    while started.elapsed().as_secs_f64() < seconds {
        model.embed(b, &batch, &dir.pooling)?;
        runs += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    emit(json!({
        "bench": "encoder", "impl": "atomic", "model": name, "dtype": b.precision().to_string(),
        "path": "embed", "batch": workload().enc_batch, "seq": workload().enc_seq, "runs": runs,
        "ms_per_batch": elapsed * 1e3 / runs as f64,
        "sentences_per_s": (runs * workload().enc_batch) as f64 / elapsed,
    }));
    // The forward pass with cuBLASLt adding the biases (the worker's default), then with a
    // bias pass after each product, to show what the epilogue buys.
    let epilogue = b.bias_epilogue_enabled();
    let forward = |bias_epilogue: bool| -> anyhow::Result<()> {
        model.encode(b, &batch)?;
        b.synchronize()?;
        let started = Instant::now();
        let mut runs = 0;
        while started.elapsed().as_secs_f64() < seconds {
            drop(model.encode(b, &batch)?);
            runs += 1;
            if runs % 8 == 0 {
                b.synchronize()?; // keep the host from queueing seconds ahead of the clock
            }
        }
        b.synchronize()?;
        let elapsed = started.elapsed().as_secs_f64();
        // Counted over the backend's life so far (the self-test's shapes and earlier models'
        // included).
        let (planned, refused) = b.bias_epilogue_plans();
        emit(json!({
            "bench": "encoder", "impl": "atomic", "model": name, "dtype": b.precision().to_string(),
            "path": "forward", "bias_epilogue": bias_epilogue,
            "epilogue_shapes_planned": planned, "epilogue_shapes_refused": refused,
            "batch": workload().enc_batch, "seq": workload().enc_seq, "runs": runs,
            "ms_per_batch": elapsed * 1e3 / runs as f64,
            "sentences_per_s": (runs * workload().enc_batch) as f64 / elapsed,
        }));
        Ok(())
    };
    for bias_epilogue in [epilogue, false] {
        if !bias_epilogue && !epilogue {
            break; // cuBLASLt did not open: the first run already was the bias pass
        }
        b.set_bias_epilogue(bias_epilogue);
        let timed = forward(bias_epilogue);
        // Back to the worker's setting before anything else runs, failed or not.
        b.set_bias_epilogue(epilogue);
        timed?;
    }
    drop(model);
    encoder_ops(b, config, name)
}

/// One `op` line: mean time per call, how often the forward pass (or decode step) calls it,
/// and its arithmetic and memory traffic where they mean something, for TFLOP/s and GB/s.
struct Op<'a> {
    section: &'a str,
    model: &'a str,
    batch: usize,
    /// The backend's storage precision: the size of every tensor element the op moves.
    precision: Precision,
}

impl Op<'_> {
    fn emit(&self, op: &str, shape: String, us: f64, calls: usize, flops: f64, bytes: f64) {
        emit(json!({
            "bench": "op", "impl": "atomic", "dtype": self.precision.to_string(),
            "section": self.section, "model": self.model, "batch": self.batch, "op": op,
            "shape": shape, "us": us, "calls": calls, "flops": flops, "bytes": bytes,
        }));
    }

    /// Bytes that `elements` tensor elements take in the backend's precision.
    fn bytes(&self, elements: usize) -> f64 {
        (elements * self.precision.bytes()) as f64
    }

    /// Times a projection of `x [n, k]` through a weight `[m, k]` (with whatever it folds in)
    /// and emits it with the product's arithmetic and the weight's and rows' traffic.
    fn folded(
        &self,
        b: &CudaBackend,
        op: &str,
        (n, k, m): (usize, usize, usize),
        calls: usize,
        f: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let us = time_op(b, workload().op_budget, f)?;
        let flops = 2.0 * (n * k * m) as f64;
        let bytes = self.bytes(m * k + n * k + n * m);
        self.emit(op, format!("[{n},{k}]x[{m},{k}]ᵀ"), us, calls, flops, bytes);
        Ok(())
    }

    /// [`Op::folded`] for a projection added onto a residual it takes by value: each call gets
    /// a copy of `residual` made before the clock runs (a device copy per call, so the copies
    /// are timed too and subtracted).
    fn folded_add(
        &self,
        b: &CudaBackend,
        op: &str,
        shape: (usize, usize, usize),
        calls: usize,
        residual: &CudaTensor,
        mut f: impl FnMut(CudaTensor) -> atomic_worker::backend::Result<CudaTensor>,
    ) -> anyhow::Result<()> {
        let copy_us = time_op(b, workload().op_budget, || {
            drop(b.copy(residual)?);
            Ok(())
        })?;
        let (n, k, m) = shape;
        let both_us = time_op(b, workload().op_budget, || {
            drop(f(b.copy(residual)?)?);
            Ok(())
        })?;
        let us = (both_us - copy_us).max(0.0);
        let flops = 2.0 * (n * k * m) as f64;
        let bytes = self.bytes(m * k + n * k + 2 * n * m);
        self.emit(
            op,
            format!("[{n},{k}]x[{m},{k}]ᵀ + [{n},{m}]"),
            us,
            calls,
            flops,
            bytes,
        );
        Ok(())
    }

    /// Times `linear(x [n, k], w [m, k], bias)` and emits it.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call per product, each with its own shape"
    )]
    fn linear(
        &self,
        b: &CudaBackend,
        op: &str,
        n: usize,
        k: usize,
        m: usize,
        bias: bool,
        act: Activation,
        calls: usize,
    ) -> anyhow::Result<()> {
        let x = upload(b, &[n, k])?;
        let w = upload(b, &[m, k])?;
        let bias_t = if bias { Some(upload(b, &[m])?) } else { None };
        let us = time_op(b, workload().op_budget, || {
            drop(b.linear_act(&x, &w, bias_t.as_ref(), act)?);
            Ok(())
        })?;
        let flops = 2.0 * (n * k * m) as f64;
        let bytes = self.bytes(m * k + n * k + n * m);
        self.emit(op, format!("[{n},{k}]x[{m},{k}]ᵀ"), us, calls, flops, bytes);
        Ok(())
    }

    /// `linear_add_layer_norm` of `[n, k]` through `[m, k]` onto a residual `[n, m]`.
    fn linear_add_layer_norm(
        &self,
        b: &CudaBackend,
        op: &str,
        (n, k, m): (usize, usize, usize),
        gamma: &CudaTensor,
        beta: &CudaTensor,
        calls: usize,
    ) -> anyhow::Result<()> {
        let (x, w, bias, r) = (
            upload(b, &[n, k])?,
            upload(b, &[m, k])?,
            upload(b, &[m])?,
            upload(b, &[n, m])?,
        );
        let us = time_op(b, workload().op_budget, || {
            drop(b.linear_add_layer_norm(&x, &w, Some(&bias), &r, (gamma, beta), 1e-12)?);
            Ok(())
        })?;
        let flops = 2.0 * (n * k * m) as f64;
        // The product's operands and output, then the norm's reads of it and the residual and
        // its write.
        let bytes = self.bytes(m * k + n * k + n * m + 3 * n * m);
        self.emit(
            op,
            format!("[{n},{k}]x[{m},{k}]ᵀ + residual"),
            us,
            calls,
            flops,
            bytes,
        );
        Ok(())
    }
}

/// The ops of one BERT forward pass at the benchmark's shape, each timed alone.
fn encoder_ops(b: &CudaBackend, c: &BertConfig, name: &str) -> anyhow::Result<()> {
    let (enc_batch, enc_seq) = (workload().enc_batch, workload().enc_seq);
    let op = Op {
        section: "encoder",
        model: name,
        batch: enc_batch,
        precision: b.precision(),
    };
    let (h, inter, heads, layers) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_hidden_layers,
    );
    let d = h / heads;
    let t = enc_batch * enc_seq;
    let act = |n: usize| op.bytes(n);

    let batch = encoder_batch(c.vocab_size);
    let words = upload(b, &[c.vocab_size, h])?;
    let positions = upload(b, &[c.max_position_embeddings, h])?;
    let types = upload(b, &[c.type_vocab_size, h])?;
    let gamma = upload(b, &[h])?;
    let beta = upload(b, &[h])?;
    let pos_ids: Vec<u32> = (0..t).map(|i| (i % enc_seq) as u32).collect();
    let us = time_op(b, workload().op_budget, || {
        let w = b.embedding(&batch.ids, &words)?;
        let p = b.embedding(&pos_ids, &positions)?;
        let ty = b.embedding(&batch.type_ids, &types)?;
        drop(b.layer_norm(&b.add(&b.add(&w, &p)?, &ty)?, &gamma, &beta, 1e-12)?);
        Ok(())
    })?;
    op.emit(
        "embeddings",
        format!("3 gathers + 2 adds + layer_norm [{t},{h}]"),
        us,
        1,
        0.0,
        act(6 * t * h),
    );

    op.linear(b, "linear_qkv", t, h, 3 * h, true, Activation::Identity, layers)?;
    // The same product with its bias in a pass of its own (0 calls: what the epilogue saves).
    if b.bias_epilogue_enabled() {
        b.set_bias_epilogue(false);
        let timed = op.linear(
            b,
            "linear_qkv_bias_pass",
            t,
            h,
            3 * h,
            true,
            Activation::Identity,
            0,
        );
        b.set_bias_epilogue(true);
        timed?;
    }
    // Attention read straight out of the fused projection, as Bert runs it.
    let qkv = upload(b, &[t, 3 * h])?;
    let mask = AttentionMask::padding(&batch.valid);
    let us = time_op(b, workload().op_budget, || {
        drop(b.attention_qkv(&qkv, (enc_batch, heads), &mask)?);
        Ok(())
    })?;
    let attn_flops = 4.0 * (enc_batch * heads * enc_seq * enc_seq * d) as f64;
    op.emit(
        "attention_qkv",
        format!(
            "[{t},{}] as [{enc_batch},{enc_seq},{heads},{d}] x 3, padding mask (unfused: cuBLAS + softmax)",
            3 * h
        ),
        us,
        layers,
        attn_flops,
        act(4 * t * h),
    );
    drop(qkv);
    let q = upload(b, &[enc_batch, enc_seq, heads, d])?;
    let k = upload(b, &[enc_batch, enc_seq, heads, d])?;
    let v = upload(b, &[enc_batch, enc_seq, heads, d])?;
    // The fused flash kernels at the same shape, for comparison (0 calls: the pass does not
    // run them): the one the backend picks (on tensor cores in half precision at head
    // dimensions 32, 64 and 128), then the SIMT one where that is another kernel.
    let us = time_op(b, workload().op_budget, || {
        drop(b.attention_flash(&q, &k, &v, &mask)?);
        Ok(())
    })?;
    let tensor_cores = b.tensor_core_flash_fits(d);
    op.emit(
        "attention_flash_alone",
        format!(
            "[{enc_batch},{enc_seq},{heads},{d}] padding mask ({})",
            if tensor_cores { "tensor cores" } else { "SIMT" }
        ),
        us,
        0,
        attn_flops,
        act(4 * t * h),
    );
    if tensor_cores {
        let was = b.set_tensor_core_flash(false);
        let simt = time_op(b, workload().op_budget, || {
            drop(b.attention_flash(&q, &k, &v, &mask)?);
            Ok(())
        });
        b.set_tensor_core_flash(was);
        op.emit(
            "attention_flash_simt_alone",
            format!("[{enc_batch},{enc_seq},{heads},{d}] padding mask (SIMT)"),
            simt?,
            0,
            attn_flops,
            act(4 * t * h),
        );
    }

    // The output projections as Bert::hidden_states runs them (bias, residual and norm after
    // the product in one pass), then the composition they replace for comparison (0 calls).
    op.linear_add_layer_norm(
        b,
        "linear_add_layer_norm_attn_out",
        (t, h, h),
        &gamma,
        &beta,
        layers,
    )?;
    op.linear_add_layer_norm(
        b,
        "linear_add_layer_norm_ffn_down",
        (t, inter, h),
        &gamma,
        &beta,
        layers,
    )?;
    op.linear(b, "linear_attn_out", t, h, h, true, Activation::Identity, 0)?;
    let x = upload(b, &[t, h])?;
    let r = upload(b, &[t, h])?;
    let us = time_op(b, workload().op_budget, || {
        drop(b.add_layer_norm(&x, &r, &gamma, &beta, 1e-12)?);
        Ok(())
    })?;
    op.emit("add_layer_norm", format!("[{t},{h}]"), us, 0, 0.0, act(3 * t * h));

    // The up projection with its GELU fused into the epilogue, as Bert::hidden_states runs it.
    op.linear(
        b,
        "linear_ffn_up_gelu",
        t,
        h,
        inter,
        true,
        Activation::Gelu,
        layers,
    )?;
    op.linear(b, "linear_ffn_down", t, inter, h, true, Activation::Identity, 0)?;

    // Pooling on the GPU and its fp32 rows to the host, as Bert::embed runs them; then the
    // copy of every hidden state they replace, for comparison (0 calls).
    let hidden = upload(b, &[enc_batch, enc_seq, h])?;
    let us = time_op(b, workload().op_budget, || {
        drop(b.pool_to_host(&hidden, &batch.valid, Pooling::Mean, true)?);
        Ok(())
    })?;
    op.emit(
        "pool_mean_normalize_to_host",
        format!("[{enc_batch},{enc_seq},{h}] -> [{enc_batch},{h}] fp32"),
        us,
        1,
        0.0,
        act(t * h) + (enc_batch * h * size_of::<f32>()) as f64,
    );
    let us = time_op(b, workload().op_budget, || {
        drop(b.to_host(&x)?);
        Ok(())
    })?;
    op.emit("hidden_to_host", format!("[{t},{h}]"), us, 0, 0.0, act(t * h));
    Ok(())
}

/// Opens every model folder the benchmark needs, as the timed sections will, so that a bad
/// folder shows up before any GPU time is spent, and says whether each holds the accuracy
/// section's reference (a missing one fails only that section, so it is reported, not fatal).
fn check_models(models: &Path) -> anyhow::Result<()> {
    for name in ENCODERS.into_iter().chain([DECODER]) {
        let folder = models.join(name);
        let dir = open(&folder)?;
        let kind = match &dir.config {
            ModelConfig::Bert(c) if name != DECODER => {
                let enc_seq = workload().enc_seq;
                if c.max_position_embeddings < enc_seq {
                    bail!(
                        "{name}: {} positions, the benchmark needs {enc_seq}",
                        c.max_position_embeddings
                    );
                }
                "bert"
            }
            ModelConfig::Llama(_) if name == DECODER => "llama",
            _ => bail!("{name}: not the architecture the benchmark expects"),
        };
        let params: usize = dir
            .weights
            .names()
            .into_iter()
            .map(|n| dir.weights.shape(n).map_or(0, |s| s.iter().product::<usize>()))
            .sum();
        let reference = accuracy::has_reference(&folder);
        if !reference {
            eprintln!(
                "gpu_bench: {name}: no {} (write it with worker/bench/gpu_reference.py); the \
                 accuracy section will fail",
                accuracy::REFERENCE
            );
        }
        emit(json!({
            "bench": "check", "model": name, "kind": kind, "params": params,
            "reference": reference,
        }));
    }
    Ok(())
}

/// Parameters a decode step reads in full: every weight except the token embedding table, of
/// which a step reads one row per token (unless it doubles as the output projection).
fn weights_read_per_step(dir: &ModelDir, config: &LlamaConfig) -> (usize, usize) {
    let mut total = 0;
    let mut read = 0;
    for name in dir.weights.names() {
        let n: usize = dir.weights.shape(name).map_or(0, |s| s.iter().product());
        total += n;
        let gathered_only = name.ends_with("embed_tokens.weight") && !config.tie_word_embeddings;
        if !gathered_only {
            read += n;
        }
    }
    (total, read)
}

/// Tokens/s of greedy decoding through `CausalLm::step_greedy` (the argmax on the GPU, only the
/// ids copied back, as the server's greedy batches run) at batch 1 and 32 (prompt prefilled
/// first, untimed), then the decode step's ops one by one at the mean context length the timed
/// run saw; then the same runs with decode steps replayed from CUDA graphs (`"graphs": true`).
/// Batches of up to `GEMV_MAX_ROWS` sequences run once more each way with the matrix-vector
/// kernel off (`"gemv": false`: cuBLAS and the separate norm, SwiGLU and add kernels).
fn decode(b: &CudaBackend, folder: &Path, args: &Args) -> anyhow::Result<()> {
    let dir = open(folder)?;
    let ModelConfig::Llama(config) = &dir.config else {
        bail!("{}: not a Llama model", folder.display())
    };
    let (params, read) = weights_read_per_step(&dir, config);
    let precision = b.precision();
    emit(json!({
        "bench": "model", "impl": "atomic", "model": DECODER, "params": params,
        "params_read_per_step": read, "dtype": precision.to_string(),
        "bytes_per_param": precision.bytes(), "weight_bytes_per_step": precision.bytes() * read,
    }));
    let loaded = Instant::now();
    let model = Llama::load(b, config, &dir.weights, &dir.tensor_prefix)?;
    b.synchronize()?;
    eprintln!(
        "gpu_bench: {DECODER} loaded in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );
    let needed = PROMPT + args.max_steps + 8;
    if needed > model.max_positions() {
        bail!(
            "--max-steps {} needs {needed} positions; the model has {}",
            args.max_steps,
            model.max_positions()
        );
    }
    let vocab = model.vocab_size();
    // Plain steps first (with each batch's per-op timings), then the same runs replayed from
    // CUDA graphs: enabling them is for the rest of the backend's life.
    for graphs in [false, true] {
        if graphs {
            b.enable_decode_graphs(workload().decode_batches.iter().copied().max().unwrap_or(1));
        }
        // Batches the matrix-vector kernel takes run a second time with it off (cuBLAS and
        // the separate kernels), `"gemv": false`, and, without graphs, every batch once more
        // with the per-head decode attention instead of the grouped-heads kernel,
        // `"grouped_decode": false`, and batch 1 once more with the buffer cache off (every
        // op's output from the driver's pool), `"buffer_cache": false`, for comparison.
        for Variant {
            batch,
            gemv,
            grouped,
            reuse,
        } in workload().decode_batches.iter().copied().flat_map(|batch| {
            let best = Variant {
                batch,
                gemv: true,
                grouped: true,
                reuse: true,
            };
            let mut variants = vec![best];
            if batch <= GEMV_MAX_ROWS {
                variants.push(Variant { gemv: false, ..best });
            }
            if !graphs {
                variants.push(Variant {
                    grouped: false,
                    ..best
                });
            }
            if !graphs && batch == 1 {
                variants.push(Variant { reuse: false, ..best });
            }
            variants
        }) {
            b.set_gemv(gemv);
            b.set_grouped_decode(grouped);
            b.set_buffer_cache_limit(if reuse { DEFAULT_LIMIT_BYTES } else { 0 });
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|s| {
                    (0..PROMPT)
                        .map(|i| ((s * 7919 + i * 104_729) % (vocab - 3) + 3) as u32)
                        .collect()
                })
                .collect();
            let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            // One pool for the warm-up and the timed run, so that graphs recorded in the warm-up
            // are the ones the timed run replays.
            let pool = &mut model.new_pool(b, batch * needed)?;
            let mut run = |steps: usize, seconds: f64| -> anyhow::Result<(usize, f64, f64)> {
                let mut caches: Vec<KvCache> = (0..batch).map(|_| pool.new_cache()).collect();
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let t = Instant::now();
                let mut next = model.step_greedy(b, pool, &mut refs, &prompt_refs)?;
                let prefill = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let mut done = 0;
                while done < steps && t.elapsed().as_secs_f64() < seconds {
                    let tokens: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
                    next = model.step_greedy(b, pool, &mut refs, &tokens)?;
                    done += 1;
                }
                Ok((done, t.elapsed().as_secs_f64(), prefill))
            };
            run(4, f64::INFINITY)?;
            let missed = b.buffer_stats().missed;
            let (steps, elapsed, prefill) = run(args.max_steps, args.seconds)?;
            // Includes the timed run's prefill, which allocates the shapes of its prompt.
            let driver_allocations = b.buffer_stats().missed - missed;
            let steps = steps.max(1);
            let mean_context = PROMPT + steps / 2;
            let recorded = b.decode_graph_batches().contains(&batch);
            if graphs && !recorded {
                eprintln!("gpu_bench: batch {batch}: no decode graph was recorded (see the warning above)");
            }
            emit(json!({
                "bench": "decode", "impl": "atomic", "model": DECODER, "dtype": precision.to_string(), "batch": batch,
                "graphs": graphs, "graphs_recorded": graphs && recorded, "gemv": gemv, "grouped_decode": grouped, "buffer_cache": reuse,
                "driver_allocations": driver_allocations,
                "prompt": PROMPT, "steps": steps, "mean_context": mean_context,
                "prefill_ms": prefill * 1e3, "ms_per_step": elapsed * 1e3 / steps as f64,
                "tokens_per_s": (batch * steps) as f64 / elapsed,
            }));
            if !graphs && gemv && grouped && reuse {
                // A failure timing the ops alone costs their rows, not the batches after them.
                if let Err(e) = decode_ops(b, config, batch, mean_context) {
                    report_failure(precision, &format!("decode ops at batch {batch}"), &e);
                }
            }
        }
    }
    b.set_gemv(true);
    b.set_grouped_decode(true);
    b.set_buffer_cache_limit(DEFAULT_LIMIT_BYTES);
    Ok(())
}

/// One timed decode configuration: the batch and which of the worker's own paths are on.
#[derive(Clone, Copy)]
struct Variant {
    batch: usize,
    gemv: bool,
    grouped: bool,
    reuse: bool,
}

/// The ops of one Llama decode step (`batch` sequences, one new token each, `context` cached
/// positions), each timed alone, in the order `Llama::run` and `Step::attend` call them.
fn decode_ops(b: &CudaBackend, c: &LlamaConfig, batch: usize, context: usize) -> anyhow::Result<()> {
    let op = Op {
        section: "decode",
        model: DECODER,
        batch,
        precision: b.precision(),
    };
    let (h, heads, kvh, d, inter, layers, vocab) = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.num_hidden_layers,
        c.vocab_size,
    );
    let (q, kv, t) = (heads * d, kvh * d, batch);
    let act = |n: usize| op.bytes(n);
    let theta = c.rope_theta as f32;

    let table = upload(b, &[vocab, h])?;
    let ids: Vec<u32> = (0..t as u32).collect();
    let us = time_op(b, workload().op_budget, || {
        drop(b.embedding(&ids, &table)?);
        Ok(())
    })?;
    op.emit(
        "embedding",
        format!("{t} ids of [{vocab},{h}]"),
        us,
        1,
        0.0,
        act(2 * t * h),
    );
    drop(table);

    // The projections as `Llama::run` calls them: each block's norm folded into the product
    // that reads it, each residual add into the one that produces it (one matrix-vector
    // kernel at up to four rows). Beside each, with 0 calls, the same work composed of cuBLAS
    // and the separate kernels, as larger batches and the kernel switched off run it.
    let x = upload(b, &[t, h])?;
    let norm = upload(b, &[h])?;
    let eps = c.rms_norm_eps as f32;
    let qkv_w = upload(b, &[q + 2 * kv, h])?;
    op.folded(b, "rms_norm_linear_qkv", (t, h, q + 2 * kv), layers, || {
        drop(b.rms_norm_linear(&x, &norm, eps, &qkv_w, None)?);
        Ok(())
    })?;
    op.folded(b, "rms_norm+cublas_qkv", (t, h, q + 2 * kv), 0, || {
        drop(b.linear_cublas(&b.rms_norm(&x, &norm, eps)?, &qkv_w, None)?);
        Ok(())
    })?;
    drop(qkv_w);

    // Step::attend_qkv: q and k rotated, keys and values written into the pool by the same
    // kernel, then attention over the pool in place. Each sequence's blocks are contiguous
    // here; in a server they are scattered, which costs the kernel nothing (it reads whole
    // 16-position blocks either way).
    let blocks_per_seq = context.div_ceil(BLOCK_SIZE);
    let mut pool = b.zeros(&[batch * blocks_per_seq * BLOCK_SIZE, kvh, d])?;
    let mut values = b.zeros(&[batch * blocks_per_seq * BLOCK_SIZE, kvh, d])?;
    let plan = PagedPlan {
        block_size: BLOCK_SIZE,
        window: None,
        seqs: (0..batch)
            .map(|s| PagedSeq {
                q_len: 1,
                k_len: context,
                blocks: (0..blocks_per_seq)
                    .map(|i| (s * blocks_per_seq + i) as u32)
                    .collect(),
            })
            .collect(),
    };
    let paged = b.prepare_paged(&plan)?;
    let qkv = upload(b, &[t, q + 2 * kv])?;
    let positions: Vec<usize> = vec![context; t];
    let us = time_op(b, workload().op_budget, || {
        drop(b.split_qkv_rope_paged(
            &qkv,
            (heads, kvh),
            &positions,
            theta,
            &mut pool,
            &mut values,
            &paged,
        )?);
        Ok(())
    })?;
    op.emit(
        "split_qkv_rope_paged",
        format!("[{t},{}]", q + 2 * kv),
        us,
        layers,
        0.0,
        act(2 * t * (q + 2 * kv)),
    );
    let us = time_op(b, workload().op_budget, || {
        drop(b.prepare_paged(&plan)?);
        Ok(())
    })?;
    op.emit(
        "prepare_paged",
        format!("{batch} block tables of {blocks_per_seq}"),
        us,
        1,
        0.0,
        // Block tables and their metadata are 32-bit integers in every precision.
        4.0 * (batch * (blocks_per_seq + 4)) as f64,
    );

    let qd = upload(b, &[batch, heads, d])?;
    let us = time_op(b, workload().op_budget, || {
        drop(b.paged_attention(&qd, &pool, &values, &paged)?);
        Ok(())
    })?;
    let shape = format!("q [{batch},{heads},{d}] over {context} cached keys x {kvh} heads");
    let (flops, bytes) = (
        4.0 * (batch * heads * context * d) as f64,
        act(2 * batch * context * kv + 2 * batch * q),
    );
    op.emit("attention_decode", shape.clone(), us, layers, flops, bytes);
    // The per-head decode kernels for comparison (0 calls: not part of the step).
    b.set_grouped_decode(false);
    let per_head = time_op(b, workload().op_budget, || {
        drop(b.paged_attention(&qd, &pool, &values, &paged)?);
        Ok(())
    });
    b.set_grouped_decode(true);
    op.emit("attention_decode_per_head", shape, per_head?, 0, flops, bytes);
    drop((qd, pool, values, paged, qkv));

    // A prompt's attention (0 calls: prefill, not part of a step) as the step runs it (cuBLAS
    // for prompts of 16 tokens or more), then through the flash kernel the backend picks for
    // short prompts (on tensor cores in half precision at head dimensions 32, 64 and 128):
    // which one long prompts should take.
    let prompt = workload().prefill_prompt;
    let prompt_blocks = prompt.div_ceil(BLOCK_SIZE);
    let pool = upload(b, &[prompt_blocks * BLOCK_SIZE, kvh, d])?;
    let values = upload(b, &[prompt_blocks * BLOCK_SIZE, kvh, d])?;
    let plan = PagedPlan {
        block_size: BLOCK_SIZE,
        window: None,
        seqs: vec![PagedSeq {
            q_len: prompt,
            k_len: prompt,
            blocks: (0..prompt_blocks as u32).collect(),
        }],
    };
    let paged = b.prepare_paged(&plan)?;
    let qp = upload(b, &[prompt, heads, d])?;
    let shape = format!("q [{prompt},{heads},{d}] causal over {prompt} keys x {kvh} heads");
    // Causal: half the score matrix.
    let (flops, bytes) = (
        2.0 * (heads * prompt * prompt * d) as f64,
        act(2 * prompt * kv + 2 * prompt * q),
    );
    let us = time_op(b, workload().op_budget, || {
        drop(b.paged_attention(&qp, &pool, &values, &paged)?);
        Ok(())
    })?;
    op.emit("attention_prefill", shape.clone(), us, 0, flops, bytes);
    let us = time_op(b, workload().op_budget, || {
        drop(b.paged_attention_flash(&qp, &pool, &values, &paged)?);
        Ok(())
    })?;
    let kernel = if b.tensor_core_flash_fits(d) {
        "tensor cores"
    } else {
        "SIMT"
    };
    op.emit(
        "attention_prefill_flash",
        format!("{shape} ({kernel})"),
        us,
        0,
        flops,
        bytes,
    );
    drop((qp, pool, values, paged));

    // The residual stream is taken by value (updated in place), so each call gets a fresh
    // copy, made outside the timed call.
    let context_rows = upload(b, &[t, q])?;
    let o_w = upload(b, &[h, q])?;
    op.folded_add(b, "linear_add_o", (t, q, h), layers, &x, |r| {
        b.linear_add(&context_rows, &o_w, None, r)
    })?;
    op.folded_add(b, "cublas+add_o", (t, q, h), 0, &x, |r| {
        b.add(&r, &b.linear_cublas(&context_rows, &o_w, None)?)
    })?;
    drop((context_rows, o_w));

    let gate_up_w = upload(b, &[2 * inter, h])?;
    op.folded(b, "rms_norm_swiglu", (t, h, 2 * inter), layers, || {
        drop(b.rms_norm_swiglu(&x, &norm, eps, &gate_up_w)?);
        Ok(())
    })?;
    op.folded(b, "rms_norm+cublas+swiglu", (t, h, 2 * inter), 0, || {
        drop(b.swiglu(&b.linear_cublas(&b.rms_norm(&x, &norm, eps)?, &gate_up_w, None)?)?);
        Ok(())
    })?;
    drop(gate_up_w);

    let gated = upload(b, &[t, inter])?;
    let down_w = upload(b, &[h, inter])?;
    op.folded_add(b, "linear_add_down", (t, inter, h), layers, &x, |r| {
        b.linear_add(&gated, &down_w, None, r)
    })?;
    op.folded_add(b, "cublas+add_down", (t, inter, h), 0, &x, |r| {
        b.add(&r, &b.linear_cublas(&gated, &down_w, None)?)
    })?;
    drop((gated, down_w));

    let head_w = upload(b, &[vocab, h])?;
    op.folded(b, "rms_norm_linear_lm_head", (t, h, vocab), 1, || {
        drop(b.rms_norm_linear(&x, &norm, eps, &head_w, None)?);
        Ok(())
    })?;
    op.folded(b, "rms_norm+cublas_lm_head", (t, h, vocab), 0, || {
        drop(b.linear_cublas(&b.rms_norm(&x, &norm, eps)?, &head_w, None)?);
        Ok(())
    })?;
    drop(head_w);
    // Greedy selection on the GPU as a decode step makes it (`sample_rows` with greedy draws):
    // only the ids come back.
    let logits = upload(b, &[t, vocab])?;
    let greedy = vec![TokenDraw::GREEDY; t];
    let us = time_op(b, workload().op_budget, || {
        drop(b.sample_rows(&logits, &greedy)?);
        Ok(())
    })?;
    op.emit(
        "sample_greedy_to_host",
        format!("[{t},{vocab}]"),
        us,
        1,
        0.0,
        act(t * vocab),
    );
    // Sampling with both cuts on the GPU (top-k 50, top-p 0.9: the radix selects read the row
    // about a dozen times), for comparison with the greedy row above; 0 calls, since the
    // measured decode step is greedy.
    let draws = vec![
        TokenDraw {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.9,
            uniform: 0.5,
        };
        t
    ];
    let us = time_op(b, workload().op_budget, || {
        drop(b.sample_rows(&logits, &draws)?);
        Ok(())
    })?;
    op.emit(
        "sample_top_k_p_to_host",
        format!("[{t},{vocab}]"),
        us,
        0,
        0.0,
        act(t * vocab),
    );
    Ok(())
}

/// The `accuracy` section: the worker's outputs on the benchmark's models against PyTorch's
/// fp32 answers, which `worker/bench/gpu_reference.py` writes into each model folder as
/// `reference.json` (fixed token ids; PyTorch in fp32 without TF32).
///
/// One `accuracy` line per model and precision, with two error figures: the largest absolute
/// difference over the largest absolute reference value (BERT: every real token's hidden state;
/// Llama: each prompt's last-position logits), and the lowest cosine between one token's (one
/// prompt's) vector and the reference's. Llama adds its greedy tokens, compared step by step
/// up to the first divergence (after it the two continue from different texts) and counted
/// only at steps the bounds decide (see [`Bounds::greedy_margin_rel`]).
///
/// The bounds, per precision ([`Bounds::of`]):
///
/// - fp32: 1e-4 relative. Both sides store fp32, accumulate in fp32 and use no TF32 (cuBLAS on
///   the GPU on both); what differs is the order of summation (blocked products, the worker's
///   fused attention against PyTorch's eager softmax) and a few ulps in exp, erf and the RoPE
///   angles: each op differs by 2^-24 (6e-8) times a small factor. The worker's CPU backend
///   against PyTorch on the CPU, at these models' full shapes, differs by 9e-7 (BERT-base) and
///   4e-6 (the 1.1B Llama), so 1e-4 leaves 25x for the GPU's other summation orders while a
///   real fault (a wrong mask, scale, position or cache entry) shows at 1e-3 and beyond.
/// - fp16 and bf16: 32 unit roundoffs u, 2^-11 x 32 = 1.6e-2 and 2^-8 x 32 = 0.125. The worker
///   rounds every stored weight and activation (and the KV cache) to that precision and
///   accumulates in fp32, so each stored tensor adds an error of up to u relative, and
///   independent roundings add in quadrature. The two-layer fixtures are held to about 10u
///   (5e-3 and 4e-2); a model of L layers gathers about sqrt(L/2) times as much, which for
///   Llama's 22 layers (the deepest here, and the bound for all three) is 3.3 x 10u = 33u.
///   PyTorch itself run in fp16/bf16 on these models lands at 4u to 8u (a quarter or less of
///   the bound), a proxy for what storage rounding alone costs.
///
/// The lowest cosine must reach 1 - e^2/2 where e is the relative bound: for errors spread over a
/// vector, 1 - cos is about half the squared relative error (fp32: 1 - 5e-9, fp16: 0.99988,
/// bf16: 0.992). The two figures thus test the same budget two ways: the largest difference
/// catches a few bad elements, the cosine a bad token or prompt.
mod accuracy {
    use std::path::Path;

    use anyhow::{Context, bail};
    use atomic_worker::backend::{Backend, CudaBackend, Precision};
    use atomic_worker::config::ModelConfig;
    use atomic_worker::models::bert::{Batch, Bert};
    use atomic_worker::models::decoder::CausalLm;
    use atomic_worker::models::kv_cache::{BLOCK_SIZE, KvPool};
    use atomic_worker::models::llama::Llama;
    use serde_json::{Value, json};

    use super::{DECODER, ENCODERS, emit, open};
    use atomic_worker::sampling::argmax;

    /// The file `gpu_reference.py` writes into each model folder.
    pub const REFERENCE: &str = "reference.json";

    /// What the worker's outputs must stay within, relative to PyTorch's fp32 (see the module).
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Bounds {
        /// Largest |worker - reference| over the largest |reference|.
        pub max_abs_rel: f64,
        /// Lowest cosine of one token's hidden state (one prompt's logits) to the reference's.
        pub min_cosine: f64,
    }

    impl Bounds {
        pub fn of(precision: Precision) -> Self {
            let max_abs_rel = match precision {
                Precision::F32 => 1e-4,
                Precision::F16 => 32.0 * 2f64.powi(-11),
                Precision::Bf16 => 32.0 * 2f64.powi(-8),
            };
            Bounds {
                max_abs_rel,
                min_cosine: 1.0 - max_abs_rel * max_abs_rel / 2.0,
            }
        }

        /// The top-two gap, relative to that step's largest |logit|, above which a greedy
        /// choice is decided at this precision: when every logit is within `max_abs_rel` of the
        /// largest |logit| of the reference, the difference of any two moves by at most twice
        /// that, so a larger gap cannot change which token is on top, and a divergence there
        /// means that step's logits broke the bound. Closer calls are rounding's to make, and a
        /// divergence there is not an error. Random weights give gaps of 0.1% to 20% of the
        /// largest logit: fp32 (margin 0.02%) decides nearly every step, fp16 (3%) over half,
        /// bf16 (25%) hardly any, so in bf16 the greedy figures mostly report agreement.
        pub fn greedy_margin_rel(&self) -> f64 {
            2.0 * self.max_abs_rel
        }
    }

    /// Error figures gathered over the vectors compared (tokens, or prompts' logits).
    #[derive(Debug)]
    pub struct Errors {
        max_abs_diff: f64,
        max_abs_reference: f64,
        min_cosine: f64,
        vectors: usize,
    }

    impl Errors {
        pub fn new() -> Self {
            Errors {
                max_abs_diff: 0.0,
                max_abs_reference: 0.0,
                min_cosine: 1.0,
                vectors: 0,
            }
        }

        /// Adds one vector pair; NaN in `got` makes every figure fail (NaN compares false).
        pub fn add(&mut self, got: &[f32], want: &[f32]) -> anyhow::Result<()> {
            if got.len() != want.len() {
                bail!("{} values against the reference's {}", got.len(), want.len());
            }
            let (mut dot, mut got_sq, mut want_sq) = (0.0f64, 0.0f64, 0.0f64);
            for (&g, &w) in got.iter().zip(want) {
                let (g, w) = (f64::from(g), f64::from(w));
                let diff = (g - w).abs();
                // `max` would drop a NaN; keep it so that the bound fails.
                if diff.is_nan() || diff > self.max_abs_diff {
                    self.max_abs_diff = diff;
                }
                self.max_abs_reference = self.max_abs_reference.max(w.abs());
                dot += g * w;
                got_sq += g * g;
                want_sq += w * w;
            }
            let cosine = dot / (got_sq * want_sq).sqrt();
            if cosine.is_nan() || cosine < self.min_cosine {
                self.min_cosine = cosine;
            }
            self.vectors += 1;
            Ok(())
        }

        pub fn max_abs_rel(&self) -> f64 {
            self.max_abs_diff / self.max_abs_reference.max(f64::MIN_POSITIVE)
        }

        pub fn min_cosine(&self) -> f64 {
            self.min_cosine
        }

        /// Within both bounds (false for NaN figures, and when nothing was compared).
        pub fn within(&self, bounds: &Bounds) -> bool {
            self.vectors > 0
                && self.max_abs_rel() <= bounds.max_abs_rel
                && self.min_cosine() >= bounds.min_cosine
        }
    }

    /// One prompt's greedy tokens against the reference's, up to the first divergence.
    #[derive(Debug, Default, PartialEq)]
    pub struct Greedy {
        /// Tokens equal to the reference's before the first divergence, every step counted.
        pub agreed: usize,
        /// Decided steps (gap above the margin) compared: those before the first divergence,
        /// and the divergence itself if it is decided.
        pub compared: usize,
        /// Of the compared decided steps, those that matched.
        pub matched: usize,
        /// The step of the first divergence, if any.
        pub first_divergence: Option<usize>,
    }

    /// Compares `got` with the reference's `want`, step by step; a step counts as decided when
    /// its reference top-two gap exceeds `margin_rel` times that step's largest |logit|.
    pub fn compare_greedy(
        got: &[u32],
        want: &[u32],
        gaps: &[f64],
        scales: &[f64],
        margin_rel: f64,
    ) -> Greedy {
        let mut out = Greedy::default();
        for (step, (&g, &w)) in got.iter().zip(want).enumerate() {
            let decided = match (gaps.get(step), scales.get(step)) {
                (Some(&gap), Some(&scale)) => gap > margin_rel * scale,
                _ => false,
            };
            if decided {
                out.compared += 1;
            }
            if g != w {
                out.first_divergence = Some(step);
                return out;
            }
            out.agreed += 1;
            if decided {
                out.matched += 1;
            }
        }
        out
    }

    /// Runs every model in `backend`'s precision and emits one line each; a model that fails
    /// its bounds (or cannot be checked) fails the section without stopping the others.
    pub fn run(backend: &CudaBackend, models: &Path) -> anyhow::Result<()> {
        let precision = backend.precision();
        let bounds = Bounds::of(precision);
        let failed: Vec<String> = ENCODERS
            .into_iter()
            .chain([DECODER])
            .filter_map(|name| check_model(backend, &models.join(name), name, &bounds))
            .collect();
        if !failed.is_empty() {
            bail!("{precision} against PyTorch fp32: {}", failed.join("; "));
        }
        Ok(())
    }

    /// Checks one model and emits its line; what went wrong, if anything.
    fn check_model(backend: &CudaBackend, folder: &Path, name: &str, bounds: &Bounds) -> Option<String> {
        let result = if name == DECODER {
            llama(backend, folder, bounds)
        } else {
            bert(backend, folder, bounds)
        };
        let mut line = json!({
            "bench": "accuracy", "impl": "atomic", "model": name,
            "dtype": backend.precision().to_string(), "bound_max_abs_rel": bounds.max_abs_rel,
            "bound_min_cosine": bounds.min_cosine,
        });
        let failure = match result {
            Ok(figures) => {
                merge(&mut line, figures);
                (line["pass"] != true).then(|| format!("{name} outside the bounds"))
            }
            Err(e) => {
                let message = format!("{e:#}");
                line["pass"] = json!(false);
                line["error"] = json!(message);
                Some(format!("{name}: {message}"))
            }
        };
        emit(line);
        failure
    }

    fn merge(line: &mut Value, figures: Value) {
        if let (Some(line), Value::Object(figures)) = (line.as_object_mut(), figures) {
            line.extend(figures);
        }
    }

    /// A figure for a JSON line: JSON has no NaN or infinity, and `json!` would write them as
    /// null, which the report reads as "not measured"; a string says what happened.
    fn figure(x: f64) -> Value {
        if x.is_finite() {
            json!(x)
        } else {
            json!(x.to_string())
        }
    }

    /// Whether `folder` holds a reference, for `--check`.
    pub fn has_reference(folder: &Path) -> bool {
        folder.join(REFERENCE).is_file()
    }

    fn read_reference(folder: &Path) -> anyhow::Result<Value> {
        let path = folder.join(REFERENCE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (write it with worker/bench/gpu_reference.py)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// `v` (a number or nested arrays of numbers) flattened into f32s.
    fn floats(v: &Value) -> anyhow::Result<Vec<f32>> {
        fn walk(v: &Value, out: &mut Vec<f32>) -> anyhow::Result<()> {
            match v {
                Value::Array(items) => items.iter().try_for_each(|item| walk(item, out)),
                Value::Number(n) => {
                    let x = n.as_f64().context("a reference number out of range")?;
                    out.push(x as f32);
                    Ok(())
                }
                other => bail!("expected numbers in the reference, found {other}"),
            }
        }
        let mut out = Vec::new();
        walk(v, &mut out)?;
        Ok(out)
    }

    /// The reference's field `key`, as `T`.
    fn field<T: serde::de::DeserializeOwned>(reference: &Value, key: &str) -> anyhow::Result<T> {
        let v = reference
            .get(key)
            .with_context(|| format!("the reference has no {key:?}"))?;
        serde_json::from_value(v.clone()).with_context(|| format!("the reference's {key:?}"))
    }

    /// The reference's field `key`: one vector of floats per sequence.
    fn rows(reference: &Value, key: &str) -> anyhow::Result<Vec<Vec<f32>>> {
        let items = reference
            .get(key)
            .and_then(Value::as_array)
            .with_context(|| format!("the reference has no list {key:?}"))?;
        items.iter().map(floats).collect()
    }

    /// The sequences right-padded into one batch (id 0, masked), as `Batch::new` pads
    /// tokenizer output and as the reference was computed.
    pub fn padded_batch(sequences: &[Vec<u32>]) -> Batch {
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = Batch {
            batch: sequences.len(),
            seq,
            ids: Vec::with_capacity(sequences.len() * seq),
            type_ids: vec![0; sequences.len() * seq],
            valid: Vec::with_capacity(sequences.len() * seq),
        };
        for ids in sequences {
            let pad = seq - ids.len();
            batch
                .ids
                .extend(ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
            batch
                .valid
                .extend(std::iter::repeat_n(true, ids.len()).chain(std::iter::repeat_n(false, pad)));
        }
        batch
    }

    /// BERT: the hidden state of every real token of the reference's padded batch.
    fn bert<B: Backend>(b: &B, folder: &Path, bounds: &Bounds) -> anyhow::Result<Value> {
        let dir = open(folder)?;
        let ModelConfig::Bert(config) = &dir.config else {
            bail!("{}: not a BERT model", folder.display())
        };
        let reference = read_reference(folder)?;
        let sequences: Vec<Vec<u32>> = field(&reference, "input_ids")?;
        let want = rows(&reference, "last_hidden_state")?;
        if want.len() != sequences.len() {
            bail!(
                "{} sequences but {} hidden states in the reference",
                sequences.len(),
                want.len()
            );
        }
        let batch = padded_batch(&sequences);
        let hidden = {
            let model = Bert::load(b, config, &dir.weights, &dir.tensor_prefix)?;
            model.hidden_states(b, &batch)?
        };
        let h = config.hidden_size;
        let mut errors = Errors::new();
        for (s, (ids, want)) in sequences.iter().zip(&want).enumerate() {
            if want.len() != ids.len() * h {
                bail!(
                    "sequence {s}: the reference holds {} values, not {} x {h}",
                    want.len(),
                    ids.len()
                );
            }
            for (t, want_row) in want.chunks_exact(h).enumerate() {
                let row = (s * batch.seq + t) * h;
                errors.add(&hidden[row..row + h], want_row)?;
            }
        }
        Ok(json!({
            "compared": "last_hidden_state", "vectors": errors.vectors,
            "max_abs_rel": figure(errors.max_abs_rel()), "min_cosine": figure(errors.min_cosine()),
            "reference_device": reference.pointer("/computed/device"),
            "pass": errors.within(bounds),
        }))
    }

    /// Llama: each prompt's last-position logits after prefill, then its greedy tokens through
    /// the KV cache (prefill and single-token decode steps, as the worker serves them).
    fn llama<B: Backend>(b: &B, folder: &Path, bounds: &Bounds) -> anyhow::Result<Value> {
        let dir = open(folder)?;
        let ModelConfig::Llama(config) = &dir.config else {
            bail!("{}: not a Llama model", folder.display())
        };
        let reference = read_reference(folder)?;
        let prompts: Vec<Vec<u32>> = field(&reference, "input_ids")?;
        let want_logits = rows(&reference, "last_logits")?;
        let want_tokens: Vec<Vec<u32>> = field(&reference, "greedy_ids")?;
        let gaps: Vec<Vec<f64>> = field(&reference, "greedy_top2_gap")?;
        let scales: Vec<Vec<f64>> = field(&reference, "greedy_max_abs_logit")?;
        let n = prompts.len();
        if [want_logits.len(), want_tokens.len(), gaps.len(), scales.len()] != [n; 4] {
            bail!("the reference's lists do not all hold {n} prompts");
        }
        let model = Llama::load(b, config, &dir.weights, &dir.tensor_prefix)?;
        let positions = prompts
            .iter()
            .zip(&want_tokens)
            .map(|(p, t)| (p.len() + t.len()).div_ceil(BLOCK_SIZE) * BLOCK_SIZE)
            .sum();
        let pool = &mut model.new_pool(b, positions)?;
        let margin_rel = bounds.greedy_margin_rel();
        let mut errors = Errors::new();
        let mut greedy = Vec::with_capacity(n);
        for (i, prompt) in prompts.iter().enumerate() {
            let (logits, tokens) = generate(&model, b, pool, prompt, want_tokens[i].len())
                .with_context(|| format!("prompt {i}"))?;
            errors
                .add(&logits, &want_logits[i])
                .with_context(|| format!("prompt {i} logits"))?;
            greedy.push(compare_greedy(
                &tokens,
                &want_tokens[i],
                &gaps[i],
                &scales[i],
                margin_rel,
            ));
        }
        let compared: usize = greedy.iter().map(|g| g.compared).sum();
        let matched: usize = greedy.iter().map(|g| g.matched).sum();
        Ok(json!({
            "compared": "last-position logits", "vectors": errors.vectors,
            "max_abs_rel": figure(errors.max_abs_rel()), "min_cosine": figure(errors.min_cosine()),
            "greedy_tokens": want_tokens.iter().map(Vec::len).sum::<usize>(),
            "greedy_agreed": greedy.iter().map(|g| g.agreed).sum::<usize>(),
            "greedy_margin_rel": margin_rel,
            "greedy_compared": compared, "greedy_matched": matched,
            "first_divergence": greedy.iter().map(|g| g.first_divergence).collect::<Vec<_>>(),
            "reference_device": reference.pointer("/computed/device"),
            "pass": errors.within(bounds) && matched == compared,
        }))
    }

    /// The prompt's last-position logits and `tokens` greedy tokens, each chosen on the host
    /// from the previous step's logits; the cache is released on return.
    fn generate<B: Backend>(
        model: &Llama<B>,
        b: &B,
        pool: &mut KvPool<B>,
        prompt: &[u32],
        tokens: usize,
    ) -> anyhow::Result<(Vec<f32>, Vec<u32>)> {
        let mut cache = pool.new_cache();
        let first = model.prefill(b, pool, &mut cache, prompt)?;
        let mut chosen = Vec::with_capacity(tokens);
        let mut logits = first.clone();
        while chosen.len() < tokens {
            let token = argmax(&logits);
            chosen.push(token);
            if chosen.len() < tokens {
                logits = model.decode_step(b, pool, &mut cache, token)?;
            }
        }
        Ok((first, chosen))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn bounds_follow_the_unit_roundoff() {
            let fp16 = Bounds::of(Precision::F16);
            assert!((fp16.max_abs_rel - 0.015_625).abs() < 1e-12);
            assert!((fp16.min_cosine - 0.999_878).abs() < 1e-6);
            let bf16 = Bounds::of(Precision::Bf16);
            assert!((bf16.max_abs_rel - 0.125).abs() < 1e-12);
            assert!(Bounds::of(Precision::F32).min_cosine > 0.999_999_99);
        }

        #[test]
        fn errors_are_relative_to_the_largest_reference_value() {
            let mut e = Errors::new();
            e.add(&[1.0, 2.0, -4.0], &[1.0, 2.0, -4.1]).unwrap();
            e.add(&[0.5, 0.0, 0.0], &[0.5, 0.0, 0.0]).unwrap();
            assert!((e.max_abs_rel() - 0.1 / 4.1).abs() < 1e-6);
            assert!(e.min_cosine() < 1.0 && e.min_cosine() > 0.999);
            assert!(e.within(&Bounds {
                max_abs_rel: 0.03,
                min_cosine: 0.999
            }));
            assert!(!e.within(&Bounds::of(Precision::F32)));
            assert!(e.add(&[1.0], &[1.0, 2.0]).is_err());
        }

        #[test]
        fn nan_and_nothing_compared_fail() {
            let mut e = Errors::new();
            assert!(!e.within(&Bounds::of(Precision::Bf16)));
            e.add(&[f32::NAN, 1.0], &[1.0, 1.0]).unwrap();
            e.add(&[1.0, 1.0], &[1.0, 1.0]).unwrap();
            assert!(!e.within(&Bounds::of(Precision::Bf16)));
        }

        #[test]
        fn greedy_stops_at_the_first_divergence() {
            let want = [5, 6, 7, 8];
            let scales = [10.0; 4];
            // Every gap decided at a 1% margin (0.1 absolute): the divergence at step 2 counts.
            let g = compare_greedy(&[5, 6, 9, 8], &want, &[1.0; 4], &scales, 0.01);
            assert_eq!(
                g,
                Greedy {
                    agreed: 2,
                    compared: 3,
                    matched: 2,
                    first_divergence: Some(2)
                }
            );
            // A close call at the divergence is not counted, nor anything after it.
            let g = compare_greedy(&[5, 6, 9, 8], &want, &[1.0, 1.0, 0.05, 1.0], &scales, 0.01);
            assert_eq!(
                g,
                Greedy {
                    agreed: 2,
                    compared: 2,
                    matched: 2,
                    first_divergence: Some(2)
                }
            );
            let g = compare_greedy(&want, &want, &[0.05, 1.0, 1.0, 1.0], &scales, 0.01);
            assert_eq!(
                g,
                Greedy {
                    agreed: 4,
                    compared: 3,
                    matched: 3,
                    first_divergence: None
                }
            );
        }

        #[test]
        fn padding_goes_after_each_sequence() {
            let batch = padded_batch(&[vec![7, 8, 9], vec![4]]);
            assert_eq!((batch.batch, batch.seq), (2, 3));
            assert_eq!(batch.ids, [7, 8, 9, 4, 0, 0]);
            assert_eq!(batch.valid, [true, true, true, true, false, false]);
            assert_eq!(batch.len_of(1), 1);
        }
    }
}
