//! The dispatcher: per-model queues of ready tasks feeding ready worker endpoints, with a limit
//! of tasks in flight per endpoint, plus one lane for `http` tasks.
//!
//! It owns no Kubernetes code. Ordering and endpoint choice come from the pure
//! [`crate::engine::queue`]; running an attempt goes through an [`Executor`] (the worker HTTP
//! client in production, a no-op in benchmarks); what happens to an attempt is reported to a
//! [`ReportSink`] (the task driver), which turns it into status through the engine.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::engine::FailureReason;
use crate::engine::queue::{Endpoints, ModelQueue};
use crate::engine::state::{DispatchState, Event};
use crate::metrics::Metrics;
use crate::worker_client::AttemptError;
use crate::worker_client::ModelRequest;

/// Identifies a task: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey {
    /// Namespace of the task.
    pub namespace: String,
    /// Name of the task.
    pub name: String,
}

impl TaskKey {
    /// The key of a task object.
    pub fn of(task: &crate::api::AtomicTask) -> Self {
        TaskKey {
            namespace: task.metadata.namespace.clone().unwrap_or_default(),
            name: task.metadata.name.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A queue of the dispatcher: one per ModelDeployment, and one per namespace for `http` tasks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lane {
    /// Namespace of the tasks.
    pub namespace: String,
    /// ModelDeployment name; `None` for the `http` lane.
    pub model: Option<String>,
}

/// What an attempt does.
#[derive(Clone, Debug)]
pub enum Work {
    /// A request to a model worker.
    Model(ModelRequest),
    /// An external HTTP call (`operation: http`).
    Http {
        /// The call from the task spec.
        call: crate::api::task::HttpCall,
        /// Rendered body.
        body: Option<String>,
        /// Bearer token from the call's Secret.
        bearer: Option<String>,
    },
}

/// One attempt handed to the dispatcher by the task driver.
#[derive(Clone, Debug)]
pub struct Job {
    /// The task.
    pub key: TaskKey,
    /// Stable across attempts; receivers use it to deduplicate.
    pub idempotency_key: String,
    /// Attempt number this job becomes when it starts.
    pub attempt: u32,
    /// Higher runs first.
    pub priority: i32,
    /// Not started before this time (retry backoff).
    pub not_before: Option<Timestamp>,
    /// Limit on the attempt.
    pub timeout: Duration,
    /// What to do.
    pub work: Work,
}

/// Runs one attempt against an endpoint (`None` for `http` work).
pub trait Executor: Send + Sync + 'static {
    /// Runs the work and returns the task result.
    fn execute(
        &self,
        endpoint: Option<&str>,
        job: &Job,
    ) -> impl Future<Output = Result<Value, AttemptError>> + Send;

    /// Delivers a result to a webhook with a stable idempotency key.
    fn deliver(
        &self,
        url: &str,
        bearer: Option<&str>,
        idempotency_key: &str,
        payload: &Value,
    ) -> impl Future<Output = Result<(), AttemptError>> + Send;
}

/// Boxed future returned by [`ReportSink::report`].
pub type ReportFuture<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// Receives what happens to attempts. `report` returns whether the task accepted the event:
/// for `AttemptStarted`, false means the task moved on (cancelled, deleted, superseded) and the
/// attempt must not run.
pub trait ReportSink: Send + Sync + 'static {
    /// Applies an attempt event to the task.
    fn report(&self, key: TaskKey, event: Event) -> ReportFuture<'_>;
}

enum Slot {
    Queued {
        lane: Lane,
    },
    InFlight {
        attempt: u32,
        abort: Option<AbortHandle>,
    },
}

struct LaneState {
    queue: ModelQueue<Job>,
    endpoints: Endpoints,
    in_flight: u32,
}

#[derive(Default)]
struct State {
    lanes: HashMap<Lane, LaneState>,
    slots: HashMap<TaskKey, Slot>,
}

/// Queued and in-flight counts of one lane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneLoad {
    /// Tasks waiting.
    pub queued: u32,
    /// Tasks running.
    pub in_flight: u32,
    /// Ready endpoints.
    pub endpoints: u32,
}

