//! `atomic-operator`: runs the AtomicTask and ModelDeployment controllers, the dispatcher and the
//! metrics/health server. With leader election on, only the replica holding the Lease runs the
//! controllers and the dispatcher; a replica that loses the Lease exits so it never dispatches
//! alongside the new leader.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;

use atomic_operator::api::{AtomicTask, ModelDeployment};
use atomic_operator::controller::endpoints::EndpointIndex;
use atomic_operator::controller::task::{KubeStore, TaskContext};
use atomic_operator::controller::{self, Context};
use atomic_operator::dispatch::{Dispatcher, TaskKey};
use atomic_operator::driver::{Driver, DriverConfig};
use atomic_operator::lease::LeaderElector;
use atomic_operator::metrics::Metrics;
use atomic_operator::server;
use atomic_operator::worker_client::WorkerClient;
use atomic_operator::workload::WorkerDefaults;

/// Kubernetes operator for AtomicTask and ModelDeployment resources.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Namespace to watch; all namespaces when empty.
    #[arg(long, env = "ATOMIC_NAMESPACE", default_value = "")]
    namespace: String,
    /// Worker image for ModelDeployments that name none.
    #[arg(
        long,
        env = "ATOMIC_WORKER_IMAGE",
        default_value = "ghcr.io/atomic-dev/atomic-worker:latest"
    )]
    worker_image: String,
    /// Pull policy of worker images.
    #[arg(long, env = "ATOMIC_WORKER_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    worker_image_pull_policy: String,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "ATOMIC_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease so that only one replica dispatches.
    #[arg(long, env = "ATOMIC_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "ATOMIC_LEASE_NAME", default_value = "atomic-operator")]
    lease_name: String,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "atomic-operator")]
    identity: String,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "ATOMIC_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Results larger than this (bytes of JSON) go to a ConfigMap instead of the status.
    #[arg(long, env = "ATOMIC_MAX_INLINE_RESULT_BYTES", default_value_t = 16384)]
    max_inline_result_bytes: usize,
    /// Default tasks in flight per worker pod (a ModelDeployment's replicas.maxInFlightPerReplica wins).
    #[arg(long, env = "ATOMIC_MAX_IN_FLIGHT_PER_POD", default_value_t = 8)]
    max_in_flight_per_pod: u32,
    /// Concurrent `http` tasks per namespace.
    #[arg(long, env = "ATOMIC_HTTP_CONCURRENCY", default_value_t = 32)]
    http_concurrency: u32,
    /// Log format.
    #[arg(long, env = "ATOMIC_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let ready = Arc::new(AtomicBool::new(false));

    let server = tokio::spawn(server::serve(
        args.metrics_addr,
        server::ServerState {
            metrics: Arc::clone(&metrics),
            ready: Arc::clone(&ready),
        },
        shutdown_signal(),
    ));

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;

    let mut elector = None;
    if args.leader_election {
        let lease_api: Api<Lease> = Api::namespaced(client.clone(), &args.lease_namespace);
        let duration = Duration::from_secs(args.lease_seconds);
        let e = LeaderElector::new(
            lease_api,
            &args.lease_name,
            &args.identity,
            duration,
            duration / 3,
        );
        tracing::info!(lease = %args.lease_name, identity = %args.identity, "waiting for leadership");
        loop {
            match e.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "leader election"),
            }
            tokio::time::sleep(Duration::from_secs(args.lease_seconds / 3 + 1)).await;
        }
        metrics.set_leader(true);
        tracing::info!("leading");
        elector = Some(e);
    }

    let executor = Arc::new(WorkerClient::new(Duration::from_secs(5)).context("building the HTTP client")?);
    let dispatcher = Arc::new(Dispatcher::new(
        executor,
        Arc::clone(&metrics),
        args.max_in_flight_per_pod,
        args.http_concurrency,
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
            instance: Some(args.identity.clone()),
        },
    );
    let store = Arc::new(KubeStore::new(client.clone(), recorder, task_wake_tx));
    let driver = Driver::new(
        store,
        Arc::clone(&dispatcher),
        Arc::clone(&metrics),
        DriverConfig {
            max_inline_result_bytes: args.max_inline_result_bytes,
        },
    );

    let model_ctx = Arc::new(Context {
        client: client.clone(),
        worker_defaults: WorkerDefaults {
            image: args.worker_image.clone(),
            image_pull_policy: args.worker_image_pull_policy.clone(),
        },
        dispatcher: Arc::clone(&dispatcher),
        metrics: Arc::clone(&metrics),
    });
    let models = Controller::new(
        namespaced::<ModelDeployment>(&client, &args.namespace),
        watcher::Config::default(),
    )
    .owns(
        namespaced::<Deployment>(&client, &args.namespace),
        watcher::Config::default().labels("app.kubernetes.io/managed-by=atomic-operator"),
    )
    .reconcile_on(receiver_stream(demand_rx))
    .graceful_shutdown_on(shutdown_signal())
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
    let tasks = Controller::new(
        namespaced::<AtomicTask>(&client, &args.namespace),
        watcher::Config::default(),
    )
    .reconcile_on(receiver_stream(task_wake_rx))
    .graceful_shutdown_on(shutdown_signal())
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
        namespaced::<EndpointSlice>(&client, &args.namespace),
        Arc::clone(&dispatcher),
    );
    let deletions = watch_deletions(
        namespaced::<AtomicTask>(&client, &args.namespace),
        Arc::clone(&dispatcher),
    );
    let dispatch = Arc::clone(&dispatcher).run(shutdown_signal());
    let leadership = hold_leadership(elector, args.lease_seconds);

    ready.store(true, Ordering::SeqCst);
    tokio::select! {
        _ = async { tokio::join!(models, tasks, dispatch) } => tracing::info!("controllers stopped"),
        r = endpoints => tracing::error!(?r, "endpoint watch ended"),
        r = deletions => tracing::error!(?r, "task watch ended"),
        lost = leadership => {
            metrics.set_leader(false);
            anyhow::bail!("lost leadership: {lost}");
        }
    }
    ready.store(false, Ordering::SeqCst);
    server.abort();
    Ok(())
}

