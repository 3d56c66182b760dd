//! The operator's Prometheus metrics: one [`Metrics`] value owns a private registry with every
//! series the operator exports, so tests and several operators in one process do not collide
//! the way they would in the global registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::Error;

/// Buckets for task durations and queue waits: tasks run from milliseconds (an embedding on a
/// warm model) to many minutes (long generations, cold starts).
const TASK_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];

/// Buckets for one reconcile: API round-trips, milliseconds to a few seconds.
const RECONCILE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every metric the operator exports, registered in one private registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `atomic_tasks{phase, model}`: tasks currently known, per phase and model.
    pub tasks: IntGaugeVec,
    /// `atomic_task_transitions_total{from, to}`: phase transitions.
    pub task_transitions: IntCounterVec,
    /// `atomic_task_duration_seconds{operation, phase}`: first attempt to terminal phase.
    pub task_duration: HistogramVec,
    /// `atomic_task_queue_wait_seconds{model}`: time from queued to dispatched.
    pub queue_wait: HistogramVec,
    /// `atomic_task_attempts_total{operation}`: attempts started.
    pub attempts: IntCounterVec,
    /// `atomic_task_retries_total{reason}`: attempts that failed and will be retried.
    pub retries: IntCounterVec,
    /// `atomic_dispatch_errors_total{reason}`: failed attempts, by failure reason.
    pub dispatch_errors: IntCounterVec,
    /// `atomic_queue_depth{model}`: tasks waiting for a worker.
    pub queue_depth: IntGaugeVec,
    /// `atomic_in_flight{model}`: attempts currently running.
    pub in_flight: IntGaugeVec,
    /// `atomic_reconcile_duration_seconds{controller}`: time spent in one reconcile.
    pub reconcile_duration: HistogramVec,
    /// `atomic_reconcile_errors_total{controller, error}`: reconciles that returned an error.
    pub reconcile_errors: IntCounterVec,
    /// `atomic_leader`: 1 while this replica holds the leader lease, else 0.
    pub leader: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let metrics = Metrics {
            tasks: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("atomic_tasks", "AtomicTasks currently known, by phase and model."),
                    &["phase", "model"],
                )?,
            )?,
            task_transitions: register(
                &registry,
                IntCounterVec::new(
                    Opts::new("atomic_task_transitions_total", "AtomicTask phase transitions."),
                    &["from", "to"],
                )?,
            )?,
            task_duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "atomic_task_duration_seconds",
                        "Time from a task's first attempt to its terminal phase.",
                    )
                    .buckets(TASK_BUCKETS.to_vec()),
                    &["operation", "phase"],
                )?,
            )?,
            queue_wait: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "atomic_task_queue_wait_seconds",
                        "Time a task waited in the queue before an attempt was dispatched.",
                    )
                    .buckets(TASK_BUCKETS.to_vec()),
                    &["model"],
                )?,
            )?,
            attempts: register(
                &registry,
                IntCounterVec::new(
                    Opts::new("atomic_task_attempts_total", "Task attempts started."),
                    &["operation"],
                )?,
            )?,
            retries: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "atomic_task_retries_total",
                        "Failed attempts that will be retried, by failure reason.",
                    ),
                    &["reason"],
                )?,
            )?,
            dispatch_errors: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "atomic_dispatch_errors_total",
                        "Failed task attempts, by failure reason.",
                    ),
                    &["reason"],
                )?,
            )?,
            queue_depth: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("atomic_queue_depth", "Tasks waiting for a worker, by model."),
                    &["model"],
                )?,
            )?,
            in_flight: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("atomic_in_flight", "Task attempts currently running, by model."),
                    &["model"],
                )?,
            )?,
            reconcile_duration: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "atomic_reconcile_duration_seconds",
                        "Time spent in one reconcile, by controller.",
                    )
                    .buckets(RECONCILE_BUCKETS.to_vec()),
                    &["controller"],
                )?,
            )?,
            reconcile_errors: register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "atomic_reconcile_errors_total",
                        "Reconciles that failed, by controller and error kind.",
                    ),
                    &["controller", "error"],
                )?,
            )?,
            leader: register(
                &registry,
                IntGauge::new(
                    "atomic_leader",
                    "1 while this replica holds the leader lease, else 0.",
                )?,
            )?,
            registry,
        };
        Ok(metrics)
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, Error> {
        Ok(TextEncoder::new().encode_to_string(&self.registry.gather())?)
    }
}