/// Called with a lane whose queue went from empty to non-empty.
pub type DemandCallback = Box<dyn Fn(&Lane) + Send + Sync>;

/// The dispatcher. Cheap to share behind an `Arc`; `run` drives it.
pub struct Dispatcher<E> {
    state: Mutex<State>,
    executor: Arc<E>,
    sink: OnceLock<Arc<dyn ReportSink>>,
    wake: Notify,
    metrics: Arc<Metrics>,
    max_in_flight_per_endpoint: u32,
    http_concurrency: u32,
    /// Called with a lane whose queue went from empty to non-empty, so its model can scale up.
    on_demand: OnceLock<DemandCallback>,
}

impl<E: Executor> Dispatcher<E> {
    /// A dispatcher with `http_concurrency` slots for `http` tasks per namespace and a default
    /// per-endpoint limit for models whose limit is not set through [`Self::set_endpoints`].
    pub fn new(
        executor: Arc<E>,
        metrics: Arc<Metrics>,
        max_in_flight_per_endpoint: u32,
        http_concurrency: u32,
    ) -> Self {
        Dispatcher {
            state: Mutex::new(State::default()),
            executor,
            sink: OnceLock::new(),
            wake: Notify::new(),
            metrics,
            max_in_flight_per_endpoint,
            http_concurrency,
            on_demand: OnceLock::new(),
        }
    }

    /// The executor that runs attempts.
    pub fn executor(&self) -> &Arc<E> {
        &self.executor
    }

    /// Sets where attempt events go; the first call wins.
    pub fn set_sink(&self, sink: Arc<dyn ReportSink>) {
        let _ = self.sink.set(sink);
    }