/// Keeps the Lease renewed; returns when leadership is lost (never without an elector).
async fn hold_leadership(elector: Option<LeaderElector>, lease_seconds: u64) -> String {
    let Some(elector) = elector else {
        return std::future::pending().await;
    };
    let renew_every = Duration::from_secs((lease_seconds / 3).max(1));
    let mut failures_since = None;
    loop {
        tokio::time::sleep(renew_every).await;
        match elector.try_acquire_or_renew().await {
            Ok(true) => failures_since = None,
            Ok(false) => return "another replica holds the lease".to_owned(),
            Err(e) => {
                // Transient API errors are tolerated until the lease could have expired.
                let since = *failures_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= Duration::from_secs(lease_seconds) {
                    return format!("could not renew the lease: {e}");
                }
            }
        }
    }
}

/// Feeds ready worker endpoints to the dispatcher.
async fn watch_endpoints(
    api: Api<EndpointSlice>,
    dispatcher: Arc<Dispatcher<WorkerClient>>,
) -> anyhow::Result<()> {
    let config = watcher::Config::default().labels(atomic_operator::workload::MODEL_LABEL);
    let mut index = EndpointIndex::default();
    let mut listing = Vec::new();
    let mut events = watcher(api, config).default_backoff().boxed();
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
    Ok(())
}

/// Abandons the queued or running work of deleted tasks at once.
async fn watch_deletions(
    api: Api<AtomicTask>,
    dispatcher: Arc<Dispatcher<WorkerClient>>,
) -> anyhow::Result<()> {
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        if let Ok(watcher::Event::Delete(task)) = event {
            dispatcher.abandon(&TaskKey {
                namespace: task.metadata.namespace.unwrap_or_default(),
                name: task.metadata.name.unwrap_or_default(),
            });
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
