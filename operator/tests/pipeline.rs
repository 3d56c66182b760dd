//! Drives the driver, engine and dispatcher against a fake worker HTTP server on localhost, with
//! the in-memory store standing in for the API server: a dependent pipeline with templated
//! prompts, output delivery, and the failure modes (5xx, slow, connection refused, bad request).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

use atomic_operator::api::task::{AtomicTaskSpec, HttpCall, OutputSpec, RetryPolicy, TaskInput, Webhook};
use atomic_operator::api::{AtomicTask, Operation, TaskPhase};
use atomic_operator::dispatch::Lane;
use atomic_operator::driver::{Driver, DriverConfig};
use atomic_operator::memory::{LocalRun, MemoryStore, run_until_settled};
use atomic_operator::metrics::Metrics;
use atomic_operator::worker_client::WorkerClient;

/// A request the fake endpoint received: Idempotency-Key, Authorization, body.
type Delivery = (Option<String>, Option<String>, Value);

#[derive(Default)]
struct Seen {
    prompts: Mutex<Vec<String>>,
    hooks: Mutex<Vec<Delivery>>,
    flaky_calls: AtomicU32,
    flaky_hook_calls: AtomicU32,
}

async fn classify(State(seen): State<Arc<Seen>>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    seen.prompts
        .lock()
        .unwrap()
        .push(body["input"].as_str().unwrap_or_default().to_owned());
    match model.as_str() {
        "flaky" if seen.flaky_calls.fetch_add(1, Ordering::SeqCst) < 2 => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": {"message": "model loading", "type": "unavailable"}})),
        ),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            (
                StatusCode::OK,
                Json(json!({"model": model, "label": "late", "score": 1.0, "scores": []})),
            )
        }
        "picky" => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "input too long", "type": "invalid_request_error"}})),
        ),
        _ => (
            StatusCode::OK,
            Json(json!({
                "model": model, "label": "billing", "score": 0.8,
                "scores": [{"label": "billing", "score": 0.8}, {"label": "other", "score": 0.2}]
            })),
        ),
    }
}

async fn extract(State(seen): State<Arc<Seen>>, Json(body): Json<Value>) -> Json<Value> {
    seen.prompts
        .lock()
        .unwrap()
        .push(body["input"].as_str().unwrap_or_default().to_owned());
    Json(json!({"model": body["model"], "entities": [
        {"type": "ORDER", "text": "A-1234", "start": 10, "end": 16, "score": 0.99}
    ]}))
}

