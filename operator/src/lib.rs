//! Atomic operator: reconciles `AtomicTask` and `ModelDeployment` resources and dispatches tasks
//! to worker pods.
//!
//! The decision logic (task state machine, DAG, templating, retry arithmetic, queues, scaling) is
//! pure and lives in [`engine`]; the task [`driver`] applies its decisions through a storage
//! trait, so the same code runs against the Kubernetes API ([`controller`]) and in memory
//! ([`memory`]); the [`dispatch`]er sends ready tasks to worker pods.

pub mod api;
pub mod controller;
pub mod dispatch;
pub mod driver;
pub mod engine;
pub mod lease;
pub mod manifest;
pub mod memory;
pub mod metrics;
pub mod run;
pub mod server;
pub mod worker_client;
pub mod workload;

#[cfg(test)]
mod fixtures;

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
    /// Someone else kept writing the object; the caller retries later.
    #[error("conflict: {0}")]
    Conflict(String),
    /// An object lacks a field the operator needs.
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// Adding or removing a finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// Short label for the `error` label of reconcile error metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Json(_) => "serialisation",
            Error::Conflict(_) => "conflict",
            Error::MissingField(_) => "invalid_object",
            Error::Finalizer(_) => "finalizer",
            Error::HttpClient(_) => "http_client",
            Error::Metrics(_) => "metrics",
            Error::Io(_) => "io",
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
