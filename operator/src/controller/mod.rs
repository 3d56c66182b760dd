//! The Kubernetes shell: controllers for ModelDeployment and AtomicTask, the EndpointSlice
//! watcher that tells the dispatcher which worker pods are ready, and the shared context.

pub mod endpoints;
pub mod model;
pub mod task;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube::runtime::controller::Action;

use crate::Error;
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::workload::WorkerDefaults;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "atomic-operator";

/// What every reconcile needs.
pub struct Context<E> {
    /// Kubernetes client.
    pub client: Client,
    /// Worker pod defaults.
    pub worker_defaults: WorkerDefaults,
    /// The dispatcher (queues, endpoints, load).
    pub dispatcher: Arc<Dispatcher<E>>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
}

/// Requeue policy after a failed reconcile: log, count, back off. Conflicts retry fast since
/// they only mean that someone else wrote first.
pub fn error_policy(controller: &'static str, error: &Error, metrics: &Metrics) -> Action {
    tracing::warn!(controller, %error, "reconcile failed");
    metrics.reconcile_error(controller, error.metric_label());
    match error {
        Error::Conflict(_) => Action::requeue(Duration::from_millis(200)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

/// Runs a reconcile and records its duration.
pub async fn timed<T>(
    controller: &'static str,
    metrics: &Metrics,
    reconcile: impl std::future::Future<Output = T>,
) -> T {
    let started = Instant::now();
    let out = reconcile.await;
    metrics.reconcile_duration(controller, started.elapsed().as_secs_f64());
    out
}
