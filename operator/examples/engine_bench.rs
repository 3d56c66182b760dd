//! Benchmark: pushes tasks with dependencies through the real driver, engine and dispatcher
//! with a no-op worker and an in-memory store, and prints tasks/s and peak memory.
//!
//! `cargo run --release -p atomic-operator --example engine_bench -- [TASKS] [KNOWN]`
//!
//! Phase 1 runs TASKS tasks (default 10,000) to completion: ten layers, each task depending on up
//! to three tasks of the layer before, with prompts that template upstream results. Phase 2 makes
//! KNOWN tasks (default 100,000) known to the engine (observed once, all blocked on a task that
//! does not exist yet) and reports the resident memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atomic_operator::api::task::{AtomicTaskSpec, Operation, TaskInput};
use atomic_operator::api::{AtomicTask, TaskPhase};
use atomic_operator::dispatch::{Lane, NoopExecutor};
use atomic_operator::driver::DriverConfig;
use atomic_operator::memory::LocalRun;
use atomic_operator::metrics::Metrics;

const LAYERS: usize = 10;

fn task(name: String, depends_on: Vec<String>, prompt: Option<String>) -> AtomicTask {
    let mut t = AtomicTask::new(
        &name,
        AtomicTaskSpec {
            model: Some("noop".to_owned()),
            operation: Operation::Generate,
            depends_on,
            prompt,
            input: Some(TaskInput {
                text: Some(format!("input of {name}")),
                value_from: None,
            }),
            ..AtomicTaskSpec::default()
        },
    );
    t.metadata.namespace = Some("bench".to_owned());
    t
}

/// Peak resident set size of this process in MiB (Linux), 0 elsewhere.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn setup() -> LocalRun<NoopExecutor> {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let run = LocalRun::start(Arc::new(NoopExecutor), metrics, 64, 64, DriverConfig::default());
    let lane = Lane {
        namespace: "bench".to_owned(),
        model: Some("noop".to_owned()),
    };
    run.dispatcher
        .set_endpoints(lane, (0..8).map(|i| format!("10.0.0.{i}:8080")).collect());
    run
}

async fn throughput(n: usize) {
    let run = setup();
    let store = Arc::clone(&run.store);
    let per_layer = n.div_ceil(LAYERS);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let started = Instant::now();
    let mut edges = 0;
    for i in 0..n {
        let layer = i / per_layer;
        let mut deps = Vec::new();
        if layer > 0 {
            for _ in 0..(next() % 4) {
                let dep = (layer - 1) * per_layer + (next() as usize % per_layer);
                let name = format!("t{dep}");
                if !deps.contains(&name) {
                    deps.push(name);
                }
            }
        }
        edges += deps.len();
        let prompt = deps
            .first()
            .map(|d| format!("continue from {{{{ tasks.{d}.attempt }}}}: {{{{ input.text }}}}"));
        store.insert(task(format!("t{i}"), deps, prompt));
    }
    let settled = run.settle(Duration::from_secs(300)).await.expect("run");
    let elapsed = started.elapsed().as_secs_f64();
    let succeeded = store.count_in(TaskPhase::Succeeded);
    println!(
        "throughput: {n} tasks ({edges} dependency edges, {LAYERS} layers) settled={settled} succeeded={succeeded} in {elapsed:.2} s = {:.0} tasks/s; peak RSS {:.0} MiB",
        n as f64 / elapsed,
        peak_rss_mib()
    );
    assert_eq!(succeeded, n, "every task must succeed");
}

async fn memory(known: usize) {
    let LocalRun {
        store,
        driver,
        wakeups,
        ..
    } = setup();
    // Nothing runs here, so wake-ups are not needed; dropping the receiver keeps them from piling up.
    drop(wakeups);
    let before = peak_rss_mib();
    for i in 0..known {
        store.insert(task(format!("k{i}"), vec!["not-yet-created".to_owned()], None));
    }
    for key in store.keys() {
        driver
            .apply(&key, atomic_operator::engine::state::Event::Observe)
            .await
            .expect("observe");
    }
    let blocked = store.count_in(TaskPhase::Blocked);
    println!(
        "memory: {known} tasks known ({blocked} blocked): peak RSS {:.0} MiB (was {before:.0} MiB before loading)",
        peak_rss_mib()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let known: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    throughput(tasks).await;
    memory(known).await;
}
