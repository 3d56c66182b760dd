//! Atomic operator: reconciles `AtomicTask` and `ModelDeployment` resources and dispatches tasks
//! to worker pods.
//!
//! The decision logic (task state machine, DAG, templating, retry arithmetic, queues, scaling) is
//! pure and lives in [`engine`]; the Kubernetes and HTTP code around it is a thin shell.

pub mod api;
pub mod engine;

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A resource could not be (de)serialised.
    #[error("serialisation: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
