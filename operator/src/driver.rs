//! The task driver: the one place where an event about a task (an observation or an attempt
//! report) is turned into a new status through the pure engine, written with optimistic
//! concurrency, and followed by its effects (queueing, abandoning, deleting, delivering output,
//! waking dependents, metrics and events).
//!
//! Storage is behind [`TaskStore`], so the same driver runs against the Kubernetes API (the
//! controller), and against memory (local runs, benchmarks and tests).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::api::task::{
    AtomicTask, AtomicTaskStatus, DEFAULT_TIMEOUT_SECONDS, InputSource, KeyRef, Operation, TaskPhase,
};
use crate::dispatch::{Dispatcher, Executor, Job, Lane, ReportFuture, ReportSink, TaskKey, Work};
use crate::engine::dag::find_cycles;
use crate::engine::state::{CYCLE_REASON, DepState, Event, Observation, Transition, step};
use crate::metrics::Metrics;
use crate::worker_client::ModelRequest;
use crate::{Error, Result};

/// Name of the condition that tells whether the output was delivered.
pub const OUTPUT_CONDITION: &str = "OutputDelivered";
/// How often a status write is retried after a conflict before giving up for this round.
const MAX_CONFLICT_RETRIES: usize = 8;

/// Where tasks and the objects they reference live.
pub trait TaskStore: Send + Sync + 'static {
    /// The current task, or `None` when it is gone.
    fn get(&self, key: &TaskKey) -> impl Future<Output = Result<Option<AtomicTask>>> + Send;
    /// Writes the status if the task has not changed since it was read; `Ok(None)` when it has
    /// (a conflict) or is gone, so the caller reads it again.
    fn write_status(
        &self,
        task: &AtomicTask,
        status: &AtomicTaskStatus,
    ) -> impl Future<Output = Result<Option<AtomicTask>>> + Send;
    /// Deletes the task (TTL passed).
    fn delete(&self, key: &TaskKey) -> impl Future<Output = Result<()>> + Send;
    /// Reads an input or token from a ConfigMap or Secret; `Err` carries a message for the status.
    fn read_value(
        &self,
        namespace: &str,
        source: &InputSource,
    ) -> impl Future<Output = std::result::Result<String, String>> + Send;
    /// Stores a large result and returns where it is.
    fn store_result(&self, task: &AtomicTask, result: &Value) -> impl Future<Output = Result<KeyRef>> + Send;
    /// Loads a result stored by [`TaskStore::store_result`].
    fn load_result(
        &self,
        namespace: &str,
        at: &KeyRef,
    ) -> impl Future<Output = std::result::Result<Value, String>> + Send {
        async move {
            let source = InputSource {
                config_map_key_ref: Some(at.clone()),
                secret_key_ref: None,
            };
            let text = self.read_value(namespace, &source).await?;
            serde_json::from_str(&text)
                .map_err(|e| format!("ConfigMap {namespace}/{} holds no JSON result: {e}", at.name))
        }
    }
    /// Writes a result into the output ConfigMap named by the task.
    fn write_output(
        &self,
        task: &AtomicTask,
        config_map: &str,
        result: &Value,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Records a phase change where people look (Kubernetes events).
    fn record(&self, task: &AtomicTask, transition: &Transition) -> impl Future<Output = ()> + Send;
    /// Asks for the task to be observed again soon (its dependencies changed).
    fn wake(&self, key: TaskKey);
}

/// Settings of the driver.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Results whose JSON is larger than this go to a ConfigMap named in `status.resultRef`.
    pub max_inline_result_bytes: usize,
    /// Wait between tries of an output delivery that failed.
    pub output_retry: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            max_inline_result_bytes: 16 * 1024,
            output_retry: Duration::from_secs(30),
        }
    }
}

/// What applying an event led to.
#[derive(Debug)]
pub struct Applied {
    /// The task after the event, `None` when it is gone.
    pub task: Option<AtomicTask>,
    /// When the task wants to be observed again.
    pub requeue_after: Option<Duration>,
    /// Whether the event changed the task.
    pub accepted: bool,
}

/// Drives tasks through the engine. See the module docs.
pub struct Driver<S, E> {
    store: Arc<S>,
    dispatcher: Arc<Dispatcher<E>>,
    metrics: Arc<Metrics>,
    config: DriverConfig,
    /// Tasks waiting on a task, by the awaited task; woken when it finishes.
    waiters: Mutex<HashMap<TaskKey, HashSet<TaskKey>>>,
}

