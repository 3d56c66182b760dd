//! Wiring of the running operator: both controllers, the dispatcher, the EndpointSlice and
//! deletion watches and the task census, all stopped by one [`Shutdown`]. The binary adds flags,
//! leader election and the metrics server around it; end-to-end tests run it in-process.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};

use crate::Result;
use crate::api::{AtomicTask, ModelDeployment};
use crate::controller::endpoints::EndpointIndex;
use crate::controller::task::{KubeStore, TaskContext};
use crate::controller::{self, Context};
use crate::dispatch::{Dispatcher, TaskKey};
use crate::driver::{Driver, DriverConfig};
use crate::metrics::Metrics;
use crate::worker_client::WorkerClient;
use crate::workload::{MODEL_LABEL, WorkerDefaults};

/// How often the per-phase task counts are refreshed.
const CENSUS_INTERVAL: Duration = Duration::from_secs(15);

/// Settings of a running operator.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace to watch; all when empty.
    pub namespace: String,
    /// Worker pod defaults.
    pub worker_defaults: WorkerDefaults,
    /// This replica's name in events.
    pub identity: String,
    /// Results larger than this go to a ConfigMap.
    pub max_inline_result_bytes: usize,
    /// Default tasks in flight per worker pod.
    pub max_in_flight_per_pod: u32,
    /// Concurrent `http` tasks per namespace.
    pub http_concurrency: u32,
}

/// A shutdown signal that any number of tasks can wait for.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A signal and the function that fires it.
    pub fn new() -> (Self, impl FnOnce()) {
        let (tx, rx) = watch::channel(false);
        (Shutdown(rx), move || {
            let _ = tx.send(true);
        })
    }

    /// Resolves once the signal fired (or its sender is gone).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

fn namespaced<K>(client: &Client, namespace: &str) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    if namespace.is_empty() {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), namespace)
    }
}

fn receiver_stream<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

/// Runs the controllers and the dispatcher until `shutdown` fires.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<()> {
    let executor = Arc::new(WorkerClient::new(Duration::from_secs(5))?);
    let dispatcher = Arc::new(Dispatcher::new(
        executor,
        Arc::clone(&metrics),
        settings.max_in_flight_per_pod,
        settings.http_concurrency,
    ));
    let (task_wake_tx, task_wake_rx) = mpsc::unbounded_channel::<ObjectRef<AtomicTask>>();
    let (demand_tx, demand_rx) = mpsc::unbounded_channel::<ObjectRef<ModelDeployment>>();
    dispatcher.set_on_demand(Box::new(move |lane| {
        if let Some(model) = &lane.model {
            let _ = demand_tx.send(ObjectRef::new(model).within(&lane.namespace));
        }
    }));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "atomic-operator".into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let store = Arc::new(KubeStore::new(client.clone(), recorder, task_wake_tx));
    let driver = Driver::new(
        store,
        Arc::clone(&dispatcher),
        Arc::clone(&metrics),
        DriverConfig {
            max_inline_result_bytes: settings.max_inline_result_bytes,
            ..DriverConfig::default()
        },
    );

    let model_ctx = Arc::new(Context {
        client: client.clone(),
        worker_defaults: settings.worker_defaults.clone(),
        dispatcher: Arc::clone(&dispatcher),
        metrics: Arc::clone(&metrics),
    });
    let models = Controller::new(
        namespaced::<ModelDeployment>(&client, &settings.namespace),
        watcher::Config::default(),
    )
    .owns(
        namespaced::<Deployment>(&client, &settings.namespace),
        watcher::Config::default().labels("app.kubernetes.io/managed-by=atomic-operator"),
    )
    .reconcile_on(receiver_stream(demand_rx))
    .graceful_shutdown_on(shutdown.wait())
    .run(
        |md, ctx: Arc<Context<WorkerClient>>| async move {
            let metrics = Arc::clone(&ctx.metrics);
            controller::timed("modeldeployment", &metrics, controller::model::reconcile(md, ctx)).await
        },
        |_, error, ctx| controller::error_policy("modeldeployment", error, &ctx.metrics),
        model_ctx,
    )
    .for_each(|_| futures::future::ready(()));

    let task_ctx = Arc::new(TaskContext {
        driver,
        metrics: Arc::clone(&metrics),
    });
    let task_controller = Controller::new(
        namespaced::<AtomicTask>(&client, &settings.namespace),
        watcher::Config::default(),
    );
    let census = census(task_controller.store(), Arc::clone(&metrics), shutdown.clone());
    let tasks = task_controller
        .reconcile_on(receiver_stream(task_wake_rx))
        .graceful_shutdown_on(shutdown.wait())
        .run(
            |task, ctx: Arc<TaskContext<WorkerClient>>| async move {
                let metrics = Arc::clone(&ctx.metrics);
                controller::timed("atomictask", &metrics, controller::task::reconcile(task, ctx)).await
            },
            |_, error, ctx| controller::error_policy("atomictask", error, &ctx.metrics),
            task_ctx,
        )
        .for_each(|_| futures::future::ready(()));

    let endpoints = watch_endpoints(
        namespaced::<EndpointSlice>(&client, &settings.namespace),
        Arc::clone(&dispatcher),
    );
    let deletions = watch_deletions(
        namespaced::<AtomicTask>(&client, &settings.namespace),
        Arc::clone(&dispatcher),
    );
    let dispatch = Arc::clone(&dispatcher).run(shutdown.wait());
    let stop = shutdown.wait();
    tokio::join!(models, tasks, dispatch, census, async {
        tokio::select! {
            _ = endpoints => tracing::error!("endpoint slice watch ended"),
            _ = deletions => tracing::error!("task deletion watch ended"),
            _ = stop => {}
        }
    });
    Ok(())
}

