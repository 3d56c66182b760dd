//! The HTTP handlers. Each model route parses its body (400 for malformed JSON, 422 for JSON of
//! the wrong shape or with unknown fields), checks the model name and the input limits,
//! tokenizes on the blocking pool, hands the encodings to the scheduler and shapes the answer.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use atomic_protocol::{
    ClassifyRequest, ClassifyResponse, Embedding, EmbeddingInput, EmbeddingRequest, EmbeddingResponse,
    EmbeddingUsage, ExtractRequest, ExtractResponse, ModelCard, ModelList, Token, TokenizeRequest,
    TokenizeResponse, TokenizedText,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::engine::{Capability, Engine, Head};
use super::error::ApiError;
use super::scheduler::{Output, ScheduleError, Work};
use super::{AppState, Limits};
use crate::tasks;
use crate::tokenizer::Encoding;

pub(super) type Body = Result<Bytes, BytesRejection>;

/// Liveness: fails only once the compute device has failed, so that the pod restarts with a
/// fresh device context.
pub(super) async fn health(State(state): State<AppState>) -> Response {
    match state.device_fault() {
        None => (StatusCode::OK, "ok").into_response(),
        Some(fault) => device_failed(&fault).into_response(),
    }
}

fn device_failed(fault: &str) -> ApiError {
    ApiError::unavailable(format!(
        "the compute device failed ({fault}); the worker must restart"
    ))
}

pub(super) async fn ready(State(state): State<AppState>) -> Response {
    if let Some(fault) = state.device_fault() {
        device_failed(&fault).into_response()
    } else if state.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else if state.0.engine.get().is_some() {
        ApiError::unavailable("the worker is shutting down").into_response()
    } else {
        ApiError::unavailable("the model is loading").into_response()
    }
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics().render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => ApiError::internal(format!("cannot render metrics: {e}")).into_response(),
    }
}

pub(super) async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".to_owned(),
        data: vec![ModelCard {
            id: state.0.model_name.clone(),
            object: "model".to_owned(),
            created: state.0.created,
            owned_by: "atomic".to_owned(),
        }],
    })
}

