//! The operator's outbound HTTP: model requests to worker pods, `operation: http` calls and
//! result webhooks.
//!
//! Every failure is classified into an engine [`FailureReason`] here, at the edge, so the retry
//! logic in the engine never sees an HTTP status or a reqwest error. Worker answers are
//! normalised into the task result JSON that prompt templates read (`{{ tasks.NAME.FIELD }}`), so
//! the templates do not depend on the wire format of the worker API.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::Error;
use crate::api::task::{GenerationParameters, HttpCall, HttpMethod, Operation};
use crate::engine::FailureReason;
use atomic_protocol::{
    CLASSIFY_PATH, COMPLETIONS_PATH, ClassifyRequest, ClassifyResponse, CompletionRequest,
    CompletionResponse, EMBEDDINGS_PATH, EXTRACT_PATH, EmbeddingInput, EmbeddingRequest, EmbeddingResponse,
    ErrorResponse, ExtractRequest, ExtractResponse, SamplingOptions,
};

/// Name of the header that lets receivers deduplicate redelivered requests.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// Longest piece of a non-JSON error body quoted in a failure message; status messages end up in
/// the task status, which must stay small.
const MAX_QUOTED_BODY: usize = 256;

/// One model request of a task, ready to send to a worker.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ModelRequest {
    /// Model name, as the worker knows it.
    pub model: String,
    /// What to do; `Http` is not a model operation and is refused.
    pub operation: Operation,
    /// The rendered prompt.
    pub prompt: String,
    /// Candidate labels for `classify`; empty means the model's own.
    pub labels: Vec<String>,
    /// Sampling parameters for `generate`.
    pub parameters: Option<GenerationParameters>,
}

/// Why one attempt failed: the engine's classification plus a precise message for the status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AttemptError {
    /// Classification that drives retries.
    pub reason: FailureReason,
    /// Human-readable explanation, e.g. `worker 10.0.0.5:8080 answered 503: model loading`.
    pub message: String,
}

impl AttemptError {
    fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        AttemptError {
            reason,
            message: message.into(),
        }
    }
}

/// Largest response body read from a worker or endpoint (a 32k-token generation is far below).
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// HTTP client for workers, `http` tasks and webhooks. Cheap to clone: clones share one
/// connection pool.
#[derive(Clone, Debug)]
pub struct WorkerClient {
    http: reqwest::Client,
}

