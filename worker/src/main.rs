//! `atomic-worker`: the inference worker. `atomic-worker serve` loads a model folder and serves
//! it over HTTP (see [`atomic_worker::server`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use atomic_worker::backend::CpuBackend;
use atomic_worker::backend::device::{CUDA_BUILT, DeviceSpec, Precision, Selected, select};
use atomic_worker::server::{self, AppState, Engine, Limits, Metrics, ModelLimits, ModelParts, Task};
use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "atomic-worker",
    version,
    about = "Transformer inference worker for Atomic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load a model folder and serve it over HTTP.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Model folder: config.json, tokenizer.json and safetensors weights.
    #[arg(long, env = "ATOMIC_WORKER_MODEL_DIR")]
    model_dir: PathBuf,

    /// Name the model is served under (the `model` field of requests); defaults to the folder name.
    #[arg(long, env = "ATOMIC_WORKER_MODEL_NAME")]
    model_name: Option<String>,

    /// Task the deployment runs; the worker refuses to start when the model cannot do it.
    #[arg(long, env = "ATOMIC_WORKER_TASK", value_enum)]
    task: Option<Task>,

    /// Comma-separated labels for classification requests that give none (zero-shot for models
    /// without a head, a subset of the head's labels otherwise).
    #[arg(long, env = "ATOMIC_WORKER_LABELS", value_delimiter = ',')]
    labels: Vec<String>,

    /// Port to listen on.
    #[arg(long, env = "ATOMIC_WORKER_PORT", default_value_t = 8080)]
    port: u16,

    /// Address to listen on.
    #[arg(long, env = "ATOMIC_WORKER_HOST", default_value = "0.0.0.0")]
    host: IpAddr,

    /// Compute threads; 0 uses every available core.
    #[arg(long, env = "ATOMIC_WORKER_THREADS", default_value_t = 0)]
    threads: usize,

    /// Most padded tokens (sequences × longest sequence) in one forward pass.
    #[arg(long, env = "ATOMIC_WORKER_MAX_BATCH_TOKENS", default_value_t = 16384)]
    max_batch_tokens: usize,

    /// Mebibytes of key/value cache the running generations may reserve together (decoders);
    /// each reserves its prompt plus `max_tokens` on joining, and the rest wait their turn.
    #[arg(long, env = "ATOMIC_WORKER_KV_CACHE_MIB", default_value_t = 2048)]
    kv_cache_mib: usize,

    /// Requests handled at once; more are answered 429 (Too Many Requests).
    #[arg(long, env = "ATOMIC_WORKER_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    max_concurrent_requests: usize,

    /// Texts per request (a list `input`, or zero-shot labels).
    #[arg(long, env = "ATOMIC_WORKER_MAX_INPUTS", default_value_t = 256)]
    max_inputs: usize,

    /// Characters per text; longer texts are answered 413.
    #[arg(long, env = "ATOMIC_WORKER_MAX_INPUT_CHARS", default_value_t = 100_000)]
    max_input_chars: usize,

    /// Storage precision of weights, activations and the KV cache on a GPU: fp32, fp16 or bf16
    /// (arithmetic accumulates in fp32 either way). The CPU computes in fp32 whatever is asked,
    /// with a warning.
    #[arg(long, env = "ATOMIC_WORKER_PRECISION", default_value = "fp32")]
    precision: Precision,

    /// Decode steps of up to this many sequences are recorded as CUDA graphs, once per batch
    /// size, and replayed: one launch per step instead of a dozen per layer (GPU only; 0 turns
    /// it off). Each recorded batch size keeps its own activation memory. Off by default until
    /// it has been verified on a GPU.
    #[arg(long, env = "ATOMIC_WORKER_CUDA_GRAPH_MAX_BATCH", default_value_t = 0)]
    cuda_graph_max_batch: usize,

    /// Device memory, in MiB, that the GPU keeps of the buffers ops drop, to hand to later ops
    /// without asking the driver: after the warm-up pass a forward pass of shapes seen before
    /// asks the driver for no memory. 0 turns the reuse off (every buffer goes back to the driver's pool).
    #[arg(long, env = "ATOMIC_WORKER_GPU_BUFFER_CACHE_MIB", default_value_t = atomic_worker::backend::buffer_cache::DEFAULT_LIMIT_BYTES >> 20)]
    gpu_buffer_cache_mib: usize,

    /// Compute device: `auto` (GPU 0 when this build has CUDA and a GPU is usable, else the CPU
    /// with a warning), `cpu`, or `cuda:N` (that GPU or fail; needs a build with the `cuda`
    /// feature).
    #[arg(long, env = "ATOMIC_WORKER_DEVICE", default_value = "auto")]
    device: DeviceSpec,

    /// Folder where the GPU kernels, compiled at start-up, are kept for the next start (which
    /// then skips the compiler). Defaults to `$XDG_CACHE_HOME/atomic-worker/kernels` or
    /// `$HOME/.cache/atomic-worker/kernels`; an unusable folder is a warning. Its contents run
    /// on the GPU: it must be writable by the worker alone.
    #[arg(long, env = "ATOMIC_WORKER_KERNEL_CACHE_DIR")]
    kernel_cache_dir: Option<PathBuf>,

    /// Compile every GPU kernel at start-up and keep none (overrides --kernel-cache-dir).
    #[arg(long, env = "ATOMIC_WORKER_NO_KERNEL_CACHE")]
    no_kernel_cache: bool,
}

