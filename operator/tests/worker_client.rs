//! `WorkerClient` against a fake worker on localhost: the normalised results of the four model
//! operations, the classification of every failure mode, and the headers of `http` tasks and
//! webhooks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use atomic_operator::api::task::{GenerationParameters, HttpCall, HttpMethod, Operation};
use atomic_operator::engine::FailureReason;
use atomic_operator::worker_client::{AttemptError, ModelRequest, WorkerClient};
use atomic_protocol::{
    ClassifyResponse, CompletionChoice, CompletionResponse, CompletionUsage, Embedding, EmbeddingResponse,
    EmbeddingUsage, Entity, ErrorDetail, ErrorResponse, ExtractResponse, LabelScore,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_millis(200);

/// A request as the fake server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

struct Fake {
    addr: String,
    log: Log,
}

impl Fake {
    fn last(&self) -> Seen {
        self.log.lock().unwrap().last().cloned().expect("a request")
    }
}

async fn start_fake() -> Fake {
    let log: Log = Arc::default();
    let app = Router::new().fallback(any(handle)).with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Fake { addr, log }
}

fn error_body(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = ErrorResponse {
        error: ErrorDetail {
            message: message.into(),
            error_type: kind.into(),
            code: None,
        },
    };
    (status, axum::Json(body)).into_response()
}

/// Worker endpoints select their behaviour by model name; other paths act as an external API
/// and a webhook receiver.
async fn handle(
    State(log): State<Log>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    log.lock().unwrap().push(Seen {
        method,
        path: path.clone(),
        headers,
        body: body.clone(),
    });
    match path.as_str() {
        "/api/json" => return axum::Json(json!({"ok": true, "id": 7})).into_response(),
        "/api/text" => return (StatusCode::CREATED, "created").into_response(),
        "/api/down" => return (StatusCode::BAD_GATEWAY, "upstream down").into_response(),
        "/hook" => return StatusCode::NO_CONTENT.into_response(),
        "/hook/reject" => {
            return error_body(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad payload",
                "invalid_request_error",
            );
        }
        _ => {}
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    match model.as_str() {
        "loading" => {
            return error_body(StatusCode::SERVICE_UNAVAILABLE, "model loading", "server_error");
        }
        "busy" => {
            return error_body(StatusCode::TOO_MANY_REQUESTS, "queue full", "rate_limit_error");
        }
        "conflict" => return error_body(StatusCode::CONFLICT, "busy", "server_error"),
        "picky" => {
            return error_body(
                StatusCode::BAD_REQUEST,
                "unknown label: maybe",
                "invalid_request_error",
            );
        }
        "garbage" => return "this is not json".into_response(),
        "wrong-shape" => return axum::Json(json!({"unexpected": true})).into_response(),
        "slow" => tokio::time::sleep(Duration::from_secs(2)).await,
        _ => {}
    }
    match path.as_str() {
        "/v1/embeddings" => axum::Json(EmbeddingResponse {
            object: "list".into(),
            data: vec![Embedding {
                object: "embedding".into(),
                index: 0,
                embedding: vec![0.5, -0.25, 0.125],
            }],
            model,
            usage: EmbeddingUsage {
                prompt_tokens: 3,
                total_tokens: 3,
            },
        })
        .into_response(),
        "/v1/completions" => axum::Json(CompletionResponse {
            id: "cmpl-1".into(),
            object: "text_completion".into(),
            created: 1_700_000_000,
            model,
            choices: vec![CompletionChoice {
                index: 0,
                text: "Your kettle ships tomorrow.".into(),
                logprobs: None,
                finish_reason: Some("stop".into()),
            }],
            usage: CompletionUsage {
                prompt_tokens: 5,
                completion_tokens: 6,
                total_tokens: 11,
            },
        })
        .into_response(),
        "/v1/classify" => axum::Json(ClassifyResponse {
            model,
            label: "refund".into(),
            score: 0.75,
            scores: vec![
                LabelScore {
                    label: "refund".into(),
                    score: 0.75,
                },
                LabelScore {
                    label: "shipping".into(),
                    score: 0.25,
                },
            ],
        })
        .into_response(),
        "/v1/extract" => axum::Json(ExtractResponse {
            model,
            entities: vec![
                Entity {
                    entity_type: "ORDER".into(),
                    text: "A-1234".into(),
                    start: 6,
                    end: 12,
                    score: 0.5,
                },
                Entity {
                    entity_type: "PRODUCT".into(),
                    text: "kettle".into(),
                    start: 17,
                    end: 23,
                    score: 0.75,
                },
                Entity {
                    entity_type: "ORDER".into(),
                    text: "B-5".into(),
                    start: 30,
                    end: 33,
                    score: 0.5,
                },
            ],
        })
        .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn client() -> WorkerClient {
    WorkerClient::new(Duration::from_secs(1)).unwrap()
}

fn request(model: &str, operation: Operation) -> ModelRequest {
    ModelRequest {
        model: model.into(),
        operation,
        prompt: "order A-1234 for a kettle".into(),
        labels: vec![],
        parameters: None,
    }
}

async fn run(fake: &Fake, model: &str, operation: Operation) -> Result<Value, AttemptError> {
    client()
        .run_task(&fake.addr, &request(model, operation), TIMEOUT)
        .await
}

#[tokio::test]
async fn embed_is_normalised() {
    let fake = start_fake().await;
    let result = run(&fake, "minilm", Operation::Embed).await.unwrap();
    assert_eq!(result, json!({"embedding": [0.5, -0.25, 0.125], "dimensions": 3}));
    let seen = fake.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path, "/v1/embeddings");
    assert_eq!(
        seen.json(),
        json!({"model": "minilm", "input": "order A-1234 for a kettle"})
    );
}

#[tokio::test]
async fn generate_is_normalised_and_sends_parameters() {
    let fake = start_fake().await;
    let mut req = request("llama", Operation::Generate);
    req.parameters = Some(GenerationParameters {
        max_tokens: Some(64),
        temperature: Some(0.0),
        seed: Some(7),
        stop: vec!["\n".into()],
        ..Default::default()
    });
    let result = client().run_task(&fake.addr, &req, TIMEOUT).await.unwrap();
    assert_eq!(
        result,
        json!({
            "text": "Your kettle ships tomorrow.",
            "finishReason": "stop",
            "usage": {"promptTokens": 5, "completionTokens": 6, "totalTokens": 11},
        })
    );
    let seen = fake.last();
    assert_eq!(seen.path, "/v1/completions");
    assert_eq!(
        seen.json(),
        json!({
            "model": "llama", "prompt": "order A-1234 for a kettle",
            "max_tokens": 64, "temperature": 0.0, "seed": 7, "stop": ["\n"],
        })
    );
}

#[tokio::test]
async fn classify_is_normalised_and_sends_labels() {
    let fake = start_fake().await;
    let mut req = request("bart", Operation::Classify);
    req.labels = vec!["refund".into(), "shipping".into()];
    let result = client().run_task(&fake.addr, &req, TIMEOUT).await.unwrap();
    assert_eq!(
        result,
        json!({"label": "refund", "score": 0.75, "scores": {"refund": 0.75, "shipping": 0.25}})
    );
    let seen = fake.last();
    assert_eq!(seen.path, "/v1/classify");
    assert_eq!(seen.json()["labels"], json!(["refund", "shipping"]));
}

#[tokio::test]
async fn extract_is_normalised_with_first_text_per_type() {
    let fake = start_fake().await;
    let result = run(&fake, "ner", Operation::Extract).await.unwrap();
    assert_eq!(result["ORDER"], "A-1234");
    assert_eq!(result["PRODUCT"], "kettle");
    assert_eq!(result["entities"].as_array().unwrap().len(), 3);
    assert_eq!(
        result["entities"][1],
        json!({"type": "PRODUCT", "text": "kettle", "start": 17, "end": 23, "score": 0.75})
    );
    assert_eq!(fake.last().path, "/v1/extract");
}

#[tokio::test]
async fn server_error_carries_body_message() {
    let fake = start_fake().await;
    let err = run(&fake, "loading", Operation::Embed).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::ServerError);
    assert_eq!(
        err.to_string(),
        format!("worker {} answered 503: model loading", fake.addr)
    );
}

#[tokio::test]
async fn too_many_requests_is_overloaded() {
    let fake = start_fake().await;
    let err = run(&fake, "busy", Operation::Generate).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::Overloaded);
    assert!(err.message.ends_with("answered 429: queue full"), "{err}");
}

#[tokio::test]
async fn conflict_is_retryable() {
    let fake = start_fake().await;
    let err = run(&fake, "conflict", Operation::Generate).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::ServerError);
    assert!(err.reason.is_retryable());
}