impl WorkerClient {
    /// A client that gives up connecting after `connect_timeout`. The overall limit is set per
    /// call, because it is the task's `timeoutSeconds`.
    pub fn new(connect_timeout: Duration) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()?;
        Ok(WorkerClient { http })
    }

    /// Sends `req` to the worker at `endpoint` (`host:port`) and returns the normalised task
    /// result.
    pub async fn run_task(
        &self,
        endpoint: &str,
        req: &ModelRequest,
        timeout: Duration,
    ) -> Result<Value, AttemptError> {
        let peer = format!("worker {endpoint}");
        let url = |path: &str| format!("http://{endpoint}{path}");
        match req.operation {
            Operation::Embed => {
                let body = EmbeddingRequest {
                    model: req.model.clone(),
                    input: EmbeddingInput::One(req.prompt.clone()),
                };
                let builder = self.http.post(url(EMBEDDINGS_PATH)).json(&body);
                let resp: EmbeddingResponse = self.exchange(&peer, builder, timeout).await?;
                normalise_embedding(&peer, resp)
            }
            Operation::Classify => {
                let body = ClassifyRequest {
                    model: req.model.clone(),
                    input: req.prompt.clone(),
                    labels: req.labels.clone(),
                };
                let builder = self.http.post(url(CLASSIFY_PATH)).json(&body);
                let resp: ClassifyResponse = self.exchange(&peer, builder, timeout).await?;
                Ok(normalise_classification(resp))
            }
            Operation::Extract => {
                let body = ExtractRequest {
                    model: req.model.clone(),
                    input: req.prompt.clone(),
                };
                let builder = self.http.post(url(EXTRACT_PATH)).json(&body);
                let resp: ExtractResponse = self.exchange(&peer, builder, timeout).await?;
                Ok(normalise_extraction(resp))
            }
            Operation::Generate => {
                let params = req.parameters.clone().unwrap_or_default();
                let body = CompletionRequest {
                    model: req.model.clone(),
                    prompt: req.prompt.clone(),
                    sampling: SamplingOptions {
                        max_tokens: params.max_tokens,
                        temperature: params.temperature,
                        top_p: params.top_p,
                        top_k: params.top_k,
                        seed: params.seed,
                        stop: params.stop,
                        n: None,
                    },
                    ..CompletionRequest::default()
                };
                let builder = self.http.post(url(COMPLETIONS_PATH)).json(&body);
                let resp: CompletionResponse = self.exchange(&peer, builder, timeout).await?;
                normalise_completion(&peer, resp)
            }
            Operation::Http => Err(AttemptError::new(
                FailureReason::Rejected,
                "operation http is not a model operation and is not sent to a worker",
            )),
        }
    }

    /// Makes the request of an `operation: http` task. `body` is the rendered body template
    /// (not sent for GET), `bearer` the token from the task's secret. The result is
    /// `{"status": code, "body": JSON or string}`.
    pub async fn call_http(
        &self,
        call: &HttpCall,
        body: Option<&str>,
        bearer: Option<&str>,
        idempotency_key: &str,
        timeout: Duration,
    ) -> Result<Value, AttemptError> {
        let method = match call.method {
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Get => reqwest::Method::GET,
        };
        let peer = format!("{method} {}", without_query(&call.url));
        let mut headers = HeaderMap::new();
        for (name, value) in &call.headers {
            // A bad header in the manifest will be just as bad on the next attempt.
            let name = HeaderName::try_from(name.as_str()).map_err(|e| {
                AttemptError::new(FailureReason::Rejected, format!("header name {name:?}: {e}"))
            })?;
            let value = HeaderValue::try_from(value.as_str()).map_err(|e| {
                AttemptError::new(FailureReason::Rejected, format!("header {name} value: {e}"))
            })?;
            headers.insert(name, value);
        }
        let body = body.filter(|_| call.method != HttpMethod::Get);
        if body.is_some() && !headers.contains_key(CONTENT_TYPE) {
            // Templates usually render JSON; say so unless the manifest chose a content type.
            let content_type = match body.map(serde_json::from_str::<Value>) {
                Some(Ok(_)) => "application/json",
                _ => "text/plain; charset=utf-8",
            };
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        // Inserted after the manifest's headers so they cannot be overridden: the key is what
        // makes retries safe, and the token comes from the secret the task names.
        add_standard_headers(&mut headers, bearer, idempotency_key)?;

        let mut builder = self.http.request(method, &call.url).headers(headers);
        if let Some(body) = body {
            builder = builder.body(body.to_owned());
        }
        let (status, bytes) = self.send(&peer, builder, timeout).await?;
        if !status.is_success() {
            return Err(classify_status(&peer, status, &bytes));
        }
        let body = match serde_json::from_slice::<Value>(&bytes) {
            Ok(json) => json,
            Err(_) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        };
        Ok(json!({ "status": status.as_u16(), "body": body }))
    }

    /// POSTs a task's result to its webhook. `idempotency_key` must be the same for every
    /// delivery of the same result, so the receiver can drop redeliveries.
    pub async fn deliver_webhook(
        &self,
        hook_url: &str,
        bearer: Option<&str>,
        idempotency_key: &str,
        payload: &Value,
        timeout: Duration,
    ) -> Result<(), AttemptError> {
        let peer = format!("webhook {}", without_query(hook_url));
        let mut headers = HeaderMap::new();
        add_standard_headers(&mut headers, bearer, idempotency_key)?;
        let builder = self.http.post(hook_url).headers(headers).json(payload);
        let (status, bytes) = self.send(&peer, builder, timeout).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(classify_status(&peer, status, &bytes))
        }
    }

    /// Sends a request, requires a 2xx and parses the body as `T`.
    async fn exchange<T: DeserializeOwned>(
        &self,
        peer: &str,
        builder: RequestBuilder,
        timeout: Duration,
    ) -> Result<T, AttemptError> {
        let (status, bytes) = self.send(peer, builder, timeout).await?;
        if !status.is_success() {
            return Err(classify_status(peer, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            AttemptError::new(
                FailureReason::BadResponse,
                format!("{peer} answered {} with an unreadable body: {e}", status.as_u16()),
            )
        })
    }

    /// Sends a request and reads the whole body within `timeout`.
    async fn send(
        &self,
        peer: &str,
        builder: RequestBuilder,
        timeout: Duration,
    ) -> Result<(StatusCode, Vec<u8>), AttemptError> {
        // reqwest's per-request timeout covers connecting, the headers and the body.
        let resp = builder
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| transport_error(peer, &e, timeout))?;
        let status = resp.status();
        // Read in chunks with a cap: a runaway endpoint must not exhaust the operator's memory.
        let mut resp = resp;
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| transport_error(peer, &e, timeout))?
        {
            if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(AttemptError::new(
                    FailureReason::BadResponse,
                    format!("{peer} answered more than {MAX_RESPONSE_BYTES} bytes"),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((status, bytes))
    }
}

/// A URL without its query string and user info, for messages: those parts may carry secrets
/// and messages end up in task statuses and events.
fn without_query(url: &str) -> String {
    let base = url.split(['?', '#']).next().unwrap_or(url);
    let Some((scheme, rest)) = base.split_once("://") else {
        return base.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => base.to_owned(),
    }
}

/// Adds the `Idempotency-Key` and, when there is a token, `Authorization` headers.
fn add_standard_headers(
    headers: &mut HeaderMap,
    bearer: Option<&str>,
    idempotency_key: &str,
) -> Result<(), AttemptError> {
    let key = HeaderValue::try_from(idempotency_key)
        .map_err(|e| AttemptError::new(FailureReason::Rejected, format!("idempotency key: {e}")))?;
    headers.insert(IDEMPOTENCY_KEY, key);
    if let Some(token) = bearer {
        let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
            // The error would not say more, and the token itself must not reach the status.
            AttemptError::new(
                FailureReason::Rejected,
                "bearer token is not a valid header value",
            )
        })?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    Ok(())
}

