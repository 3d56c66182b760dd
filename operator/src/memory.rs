//! An in-memory [`TaskStore`] and the loop that drives it: the same driver, engine and
//! dispatcher as in the cluster, with tasks, ConfigMaps and Secrets held in maps. Used by local
//! runs (`atomic-operator run`), the benchmark and tests.
//!
//! It mimics the API server where it matters to the driver: every object has a
//! `resourceVersion`, a status write with a stale one is a conflict, and every write wakes the
//! task's observer as a watch event would.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::Result;
use crate::api::task::{AtomicTask, AtomicTaskStatus, InputSource, KeyRef};
use crate::dispatch::{Dispatcher, Executor, TaskKey};
use crate::driver::{Driver, DriverConfig, TaskStore};
use crate::engine::state::{Event, Transition};
use crate::metrics::Metrics;

#[derive(Default)]
struct Objects {
    /// Behind `Arc`s, as in a reflector cache: large values would bloat the map's nodes.
    tasks: BTreeMap<TaskKey, Arc<AtomicTask>>,
    config_maps: HashMap<(String, String), BTreeMap<String, String>>,
    secrets: HashMap<(String, String), BTreeMap<String, String>>,
    transitions: Vec<(TaskKey, Transition)>,
    next_version: u64,
}

/// Tasks, ConfigMaps and Secrets in memory.
pub struct MemoryStore {
    objects: Mutex<Objects>,
    wake: mpsc::UnboundedSender<TaskKey>,
}

impl MemoryStore {
    /// An empty store and the receiver of its wake-ups (feed it to [`run_until_settled`]).
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<TaskKey>) {
        let (wake, rx) = mpsc::unbounded_channel();
        (
            Arc::new(MemoryStore {
                objects: Mutex::default(),
                wake,
            }),
            rx,
        )
    }

    fn lock(&self) -> MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a task as `kubectl apply` would (namespace `default` when unset); wakes it.
    pub fn insert(&self, mut task: AtomicTask) -> TaskKey {
        let namespace = task
            .metadata
            .namespace
            .get_or_insert_with(|| "default".to_owned())
            .clone();
        let name = task.metadata.name.clone().unwrap_or_default();
        let key = TaskKey { namespace, name };
        {
            let mut objects = self.lock();
            objects.next_version += 1;
            task.metadata.resource_version = Some(objects.next_version.to_string());
            task.metadata
                .uid
                .get_or_insert_with(|| format!("uid-{}", objects.next_version));
            task.metadata.generation = Some(1);
            task.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::now(),
            ));
            objects.tasks.insert(key.clone(), Arc::new(task));
        }
        let _ = self.wake.send(key.clone());
        key
    }

    /// Sets `spec.cancel` on a task, as `kubectl patch` would.
    pub fn cancel(&self, key: &TaskKey) {
        {
            let mut objects = self.lock();
            objects.next_version += 1;
            let version = objects.next_version.to_string();
            if let Some(task) = objects.tasks.get_mut(key) {
                let task = Arc::make_mut(task);
                task.spec.cancel = true;
                task.metadata.resource_version = Some(version);
            }
        }
        let _ = self.wake.send(key.clone());
    }

    /// Adds a ConfigMap.
    pub fn insert_config_map(&self, namespace: &str, name: &str, data: BTreeMap<String, String>) {
        self.lock()
            .config_maps
            .insert((namespace.to_owned(), name.to_owned()), data);
    }

    /// Adds a Secret (values in plain text).
    pub fn insert_secret(&self, namespace: &str, name: &str, data: BTreeMap<String, String>) {
        self.lock()
            .secrets
            .insert((namespace.to_owned(), name.to_owned()), data);
    }

    /// A snapshot of every task.
    pub fn tasks(&self) -> Vec<AtomicTask> {
        self.lock().tasks.values().map(|t| AtomicTask::clone(t)).collect()
    }

    /// The keys of every task.
    pub fn keys(&self) -> Vec<TaskKey> {
        self.lock().tasks.keys().cloned().collect()
    }

    /// How many tasks are in `phase`.
    pub fn count_in(&self, phase: crate::api::TaskPhase) -> usize {
        self.lock()
            .tasks
            .values()
            .filter(|t| {
                t.status
                    .as_ref()
                    .map_or(crate::api::TaskPhase::Pending, |s| s.phase)
                    == phase
            })
            .count()
    }

    /// A ConfigMap's data.
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        self.lock()
            .config_maps
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every phase change recorded so far, in order.
    pub fn transitions(&self) -> Vec<(TaskKey, Transition)> {
        self.lock().transitions.clone()
    }

    /// Whether every task is in a terminal phase.
    pub fn settled(&self) -> bool {
        self.lock()
            .tasks
            .values()
            .all(|t| t.status.as_ref().is_some_and(|s| s.phase.is_terminal()))
    }
}

impl TaskStore for MemoryStore {
    async fn get(&self, key: &TaskKey) -> Result<Option<AtomicTask>> {
        Ok(self.lock().tasks.get(key).map(|t| AtomicTask::clone(t)))
    }

    async fn write_status(&self, task: &AtomicTask, status: &AtomicTaskStatus) -> Result<Option<AtomicTask>> {
        let key = TaskKey::of(task);
        let updated = {
            let mut objects = self.lock();
            objects.next_version += 1;
            let version = objects.next_version.to_string();
            let Some(current) = objects.tasks.get_mut(&key) else {
                return Ok(None);
            };
            if current.metadata.resource_version != task.metadata.resource_version {
                return Ok(None);
            }
            let current = Arc::make_mut(current);
            current.status = Some(status.clone());
            current.metadata.resource_version = Some(version);
            current.clone()
        };
        let _ = self.wake.send(key);
        Ok(Some(updated))
    }