    /// Sets the callback for lanes that start to have demand; the first call wins.
    pub fn set_on_demand(&self, callback: DemandCallback) {
        let _ = self.on_demand.set(callback);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping dispatch, so take the data either way.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_lane(&self, lane: &Lane) -> LaneState {
        let mut endpoints = Endpoints::new(self.max_in_flight_per_endpoint);
        if lane.model.is_none() {
            // The http lane has no pods: one virtual endpoint carries its concurrency.
            endpoints = Endpoints::new(self.http_concurrency);
            endpoints.set_ready(vec![String::new()]);
        }
        LaneState {
            queue: ModelQueue::new(),
            endpoints,
            in_flight: 0,
        }
    }

    /// What the dispatcher holds for a task.
    pub fn state_of(&self, key: &TaskKey) -> DispatchState {
        match self.lock().slots.get(key) {
            None => DispatchState::Idle,
            Some(Slot::Queued { .. }) => DispatchState::Queued,
            Some(Slot::InFlight { attempt, .. }) => DispatchState::InFlight { attempt: *attempt },
        }
    }

    /// Queues a job (replacing a queued job of the same task). A job for an attempt that is not
    /// newer than the one in flight is ignored; a newer one (a retry decided while the failed
    /// attempt is still reporting) takes the task's slot, and the old attempt only gives its
    /// endpoint back when it ends.
    pub fn enqueue(&self, lane: Lane, job: Job) {
        let demand = {
            let mut state = self.lock();
            if let Some(Slot::InFlight { attempt, .. }) = state.slots.get(&job.key)
                && *attempt >= job.attempt
            {
                return;
            }
            let State { lanes, slots } = &mut *state;
            if let Some(Slot::Queued { lane: old }) = slots.get(&job.key)
                && *old != lane
                && let Some(l) = lanes.get_mut(old)
            {
                l.queue.remove(&job.key.to_string());
            }
            state
                .slots
                .insert(job.key.clone(), Slot::Queued { lane: lane.clone() });
            let lane_state = state
                .lanes
                .entry(lane.clone())
                .or_insert_with(|| self.new_lane(&lane));
            let was_idle = lane_state.queue.is_empty() && lane_state.in_flight == 0;
            lane_state
                .queue
                .push(job.key.to_string(), job.priority, job.not_before, job.clone());
            self.metrics
                .set_queue_depth(&lane_label(&lane), lane_state.queue.len());
            was_idle
        };
        if demand && let Some(callback) = self.on_demand.get() {
            callback(&lane);
        }
        self.wake.notify_one();
    }

    /// Drops a task's queued job and aborts its in-flight attempt, if any.
    pub fn abandon(&self, key: &TaskKey) {
        let mut state = self.lock();
        match state.slots.remove(key) {
            Some(Slot::Queued { lane }) => {
                if let Some(l) = state.lanes.get_mut(&lane) {
                    l.queue.remove(&key.to_string());
                    self.metrics.set_queue_depth(&lane_label(&lane), l.queue.len());
                }
            }
            // The watcher spawned with the attempt releases the endpoint when it sees the abort.
            Some(Slot::InFlight {
                abort: Some(abort), ..
            }) => abort.abort(),
            Some(Slot::InFlight { abort: None, .. }) | None => {}
        }
    }

    /// Replaces the ready endpoints of a model lane.
    pub fn set_endpoints(&self, lane: Lane, addresses: Vec<String>) {
        {
            let mut state = self.lock();
            let lane_state = state
                .lanes
                .entry(lane.clone())
                .or_insert_with(|| self.new_lane(&lane));
            lane_state.endpoints.set_ready(addresses);
        }
        self.wake.notify_one();
    }

    /// Sets how many tasks of a model lane may be in flight on one endpoint.
    pub fn set_endpoint_limit(&self, lane: &Lane, max_in_flight: u32) {
        {
            let mut state = self.lock();
            let lane_state = state
                .lanes
                .entry(lane.clone())
                .or_insert_with(|| self.new_lane(lane));
            lane_state.endpoints.set_limit(max_in_flight);
        }
        self.wake.notify_one();
    }

    /// Forgets a lane whose ModelDeployment is gone; its queued tasks stay queued in their status
    /// and are picked up again if the model comes back.
    pub fn forget_lane(&self, lane: &Lane) {
        let mut state = self.lock();
        if let Some(removed) = state.lanes.remove(lane) {
            let State { slots, .. } = &mut *state;
            slots.retain(|_, slot| !matches!(slot, Slot::Queued { lane: l } if l == lane));
            drop(removed);
        }
    }

    /// Load of a lane, for autoscaling and status.
    pub fn load(&self, lane: &Lane) -> LaneLoad {
        let state = self.lock();
        state.lanes.get(lane).map_or(LaneLoad::default(), |l| LaneLoad {
            queued: u32::try_from(l.queue.len()).unwrap_or(u32::MAX),
            in_flight: l.in_flight,
            endpoints: u32::try_from(l.endpoints.ready()).unwrap_or(u32::MAX),
        })
    }

    /// Takes every job that can start now, with the endpoint it goes to.
    fn take_startable(&self, now: Timestamp) -> (Vec<(Lane, Job, String)>, Option<Timestamp>) {
        let mut state = self.lock();
        let State { lanes, slots } = &mut *state;
        let mut started = Vec::new();
        let mut next_due: Option<Timestamp> = None;
        for (lane, lane_state) in lanes.iter_mut() {
            while !lane_state.queue.is_empty() {
                let Some(endpoint) = lane_state.endpoints.acquire() else {
                    break;
                };
                match lane_state.queue.pop_ready(now).map(|entry| entry.payload) {
                    Some(job) => {
                        lane_state.in_flight += 1;
                        slots.insert(
                            job.key.clone(),
                            Slot::InFlight {
                                attempt: job.attempt,
                                abort: None,
                            },
                        );
                        started.push((lane.clone(), job, endpoint));
                    }
                    None => {
                        lane_state.endpoints.release(&endpoint);
                        break;
                    }
                }
            }
            if let Some(t) = lane_state.queue.next_ready_time(now) {
                next_due = Some(next_due.map_or(t, |n| n.min(t)));
            }
            self.metrics
                .set_queue_depth(&lane_label(lane), lane_state.queue.len());
            self.metrics
                .set_in_flight(&lane_label(lane), lane_state.in_flight);
        }
        (started, next_due)
    }

    fn finish(&self, lane: &Lane, key: &TaskKey, attempt: u32, endpoint: &str) {
        let mut state = self.lock();
        if let Some(l) = state.lanes.get_mut(lane) {
            l.endpoints.release(endpoint);
            l.in_flight = l.in_flight.saturating_sub(1);
            self.metrics.set_in_flight(&lane_label(lane), l.in_flight);
        }
        if matches!(state.slots.get(key), Some(Slot::InFlight { attempt: a, .. }) if *a == attempt) {
            state.slots.remove(key);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Drives the dispatcher until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let now = Timestamp::now();
            let (started, next_due) = self.take_startable(now);
            for (lane, job, endpoint) in started {
                self.start(lane, job, endpoint);
            }
            let sleep = next_due
                .map(|t| duration_until(now, t))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn start(self: &Arc<Self>, lane: Lane, job: Job, endpoint: String) {
        let this = Arc::clone(self);
        let key = job.key.clone();
        let attempt = job.attempt;
        let handle = tokio::spawn({
            let (lane, endpoint) = (lane.clone(), endpoint.clone());
            async move {
                this.attempt(&lane, &job, &endpoint).await;
                this.finish(&lane, &job.key, job.attempt, &endpoint);
            }
        });
        let mut state = self.lock();
        match state.slots.get_mut(&key) {
            Some(Slot::InFlight {
                attempt: a, abort, ..
            }) if *a == attempt => *abort = Some(handle.abort_handle()),
            _ => {}
        }
        drop(state);
        // An abort skips `finish`, so a watcher gives the endpoint back.
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = handle.await
                && e.is_cancelled()
            {
                this.finish(&lane, &key, attempt, &endpoint);
            }
        });
    }

    async fn attempt(&self, lane: &Lane, job: &Job, endpoint: &str) {
        let Some(sink) = self.sink.get() else { return };
        let worker = if lane.model.is_some() {
            endpoint.to_owned()
        } else {
            "http".to_owned()
        };
        if !sink
            .report(
                job.key.clone(),
                Event::AttemptStarted {
                    attempt: job.attempt,
                    worker,
                },
            )
            .await
        {
            return;
        }
        let target = lane.model.as_ref().map(|_| endpoint);
        let outcome = match tokio::time::timeout(job.timeout, self.executor.execute(target, job)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(AttemptError {
                reason: FailureReason::Timeout,
                message: format!(
                    "attempt {} ran past its {}s timeout",
                    job.attempt,
                    job.timeout.as_secs()
                ),
            }),
        };
        let event = match outcome {
            Ok(result) => Event::AttemptSucceeded {
                attempt: job.attempt,
                result,
            },
            Err(e) => {
                self.metrics.dispatch_error(e.reason.as_str());
                Event::AttemptFailed {
                    attempt: job.attempt,
                    reason: e.reason,
                    message: e.message,
                }
            }
        };
        sink.report(job.key.clone(), event).await;
    }
}

/// Metric label of a lane: `namespace/model`, or `namespace/http`.
pub fn lane_label(lane: &Lane) -> String {
    format!("{}/{}", lane.namespace, lane.model.as_deref().unwrap_or("http"))
}

/// Time from `now` to `then`, zero when `then` has passed.
pub fn duration_until(now: Timestamp, then: Timestamp) -> Duration {
    let millis = then.as_millisecond().saturating_sub(now.as_millisecond());
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// An executor that answers every attempt at once with `{"ok": true}`: the "no-op worker" of
/// benchmarks and controller tests.
pub struct NoopExecutor;

impl Executor for NoopExecutor {
    async fn execute(&self, _endpoint: Option<&str>, job: &Job) -> Result<Value, AttemptError> {
        Ok(serde_json::json!({ "ok": true, "attempt": job.attempt }))
    }

    async fn deliver(
        &self,
        _url: &str,
        _bearer: Option<&str>,
        _key: &str,
        _payload: &Value,
    ) -> Result<(), AttemptError> {
        Ok(())
    }
}

impl Executor for crate::worker_client::WorkerClient {
    async fn execute(&self, endpoint: Option<&str>, job: &Job) -> Result<Value, AttemptError> {
        match (&job.work, endpoint) {
            (Work::Model(request), Some(endpoint)) => self.run_task(endpoint, request, job.timeout).await,
            (Work::Model(request), None) => Err(AttemptError {
                reason: FailureReason::Unreachable,
                message: format!("no worker endpoint for model {}", request.model),
            }),
            (Work::Http { call, body, bearer }, _) => {
                self.call_http(
                    call,
                    body.as_deref(),
                    bearer.as_deref(),
                    &job.idempotency_key,
                    job.timeout,
                )
                .await
            }
        }
    }

    async fn deliver(
        &self,
        url: &str,
        bearer: Option<&str>,
        key: &str,
        payload: &Value,
    ) -> Result<(), AttemptError> {
        self.deliver_webhook(url, bearer, key, payload, WEBHOOK_TIMEOUT)
            .await
    }
}

/// Limit on one webhook delivery.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::api::Operation;

    /// Records what ran; attempt 1 of task "retry" fails, everything else succeeds after `delay`.
    struct Recorder {
        order: Mutex<Vec<String>>,
        running: AtomicU32,
        peak: AtomicU32,
        delay: Duration,
    }

    impl Executor for Recorder {
        async fn execute(&self, _endpoint: Option<&str>, job: &Job) -> Result<Value, AttemptError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            self.order
                .lock()
                .unwrap()
                .push(format!("{}#{}", job.key.name, job.attempt));
            tokio::time::sleep(self.delay).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            if job.key.name == "retry" && job.attempt == 1 {
                return Err(AttemptError {
                    reason: FailureReason::ServerError,
                    message: "boom".into(),
                });
            }
            Ok(serde_json::json!({}))
        }

        async fn deliver(&self, _: &str, _: Option<&str>, _: &str, _: &Value) -> Result<(), AttemptError> {
            Ok(())
        }
    }

