//! End to end against a real cluster: CRDs install and validate server-side, and the operator
//! (run in-process, watching a fresh namespace) drives tasks and ModelDeployments.
//!
//! Runs when `KUBECONFIG` is set; otherwise prints why it skips. The cluster must let the
//! current user manage CRDs and namespaces.

use std::sync::Arc;
use std::time::Duration;

use atomic_operator::api::{AtomicTask, ModelDeployment, TaskPhase};
use atomic_operator::metrics::Metrics;
use atomic_operator::run::{Settings, Shutdown, run};
use atomic_operator::workload::WorkerDefaults;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::json;

fn cluster_configured() -> bool {
    match std::env::var_os("KUBECONFIG") {
        Some(path) if !path.is_empty() => true,
        _ => {
            // Written straight to stderr: the test harness would swallow `eprintln!` of a passing test.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED operator_end_to_end: needs a cluster; set KUBECONFIG to run it"
            );
            false
        }
    }
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [AtomicTask::crd(), ModelDeployment::crd()] {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("atomic-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        wait_for(&format!("CRD {name} established"), || async {
            let crd = crds.get(&name).await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    }
}

async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..120 {
        if let Some(v) = probe().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out waiting for {what}");
}

fn task(value: serde_json::Value) -> AtomicTask {
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
async fn operator_end_to_end() {
    if !cluster_configured() {
        return;
    }
    let client = Client::try_default().await.expect("connecting to the cluster");
    install_crds(&client).await;

    let ns = format!("atomic-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .expect("creating the test namespace");

    // Server-side CEL validation rejects a task that depends on itself.
    let tasks: Api<AtomicTask> = Api::namespaced(client.clone(), &ns);
    let selfish = task(json!({
        "apiVersion": "atomic.dev/v1alpha1", "kind": "AtomicTask",
        "metadata": {"name": "selfish"},
        "spec": {"model": "m", "operation": "generate", "dependsOn": ["selfish"]}
    }));
    let err = tasks.create(&PostParams::default(), &selfish).await.unwrap_err();
    assert!(err.to_string().contains("may not depend on itself"), "{err}");

    // A local endpoint for an http task; the operator runs in this process, so it can reach it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/send", axum::routing::post(|| async { "sent" }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (shutdown, stop) = Shutdown::new();
    let settings = Settings {
        namespace: ns.clone(),
        worker_defaults: WorkerDefaults {
            image: "atomic-worker:e2e".to_owned(),
            image_pull_policy: "IfNotPresent".to_owned(),
        },
        identity: "e2e".to_owned(),
        max_inline_result_bytes: 16 * 1024,
        max_in_flight_per_pod: 4,
        http_concurrency: 4,
    };
    let operator = tokio::spawn(run(
        client.clone(),
        settings,
        Arc::new(Metrics::new().unwrap()),
        shutdown,
    ));

    for t in [
        json!({"metadata": {"name": "send"}, "spec": {"operation": "http", "http": {"url": format!("http://{addr}/send")}}}),
        json!({"metadata": {"name": "a"}, "spec": {"model": "m", "operation": "generate", "dependsOn": ["b"]}}),
        json!({"metadata": {"name": "b"}, "spec": {"model": "m", "operation": "generate", "dependsOn": ["a"]}}),
    ] {
        let mut t = t;
        t["apiVersion"] = json!("atomic.dev/v1alpha1");
        t["kind"] = json!("AtomicTask");
        tasks
            .create(&PostParams::default(), &task(t))
            .await
            .expect("creating a task");
    }
    let phase_of = |name: &'static str| {
        let tasks = tasks.clone();
        move || {
            let tasks = tasks.clone();
            async move {
                let s = tasks.get(name).await.ok()?.status?;
                s.phase.is_terminal().then_some(s)
            }
        }
    };
    let send = wait_for("http task to finish", phase_of("send")).await;
    assert_eq!(send.phase, TaskPhase::Succeeded, "{:?}", send.message);
    assert_eq!(send.result.unwrap()["body"], "sent");
    for name in ["a", "b"] {
        let s = wait_for("cycle to fail", phase_of(name)).await;
        assert_eq!(
            s.reason.as_deref(),
            Some("DependencyCycle"),
            "{name}: {:?}",
            s.message
        );
    }

    // A ModelDeployment gets its Deployment and Service, owned, and a status.
    let models: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "atomic.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "intent"},
        "spec": {"model": {"source": {"hostPath": {"path": "/models/minilm"}}}, "replicas": {"min": 0, "max": 2}}
    }))
    .unwrap();
    models
        .create(&PostParams::default(), &md)
        .await
        .expect("creating a ModelDeployment");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let d = wait_for("worker Deployment", || async {
        deployments.get("intent-worker").await.ok()
    })
    .await;
    assert_eq!(d.metadata.owner_references.unwrap()[0].kind, "ModelDeployment");
    assert_eq!(
        d.spec.replicas,
        Some(0),
        "min 0 and no waiting task: scaled to zero"
    );
    wait_for("worker Service", || async {
        services.get("intent-worker").await.ok()
    })
    .await;
    let status = wait_for("ModelDeployment status", || async {
        models.get("intent").await.ok()?.status
    })
    .await;
    assert_eq!(status.desired_replicas, 0);

    stop();
    let _ = tokio::time::timeout(Duration::from_secs(20), operator).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