/// Refreshes `atomic_tasks{phase, model}` from the controller's cache.
async fn census(store: Store<AtomicTask>, metrics: Arc<Metrics>, shutdown: Shutdown) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
        for task in store.state() {
            let phase = task.status.as_ref().map(|s| s.phase).unwrap_or_default();
            let model = task.spec.model.clone().unwrap_or_else(|| "http".to_owned());
            *counts.entry((phase.as_str().to_owned(), model)).or_default() += 1;
        }
        metrics.set_task_counts(&counts);
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(CENSUS_INTERVAL) => {}
        }
    }
}

/// Feeds ready worker endpoints to the dispatcher.
async fn watch_endpoints(api: Api<EndpointSlice>, dispatcher: Arc<Dispatcher<WorkerClient>>) {
    let mut index = EndpointIndex::default();
    let mut listing = Vec::new();
    let mut events = watcher(api, watcher::Config::default().labels(MODEL_LABEL))
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(slice)) => {
                if let Some((lane, addresses)) = index.apply(&slice) {
                    dispatcher.set_endpoints(lane, addresses);
                }
            }
            Ok(watcher::Event::Delete(slice)) => {
                if let Some((lane, addresses)) = index.remove(&slice) {
                    dispatcher.set_endpoints(lane, addresses);
                }
            }
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(slice)) => listing.push(slice),
            Ok(watcher::Event::InitDone) => {
                for (lane, addresses) in index.reset(&listing) {
                    dispatcher.set_endpoints(lane, addresses);
                }
                listing.clear();
            }
            Err(e) => tracing::warn!(error = %e, "endpoint slice watch"),
        }
    }
}

/// Abandons the queued or running work of deleted tasks at once (the controller does not see
/// objects that are gone).
async fn watch_deletions(api: Api<AtomicTask>, dispatcher: Arc<Dispatcher<WorkerClient>>) {
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        if let Ok(watcher::Event::Delete(task)) = event {
            dispatcher.abandon(&TaskKey::of(&task));
        }
    }
}
