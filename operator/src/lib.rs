//! Atomic operator: reconciles `AtomicTask` and `ModelDeployment` resources and dispatches tasks
//! to worker pods.
//!
//! The decision logic (task state machine, DAG, templating, retry arithmetic, queues, scaling) is
//! pure and lives in [`engine`]; the Kubernetes and HTTP code around it is a thin shell.

pub mod api;
pub mod engine;
pub mod lease;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod worker_client;

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A resource could not be (de)serialised.
    #[error("serialisation: {0}")]
    Json(#[from] serde_json::Error),
    /// The HTTP client could not be built (e.g. the TLS backend failed to initialise).
    #[error("HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// A metric could not be registered or the registry could not be encoded.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A socket could not be bound or served.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