    /// Plays the driver: accepts every start, and answers a failure by queueing the next attempt
    /// at once, from inside the report (as the engine does on a retryable failure).
    struct RetryingSink {
        dispatcher: Mutex<Option<Arc<Dispatcher<Recorder>>>>,
        done: AtomicU32,
    }

    impl ReportSink for RetryingSink {
        fn report(&self, key: TaskKey, event: Event) -> ReportFuture<'_> {
            Box::pin(async move {
                match event {
                    Event::AttemptFailed { attempt, .. } => {
                        let dispatcher = self.dispatcher.lock().unwrap().clone().unwrap();
                        dispatcher.enqueue(lane(), job(&key.name, attempt + 1, 0));
                    }
                    Event::AttemptSucceeded { .. } => {
                        self.done.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
                true
            })
        }
    }

    fn lane() -> Lane {
        Lane {
            namespace: "ns".into(),
            model: Some("m".into()),
        }
    }

    fn job(name: &str, attempt: u32, priority: i32) -> Job {
        Job {
            key: TaskKey {
                namespace: "ns".into(),
                name: name.into(),
            },
            idempotency_key: name.into(),
            attempt,
            priority,
            not_before: None,
            timeout: Duration::from_secs(5),
            work: Work::Model(ModelRequest {
                model: "m".into(),
                operation: Operation::Generate,
                prompt: String::new(),
                labels: vec![],
                parameters: None,
            }),
        }
    }

