//! The HTTP server end to end: each test starts a server in-process on 127.0.0.1:0 with a tiny
//! fixture model (or the real all-MiniLM-L6-v2 when fetched) and talks to it over HTTP.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use atomic_worker::Encoding;
use atomic_worker::server::scheduler::{Encoder, Output, Work};
use atomic_worker::server::{self, AppState, Engine, Limits, Metrics};
use futures::future::join_all;
use serde_json::{Value, json};

mod common;
use common::{fixture, max_abs_diff, minilm};

struct Server {
    base: String,
    state: AppState,
    http: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Options {
    limits: Limits,
    labels: Vec<String>,
    max_batch_tokens: usize,
    slow: Option<Duration>,
    /// The encoder's device fails on every batch.
    broken_device: bool,
    load: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            labels: vec![],
            max_batch_tokens: 16384,
            slow: None,
            broken_device: false,
            load: true,
        }
    }
}

/// Sleeps before each batch, so that requests pile up.
struct Slow(Box<dyn Encoder>, Duration);

impl Encoder for Slow {
    fn run(&self, work: Work, encodings: &[Encoding]) -> atomic_worker::Result<Vec<Output>> {
        std::thread::sleep(self.1);
        self.0.run(work, encodings)
    }
}

/// A device that fails the way a GPU does after a kernel fault.
struct BrokenDevice;

impl Encoder for BrokenDevice {
    fn run(&self, _: Work, _: &[Encoding]) -> atomic_worker::Result<Vec<Output>> {
        Err(atomic_worker::Error::Backend(
            atomic_worker::backend::BackendError::Device(
                "launching softmax_rows_f32: an illegal memory access was encountered".to_owned(),
            ),
        ))
    }
}