pub(super) async fn embeddings(State(state): State<AppState>, body: Body) -> Response {
    handle(state, "embeddings", body, |state, engine, body| async move {
        let (req, extra): (EmbeddingRequest, _) =
            parse(&body, &["model", "input", "encoding_format", "user"])?;
        if let Some(format) = extra.get("encoding_format")
            && format != "float"
        {
            return Err(ApiError::bad_request(
                "unsupported_encoding_format",
                format!("encoding_format {format} is not supported; use \"float\""),
            ));
        }
        state.check_model(&req.model)?;
        encoder_head(&state, &engine)?;
        let texts = texts_of(req.input);
        state.check_inputs(&texts)?;
        let (_, encodings) = state.encode(&engine, texts).await?;
        let tokens: usize = encodings.iter().map(|e| e.ids.len()).sum();
        let outputs = submit(&engine, Work::Embed, encodings).await?;
        let data = outputs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                Ok(Embedding {
                    object: "embedding".to_owned(),
                    index: i as u32,
                    embedding: vector(o)?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(EmbeddingResponse {
            object: "list".to_owned(),
            data,
            model: state.0.model_name.clone(),
            usage: EmbeddingUsage {
                prompt_tokens: tokens as u32,
                total_tokens: tokens as u32,
            },
        })
    })
    .await
}

pub(super) async fn classify(State(state): State<AppState>, body: Body) -> Response {
    handle(state, "classify", body, |state, engine, body| async move {
        let (req, _): (ClassifyRequest, _) = parse(&body, &["model", "input", "labels"])?;
        state.check_model(&req.model)?;
        state.check_inputs(std::slice::from_ref(&req.input))?;
        let labels = if req.labels.is_empty() {
            engine.default_labels.clone()
        } else {
            req.labels
        };
        if let Some(dup) = labels
            .iter()
            .enumerate()
            .find_map(|(i, l)| labels[..i].contains(l).then_some(l))
        {
            return Err(ApiError::bad_request(
                "duplicate_label",
                format!("label `{dup}` is given twice"),
            ));
        }
        let head = encoder_head(&state, &engine)?;
        let scores = match head {
            Head::Sequence(known) => {
                let (_, encodings) = state.encode(&engine, vec![req.input]).await?;
                let logits = vector(first(submit(&engine, Work::SequenceLogits, encodings).await?)?)?;
                if labels.is_empty() {
                    tasks::label_scores(known, &logits)
                } else {
                    let picked = labels
                        .iter()
                        .map(|l| {
                            known
                                .iter()
                                .position(|k| k == l)
                                .and_then(|i| logits.get(i).copied())
                                .ok_or_else(|| {
                                    ApiError::bad_request(
                                        "unknown_label",
                                        format!(
                                            "`{l}` is not a label of the model's classification head ({})",
                                            known.join(", ")
                                        ),
                                    )
                                })
                        })
                        .collect::<Result<Vec<f32>, _>>()?;
                    tasks::label_scores(&labels, &picked)
                }
            }
            Head::None => {
                if labels.is_empty() {
                    return Err(ApiError::bad_request(
                        "missing_labels",
                        "the model has no classification head: give `labels` to classify by \
                         embedding similarity (zero-shot)",
                    ));
                }
                state.check_inputs(&labels)?;
                zero_shot(&state, &engine, req.input, labels).await?
            }
            Head::Token(_) => {
                return Err(ApiError::bad_request(
                    "wrong_task",
                    "the model is a token classifier: use /v1/extract",
                ));
            }
        };
        let best = scores
            .first()
            .cloned()
            .ok_or_else(|| ApiError::internal("the model has no labels"))?;
        Ok(ClassifyResponse {
            model: state.0.model_name.clone(),
            label: best.label,
            score: best.score,
            scores,
        })
    })
    .await
}

/// Embeds the input, and the labels unless their embeddings are cached, in one request to the
/// scheduler, and scores the labels by similarity.
async fn zero_shot(
    state: &AppState,
    engine: &Engine,
    input: String,
    labels: Vec<String>,
) -> Result<Vec<atomic_protocol::LabelScore>, ApiError> {
    let cached = engine.cached_labels(&labels);
    let mut texts = vec![input];
    if cached.is_none() {
        texts.extend(labels.iter().cloned());
    }
    let (_, encodings) = state.encode(engine, texts).await?;
    let mut vectors = submit(engine, Work::Embed, encodings)
        .await?
        .into_iter()
        .map(vector)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let input = vectors
        .next()
        .ok_or_else(|| ApiError::internal("the model gave no embedding"))?;
    let label_embeddings = match cached {
        Some(e) => e,
        None => {
            let e = Arc::new(vectors.collect::<Vec<_>>());
            engine.cache_labels(labels.clone(), e.clone());
            e
        }
    };
    Ok(tasks::zero_shot(&input, &labels, &label_embeddings))
}

pub(super) async fn extract(State(state): State<AppState>, body: Body) -> Response {
    handle(state, "extract", body, |state, engine, body| async move {
        let (req, _): (ExtractRequest, _) = parse(&body, &["model", "input"])?;
        state.check_model(&req.model)?;
        state.check_inputs(std::slice::from_ref(&req.input))?;
        let head = encoder_head(&state, &engine)?;
        let Head::Token(id2label) = head else {
            return Err(ApiError::bad_request(
                "wrong_task",
                "the model has no token classification head, so it cannot extract entities",
            ));
        };
        let (texts, encodings) = state.encode(&engine, vec![req.input]).await?;
        let encoding = encodings
            .first()
            .cloned()
            .ok_or_else(|| ApiError::internal("the tokenizer gave no encoding"))?;
        let Output::Tokens(rows) = first(submit(&engine, Work::TokenLogits, encodings).await?)? else {
            return Err(ApiError::internal("the model gave no token logits"));
        };
        let text = texts.first().map(String::as_str).unwrap_or_default();
        let tags = tasks::token_tags(&encoding, &rows, id2label);
        Ok(ExtractResponse {
            model: state.0.model_name.clone(),
            entities: tasks::group_entities(text, &tags),
        })
    })
    .await
}

pub(super) async fn tokenize(State(state): State<AppState>, body: Body) -> Response {
    handle(state, "tokenize", body, |state, engine, body| async move {
        let (req, _): (TokenizeRequest, _) = parse(&body, &["model", "input"])?;
        state.check_model(&req.model)?;
        let texts = texts_of(req.input);
        state.check_inputs(&texts)?;
        let (_, encodings) = state.encode(&engine, texts).await?;
        let data = encodings
            .iter()
            .enumerate()
            .map(|(i, e)| TokenizedText {
                index: i as u32,
                tokens: (0..e.ids.len())
                    .map(|t| Token {
                        id: e.ids[t],
                        text: engine.tokenizer.id_to_token(e.ids[t]).unwrap_or_default(),
                        special: e.special_tokens_mask.get(t).copied().unwrap_or(false),
                        start: e.offsets.get(t).map_or(0, |o| o.0),
                        end: e.offsets.get(t).map_or(0, |o| o.1),
                    })
                    .collect(),
            })
            .collect();
        Ok(TokenizeResponse {
            model: state.0.model_name.clone(),
            data,
        })
    })
    .await
}

pub(super) async fn completions(State(state): State<AppState>, body: Body) -> Response {
    super::generate::completions(state, body).await
}

pub(super) async fn chat_completions(State(state): State<AppState>, body: Body) -> Response {
    super::generate::chat_completions(state, body).await
}

/// The head of an encoder; a decoder answers 400.
fn encoder_head<'e>(state: &AppState, engine: &'e Engine) -> Result<&'e Head, ApiError> {
    match &engine.capability {
        Capability::Encoder(head) => Ok(head),
        Capability::Decoder => Err(ApiError::bad_request(
            "model_not_encoder",
            format!(
                "model `{}` is a decoder (text generation): it does not embed, classify or \
                 extract; use /v1/completions or /v1/chat/completions",
                state.0.model_name
            ),
        )),
    }
}