async fn complete(State(seen): State<Arc<Seen>>, Json(body): Json<Value>) -> Json<Value> {
    let prompt = body["prompt"].as_str().unwrap_or_default().to_owned();
    seen.prompts.lock().unwrap().push(prompt.clone());
    let text = if body["model"] == "big" {
        "x".repeat(40_000)
    } else {
        format!("Dear customer, re: {prompt}")
    };
    Json(json!({
        "id": "c1", "object": "text_completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    }))
}

async fn hook(State(seen): State<Arc<Seen>>, headers: HeaderMap, Json(body): Json<Value>) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    seen.hooks
        .lock()
        .unwrap()
        .push((header("idempotency-key"), header("authorization"), body));
    StatusCode::OK
}

async fn flaky_hook(State(seen): State<Arc<Seen>>) -> StatusCode {
    if seen.flaky_hook_calls.fetch_add(1, Ordering::SeqCst) == 0 {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

async fn fake_worker() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/extract", post(extract))
        .route("/v1/completions", post(complete))
        .route("/hook", post(hook))
        .route("/send", post(hook))
        .route("/flaky-hook", post(flaky_hook))
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

fn task(name: &str, model: &str, operation: Operation) -> AtomicTask {
    let mut t = AtomicTask::new(
        name,
        AtomicTaskSpec {
            model: Some(model.to_owned()),
            operation,
            input: Some(TaskInput {
                text: Some("my kettle broke, order A-1234".to_owned()),
                value_from: None,
            }),
            timeout_seconds: Some(1),
            retries: Some(RetryPolicy {
                limit: 3,
                backoff_seconds: 0,
                max_backoff_seconds: 0,
            }),
            ..AtomicTaskSpec::default()
        },
    );
    t.metadata.namespace = Some("ns".to_owned());
    t
}

struct Harness {
    store: Arc<MemoryStore>,
    driver: Arc<Driver<MemoryStore, WorkerClient>>,
    wakeups: Option<tokio::sync::mpsc::UnboundedReceiver<atomic_operator::dispatch::TaskKey>>,
    metrics: Arc<Metrics>,
}

fn harness(endpoints: &[(&str, String)]) -> Harness {
    let metrics = Arc::new(Metrics::new().unwrap());
    let client = WorkerClient::new(Duration::from_millis(500)).unwrap();
    let run = LocalRun::start(
        Arc::new(client),
        Arc::clone(&metrics),
        4,
        4,
        DriverConfig {
            max_inline_result_bytes: 16 * 1024,
            output_retry: Duration::from_millis(300),
        },
    );
    for (model, addr) in endpoints {
        let lane = Lane {
            namespace: "ns".to_owned(),
            model: Some((*model).to_owned()),
        };
        run.dispatcher.set_endpoints(lane, vec![addr.clone()]);
    }
    Harness {
        store: run.store,
        driver: run.driver,
        wakeups: Some(run.wakeups),
        metrics,
    }
}

impl Harness {
    async fn settle(&mut self) {
        let wakeups = self.wakeups.take().unwrap();
        let settled = run_until_settled(&self.store, &self.driver, wakeups, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(settled, "tasks did not settle: {:#?}", self.phases());
    }

    fn get(&self, name: &str) -> AtomicTask {
        self.store
            .tasks()
            .into_iter()
            .find(|t| t.metadata.name.as_deref() == Some(name))
            .unwrap()
    }

    fn status(&self, name: &str) -> atomic_operator::api::AtomicTaskStatus {
        self.get(name).status.unwrap()
    }

    fn phases(&self) -> BTreeMap<String, (TaskPhase, Option<String>)> {
        self.store
            .tasks()
            .into_iter()
            .map(|t| {
                let s = t.status.unwrap_or_default();
                (t.metadata.name.unwrap_or_default(), (s.phase, s.message))
            })
            .collect()
    }
}

#[tokio::test]
async fn a_pipeline_runs_in_dependency_order_with_templated_prompts_and_outputs() {
    let (addr, seen) = fake_worker().await;
    let addr_s = addr.to_string();
    let mut h = harness(&[
        ("intent", addr_s.clone()),
        ("entities", addr_s.clone()),
        ("writer", addr_s.clone()),
    ]);
    h.store.insert_secret(
        "ns",
        "mail-api",
        BTreeMap::from([("token".to_owned(), "s3cret\n".to_owned())]),
    );

    h.store.insert(task("intent", "intent", Operation::Classify));
    h.store.insert(task("entities", "entities", Operation::Extract));
    let mut reply = task("reply", "writer", Operation::Generate);
    reply.spec.depends_on = vec!["intent".to_owned(), "entities".to_owned()];
    reply.spec.prompt =
        Some("about {{ tasks.intent.label }} for order {{ tasks.entities.ORDER }}".to_owned());
    reply.spec.output = Some(OutputSpec {
        config_map: Some("replies".to_owned()),
        webhook: Some(Webhook {
            url: format!("http://{addr}/hook"),
            secret_ref: Some("mail-api".to_owned()),
        }),
    });
    h.store.insert(reply);
    let mut send = task("send", "unused", Operation::Http);
    send.spec.model = None;
    send.spec.depends_on = vec!["reply".to_owned()];
    send.spec.http = Some(HttpCall {
        url: format!("http://{addr}/send"),
        body: Some(r#"{"text": {{ tasks.reply.text | json }}}"#.to_owned()),
        ..HttpCall::default()
    });
    h.store.insert(send);
    h.settle().await;

    for name in ["intent", "entities", "reply", "send"] {
        assert_eq!(
            h.status(name).phase,
            TaskPhase::Succeeded,
            "{name}: {:?}",
            h.phases()
        );
        assert_eq!(h.status(name).attempts, 1);
    }
    let reply = h.status("reply");
    assert_eq!(
        reply.result.as_ref().unwrap()["text"],
        "Dear customer, re: about billing for order A-1234"
    );
    assert!(
        seen.prompts
            .lock()
            .unwrap()
            .contains(&"about billing for order A-1234".to_owned())
    );

    // The reply started only after both dependencies finished.
    let intent_done = h.status("intent").completion_time.unwrap().0;
    assert!(reply.start_time.unwrap().0 >= intent_done);

    // Output: the ConfigMap has the result, the webhook got it with the task's stable key and token.
    let cm = h.store.config_map("ns", "replies").unwrap();
    assert!(cm["reply"].contains("A-1234"));
    let hooks = seen.hooks.lock().unwrap().clone();
    let (key, auth, payload) = hooks.iter().find(|(_, _, p)| p["task"] == "reply").unwrap();
    assert_eq!(key.as_deref(), h.get("reply").metadata.uid.as_deref());
    assert_eq!(auth.as_deref(), Some("Bearer s3cret"));
    assert_eq!(payload["result"]["text"], reply.result.as_ref().unwrap()["text"]);
    let delivered = reply
        .conditions
        .iter()
        .any(|c| c.type_ == "OutputDelivered" && c.status == "True");
    assert!(delivered, "{:?}", reply.conditions);

    // The http task posted valid JSON built from the reply.
    let (_, _, sent) = hooks.iter().find(|(_, _, p)| p.get("text").is_some()).unwrap();
    assert_eq!(sent["text"], reply.result.as_ref().unwrap()["text"]);

    let metrics = h.metrics.encode().unwrap();
    assert!(
        metrics.contains("atomic_task_transitions_total{from=\"Running\",to=\"Succeeded\"} 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let (addr, seen) = fake_worker().await;
    let mut h = harness(&[("flaky", addr.to_string())]);
    h.store.insert(task("t", "flaky", Operation::Classify));
    h.settle().await;
    let s = h.status("t");
    assert_eq!(s.phase, TaskPhase::Succeeded, "{:?}", s.message);
    assert_eq!(s.attempts, 3, "two 503s, then success");
    assert_eq!(seen.flaky_calls.load(Ordering::SeqCst), 3);
    assert!(
        h.metrics
            .encode()
            .unwrap()
            .contains("atomic_dispatch_errors_total{reason=\"ServerError\"} 2")
    );
}

#[tokio::test]
async fn a_slow_worker_times_out() {
    let (addr, _) = fake_worker().await;
    let mut h = harness(&[("slow", addr.to_string())]);
    let mut t = task("t", "slow", Operation::Classify);
    t.spec.retries = Some(RetryPolicy {
        limit: 1,
        backoff_seconds: 0,
        max_backoff_seconds: 0,
    });
    h.store.insert(t);
    h.settle().await;
    let s = h.status("t");
    assert_eq!(s.phase, TaskPhase::TimedOut, "{:?}", s.message);
    assert_eq!(s.attempts, 2);
}

#[tokio::test]
async fn an_unreachable_worker_fails_after_the_retry_limit_and_blocks_nothing_forever() {
    // Bind and drop a listener: the port is closed.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut h = harness(&[("gone", closed.to_string())]);
    let mut t = task("t", "gone", Operation::Classify);
    t.spec.retries = Some(RetryPolicy {
        limit: 2,
        backoff_seconds: 0,
        max_backoff_seconds: 0,
    });
    h.store.insert(t);
    let mut child = task("child", "gone", Operation::Classify);
    child.spec.depends_on = vec!["t".to_owned()];
    h.store.insert(child);
    h.settle().await;
    let s = h.status("t");
    assert_eq!(s.phase, TaskPhase::Failed);
    assert_eq!(s.attempts, 3);
    assert_eq!(s.reason.as_deref(), Some("Unreachable"), "{:?}", s.message);
    let c = h.status("child");
    assert_eq!(c.phase, TaskPhase::Failed);
    assert_eq!(c.reason.as_deref(), Some("DependencyFailed"));
    assert_eq!(c.attempts, 0, "a task never runs before its dependencies succeed");
}

#[tokio::test]
async fn a_rejected_request_is_not_retried() {
    let (addr, seen) = fake_worker().await;
    let mut h = harness(&[("picky", addr.to_string())]);
    h.store.insert(task("t", "picky", Operation::Classify));
    h.settle().await;
    let s = h.status("t");
    assert_eq!(s.phase, TaskPhase::Failed);
    assert_eq!(s.attempts, 1);
    assert!(s.message.unwrap_or_default().contains("input too long"));
    assert_eq!(seen.prompts.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn large_results_go_to_a_config_map_that_dependents_can_read() {
    let (addr, _) = fake_worker().await;
    let mut h = harness(&[("big", addr.to_string()), ("intent", addr.to_string())]);
    h.store.insert(task("big", "big", Operation::Generate));
    let mut next = task("next", "intent", Operation::Classify);
    next.spec.depends_on = vec!["big".to_owned()];
    next.spec.prompt = Some("{{ tasks.big.finishReason }}".to_owned());
    h.store.insert(next);
    h.settle().await;
    let s = h.status("big");
    assert_eq!(s.phase, TaskPhase::Succeeded);
    assert!(s.result.is_none());
    let at = s.result_ref.unwrap();
    let cm = h.store.config_map("ns", &at.name).unwrap();
    let stored: Value = serde_json::from_str(&cm[&at.key]).unwrap();
    assert_eq!(stored["text"].as_str().unwrap().len(), 40_000);
    assert_eq!(h.status("next").phase, TaskPhase::Succeeded, "{:?}", h.phases());
}

#[tokio::test]
async fn cycles_and_bad_templates_fail_with_a_reason() {
    let (addr, _) = fake_worker().await;
    let mut h = harness(&[("intent", addr.to_string())]);
    let mut a = task("a", "intent", Operation::Classify);
    a.spec.depends_on = vec!["b".to_owned()];
    let mut b = task("b", "intent", Operation::Classify);
    b.spec.depends_on = vec!["a".to_owned()];
    let mut typo = task("typo", "intent", Operation::Classify);
    typo.spec.prompt = Some("{{ tasks.nowhere.label }}".to_owned());
    h.store.insert(a);
    h.store.insert(b);
    h.store.insert(typo);
    h.settle().await;
    for name in ["a", "b"] {
        let s = h.status(name);
        assert_eq!(
            s.reason.as_deref(),
            Some("DependencyCycle"),
            "{name}: {:?}",
            s.message
        );
        assert!(s.message.unwrap().contains("a -> b") || h.status(name).message.unwrap().contains("b -> a"));
    }
    let s = h.status("typo");
    assert_eq!(s.phase, TaskPhase::Failed);
    assert!(s.message.unwrap().contains("nowhere"));
}

#[tokio::test]
async fn cancelling_a_running_task_abandons_it() {
    let (addr, _) = fake_worker().await;
    let mut h = harness(&[("slow", addr.to_string())]);
    let mut t = task("t", "slow", Operation::Classify);
    t.spec.timeout_seconds = Some(30);
    let key = h.store.insert(t);
    let store = Arc::clone(&h.store);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.cancel(&key);
    });
    h.settle().await;
    let s = h.status("t");
    assert_eq!(s.phase, TaskPhase::Cancelled);
    assert!(
        s.result.is_none(),
        "the late answer must not complete a cancelled task"
    );
}

#[tokio::test]
async fn tasks_found_running_after_an_operator_restart_run_again_exactly_once() {
    let (addr, seen) = fake_worker().await;
    let mut h = harness(&[("intent", addr.to_string())]);
    // The status a previous operator process left behind when it died mid-attempt.
    let mut t = task("t", "intent", Operation::Classify);
    t.status = Some(atomic_operator::api::AtomicTaskStatus {
        phase: TaskPhase::Running,
        attempts: 1,
        worker: Some("10.0.0.9:8080".to_owned()),
        start_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        )),
        attempt_start_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        )),
        ..Default::default()
    });
    let key = h.store.insert(t);
    h.settle().await;
    let s = h.status("t");
    assert_eq!(s.phase, TaskPhase::Succeeded, "{:?}", s.message);
    assert_eq!(s.attempts, 2, "the lost attempt is redone as attempt 2");
    assert_eq!(seen.prompts.lock().unwrap().len(), 1);

    // A late answer from the lost attempt changes nothing: no task completes twice.
    let late = atomic_operator::engine::state::Event::AttemptSucceeded {
        attempt: 1,
        result: json!({"label": "stale"}),
    };
    let applied = h.driver.apply(&key, late).await.unwrap();
    assert!(!applied.accepted);
    assert_eq!(h.status("t").result, s.result);
    assert_eq!(h.status("t").completion_time, s.completion_time);
}

#[tokio::test]
async fn a_failed_webhook_delivery_is_retried_after_a_pause_not_in_a_loop() {
    let (addr, seen) = fake_worker().await;
    let mut h = harness(&[("intent", addr.to_string())]);
    let mut t = task("t", "intent", Operation::Classify);
    t.spec.output = Some(OutputSpec {
        config_map: None,
        webhook: Some(Webhook {
            url: format!("http://{addr}/flaky-hook"),
            secret_ref: None,
        }),
    });
    let key = h.store.insert(t);
    h.settle().await;
    let failed = h.status("t");
    let condition = |s: &atomic_operator::api::AtomicTaskStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "OutputDelivered")
            .cloned()
            .unwrap()
    };
    assert_eq!(condition(&failed).status, "False");
    assert!(
        condition(&failed).message.contains("500"),
        "{:?}",
        condition(&failed)
    );
    assert_eq!(seen.flaky_hook_calls.load(Ordering::SeqCst), 1);

    // Observed again at once: no new try, and a requeue for when the pause ends.
    let applied = h
        .driver
        .apply(&key, atomic_operator::engine::state::Event::Observe)
        .await
        .unwrap();
    assert_eq!(seen.flaky_hook_calls.load(Ordering::SeqCst), 1);
    let wait = applied.requeue_after.expect("a retry is scheduled");
    assert!(wait <= Duration::from_millis(300));

    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    h.driver
        .apply(&key, atomic_operator::engine::state::Event::Observe)
        .await
        .unwrap();
    assert_eq!(seen.flaky_hook_calls.load(Ordering::SeqCst), 2);
    assert_eq!(condition(&h.status("t")).status, "True");
}

#[tokio::test]
async fn finished_tasks_are_deleted_after_their_ttl() {
    let (addr, _) = fake_worker().await;
    let h = harness(&[("intent", addr.to_string())]);
    let mut short = task("short", "intent", Operation::Classify);
    short.spec.ttl_seconds_after_finished = Some(0);
    let mut kept = task("kept", "intent", Operation::Classify);
    kept.spec.ttl_seconds_after_finished = None;
    h.store.insert(short);
    h.store.insert(kept);
    let mut wakeups = h.wakeups.unwrap();
    // Drive observations until the TTL task is gone (or give up after a few seconds).
    for _ in 0..200 {
        if h.store.tasks().len() == 1 {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(50), wakeups.recv()).await {
            Ok(Some(key)) => {
                let applied = h
                    .driver
                    .apply(&key, atomic_operator::engine::state::Event::Observe)
                    .await
                    .unwrap();
                if let Some(after) = applied.requeue_after {
                    tokio::time::sleep(after.min(Duration::from_millis(50))).await;
                    atomic_operator::driver::TaskStore::wake(&*h.store, key);
                }
            }
            _ => continue,
        }
    }
    let names: Vec<_> = h
        .store
        .tasks()
        .into_iter()
        .filter_map(|t| t.metadata.name)
        .collect();
    assert_eq!(names, ["kept"]);
}
