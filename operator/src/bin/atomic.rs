//! `atomic`: runs a folder of AtomicTask manifests locally, without a cluster, through the same
//! engine, driver and dispatcher as the operator. Model tasks go to worker endpoints given with
//! `--worker MODEL=HOST:PORT`; results are printed as a table and written to `--out`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use atomic_operator::api::Operation;
use atomic_operator::dispatch::Lane;
use atomic_operator::driver::DriverConfig;
use atomic_operator::memory::LocalRun;
use atomic_operator::metrics::Metrics;
use atomic_operator::worker_client::WorkerClient;

/// Run Atomic task pipelines locally.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs every AtomicTask in a folder (or file) of manifests until all have finished.
    Run {
        /// Folder or file of manifests.
        path: PathBuf,
        /// Worker endpoint of a model, `MODEL=HOST:PORT`; repeat for each model.
        #[arg(long = "worker", env = "ATOMIC_WORKERS", value_delimiter = ',')]
        workers: Vec<String>,
        /// Folder that receives one JSON file per task (its final status).
        #[arg(long, env = "ATOMIC_OUT", default_value = "atomic-out")]
        out: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, env = "ATOMIC_TIMEOUT_SECONDS", default_value_t = 600)]
        timeout_seconds: u64,
        /// Tasks in flight per worker endpoint.
        #[arg(long, env = "ATOMIC_MAX_IN_FLIGHT_PER_POD", default_value_t = 8)]
        max_in_flight: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match Cli::parse().command {
        Command::Run {
            path,
            workers,
            out,
            timeout_seconds,
            max_in_flight,
        } => run(path, workers, out, timeout_seconds, max_in_flight).await,
    }
}

async fn run(
    path: PathBuf,
    workers: Vec<String>,
    out: PathBuf,
    timeout_seconds: u64,
    max_in_flight: u32,
) -> anyhow::Result<()> {
    let manifests = match atomic_operator::manifest::load(&path) {
        Ok(m) => m,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            bail!("{} manifest error(s) in {}", errors.len(), path.display());
        }
    };
    if manifests.tasks.is_empty() {
        bail!("no AtomicTask in {}", path.display());
    }
    let mut endpoints: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in &workers {
        let (model, addr) = w
            .split_once('=')
            .with_context(|| format!("--worker {w:?} is not MODEL=HOST:PORT"))?;
        endpoints
            .entry(model.to_owned())
            .or_default()
            .push(addr.to_owned());
    }
    let missing: Vec<_> = manifests
        .tasks
        .iter()
        .filter(|t| t.spec.operation != Operation::Http)
        .filter_map(|t| t.spec.model.clone())
        .filter(|m| !endpoints.contains_key(m))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !missing.is_empty() {
        bail!(
            "no worker for model(s) {}: start a worker for each and pass --worker MODEL=HOST:PORT",
            missing.join(", ")
        );
    }

    let metrics = Arc::new(Metrics::new()?);
    let run = LocalRun::start(
        Arc::new(WorkerClient::new(Duration::from_secs(5))?),
        metrics,
        max_in_flight,
        16,
        DriverConfig::default(),
    );
    let store = Arc::clone(&run.store);
    for task in manifests.tasks {
        let key = store.insert(task);
        for (model, addrs) in &endpoints {
            let lane = Lane {
                namespace: key.namespace.clone(),
                model: Some(model.clone()),
            };
            run.dispatcher.set_endpoints(lane, addrs.clone());
        }
    }
    let settled = run.settle(Duration::from_secs(timeout_seconds)).await?;

    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    println!(
        "{:<24} {:<10} {:>8}  RESULT / MESSAGE",
        "TASK", "PHASE", "ATTEMPTS"
    );
    let mut failed = 0;
    for task in store.tasks() {
        let name = task.metadata.name.clone().unwrap_or_default();
        let status = task.status.clone().unwrap_or_default();
        if status.phase != atomic_operator::api::TaskPhase::Succeeded {
            failed += 1;
        }
        let detail = match &status.result {
            Some(result) => summarise(result),
            None => status.message.clone().unwrap_or_default(),
        };
        println!(
            "{:<24} {:<10} {:>8}  {}",
            name,
            status.phase.as_str(),
            status.attempts,
            detail
        );
        let file = out.join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&status)?)
            .with_context(|| format!("writing {}", file.display()))?;
    }
    println!("results written to {}", out.display());
    if !settled {
        bail!("not every task finished within {timeout_seconds} s");
    }
    if failed > 0 {
        bail!("{failed} task(s) did not succeed");
    }
    Ok(())
}

/// One line of a result for the table.
fn summarise(result: &serde_json::Value) -> String {
    let text = match result.get("text").or_else(|| result.get("label")) {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => result.to_string(),
    };
    let line = text.replace('\n', " ");
    if line.chars().count() > 80 {
        format!("{}…", line.chars().take(80).collect::<String>())
    } else {
        line
    }
}