/// Runs a model route: counts it, checks readiness and the concurrency limit, runs `f` and
/// answers its value as JSON or its error with OpenAI's error body.
async fn handle<F, Fut, T>(state: AppState, endpoint: &'static str, body: Body, f: F) -> Response
where
    F: FnOnce(AppState, Arc<Engine>, Bytes) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
    T: Serialize,
{
    let metrics = state.metrics();
    metrics.requests.with_label_values(&[endpoint]).inc();
    let result = async {
        let (engine, _admitted) = state.admit()?;
        let body = state.read_body(body)?;
        f(state.clone(), engine, body).await
    }
    .await;
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => {
            metrics.failures.with_label_values(&[endpoint, e.code]).inc();
            if e.status.is_server_error() {
                tracing::warn!(endpoint, error = %e.message, "request failed");
            }
            e.into_response()
        }
    }
}

/// A request admitted under the concurrency limit: holds its permit and decrements the in-flight
/// gauge when dropped, however the request ends (a stream holds it until it ends).
pub(super) struct Admitted {
    state: AppState,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.state.metrics().in_flight.dec();
    }
}

/// Parses a JSON body into `T`, refusing top-level fields outside `allowed` (unless empty).
/// Gives the typed request and the raw fields.
pub(super) fn parse<T: DeserializeOwned>(
    body: &[u8],
    allowed: &[&str],
) -> Result<(T, Map<String, Value>), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("the body is not valid JSON: {e}")))?;
    let fields = match &value {
        Value::Object(map) => map.clone(),
        _ => return Err(ApiError::invalid("the body must be a JSON object")),
    };
    if !allowed.is_empty()
        && let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(format!(
            "unknown field `{unknown}`; expected {}",
            allowed.join(", ")
        )));
    }
    let typed =
        serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("invalid request: {e}")))?;
    Ok((typed, fields))
}