impl<S: TaskStore, E: Executor> Driver<S, E> {
    /// A driver that reports attempts through `dispatcher`, wired both ways.
    pub fn new(
        store: Arc<S>,
        dispatcher: Arc<Dispatcher<E>>,
        metrics: Arc<Metrics>,
        config: DriverConfig,
    ) -> Arc<Self> {
        let driver = Arc::new(Driver {
            store,
            dispatcher: Arc::clone(&dispatcher),
            metrics,
            config,
            waiters: Mutex::new(HashMap::new()),
        });
        dispatcher.set_sink(Arc::clone(&driver) as Arc<dyn ReportSink>);
        driver
    }

    /// The dispatcher this driver feeds.
    pub fn dispatcher(&self) -> &Arc<Dispatcher<E>> {
        &self.dispatcher
    }

    /// Applies one event to a task: engine step, status write (retried on conflict), effects.
    pub async fn apply(&self, key: &TaskKey, event: Event) -> Result<Applied> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let Some(task) = self.store.get(key).await? else {
                self.dispatcher.abandon(key);
                self.wake_waiters(key);
                return Ok(Applied {
                    task: None,
                    requeue_after: None,
                    accepted: false,
                });
            };
            let old = task.status.clone().unwrap_or_default();
            // Dependencies and input matter only where the engine may render the prompt: before
            // dispatch, and on a retry. Starts, successes and finished tasks skip those reads.
            let may_render = !old.phase.is_terminal()
                && !matches!(
                    event,
                    Event::AttemptStarted { .. } | Event::AttemptSucceeded { .. }
                );
            let dep_objects = if may_render {
                self.read_dependencies(&task).await?
            } else {
                BTreeMap::new()
            };
            let deps = self.dependencies(&key.namespace, &dep_objects).await;
            let cycle = if matches!(old.phase, TaskPhase::Pending | TaskPhase::Blocked) {
                self.cycle_through(&task, &dep_objects).await?
            } else {
                None
            };
            let input = match task.spec.input.as_ref() {
                Some(i) if may_render => match (&i.text, &i.value_from) {
                    (Some(text), _) => Ok(Some(text.clone())),
                    (None, Some(source)) => self.store.read_value(&key.namespace, source).await.map(Some),
                    (None, None) => Ok(None),
                },
                _ => Ok(None),
            };
            let obs = Observation {
                now: Timestamp::now(),
                deps: deps
                    .iter()
                    .map(|(name, dep)| (name.as_str(), dep.as_state()))
                    .collect(),
                cycle: cycle.as_deref(),
                input_text: input.as_ref().map(|t| t.as_deref()).map_err(|e| e.as_str()),
                dispatch: self.dispatcher.state_of(key),
                deleted: task.metadata.deletion_timestamp.is_some(),
                created: task.metadata.creation_timestamp.as_ref().map(|t| t.0),
            };
            let decision = step(&key.name, &task.spec, &old, &obs, event.clone());
            let mut status = decision.status.clone();
            status.observed_generation = task.metadata.generation;
            self.offload_large_result(&task, &mut status).await?;
            let mut accepted = status != old;
            let mut current = task.clone();
            if accepted {
                match self.store.write_status(&task, &status).await? {
                    None => continue,
                    Some(updated) => current = updated,
                }
            }
            if let Some(transition) = &decision.transition {
                self.observe_transition(&current, &old, transition).await;
            }
            if decision.abandon {
                self.dispatcher.abandon(key);
            }
            if let Some(dispatch) = decision.enqueue {
                let job = self
                    .job(
                        &current,
                        dispatch.prompt,
                        dispatch.attempt,
                        dispatch.priority,
                        dispatch.not_before,
                    )
                    .await;
                self.dispatcher.enqueue(lane_of(&current), job);
                accepted = true;
            }
            if status.phase.is_terminal() {
                self.wake_waiters(key);
            } else {
                self.register_waiter(key, &deps);
            }
            let mut requeue_after = decision.requeue_after;
            if status.phase == TaskPhase::Succeeded {
                let (refreshed, retry) = self.deliver_output(&current).await?;
                if let Some(refreshed) = refreshed {
                    current = refreshed;
                }
                requeue_after = earliest(requeue_after, retry);
            }
            if decision.delete {
                self.store.delete(key).await?;
                return Ok(Applied {
                    task: None,
                    requeue_after: None,
                    accepted: true,
                });
            }
            return Ok(Applied {
                task: Some(current),
                requeue_after,
                accepted,
            });
        }
        Err(Error::Conflict(format!(
            "status of {key} kept changing while being written"
        )))
    }

    /// Reads every dependency of a task once; `None` for those that do not exist.
    async fn read_dependencies(&self, task: &AtomicTask) -> Result<BTreeMap<String, Option<AtomicTask>>> {
        let namespace = task.metadata.namespace.clone().unwrap_or_default();
        let mut objects = BTreeMap::new();
        for name in &task.spec.depends_on {
            let key = TaskKey {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            objects.insert(name.clone(), self.store.get(&key).await?);
        }
        Ok(objects)
    }

    /// The state of each dependency, with its result loaded where it is stored elsewhere.
    async fn dependencies(
        &self,
        namespace: &str,
        objects: &BTreeMap<String, Option<AtomicTask>>,
    ) -> BTreeMap<String, Dependency> {
        let mut deps = BTreeMap::new();
        for (name, object) in objects {
            let dep = match object.as_ref().map(|t| t.status.clone().unwrap_or_default()) {
                None => Dependency::Missing,
                Some(status) => {
                    let result = match (&status.result, &status.result_ref) {
                        (Some(result), _) => Some(result.clone()),
                        (None, Some(at)) if status.phase == TaskPhase::Succeeded => {
                            match self.store.load_result(namespace, at).await {
                                Ok(result) => Some(result),
                                Err(message) => Some(Value::String(format!(
                                    "result of {name} could not be loaded: {message}"
                                ))),
                            }
                        }
                        _ => None,
                    };
                    Dependency::Present {
                        phase: status.phase,
                        result,
                        message: status.message,
                    }
                }
            };
            deps.insert(name.clone(), dep);
        }
        deps
    }

    /// The dependency cycle this task lies on, if any. Tasks past `Blocked` were checked when
    /// they got there, so the search stops at them, except those that failed on a cycle (which
    /// this task may close). `known` holds the dependencies already read.
    async fn cycle_through(
        &self,
        task: &AtomicTask,
        known: &BTreeMap<String, Option<AtomicTask>>,
    ) -> Result<Option<Vec<String>>> {
        let namespace = task.metadata.namespace.clone().unwrap_or_default();
        let root = task.metadata.name.clone().unwrap_or_default();
        let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut seen: std::collections::BTreeSet<String> = [root.clone()].into();
        let mut pending = vec![(root.clone(), task.spec.depends_on.clone())];
        while let Some((name, deps)) = pending.pop() {
            for dep in &deps {
                if !seen.insert(dep.clone()) {
                    continue;
                }
                let fetched;
                let object = match known.get(dep) {
                    Some(object) => object.as_ref(),
                    None => {
                        let key = TaskKey {
                            namespace: namespace.clone(),
                            name: dep.clone(),
                        };
                        fetched = self.store.get(&key).await?;
                        fetched.as_ref()
                    }
                };
                if let Some(t) = object {
                    let status = t.status.as_ref();
                    let phase = status.map_or(TaskPhase::Pending, |s| s.phase);
                    let failed_on_cycle = status.and_then(|s| s.reason.as_deref()) == Some(CYCLE_REASON);
                    if matches!(phase, TaskPhase::Pending | TaskPhase::Blocked) || failed_on_cycle {
                        pending.push((dep.clone(), t.spec.depends_on.clone()));
                    }
                }
            }
            graph.insert(name, deps);
        }
        Ok(find_cycles(&graph).remove(&root))
    }

    async fn offload_large_result(&self, task: &AtomicTask, status: &mut AtomicTaskStatus) -> Result<()> {
        let Some(result) = &status.result else {
            return Ok(());
        };
        if serde_json::to_vec(result)?.len() <= self.config.max_inline_result_bytes {
            return Ok(());
        }
        status.result_ref = Some(self.store.store_result(task, result).await?);
        status.result = None;
        Ok(())
    }

    async fn job(
        &self,
        task: &AtomicTask,
        prompt: String,
        attempt: u32,
        priority: i32,
        not_before: Option<Timestamp>,
    ) -> Job {
        let namespace = task.metadata.namespace.clone().unwrap_or_default();
        let spec = &task.spec;
        let work = match (spec.operation, &spec.http) {
            (Operation::Http, Some(call)) => {
                let bearer = match &call.secret_ref {
                    Some(secret) => self.token(&namespace, secret).await,
                    None => None,
                };
                Work::Http {
                    call: call.clone(),
                    body: call.body.as_ref().map(|_| prompt),
                    bearer,
                }
            }
            (operation, _) => Work::Model(ModelRequest {
                model: spec.model.clone().unwrap_or_default(),
                operation,
                prompt,
                labels: spec.labels.clone(),
                parameters: spec.parameters.clone(),
            }),
        };
        Job {
            key: TaskKey::of(task),
            idempotency_key: idempotency_key(task),
            attempt,
            priority,
            not_before,
            timeout: Duration::from_secs(u64::from(spec.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS))),
            work,
        }
    }

    async fn token(&self, namespace: &str, secret: &str) -> Option<String> {
        let source = InputSource {
            config_map_key_ref: None,
            secret_key_ref: Some(KeyRef {
                name: secret.to_owned(),
                key: "token".to_owned(),
            }),
        };
        self.store
            .read_value(namespace, &source)
            .await
            .ok()
            .map(|t| t.trim().to_owned())
    }

    /// Delivers a succeeded task's output once. A failed delivery is recorded in the
    /// `OutputDelivered` condition (its transition time is the last try) and tried again after
    /// `output_retry`; returns the updated task, if written, and when to look again.
    async fn deliver_output(&self, task: &AtomicTask) -> Result<(Option<AtomicTask>, Option<Duration>)> {
        let (Some(output), Some(status)) = (&task.spec.output, &task.status) else {
            return Ok((None, None));
        };
        let previous = status.conditions.iter().find(|c| c.type_ == OUTPUT_CONDITION);
        if previous.is_some_and(|c| c.status == "True") {
            return Ok((None, None));
        }
        if let Some(last_try) = previous.map(|c| c.last_transition_time.0) {
            let due = add_duration(last_try, self.config.output_retry);
            let now = Timestamp::now();
            if due > now {
                return Ok((None, Some(crate::dispatch::duration_until(now, due))));
            }
        }
        let namespace = task.metadata.namespace.clone().unwrap_or_default();
        let result = match (&status.result, &status.result_ref) {
            (Some(r), _) => r.clone(),
            (None, Some(at)) => self
                .store
                .load_result(&namespace, at)
                .await
                .unwrap_or(Value::Null),
            (None, None) => Value::Null,
        };
        let mut problems = Vec::new();
        if let Some(cm) = &output.config_map
            && let Err(e) = self.store.write_output(task, cm, &result).await
        {
            problems.push(format!("configMap {cm}: {e}"));
        }
        if let Some(hook) = &output.webhook {
            let bearer = match &hook.secret_ref {
                Some(secret) => self.token(&namespace, secret).await,
                None => None,
            };
            let payload = serde_json::json!({
                "task": task.metadata.name,
                "namespace": namespace,
                "phase": "Succeeded",
                "result": result,
            });
            if let Err(e) = self
                .dispatcher
                .executor()
                .deliver(&hook.url, bearer.as_deref(), &idempotency_key(task), &payload)
                .await
            {
                self.metrics.dispatch_error("WebhookFailed");
                problems.push(format!("webhook: {e}"));
            }
        }
        let mut new_status = status.clone();
        let condition = if problems.is_empty() {
            condition(OUTPUT_CONDITION, true, "Delivered", "output delivered")
        } else {
            condition(OUTPUT_CONDITION, false, "DeliveryFailed", &problems.join("; "))
        };
        let retry = (!problems.is_empty()).then_some(self.config.output_retry);
        new_status.conditions.retain(|c| c.type_ != OUTPUT_CONDITION);
        new_status.conditions.push(condition);
        Ok((self.store.write_status(task, &new_status).await?, retry))
    }

    async fn observe_transition(&self, task: &AtomicTask, old: &AtomicTaskStatus, transition: &Transition) {
        let operation = task.spec.operation.as_str();
        self.metrics
            .transition(transition.from.as_str(), transition.to.as_str());
        if transition.to == TaskPhase::Running {
            self.metrics.attempt(operation);
            if let (Some(queued), Some(started)) = (
                &old.queued_time,
                task.status.as_ref().and_then(|s| s.attempt_start_time.as_ref()),
            ) {
                let lane = lane_of(task);
                self.metrics.queue_wait(
                    &crate::dispatch::lane_label(&lane),
                    seconds_between(queued.0, started.0),
                );
            }
        }
        if transition.from == TaskPhase::Running && transition.to == TaskPhase::Queued {
            self.metrics.retry(transition.reason);
        }
        if transition.to.is_terminal()
            && let Some(status) = &task.status
        {
            let start = status
                .start_time
                .as_ref()
                .or(task.metadata.creation_timestamp.as_ref());
            if let (Some(start), Some(end)) = (start, &status.completion_time) {
                self.metrics.task_duration(
                    operation,
                    transition.to.as_str(),
                    seconds_between(start.0, end.0),
                );
            }
        }
        self.store.record(task, transition).await;
    }

    fn register_waiter(&self, key: &TaskKey, deps: &BTreeMap<String, Dependency>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for (name, dep) in deps {
            if !dep.is_terminal() {
                let awaited = TaskKey {
                    namespace: key.namespace.clone(),
                    name: name.clone(),
                };
                waiters.entry(awaited).or_default().insert(key.clone());
            }
        }
    }

    fn wake_waiters(&self, key: &TaskKey) {
        let woken = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .unwrap_or_default();
        for waiter in woken {
            self.store.wake(waiter);
        }
    }
}