/// Registers a collector and hands it back, so the constructor reads as one expression.
/// Recording helpers, so callers name events rather than label layouts.
impl Metrics {
    /// A task moved from one phase to another.
    pub fn transition(&self, from: &str, to: &str) {
        self.task_transitions.with_label_values(&[from, to]).inc();
    }

    /// An attempt started.
    pub fn attempt(&self, operation: &str) {
        self.attempts.with_label_values(&[operation]).inc();
    }

    /// A failed attempt will be retried.
    pub fn retry(&self, reason: &str) {
        self.retries.with_label_values(&[reason]).inc();
    }

    /// An attempt or delivery failed.
    pub fn dispatch_error(&self, reason: &str) {
        self.dispatch_errors.with_label_values(&[reason]).inc();
    }

    /// A task waited `seconds` between queued and dispatched.
    pub fn queue_wait(&self, model: &str, seconds: f64) {
        self.queue_wait.with_label_values(&[model]).observe(seconds);
    }

    /// A task finished in `phase` after `seconds`.
    pub fn task_duration(&self, operation: &str, phase: &str, seconds: f64) {
        self.task_duration
            .with_label_values(&[operation, phase])
            .observe(seconds);
    }

    /// Tasks waiting in a model's queue.
    pub fn set_queue_depth(&self, model: &str, depth: usize) {
        self.queue_depth
            .with_label_values(&[model])
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Attempts running on a model's workers.
    pub fn set_in_flight(&self, model: &str, in_flight: u32) {
        self.in_flight
            .with_label_values(&[model])
            .set(i64::from(in_flight));
    }

    /// A reconcile took `seconds`.
    pub fn reconcile_duration(&self, controller: &str, seconds: f64) {
        self.reconcile_duration
            .with_label_values(&[controller])
            .observe(seconds);
    }

    /// A reconcile failed.
    pub fn reconcile_error(&self, controller: &str, error: &str) {
        self.reconcile_errors
            .with_label_values(&[controller, error])
            .inc();
    }

    /// This replica gained or lost leadership.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Replaces the per-phase task counts with a fresh census `(phase, model) -> count`.
    pub fn set_task_counts(&self, counts: &std::collections::BTreeMap<(String, String), i64>) {
        self.tasks.reset();
        for ((phase, model), count) in counts {
            self.tasks
                .with_label_values(&[phase.as_str(), model.as_str()])
                .set(*count);
        }
    }
}

fn register<C>(registry: &Registry, collector: C) -> Result<C, Error>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_metric() {
        let m = Metrics::new().unwrap();
        // Vectors without children are not exported, so touch one child of each.
        m.tasks.with_label_values(&["Running", "m"]).set(2);
        m.task_transitions.with_label_values(&["Queued", "Running"]).inc();
        m.task_duration
            .with_label_values(&["embed", "Succeeded"])
            .observe(0.3);
        m.queue_wait.with_label_values(&["m"]).observe(1.5);
        m.attempts.with_label_values(&["embed"]).inc();
        m.retries.with_label_values(&["Timeout"]).inc();
        m.dispatch_errors.with_label_values(&["Timeout"]).inc();
        m.queue_depth.with_label_values(&["m"]).set(3);
        m.in_flight.with_label_values(&["m"]).set(1);
        m.reconcile_duration.with_label_values(&["task"]).observe(0.01);
        m.reconcile_errors.with_label_values(&["task", "Kube"]).inc();
        m.leader.set(1);

        let text = m.encode().unwrap();
        for line in [
            "atomic_tasks{model=\"m\",phase=\"Running\"} 2",
            "atomic_task_transitions_total{from=\"Queued\",to=\"Running\"} 1",
            "atomic_task_duration_seconds_bucket{operation=\"embed\",phase=\"Succeeded\",le=\"0.5\"} 1",
            "atomic_task_queue_wait_seconds_count{model=\"m\"} 1",
            "atomic_task_attempts_total{operation=\"embed\"} 1",
            "atomic_task_retries_total{reason=\"Timeout\"} 1",
            "atomic_dispatch_errors_total{reason=\"Timeout\"} 1",
            "atomic_queue_depth{model=\"m\"} 3",
            "atomic_in_flight{model=\"m\"} 1",
            "atomic_reconcile_duration_seconds_sum{controller=\"task\"} 0.01",
            "atomic_reconcile_errors_total{controller=\"task\",error=\"Kube\"} 1",
            "atomic_leader 1",
            "# TYPE atomic_task_duration_seconds histogram",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.leader.set(1);
        assert!(b.encode().unwrap().contains("atomic_leader 0"));
    }
}