/// Classifies a failure to exchange a request at all.
fn transport_error(peer: &str, e: &reqwest::Error, timeout: Duration) -> AttemptError {
    // A connect error is checked first: a connect timeout means the peer is unreachable, not
    // that the attempt ran past the task's limit.
    if e.is_connect() {
        AttemptError::new(
            FailureReason::Unreachable,
            format!("{peer} is unreachable: {}", error_chain(e)),
        )
    } else if e.is_timeout() {
        AttemptError::new(
            FailureReason::Timeout,
            format!("{peer} did not answer within {}", format_duration(timeout)),
        )
    } else if e.is_builder() {
        // A malformed URL will not get better on retry.
        AttemptError::new(
            FailureReason::Rejected,
            format!("{peer}: invalid request: {}", error_chain(e)),
        )
    } else {
        AttemptError::new(
            FailureReason::Unreachable,
            format!("connection to {peer} broke off: {}", error_chain(e)),
        )
    }
}

/// Classifies a non-2xx answer.
fn classify_status(peer: &str, status: StatusCode, body: &[u8]) -> AttemptError {
    let reason = match status.as_u16() {
        429 => FailureReason::Overloaded,
        // Request timeout and conflict are transient conditions of the server, not of the
        // request, so they are retried like server errors.
        408 | 409 => FailureReason::ServerError,
        400..=499 => FailureReason::Rejected,
        500..=599 => FailureReason::ServerError,
        // Redirects are followed by the client, so a 1xx or 3xx here is a confused server.
        _ => FailureReason::BadResponse,
    };
    AttemptError::new(
        reason,
        format!(
            "{peer} answered {}: {}",
            status.as_u16(),
            error_message(status, body)
        ),
    )
}

/// The most useful explanation in an error body: the OpenAI-style `error.message`, else the
/// (shortened) body text, else the status's canonical reason.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(err) = serde_json::from_slice::<ErrorResponse>(body) {
        return err.error.message;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return status.canonical_reason().unwrap_or("no body").to_owned();
    }
    let mut quoted: String = text.chars().take(MAX_QUOTED_BODY).collect();
    if quoted.len() < text.len() {
        quoted.push('…');
    }
    quoted
}

/// The error and its sources, because reqwest's top-level message ("error sending request")
/// hides the cause (e.g. "Connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// `{"embedding": [...], "dimensions": n}` from the first (only) embedding.
fn normalise_embedding(peer: &str, resp: EmbeddingResponse) -> Result<Value, AttemptError> {
    let Some(first) = resp.data.into_iter().min_by_key(|e| e.index) else {
        return Err(AttemptError::new(
            FailureReason::BadResponse,
            format!("{peer} answered with no embedding"),
        ));
    };
    let dimensions = first.embedding.len();
    // Going through the f32 text form keeps `0.1` as `0.1`; widening f32 to f64 directly would
    // store `0.10000000149011612` in the status.
    let embedding: Vec<Value> = first
        .embedding
        .iter()
        .map(|x| {
            x.to_string()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number)
        })
        .collect();
    Ok(json!({ "embedding": embedding, "dimensions": dimensions }))
}

/// `{"label", "score", "scores": {label: score}}`.
fn normalise_classification(resp: ClassifyResponse) -> Value {
    let scores: Map<String, Value> = resp
        .scores
        .into_iter()
        .map(|s| (s.label, json!(s.score)))
        .collect();
    json!({ "label": resp.label, "score": resp.score, "scores": scores })
}