impl<S: TaskStore, E: Executor> ReportSink for Driver<S, E> {
    fn report(&self, key: TaskKey, event: Event) -> ReportFuture<'_> {
        Box::pin(async move {
            let started = matches!(event, Event::AttemptStarted { .. });
            match self.apply(&key, event).await {
                Ok(applied) => {
                    if started {
                        // The attempt may run only if the task is now Running on it.
                        applied.accepted
                            && applied
                                .task
                                .as_ref()
                                .and_then(|t| t.status.as_ref())
                                .is_some_and(|s| s.phase == TaskPhase::Running)
                    } else {
                        applied.accepted
                    }
                }
                Err(e) => {
                    tracing::warn!(task = %key, error = %e, "could not apply an attempt report");
                    // A lost report is recovered by the next observation (attempt lost -> retry).
                    false
                }
            }
        })
    }
}

/// A dependency as the driver read it.
#[derive(Debug)]
enum Dependency {
    Missing,
    Present {
        phase: TaskPhase,
        result: Option<Value>,
        message: Option<String>,
    },
}

impl Dependency {
    fn as_state(&self) -> DepState<'_> {
        match self {
            Dependency::Missing => DepState::Missing,
            Dependency::Present {
                phase,
                result,
                message,
            } => DepState::Present {
                phase: *phase,
                result: result.as_ref(),
                message: message.as_deref(),
            },
        }
    }

    fn is_terminal(&self) -> bool {
        matches!(self, Dependency::Present { phase, .. } if phase.is_terminal())
    }
}

/// The dispatcher lane of a task.
pub fn lane_of(task: &AtomicTask) -> Lane {
    Lane {
        namespace: task.metadata.namespace.clone().unwrap_or_default(),
        model: match task.spec.operation {
            Operation::Http => None,
            _ => task.spec.model.clone(),
        },
    }
}

/// The idempotency key of a task's external effects: the same for every attempt and delivery.
pub fn idempotency_key(task: &AtomicTask) -> String {
    match &task.metadata.uid {
        Some(uid) => uid.clone(),
        None => format!(
            "{}/{}",
            task.metadata.namespace.as_deref().unwrap_or_default(),
            task.metadata.name.as_deref().unwrap_or_default()
        ),
    }
}

/// A status condition stamped now.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        observed_generation: None,
    }
}

/// The sooner of two optional delays.
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn add_duration(t: Timestamp, d: Duration) -> Timestamp {
    let millis = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    Timestamp::from_millisecond(t.as_millisecond().saturating_add(millis)).unwrap_or(Timestamp::MAX)
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    (to.as_millisecond() - from.as_millisecond()).max(0) as f64 / 1000.0
}