#[tokio::test]
async fn bad_request_is_rejected_with_message() {
    let fake = start_fake().await;
    let err = run(&fake, "picky", Operation::Classify).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::Rejected);
    assert!(!err.reason.is_retryable());
    assert_eq!(
        err.message,
        format!("worker {} answered 400: unknown label: maybe", fake.addr)
    );
}

#[tokio::test]
async fn slow_worker_times_out() {
    let fake = start_fake().await;
    let started = std::time::Instant::now();
    let err = run(&fake, "slow", Operation::Extract).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::Timeout);
    assert_eq!(
        err.message,
        format!("worker {} did not answer within 200ms", fake.addr)
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn unparsable_body_is_bad_response() {
    let fake = start_fake().await;
    for model in ["garbage", "wrong-shape"] {
        let err = run(&fake, model, Operation::Generate).await.unwrap_err();
        assert_eq!(err.reason, FailureReason::BadResponse, "{model}");
        assert!(
            err.message.contains("answered 200 with an unreadable body"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let err = client()
        .run_task(&addr, &request("m", Operation::Embed), TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailureReason::Unreachable);
    assert!(
        err.message.starts_with(&format!("worker {addr} is unreachable")),
        "{err}"
    );
}

#[tokio::test]
async fn http_operation_is_not_sent_to_a_worker() {
    let fake = start_fake().await;
    let err = run(&fake, "m", Operation::Http).await.unwrap_err();
    assert_eq!(err.reason, FailureReason::Rejected);
    assert!(fake.log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn http_call_sends_key_token_headers_and_json_body() {
    let fake = start_fake().await;
    let call = HttpCall {
        url: format!("http://{}/api/json", fake.addr),
        method: HttpMethod::Put,
        headers: [
            ("X-Tenant".to_owned(), "acme".to_owned()),
            ("Idempotency-Key".to_owned(), "from-manifest".to_owned()),
        ]
        .into(),
        body: None,
        secret_ref: Some("api-token".into()),
    };
    let result = client()
        .call_http(
            &call,
            Some(r#"{"order":"A-1234"}"#),
            Some("s3cret"),
            "ns/task/1",
            TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(result, json!({"status": 200, "body": {"ok": true, "id": 7}}));
    let seen = fake.last();
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.header("idempotency-key"), Some("ns/task/1"));
    assert_eq!(seen.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(seen.header("x-tenant"), Some("acme"));
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.json(), json!({"order": "A-1234"}));
}

#[tokio::test]
async fn http_call_text_answer_and_get_without_body() {
    let fake = start_fake().await;
    let call = HttpCall {
        url: format!("http://{}/api/text", fake.addr),
        method: HttpMethod::Get,
        ..Default::default()
    };
    let result = client()
        .call_http(&call, Some("ignored"), None, "k", TIMEOUT)
        .await
        .unwrap();
    assert_eq!(result, json!({"status": 201, "body": "created"}));
    let seen = fake.last();
    assert_eq!(seen.method, Method::GET);
    assert!(seen.body.is_empty());
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("idempotency-key"), Some("k"));
}

#[tokio::test]
async fn http_call_failure_is_classified() {
    let fake = start_fake().await;
    let call = HttpCall {
        url: format!("http://{}/api/down", fake.addr),
        ..Default::default()
    };
    let err = client()
        .call_http(&call, None, None, "k", TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailureReason::ServerError);
    assert_eq!(
        err.message,
        format!("POST http://{}/api/down answered 502: upstream down", fake.addr)
    );

    let bad_header = HttpCall {
        headers: [("bad header".to_owned(), "x".to_owned())].into(),
        ..call
    };
    let err = client()
        .call_http(&bad_header, None, None, "k", TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailureReason::Rejected);
}

#[tokio::test]
async fn webhook_delivers_payload_with_stable_key_and_token() {
    let fake = start_fake().await;
    let url = format!("http://{}/hook", fake.addr);
    let payload = json!({"task": "summarise", "result": {"text": "hi"}});
    for _ in 0..2 {
        client()
            .deliver_webhook(&url, Some("hook-token"), "uid-123", &payload, TIMEOUT)
            .await
            .unwrap();
    }
    let log = fake.log.lock().unwrap().clone();
    assert_eq!(log.len(), 2);
    for seen in log {
        assert_eq!(seen.method, Method::POST);
        assert_eq!(seen.header("idempotency-key"), Some("uid-123"));
        assert_eq!(seen.header("authorization"), Some("Bearer hook-token"));
        assert_eq!(seen.header("content-type"), Some("application/json"));
        assert_eq!(seen.json(), payload);
    }

    let err = client()
        .deliver_webhook(&format!("{url}/reject"), None, "uid-123", &payload, TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(err.reason, FailureReason::Rejected);
    assert!(err.message.ends_with("answered 422: bad payload"), "{err}");
}
