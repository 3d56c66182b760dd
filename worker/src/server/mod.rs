//! The worker's HTTP server: OpenAI-compatible `/v1/embeddings`, `/v1/completions` and
//! `/v1/chat/completions` (streaming or not), Atomic's
//! `/v1/classify`, `/v1/extract` and `/v1/tokenize`, plus `/health`, `/ready` and `/metrics`.
//!
//! The server listens before the model is loaded, so that `/health` answers during a long load
//! while `/ready` (and every model route) answers 503 until [`AppState::set_engine`] is called.
//! A semaphore bounds the requests handled at once; past it requests get 429 rather than a
//! queue that grows without bound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::sync::Semaphore;

pub mod engine;
pub mod error;
pub mod fault;
mod generate;
pub mod generator;
pub mod metrics;
mod routes;
pub mod scheduler;
pub mod split;

pub use engine::{
    Capability, EncoderParts, Engine, Head, ModelLimits, ModelParts, check_decoder_task, check_task,
    load_encoder, load_encoder_on, load_model, load_model_on, reserve_working_set,
};
pub use error::ApiError;
pub use generator::{Decoder, DecoderOn, DecoderParts, GenerationRequest, Generator, load_decoder};
pub use metrics::Metrics;

/// The task a deployment runs (`--task`); the operator passes it, the worker checks the model
/// can do it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// Sentence embeddings.
    Embed,
    /// Text classification (a classification head, or zero-shot over labels).
    Classify,
    /// Entity extraction (a token classification head).
    Extract,
    /// Text generation (decoders).
    Generate,
}

/// Request limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests handled at once; more are answered 429.
    pub max_concurrent_requests: usize,
    /// Texts per request.
    pub max_inputs: usize,
    /// Characters per text.
    pub max_input_chars: usize,
    /// Bytes per request body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 512,
            max_inputs: 256,
            max_input_chars: 100_000,
            max_body_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The state shared by all handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    model_name: String,
    limits: Limits,
    metrics: Arc<Metrics>,
    engine: OnceLock<Arc<Engine>>,
    permits: Arc<Semaphore>,
    draining: AtomicBool,
    created: u64,
}

impl AppState {
    /// A server for the model `model_name`, not ready until [`AppState::set_engine`].
    pub fn new(model_name: impl Into<String>, limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Inner {
            model_name: model_name.into(),
            permits: Arc::new(Semaphore::new(limits.max_concurrent_requests.max(1))),
            limits,
            metrics,
            engine: OnceLock::new(),
            draining: AtomicBool::new(false),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }))
    }

    /// Installs the loaded model; the server is ready from here on. A second call is ignored.
    pub fn set_engine(&self, engine: Engine) {
        let _ = self.0.engine.set(Arc::new(engine));
    }

    /// Marks the server as shutting down: `/ready` answers 503 so no new work is routed here.
    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the model is loaded, its device works and the server is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.0.engine.get().is_some_and(|e| e.fault.get().is_none())
            && !self.0.draining.load(Ordering::SeqCst)
    }

    /// The compute device's failure, once a model thread has recorded one.
    pub fn device_fault(&self) -> Option<String> {
        self.0.engine.get().and_then(|e| e.fault.get().map(str::to_owned))
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
}

/// The routes.
pub fn router(state: AppState) -> Router {
    use atomic_protocol as p;
    let body_limit = state.0.limits.max_body_bytes;
    Router::new()
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route(p::MODELS_PATH, get(routes::models))
        .route(p::EMBEDDINGS_PATH, post(routes::embeddings))
        .route(p::CLASSIFY_PATH, post(routes::classify))
        .route(p::EXTRACT_PATH, post(routes::extract))
        .route(p::TOKENIZE_PATH, post(routes::tokenize))
        .route(p::COMPLETIONS_PATH, post(routes::completions))
        .route(p::CHAT_COMPLETIONS_PATH, post(routes::chat_completions))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
