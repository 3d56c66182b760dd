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
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use atomic_operator::lease::LeaderElector;
use atomic_operator::metrics::Metrics;
use atomic_operator::run::{Settings, Shutdown, run};
use atomic_operator::server;
use atomic_operator::workload::WorkerDefaults;

/// Kubernetes operator for AtomicTask and ModelDeployment resources.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Namespace to watch; all namespaces when empty.
    #[arg(long, env = "ATOMIC_NAMESPACE", default_value = "")]
    namespace: String,
    /// Worker image for ModelDeployments that name none.
    #[arg(long, env = "ATOMIC_WORKER_IMAGE", default_value = "atomic-worker:latest")]
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
    // Colour codes only on a terminal: a pod's log gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let ready = Arc::new(AtomicBool::new(false));
    let (shutdown, stop) = Shutdown::new();

    let server = tokio::spawn(server::serve(
        args.metrics_addr,
        server::ServerState {
            metrics: Arc::clone(&metrics),
            ready: Arc::clone(&ready),
        },
        shutdown.wait(),
    ));

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    // Ready once connected, leader or not: a follower that never became ready would stall
    // rolling updates of the operator's own Deployment. `atomic_leader` says who leads.
    ready.store(true, Ordering::SeqCst);

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
            tokio::select! {
                _ = shutdown_signal() => return Ok(()),
                _ = tokio::time::sleep(e.renew_every()) => {}
            }
        }
        metrics.set_leader(true);
        tracing::info!("leading");
        elector = Some(e);
    }

    let settings = Settings {
        namespace: args.namespace.clone(),
        worker_defaults: WorkerDefaults {
            image: args.worker_image.clone(),
            image_pull_policy: args.worker_image_pull_policy.clone(),
        },
        identity: args.identity.clone(),
        max_inline_result_bytes: args.max_inline_result_bytes,
        max_in_flight_per_pod: args.max_in_flight_per_pod,
        http_concurrency: args.http_concurrency,
    };
    let controllers = tokio::spawn(run(client, settings, Arc::clone(&metrics), shutdown.clone()));

    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        lost = hold_leadership(elector, args.lease_seconds) => {
            metrics.set_leader(false);
            Err(anyhow::anyhow!("lost leadership: {lost}"))
        }
    };
    // Stop taking work, let in-flight reconciles finish, then exit; after a lost lease the
    // process exits non-zero so that its pod restarts as a follower.
    ready.store(false, Ordering::SeqCst);
    stop();
    match tokio::time::timeout(Duration::from_secs(20), controllers).await {
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "controllers failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "controllers panicked"),
        Err(_) => tracing::warn!("controllers did not stop within 20 s"),
        Ok(Ok(Ok(()))) => {}
    }
    let _ = server.await;
    outcome
}

/// Keeps the Lease renewed; returns when leadership is lost (never without an elector).
async fn hold_leadership(elector: Option<LeaderElector>, lease_seconds: u64) -> String {
    let Some(elector) = elector else {
        return std::future::pending().await;
    };
    let mut failures_since = None;
    loop {
        tokio::time::sleep(elector.renew_every()).await;
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