    async fn delete(&self, key: &TaskKey) -> Result<()> {
        self.lock().tasks.remove(key);
        Ok(())
    }

    async fn read_value(&self, namespace: &str, source: &InputSource) -> std::result::Result<String, String> {
        let objects = self.lock();
        let (kind, map, at) = match (&source.config_map_key_ref, &source.secret_key_ref) {
            (Some(at), _) => ("ConfigMap", &objects.config_maps, at),
            (None, Some(at)) => ("Secret", &objects.secrets, at),
            (None, None) => return Err("valueFrom names no ConfigMap or Secret".to_owned()),
        };
        let data = map
            .get(&(namespace.to_owned(), at.name.clone()))
            .ok_or_else(|| format!("{kind} {namespace}/{} not found", at.name))?;
        data.get(&at.key)
            .cloned()
            .ok_or_else(|| format!("{kind} {namespace}/{} has no key {}", at.name, at.key))
    }

    async fn store_result(&self, task: &AtomicTask, result: &Value) -> Result<KeyRef> {
        let at = KeyRef {
            name: format!("{}-result", task.metadata.name.as_deref().unwrap_or_default()),
            key: "result.json".to_owned(),
        };
        let namespace = task.metadata.namespace.clone().unwrap_or_default();
        self.lock().config_maps.insert(
            (namespace, at.name.clone()),
            BTreeMap::from([(at.key.clone(), serde_json::to_string(result)?)]),
        );
        Ok(at)
    }

    async fn write_output(&self, task: &AtomicTask, config_map: &str, result: &Value) -> Result<()> {
        let namespace = task.metadata.namespace.clone().unwrap_or_default();
        let name = task.metadata.name.clone().unwrap_or_default();
        let value = serde_json::to_string(result)?;
        self.lock()
            .config_maps
            .entry((namespace, config_map.to_owned()))
            .or_default()
            .insert(name, value);
        Ok(())
    }

    async fn record(&self, task: &AtomicTask, transition: &Transition) {
        let key = TaskKey::of(task);
        self.lock().transitions.push((key, transition.clone()));
    }

    fn wake(&self, key: TaskKey) {
        let _ = self.wake.send(key);
    }
}

/// Everything a run without a cluster needs: store, driver and a running dispatcher.
pub struct LocalRun<E> {
    /// The tasks.
    pub store: Arc<MemoryStore>,
    /// The driver over `store`.
    pub driver: Arc<Driver<MemoryStore, E>>,
    /// The dispatcher (already running); give it endpoints with `set_endpoints`.
    pub dispatcher: Arc<Dispatcher<E>>,
    /// Wake-ups of the store, for [`run_until_settled`].
    pub wakeups: mpsc::UnboundedReceiver<TaskKey>,
}

impl<E: Executor> LocalRun<E> {
    /// Wires a store, a driver and a dispatcher (spawned on the current runtime, running until
    /// the runtime stops) around `executor`.
    pub fn start(
        executor: Arc<E>,
        metrics: Arc<Metrics>,
        max_in_flight_per_endpoint: u32,
        http_concurrency: u32,
        config: DriverConfig,
    ) -> Self {
        let dispatcher = Arc::new(Dispatcher::new(
            executor,
            Arc::clone(&metrics),
            max_in_flight_per_endpoint,
            http_concurrency,
        ));
        let (store, wakeups) = MemoryStore::new();
        let driver = Driver::new(Arc::clone(&store), Arc::clone(&dispatcher), metrics, config);
        tokio::spawn(Arc::clone(&dispatcher).run(std::future::pending()));
        LocalRun {
            store,
            driver,
            dispatcher,
            wakeups,
        }
    }

    /// Runs until every task is terminal or `limit` passes; returns whether all settled.
    pub async fn settle(self, limit: Duration) -> Result<bool> {
        run_until_settled(&self.store, &self.driver, self.wakeups, limit).await
    }
}

/// Observes woken tasks until every task in the store is terminal or `limit` passes; timers the
/// engine asks for (backoff, timeouts, TTL) are honoured. Returns whether the store settled.
pub async fn run_until_settled<E: Executor>(
    store: &Arc<MemoryStore>,
    driver: &Arc<Driver<MemoryStore, E>>,
    mut wakeups: mpsc::UnboundedReceiver<TaskKey>,
    limit: Duration,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + limit;
    let (timer_tx, mut timers) = mpsc::unbounded_channel::<TaskKey>();
    loop {
        if store.settled() {
            return Ok(true);
        }
        // Drain what is ready, deduplicating keys woken several times.
        let mut batch: Vec<TaskKey> = Vec::new();
        let mut seen = HashSet::new();
        tokio::select! {
            Some(key) = wakeups.recv() => batch.push(key),
            Some(key) = timers.recv() => batch.push(key),
            _ = tokio::time::sleep_until(deadline) => return Ok(store.settled()),
        }
        while let Ok(key) = wakeups.try_recv() {
            batch.push(key);
        }
        while let Ok(key) = timers.try_recv() {
            batch.push(key);
        }
        for key in batch {
            if !seen.insert(key.clone()) {
                continue;
            }
            let applied = driver.apply(&key, Event::Observe).await?;
            if let Some(after) = applied.requeue_after {
                let tx = timer_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(key);
                });
            }
        }
    }
}