impl Server {
    async fn start(folder: &Path, options: Options) -> Server {
        let metrics = Arc::new(Metrics::new().unwrap());
        let state = AppState::new("tiny", options.limits, metrics.clone());
        if options.load {
            let mut parts = server::load_encoder(folder, 2).unwrap();
            if let Some(delay) = options.slow {
                parts.encoder = Box::new(Slow(parts.encoder, delay));
            }
            if options.broken_device {
                parts.encoder = Box::new(BrokenDevice);
            }
            state
                .set_engine(Engine::start(parts, options.labels, options.max_batch_tokens, metrics).unwrap());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = server::router(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Server {
            base: format!("http://{addr}"),
            state,
            http: reqwest::Client::new(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_raw(path, body.to_string()).await
    }

    async fn post_raw(&self, path: &str, body: String) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

fn vector(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Checks an OpenAI error body and its code.
fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].is_string(), "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
}

const TEXTS: [&str; 4] = [
    "My kettle stopped working after two days.",
    "I was billed twice for order A-1234!",
    "产品质量很差",
    "",
];

#[tokio::test]
async fn embeddings_accept_a_string_or_a_list_and_batched_equals_alone() {
    let s = Server::start(&fixture("tiny-bert"), Options::default()).await;
    let (status, one) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": TEXTS[0]}))
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["object"], "list");
    assert_eq!(one["model"], "tiny");
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    assert!(one["usage"]["prompt_tokens"].as_u64().unwrap() > 2);

    let (status, many) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": TEXTS}))
        .await;
    assert_eq!(status, 200, "{many}");
    let data = many["data"].as_array().unwrap();
    assert_eq!(data.len(), TEXTS.len());

    // Each text alone, sent concurrently so that the scheduler batches them with each other.
    let alone = join_all(
        TEXTS
            .iter()
            .map(|t| s.post("/v1/embeddings", json!({"model": "tiny", "input": t}))),
    )
    .await;
    for (i, (status, body)) in alone.iter().enumerate() {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(data[i]["index"], i);
        let diff = max_abs_diff(
            &vector(&body["data"][0]["embedding"]),
            &vector(&data[i]["embedding"]),
        );
        assert!(diff < 1e-5, "text {i}: batched and alone differ by {diff}");
    }
    assert_eq!(
        vector(&one["data"][0]["embedding"]),
        vector(&data[0]["embedding"])
    );
    s.stop().await;
}

#[tokio::test]
async fn sequence_head_classifies_with_its_labels_or_a_subset() {
    let s = Server::start(&fixture("tiny-bert-seqcls"), Options::default()).await;
    let (status, body) = s
        .post("/v1/classify", json!({"model": "tiny", "input": TEXTS[1]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let scores = body["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 3);
    let total: f64 = scores.iter().map(|s| s["score"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-6);
    assert_eq!(body["label"], scores[0]["label"]);
    let labels: Vec<&str> = scores.iter().map(|s| s["label"].as_str().unwrap()).collect();
    for l in ["product-quality", "service-attitude", "billing"] {
        assert!(labels.contains(&l), "{labels:?}");
    }

    let (status, body) = s
        .post(
            "/v1/classify",
            json!({"model": "tiny", "input": TEXTS[1], "labels": ["billing", "product-quality"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scores"].as_array().unwrap().len(), 2);

    let (status, body) = s
        .post(
            "/v1/classify",
            json!({"model": "tiny", "input": "x", "labels": ["weather"]}),
        )
        .await;
    assert_error(status, &body, 400, "unknown_label");
    let (status, body) = s
        .post("/v1/extract", json!({"model": "tiny", "input": "x"}))
        .await;
    assert_error(status, &body, 400, "wrong_task");
    s.stop().await;
}

#[tokio::test]
async fn zero_shot_classifies_by_similarity_with_request_or_default_labels() {
    let s = Server::start(
        &fixture("tiny-bert"),
        Options {
            labels: vec!["billing".into(), "delivery".into()],
            ..Options::default()
        },
    )
    .await;
    // The input equal to a label is closest to that label.
    for label in ["refund my money", "the parcel is late", "great product"] {
        let (status, body) = s
            .post(
                "/v1/classify",
                json!({"model": "tiny", "input": label,
                       "labels": ["refund my money", "the parcel is late", "great product"]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["label"], label, "{body}");
        assert_eq!(body["scores"].as_array().unwrap().len(), 3);
    }
    let (status, body) = s
        .post("/v1/classify", json!({"model": "tiny", "input": "billing"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["label"], "billing");
    let (status, body) = s
        .post(
            "/v1/classify",
            json!({"model": "tiny", "input": "x", "labels": ["a", "a"]}),
        )
        .await;
    assert_error(status, &body, 400, "duplicate_label");
    s.stop().await;

    let s = Server::start(&fixture("tiny-bert"), Options::default()).await;
    let (status, body) = s
        .post("/v1/classify", json!({"model": "tiny", "input": "x"}))
        .await;
    assert_error(status, &body, 400, "missing_labels");
    s.stop().await;
}

#[tokio::test]
async fn extract_gives_entities_with_byte_offsets() {
    let s = Server::start(&fixture("tiny-bert-tokcls"), Options::default()).await;
    for text in TEXTS {
        let (status, body) = s
            .post("/v1/extract", json!({"model": "tiny", "input": text}))
            .await;
        assert_eq!(status, 200, "{body}");
        for e in body["entities"].as_array().unwrap() {
            let (start, end) = (
                e["start"].as_u64().unwrap() as usize,
                e["end"].as_u64().unwrap() as usize,
            );
            assert_eq!(e["text"], text[start..end], "{e}");
            assert!(["ORDER", "PRODUCT"].contains(&e["type"].as_str().unwrap()), "{e}");
            let score = e["score"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&score), "{e}");
        }
    }
    let (status, body) = s
        .post("/v1/classify", json!({"model": "tiny", "input": "x"}))
        .await;
    assert_error(status, &body, 400, "wrong_task");
    s.stop().await;
}

#[tokio::test]
async fn tokenize_models_and_generation_routes() {
    let s = Server::start(&fixture("tiny-bert"), Options::default()).await;
    let (status, body) = s
        .post("/v1/tokenize", json!({"model": "tiny", "input": "hello world"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let tokens = body["data"][0]["tokens"].as_array().unwrap();
    assert!(tokens.len() >= 3, "{body}");
    assert_eq!(tokens[0]["special"], true);
    assert_eq!(tokens.last().unwrap()["special"], true);
    assert_eq!(tokens[1]["start"], 0);
    assert!(tokens[1]["text"].is_string());

    let (status, text) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    let (status, body) = s
        .post("/v1/completions", json!({"model": "tiny", "prompt": "Hi"}))
        .await;
    assert_error(status, &body, 400, "model_not_generative");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model `tiny` does not generate text")
    );
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_error(status, &body, 400, "model_not_generative");
    s.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let s = Server::start(
        &fixture("tiny-bert"),
        Options {
            limits: Limits {
                max_inputs: 4,
                max_input_chars: 50,
                ..Limits::default()
            },
            ..Options::default()
        },
    )
    .await;
    let (status, body) = s
        .post_raw("/v1/embeddings", "{\"model\": \"tiny\", \"input\": ".to_owned())
        .await;
    assert_error(status, &body, 400, "malformed_json");
    let (status, body) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": []}))
        .await;
    assert_error(status, &body, 400, "empty_input");
    let (status, body) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": vec!["a"; 5]}))
        .await;
    assert_error(status, &body, 413, "input_too_large");
    let (status, body) = s
        .post(
            "/v1/embeddings",
            json!({"model": "tiny", "input": "x".repeat(51)}),
        )
        .await;
    assert_error(status, &body, 413, "input_too_large");
    let (status, body) = s
        .post(
            "/v1/embeddings",
            json!({"model": "tiny", "input": "a", "dimensions": 3}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_request");
    let (status, body) = s
        .post(
            "/v1/embeddings",
            json!({"model": "tiny", "input": "a", "encoding_format": "base64"}),
        )
        .await;
    assert_error(status, &body, 400, "unsupported_encoding_format");
    let (status, body) = s
        .post(
            "/v1/embeddings",
            json!({"model": "tiny", "input": "a", "encoding_format": "float", "user": "u"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.post("/v1/embeddings", json!({"model": "tiny"})).await;
    assert_error(status, &body, 422, "invalid_request");
    let (status, body) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": 5}))
        .await;
    assert_error(status, &body, 422, "invalid_request");
    let (status, body) = s.post("/v1/embeddings", json!(["not", "an", "object"])).await;
    assert_error(status, &body, 422, "invalid_request");
    let (status, body) = s
        .post(
            "/v1/classify",
            json!({"model": "tiny", "input": "a", "label": ["x"]}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_request");
    let (status, body) = s
        .post("/v1/extract", json!({"model": "other", "input": "a"}))
        .await;
    assert_error(status, &body, 404, "model_not_found");
    let (status, body) = s
        .post(
            "/v1/classify",
            json!({"model": "tiny", "input": "a", "labels": vec!["x"; 5]}),
        )
        .await;
    assert_error(status, &body, 400, "duplicate_label");
    s.stop().await;
}

#[tokio::test]
async fn overload_is_answered_429() {
    let s = Server::start(
        &fixture("tiny-bert"),
        Options {
            limits: Limits {
                max_concurrent_requests: 2,
                ..Limits::default()
            },
            slow: Some(Duration::from_millis(500)),
            ..Options::default()
        },
    )
    .await;
    let results = join_all((0..8).map(|i| {
        s.post(
            "/v1/embeddings",
            json!({"model": "tiny", "input": format!("text {i}")}),
        )
    }))
    .await;
    let ok = results.iter().filter(|(status, _)| *status == 200).count();
    let overloaded: Vec<_> = results.iter().filter(|(status, _)| *status == 429).collect();
    assert!((1..=2).contains(&ok), "{results:?}");
    assert_eq!(ok + overloaded.len(), 8, "{results:?}");
    for (status, body) in overloaded {
        assert_error(*status, body, 429, "overloaded");
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }
    // Capacity comes back once the slow requests are done.
    let (status, body) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": "again"}))
        .await;
    assert_eq!(status, 200, "{body}");
    s.stop().await;
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let s = Server::start(
        &fixture("tiny-bert"),
        Options {
            load: false,
            ..Options::default()
        },
    )
    .await;
    assert_eq!(s.get("/health").await.0, 200);
    let (status, body) = s.get("/ready").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": "a"}))
        .await;
    assert_error(status, &body, 503, "unavailable");

    let metrics = Arc::new(Metrics::new().unwrap());
    let parts = server::load_encoder(&fixture("tiny-bert"), 1).unwrap();
    s.state
        .set_engine(Engine::start(parts, vec![], 16384, metrics).unwrap());
    assert_eq!(s.get("/ready").await.0, 200);
    let (status, _) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": ["a", "b"]}))
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": []}))
        .await;
    assert_eq!(status, 400);
    let (status, text) = s.get("/metrics").await;
    assert_eq!(status, 200);
    for want in [
        "atomic_worker_queue_size",
        "atomic_worker_requests_in_flight",
        "atomic_worker_requests_total{endpoint=\"embeddings\"} 3",
        "atomic_worker_request_failures_total{endpoint=\"embeddings\",reason=\"empty_input\"} 1",
        "atomic_worker_request_failures_total{endpoint=\"embeddings\",reason=\"unavailable\"} 1",
        "atomic_worker_stage_duration_seconds_count{stage=\"tokenize\"}",
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }

    s.state.start_draining();
    assert_eq!(s.get("/ready").await.0, 503);
    s.stop().await;
}

#[tokio::test]
async fn metrics_count_batches() {
    let s = Server::start(&fixture("tiny-bert"), Options::default()).await;
    let (status, _) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": ["a b", "c"]}))
        .await;
    assert_eq!(status, 200);
    let (_, text) = s.get("/metrics").await;
    for want in [
        "atomic_worker_batch_size_count 1",
        "atomic_worker_batch_size_sum 2",
        "atomic_worker_batch_tokens_count 1",
        "atomic_worker_stage_duration_seconds_count{stage=\"forward\"} 1",
        "atomic_worker_stage_duration_seconds_count{stage=\"queue\"} 1",
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }
    s.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let s = Server::start(
        &fixture("tiny-bert"),
        Options {
            slow: Some(Duration::from_millis(300)),
            ..Options::default()
        },
    )
    .await;
    let http = s.http.clone();
    let url = format!("{}/v1/embeddings", s.base);
    let request = tokio::spawn(async move {
        http.post(url)
            .json(&json!({"model": "tiny", "input": "in flight"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.stop().await;
    assert_eq!(request.await.unwrap().unwrap(), 200);
}

#[tokio::test]
async fn minilm_embeddings_match_sentence_transformers() {
    let Some(path) = minilm("minilm_embeddings_match_sentence_transformers") else {
        return;
    };
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm-reference.json")).unwrap()).unwrap();
    let sentences = reference["sentences"].clone();
    let s = Server::start(&path, Options::default()).await;
    let (status, body) = s
        .post("/v1/embeddings", json!({"model": "tiny", "input": sentences}))
        .await;
    assert_eq!(status, 200, "{body}");
    for (i, want) in reference["embeddings"].as_array().unwrap().iter().enumerate() {
        let got = vector(&body["data"][i]["embedding"]);
        let diff = max_abs_diff(&got, &vector(want));
        assert!(diff < 1e-4, "sentence {i}: max |diff| {diff}");
    }
    // Zero-shot with a real embedding model picks the sensible label.
    let (status, body) = s
        .post(
            "/v1/classify",
            json!({"model": "tiny", "input": "I was charged twice on my credit card",
                   "labels": ["billing problem", "weather forecast", "football results"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["label"], "billing problem", "{body}");
    s.stop().await;
}

#[tokio::test]
async fn a_failed_device_takes_the_worker_out_of_service() {
    let options = Options {
        broken_device: true,
        ..Options::default()
    };
    let s = Server::start(&fixture("tiny-bert"), options).await;
    assert_eq!(s.get("/ready").await.0, 200);
    assert_eq!(s.get("/health").await.0, 200);
    let body = json!({"model": "tiny", "input": "my kettle broke"});
    let (status, got) = s.post("/v1/embeddings", body.clone()).await;
    assert_eq!(status, 500, "{got}");
    assert!(
        got["error"]["message"]
            .as_str()
            .unwrap()
            .contains("illegal memory access")
    );
    // From now on: not ready, not live (so Kubernetes restarts it), and new work is refused
    // at once with the reason.
    for path in ["/ready", "/health"] {
        let (status, text) = s.get(path).await;
        assert_eq!(status, 503, "{path}: {text}");
        assert!(
            text.contains("compute device failed") && text.contains("illegal memory access"),
            "{text}"
        );
    }
    let (status, got) = s.post("/v1/embeddings", body).await;
    assert_eq!(status, 503, "{got}");
    assert!(got["error"]["message"].as_str().unwrap().contains("must restart"));
    s.stop().await;
}