impl ServeArgs {
    /// The kernel cache folder the flags and the environment give, if any.
    #[cfg(feature = "cuda")]
    fn kernel_cache(&self) -> Option<PathBuf> {
        if self.no_kernel_cache {
            return None;
        }
        self.kernel_cache_dir.clone().or_else(|| {
            atomic_worker::backend::device::default_kernel_cache_dir(
                std::env::var_os("XDG_CACHE_HOME"),
                std::env::var_os("HOME"),
            )
        })
    }
}

fn main() -> ExitCode {
    atomic_worker::alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a pod's log, or a file, gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Plainly on stderr (not through the log format) so it is the pod's last line.
            eprintln!("atomic-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the device `--device` names and loads the model onto it, recording how long each
/// phase took in `metrics`.
fn load_on_device(args: &ServeArgs, limits: &ModelLimits, metrics: &Metrics) -> anyhow::Result<ModelParts> {
    #[cfg(feature = "cuda")]
    let selected = select(args.device, CUDA_BUILT, |n| {
        let cache = args.kernel_cache();
        let backend =
            atomic_worker::backend::cuda::CudaBackend::with_kernel_cache(n, args.precision, cache.as_deref())
                .map_err(|e| e.to_string())?;
        let build = backend.kernel_build();
        tracing::info!(
            kernels = %build.target,
            nvrtc = %build.nvrtc,
            from_cache = build.from_cache,
            compiled = build.compiled,
            cache_dir = build.cache_dir.as_ref().map(|d| d.display().to_string()),
            seconds = build.seconds,
            "built the GPU kernels"
        );
        metrics.record_startup("kernels", build.seconds);
        backend.set_buffer_cache_limit(args.gpu_buffer_cache_mib.saturating_mul(1 << 20));
        // Every op against the reference before anything is served: a kernel that is wrong on
        // this GPU stops here, by name, instead of answering wrongly.
        let started = std::time::Instant::now();
        backend.self_test(args.precision).map_err(|e| e.to_string())?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(seconds, "the GPU passed the start-up self-test");
        metrics.record_startup("selftest", seconds);
        if args.cuda_graph_max_batch > 0 {
            backend.enable_decode_graphs(args.cuda_graph_max_batch);
        }
        Ok(backend)
    })?;
    #[cfg(not(feature = "cuda"))]
    let selected = select(args.device, CUDA_BUILT, |_| Err::<(), _>(String::new()))?;
    let dir = &args.model_dir;
    let parts = match selected {
        Selected::Cpu { warning } => {
            if let Some(warning) = warning {
                tracing::warn!("{warning}");
            }
            if args.precision != Precision::F32 {
                tracing::warn!(precision = %args.precision, "the CPU backend computes in fp32");
            }
            if args.cuda_graph_max_batch > 0 {
                tracing::warn!("--cuda-graph-max-batch is for GPUs; the CPU backend ignores it");
            }
            let backend = CpuBackend::new(args.threads)?;
            let simd = atomic_worker::backend::cpu_kernels::detected_simd_level();
            // The row kernels are picked for this CPU's SIMD level at run time: check them too.
            let started = std::time::Instant::now();
            atomic_worker::backend::selftest::check(&backend, Precision::F32)?;
            metrics.record_startup("selftest", started.elapsed().as_secs_f64());
            tracing::info!(threads = backend.threads(), ?simd, "running on the CPU");
            let started = std::time::Instant::now();
            let parts = server::load_model_on(dir, backend, limits);
            metrics.record_startup("load", started.elapsed().as_secs_f64());
            parts
        }
        #[cfg(feature = "cuda")]
        Selected::Cuda(backend) => {
            use atomic_worker::backend::Backend;
            tracing::info!(
                device = backend.name(),
                precision = %backend.precision(),
                cuda_graph_max_batch = args.cuda_graph_max_batch,
                "running on the GPU"
            );
            let started = std::time::Instant::now();
            let parts = server::load_model_on(dir, backend, limits);
            metrics.record_startup("load", started.elapsed().as_secs_f64());
            parts.map(|mut parts| {
                let started = std::time::Instant::now();
                // A failure here (out of memory, above all) is loud but not fatal: smaller
                // batches may still fit, and the scheduler reports what does not.
                match server::reserve_working_set(&mut parts, limits) {
                    Ok(tokens) => tracing::info!(
                        tokens,
                        seconds = started.elapsed().as_secs_f64(),
                        "ran the largest pass: the GPU's memory pool holds its working set"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the largest pass the limits admit failed at start-up; lower --max-batch-tokens \
                         (or --kv-cache-mib) until it fits"
                    ),
                }
                metrics.record_startup("warmup", started.elapsed().as_secs_f64());
                parts
            })
        }
        #[cfg(not(feature = "cuda"))]
        Selected::Cuda(()) => anyhow::bail!("--device {}: this build has no CUDA backend", args.device),
    };
    parts.with_context(|| format!("cannot load the model in {}", dir.display()))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let process_started = std::time::Instant::now();
    let model_name = match &args.model_name {
        Some(name) => name.clone(),
        None => args
            .model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_owned()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
        let limits = Limits {
            max_concurrent_requests: args.max_concurrent_requests,
            max_inputs: args.max_inputs,
            max_input_chars: args.max_input_chars,
            ..Limits::default()
        };
        let state = AppState::new(model_name.clone(), limits, metrics.clone());
        let addr = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(%addr, model = %model_name, "listening; loading the model");

        // Serve /health while the model loads; a load failure ends the process.
        let app = server::router(state.clone());
        let draining = state.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    server::shutdown_signal().await;
                    tracing::info!("shutting down: finishing in-flight requests");
                    draining.start_draining();
                })
                .await
        });

        // The device opens (and its kernels compile) while loading, so /ready stays 503 until
        // both are done and a device error ends the process with its reason.
        let model_limits = ModelLimits {
            max_batch_tokens: args.max_batch_tokens,
            kv_cache_bytes: args.kv_cache_mib.saturating_mul(1 << 20),
        };
        let args = Arc::new(args);
        let loading = args.clone();
        let loading_metrics = metrics.clone();
        let parts =
            tokio::task::spawn_blocking(move || load_on_device(&loading, &model_limits, &loading_metrics))
                .await
                .context("model loading did not finish")??;
        match &parts {
            ModelParts::Encoder(p) => server::check_task(args.task, &p.head, &args.labels)?,
            ModelParts::Decoder(_) => server::check_decoder_task(args.task, &args.labels)?,
        }
        let engine = Engine::start_model(parts, args.labels.clone(), &model_limits, metrics.clone())?;
        state.set_engine(engine);
        let seconds = process_started.elapsed().as_secs_f64();
        metrics.record_startup("ready", seconds);
        tracing::info!(seconds, "model loaded; ready");

        server
            .await
            .context("the server task failed")?
            .context("the server failed")?;
        Ok(())
    })
}