fn texts_of(input: EmbeddingInput) -> Vec<String> {
    match input {
        EmbeddingInput::One(text) => vec![text],
        EmbeddingInput::Many(texts) => texts,
    }
}

fn vector(output: Output) -> Result<Vec<f32>, ApiError> {
    match output {
        Output::Vector(v) => Ok(v),
        Output::Tokens(_) => Err(ApiError::internal(
            "the model gave token outputs for a sequence task",
        )),
    }
}

fn first(outputs: Vec<Output>) -> Result<Output, ApiError> {
    outputs
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("the model gave no output"))
}

async fn submit(engine: &Engine, work: Work, encodings: Vec<Encoding>) -> Result<Vec<Output>, ApiError> {
    engine
        .scheduler
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("model_not_encoder", "the model is not an encoder"))?
        .submit(work, encodings)
        .await
        .map_err(|e| match e {
            ScheduleError::Stopped => ApiError::unavailable("the model has stopped"),
            ScheduleError::Model(message) => ApiError::internal(message),
            ScheduleError::OutOfMemory(message) => ApiError::out_of_memory(message),
        })
}

impl AppState {
    /// The engine, once loaded, and a permit under the concurrency limit (429 past it).
    pub(super) fn admit(&self) -> Result<(Arc<Engine>, Admitted), ApiError> {
        let engine = self
            .0
            .engine
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("the model is loading"))?;
        if let Some(fault) = engine.fault.get() {
            return Err(device_failed(fault));
        }
        let permit = self
            .0
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::overloaded(self.0.limits.max_concurrent_requests))?;
        self.metrics().in_flight.inc();
        Ok((
            engine,
            Admitted {
                state: self.clone(),
                _permit: permit,
            },
        ))
    }

    /// The request body, or why it could not be read.
    pub(super) fn read_body(&self, body: Body) -> Result<Bytes, ApiError> {
        body.map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::too_large(format!("the body exceeds {} bytes", self.0.limits.max_body_bytes))
            }
            _ => ApiError::malformed(e.body_text()),
        })
    }

    pub(super) fn check_model(&self, asked: &str) -> Result<(), ApiError> {
        if asked.is_empty() || asked == self.0.model_name {
            Ok(())
        } else {
            Err(ApiError::model_not_found(asked, &self.0.model_name))
        }
    }

    pub(super) fn check_inputs(&self, texts: &[String]) -> Result<(), ApiError> {
        let Limits {
            max_inputs,
            max_input_chars,
            ..
        } = self.0.limits;
        if texts.is_empty() {
            return Err(ApiError::bad_request("empty_input", "`input` holds no text"));
        }
        if texts.len() > max_inputs {
            return Err(ApiError::too_large(format!(
                "{} inputs in one request; the limit is {max_inputs}",
                texts.len()
            )));
        }
        for (i, text) in texts.iter().enumerate() {
            let chars = text.chars().count();
            if chars > max_input_chars {
                return Err(ApiError::too_large(format!(
                    "input {i} has {chars} characters; the limit is {max_input_chars}"
                )));
            }
        }
        Ok(())
    }

    /// Tokenizes on the blocking pool; gives the texts back with their encodings.
    async fn encode(
        &self,
        engine: &Engine,
        texts: Vec<String>,
    ) -> Result<(Vec<String>, Vec<Encoding>), ApiError> {
        let tokenizer = engine.tokenizer.clone();
        let started = Instant::now();
        let (texts, encodings) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let encodings = tokenizer.encode_batch(&refs);
            (texts, encodings)
        })
        .await
        .map_err(|e| ApiError::internal(format!("tokenization did not finish: {e}")))?;
        let encodings = encodings.map_err(|e| ApiError::bad_request("tokenization_failed", e.to_string()))?;
        self.metrics()
            .observe_stage("tokenize", started.elapsed().as_secs_f64());
        Ok((texts, encodings))
    }
}