    fn setup(
        delay: Duration,
        per_endpoint: u32,
    ) -> (Arc<Dispatcher<Recorder>>, Arc<Recorder>, Arc<RetryingSink>) {
        let executor = Arc::new(Recorder {
            order: Mutex::default(),
            running: AtomicU32::new(0),
            peak: AtomicU32::new(0),
            delay,
        });
        let metrics = Arc::new(Metrics::new().unwrap());
        let dispatcher = Arc::new(Dispatcher::new(Arc::clone(&executor), metrics, per_endpoint, 4));
        let sink = Arc::new(RetryingSink {
            dispatcher: Mutex::new(Some(Arc::clone(&dispatcher))),
            done: AtomicU32::new(0),
        });
        dispatcher.set_sink(Arc::clone(&sink) as Arc<dyn ReportSink>);
        tokio::spawn(Arc::clone(&dispatcher).run(std::future::pending()));
        (dispatcher, executor, sink)
    }

    async fn wait_done(sink: &RetryingSink, n: u32) {
        for _ in 0..500 {
            if sink.done.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("only {} of {n} jobs finished", sink.done.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_retry_queued_while_the_failed_attempt_reports_still_runs() {
        let (dispatcher, executor, sink) = setup(Duration::ZERO, 1);
        dispatcher.set_endpoints(lane(), vec!["a:1".into()]);
        dispatcher.enqueue(lane(), job("retry", 1, 0));
        wait_done(&sink, 1).await;
        assert_eq!(*executor.order.lock().unwrap(), ["retry#1", "retry#2"]);
        assert_eq!(dispatcher.state_of(&job("retry", 1, 0).key), DispatchState::Idle);
        assert_eq!(
            dispatcher.load(&lane()),
            LaneLoad {
                queued: 0,
                in_flight: 0,
                endpoints: 1
            }
        );
    }

    #[tokio::test]
    async fn in_flight_work_never_exceeds_endpoints_times_the_limit() {
        let (dispatcher, executor, sink) = setup(Duration::from_millis(20), 2);
        for i in 0..12 {
            dispatcher.enqueue(lane(), job(&format!("t{i}"), 1, 0));
        }
        dispatcher.set_endpoints(lane(), vec!["a:1".into(), "b:1".into()]);
        wait_done(&sink, 12).await;
        assert_eq!(executor.peak.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn higher_priority_runs_first_then_arrival_order() {
        let (dispatcher, executor, sink) = setup(Duration::ZERO, 1);
        for (name, priority) in [("low", 0), ("high", 10), ("mid", 5), ("high2", 10)] {
            dispatcher.enqueue(lane(), job(name, 1, priority));
        }
        // Endpoints appear only now, so all four compete.
        dispatcher.set_endpoints(lane(), vec!["a:1".into()]);
        wait_done(&sink, 4).await;
        assert_eq!(
            *executor.order.lock().unwrap(),
            ["high#1", "high2#1", "mid#1", "low#1"]
        );
    }

    #[tokio::test]
    async fn abandoning_a_running_attempt_frees_its_endpoint() {
        let (dispatcher, executor, sink) = setup(Duration::from_secs(30), 1);
        dispatcher.set_endpoints(lane(), vec!["a:1".into()]);
        dispatcher.enqueue(lane(), job("stuck", 1, 0));
        for _ in 0..200 {
            if executor.running.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        dispatcher.abandon(&job("stuck", 1, 0).key);
        dispatcher.enqueue(lane(), job("next", 1, 0));
        for _ in 0..200 {
            if executor.order.lock().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            *executor.order.lock().unwrap(),
            ["stuck#1", "next#1"],
            "the endpoint was given back"
        );
        assert_eq!(sink.done.load(Ordering::SeqCst), 0);
    }
}