/// `{"entities": [...], TYPE: first text of that type, ...}`.
fn normalise_extraction(resp: ExtractResponse) -> Value {
    let mut out = Map::new();
    for entity in &resp.entities {
        // `entities` is reserved for the full list, so an entity type of that name is only
        // reachable through it.
        if entity.entity_type != "entities" && !out.contains_key(&entity.entity_type) {
            out.insert(entity.entity_type.clone(), Value::String(entity.text.clone()));
        }
    }
    out.insert("entities".to_owned(), json!(resp.entities));
    Value::Object(out)
}

/// `{"text", "finishReason", "usage": {promptTokens, completionTokens, totalTokens}}`.
fn normalise_completion(peer: &str, resp: CompletionResponse) -> Result<Value, AttemptError> {
    let Some(choice) = resp.choices.into_iter().min_by_key(|c| c.index) else {
        return Err(AttemptError::new(
            FailureReason::BadResponse,
            format!("{peer} answered with no completion choice"),
        ));
    };
    Ok(json!({
        "text": choice.text,
        "finishReason": choice.finish_reason,
        "usage": {
            "promptTokens": resp.usage.prompt_tokens,
            "completionTokens": resp.usage.completion_tokens,
            "totalTokens": resp.usage.total_tokens,
        },
    }))
}

#[cfg(test)]
mod url_tests {
    use super::without_query;

    #[test]
    fn messages_do_not_carry_query_strings_or_credentials() {
        assert_eq!(
            without_query("https://api.x/send?token=abc"),
            "https://api.x/send"
        );
        assert_eq!(
            without_query("https://user:pw@api.x/send#f"),
            "https://api.x/send"
        );
        assert_eq!(without_query("http://api.x/a@b"), "http://api.x/a@b");
        assert_eq!(without_query("http://10.0.0.1:8080"), "http://10.0.0.1:8080");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atomic_protocol::{Entity, LabelScore};

    #[test]
    fn status_classification() {
        let cases = [
            (429, FailureReason::Overloaded),
            (408, FailureReason::ServerError),
            (409, FailureReason::ServerError),
            (400, FailureReason::Rejected),
            (404, FailureReason::Rejected),
            (500, FailureReason::ServerError),
            (503, FailureReason::ServerError),
            (304, FailureReason::BadResponse),
        ];
        for (code, reason) in cases {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(classify_status("worker w", status, b"").reason, reason, "{code}");
        }
    }

    #[test]
    fn error_message_prefers_openai_body_then_text_then_reason() {
        let body = br#"{"error":{"message":"model loading","type":"server_error"}}"#;
        let e = classify_status("worker 10.0.0.5:8080", StatusCode::SERVICE_UNAVAILABLE, body);
        assert_eq!(e.to_string(), "worker 10.0.0.5:8080 answered 503: model loading");
        let e = classify_status("worker w", StatusCode::BAD_GATEWAY, b" upstream down \n");
        assert_eq!(e.message, "worker w answered 502: upstream down");
        let e = classify_status("worker w", StatusCode::BAD_GATEWAY, b"");
        assert_eq!(e.message, "worker w answered 502: Bad Gateway");
        let long = "x".repeat(1000);
        let e = classify_status("worker w", StatusCode::BAD_GATEWAY, long.as_bytes());
        assert!(e.message.len() < 300, "{}", e.message);
    }

    #[test]
    fn embedding_keeps_short_decimals() {
        let resp = EmbeddingResponse {
            object: "list".into(),
            data: vec![atomic_protocol::Embedding {
                object: "embedding".into(),
                index: 0,
                embedding: vec![0.1, -0.25],
            }],
            model: "m".into(),
            usage: Default::default(),
        };
        assert_eq!(
            normalise_embedding("w", resp).unwrap(),
            json!({"embedding": [0.1, -0.25], "dimensions": 2})
        );
    }

    #[test]
    fn extraction_keys_first_entity_per_type() {
        let entity = |t: &str, text: &str| Entity {
            entity_type: t.into(),
            text: text.into(),
            start: 0,
            end: text.len(),
            score: 1.0,
        };
        let resp = ExtractResponse {
            model: "m".into(),
            entities: vec![
                entity("ORDER", "A-1"),
                entity("ORDER", "A-2"),
                entity("entities", "x"),
            ],
        };
        let out = normalise_extraction(resp);
        assert_eq!(out["ORDER"], "A-1");
        assert_eq!(out["entities"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn classification_scores_become_a_map() {
        let resp = ClassifyResponse {
            model: "m".into(),
            label: "a".into(),
            score: 0.75,
            scores: vec![
                LabelScore {
                    label: "a".into(),
                    score: 0.75,
                },
                LabelScore {
                    label: "b".into(),
                    score: 0.25,
                },
            ],
        };
        assert_eq!(
            normalise_classification(resp),
            json!({"label": "a", "score": 0.75, "scores": {"a": 0.75, "b": 0.25}})
        );
    }
}
