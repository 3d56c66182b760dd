//! The generation routes: `/v1/completions` and `/v1/chat/completions`, answered as one JSON
//! object or, with `stream: true`, as server-sent events of OpenAI-shaped chunks ending with
//! `data: [DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use atomic_protocol::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, CompletionChoice,
    CompletionRequest, CompletionResponse, CompletionUsage, SamplingOptions,
};
use axum::Json;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::AppState;
use super::engine::{Capability, Engine};
use super::error::ApiError;
use super::generator::{Event, render_chat};
use super::routes::{Admitted, Body, parse};
use crate::sampling::{FinishReason, SamplingParams};

/// `max_tokens` when a request gives none (OpenAI's default for completions).
const DEFAULT_MAX_TOKENS: usize = 16;

pub(super) async fn completions(state: AppState, body: Body) -> Response {
    run(state, "completions", body, false).await
}

pub(super) async fn chat_completions(state: AppState, body: Body) -> Response {
    run(state, "chat_completions", body, true).await
}

/// A validated generation request.
struct Prepared {
    prompt: Vec<u32>,
    params: SamplingParams,
    stream: bool,
}

async fn run(state: AppState, endpoint: &'static str, body: Body, chat: bool) -> Response {
    let metrics = state.metrics();
    metrics.requests.with_label_values(&[endpoint]).inc();
    let result = async {
        let (engine, admitted) = state.admit()?;
        let body = state.read_body(body)?;
        let prepared = prepare(&state, &engine, &body, chat).await?;
        let generator = engine
            .generator
            .as_ref()
            .ok_or_else(|| ApiError::internal("the decoder has no generation thread"))?;
        let prompt_tokens = prepared.prompt.len();
        let rx = generator
            .submit(prepared.prompt, prepared.params)
            .ok_or_else(|| ApiError::unavailable("the model has stopped"))?;
        let reply = Reply {
            id: new_id(chat),
            created: now(),
            model: state.0.model_name.clone(),
            chat,
        };
        if prepared.stream {
            Ok(stream(reply, rx, admitted))
        } else {
            let started = Instant::now();
            let out = collect(rx).await?;
            state
                .metrics()
                .observe_stage("generate", started.elapsed().as_secs_f64());
            drop(admitted);
            Ok(reply.whole(out, prompt_tokens))
        }
    }
    .await;
    let result: Result<Response, ApiError> = result;
    match result {
        Ok(response) => response,
        Err(e) => {
            metrics.failures.with_label_values(&[endpoint, e.code]).inc();
            if e.status.is_server_error() {
                tracing::warn!(endpoint, error = %e.message, "request failed");
            }
            e.into_response()
        }
    }
}

/// Parses and checks the request, renders a chat and tokenizes the prompt.
async fn prepare(state: &AppState, engine: &Engine, body: &[u8], chat: bool) -> Result<Prepared, ApiError> {
    let body = normalize(body)?;
    let (text, add_special_tokens, sampling, stream) = if chat {
        let (req, extra): (ChatCompletionRequest, _) = parse(&body, &[])?;
        state.check_model(&req.model)?;
        check_decoder(state, engine)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request(
                "empty_messages",
                "`messages` holds no message",
            ));
        }
        let template = engine.tokenizer.config().chat_template.clone().ok_or_else(|| {
            ApiError::bad_request(
                "no_chat_template",
                format!(
                    "model `{}` has no chat template (tokenizer_config.json `chat_template`); \
                     use /v1/completions with a prompt",
                    state.0.model_name
                ),
            )
        })?;
        let config = engine.tokenizer.config();
        let rendered = render_chat(
            &template,
            &req.messages,
            config.bos_token.as_deref(),
            config.eos_token.as_deref(),
        )
        .map_err(|m| ApiError::bad_request("chat_template_error", m))?;
        let mut sampling = req.sampling;
        if sampling.max_tokens.is_none() {
            sampling.max_tokens = extra
                .get("max_completion_tokens")
                .and_then(Value::as_u64)
                .map(|n| n.min(u64::from(u32::MAX)) as u32);
        }
        (rendered, false, sampling, req.stream)
    } else {
        let (req, extra): (CompletionRequest, _) = parse(&body, &[])?;
        state.check_model(&req.model)?;
        check_decoder(state, engine)?;
        let stream = match extra.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid("invalid request: `stream` must be a boolean")),
        };
        (req.prompt, true, req.sampling, stream)
    };
    state.check_inputs(std::slice::from_ref(&text))?;
    let context = engine
        .generator
        .as_ref()
        .map_or(0, super::generator::Generator::max_positions);
    let params = sampling_params(sampling, context)?;

    let tokenizer = engine.tokenizer.clone();
    let started = Instant::now();
    let (prompt, truncated) =
        tokio::task::spawn_blocking(move || tokenizer.encode_ids(&text, add_special_tokens))
            .await
            .map_err(|e| ApiError::internal(format!("tokenization did not finish: {e}")))?
            .map_err(|e| ApiError::bad_request("tokenization_failed", e.to_string()))?;
    state
        .metrics()
        .observe_stage("tokenize", started.elapsed().as_secs_f64());
    if prompt.is_empty() {
        return Err(ApiError::bad_request("empty_prompt", "the prompt has no tokens"));
    }
    if truncated || prompt.len() > context {
        return Err(ApiError::bad_request(
            "context_length_exceeded",
            format!(
                "the prompt is longer than the model's context of {context} tokens{}",
                if truncated {
                    String::new()
                } else {
                    format!(" ({} tokens)", prompt.len())
                }
            ),
        ));
    }
    Ok(Prepared {
        prompt,
        params,
        stream,
    })
}

fn check_decoder(state: &AppState, engine: &Engine) -> Result<(), ApiError> {
    match engine.capability {
        Capability::Decoder => Ok(()),
        Capability::Encoder(_) => Err(ApiError::bad_request(
            "model_not_generative",
            format!(
                "model `{}` does not generate text: it is an encoder; use /v1/embeddings, \
                 /v1/classify or /v1/extract",
                state.0.model_name
            ),
        )),
    }
}

/// OpenAI accepts `stop` as one string or a list; the typed request takes a list.
fn normalize(body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        // Let `parse` report the error.
        return Ok(body.to_vec());
    };
    if let Some(map) = value.as_object_mut() {
        match map.get("stop") {
            Some(Value::String(s)) => {
                let one = Value::Array(vec![Value::String(s.clone())]);
                map.insert("stop".to_owned(), one);
            }
            Some(Value::Null) => {
                map.remove("stop");
            }
            _ => {}
        }
    }
    serde_json::to_vec(&value).map_err(|e| ApiError::internal(format!("cannot re-encode the body: {e}")))
}

/// Checks a request's sampling options against the model's context and fills in defaults.
fn sampling_params(options: SamplingOptions, context: usize) -> Result<SamplingParams, ApiError> {
    let temperature = options.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad_request(
            "invalid_temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = options.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(
            "invalid_top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let max_tokens = options.max_tokens.map_or(DEFAULT_MAX_TOKENS, |n| n as usize);
    if max_tokens == 0 || max_tokens > context {
        return Err(ApiError::bad_request(
            "invalid_max_tokens",
            format!(
                "max_tokens must be between 1 and the model's context of {context} tokens, got {max_tokens}"
            ),
        ));
    }
    if options.stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(
            "invalid_stop",
            "stop strings must not be empty",
        ));
    }
    let seed = options.seed.unwrap_or_else(random_seed);
    Ok(SamplingParams {
        temperature: temperature as f32,
        top_k: options.top_k.map_or(0, |k| k as usize),
        top_p: top_p as f32,
        seed,
        max_tokens,
        stop: options.stop,
    })
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed for requests that give none: differs between requests.
fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn new_id(chat: bool) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = if chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{:x}{n:x}", now())
}

/// A whole generation.
struct Output {
    text: String,
    finish_reason: FinishReason,
    completion_tokens: usize,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Output, ApiError> {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Done {
                finish_reason,
                completion_tokens,
            } => {
                return Ok(Output {
                    text,
                    finish_reason,
                    completion_tokens,
                });
            }
            Event::Error(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::unavailable(
        "the model stopped before the answer was complete",
    ))
}

/// What every answer of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    chat: bool,
}

impl Reply {
    fn whole(self, out: Output, prompt_tokens: usize) -> Response {
        let usage = CompletionUsage {
            prompt_tokens: prompt_tokens as u32,
            completion_tokens: out.completion_tokens as u32,
            total_tokens: (prompt_tokens + out.completion_tokens) as u32,
        };
        let finish_reason = Some(out.finish_reason.as_str().to_owned());
        if self.chat {
            Json(ChatCompletionResponse {
                id: self.id,
                object: "chat.completion".to_owned(),
                created: self.created,
                model: self.model,
                choices: vec![ChatChoice {
                    index: 0,
                    message: ChatMessage {
                        role: "assistant".to_owned(),
                        content: out.text,
                    },
                    finish_reason,
                }],
                usage,
            })
            .into_response()
        } else {
            Json(CompletionResponse {
                id: self.id,
                object: "text_completion".to_owned(),
                created: self.created,
                model: self.model,
                choices: vec![CompletionChoice {
                    index: 0,
                    text: out.text,
                    finish_reason,
                }],
                usage,
            })
            .into_response()
        }
    }

    /// One streamed chunk: new text (or the assistant role, for chat's first chunk), or the end.
    fn chunk(&self, text: Option<&str>, role: bool, finish_reason: Option<FinishReason>) -> SseEvent {
        let finish = finish_reason.map(FinishReason::as_str);
        let choice = if self.chat {
            let mut delta = Map::new();
            if role {
                delta.insert("role".to_owned(), json!("assistant"));
                delta.insert("content".to_owned(), json!(""));
            }
            if let Some(text) = text {
                delta.insert("content".to_owned(), json!(text));
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text.unwrap_or_default(), "finish_reason": finish})
        };
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let value = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        SseEvent::default().data(value.to_string())
    }
}

struct StreamState {
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    pending: VecDeque<SseEvent>,
    ended: bool,
    _admitted: Admitted,
}

/// Streams the generation as server-sent events. The permit is held until the stream ends; a
/// client that goes away drops the stream, which cancels the sequence.
fn stream(reply: Reply, rx: UnboundedReceiver<Event>, admitted: Admitted) -> Response {
    let mut pending = VecDeque::new();
    if reply.chat {
        pending.push_back(reply.chunk(None, true, None));
    }
    let start = StreamState {
        reply,
        rx,
        pending,
        ended: false,
        _admitted: admitted,
    };
    let events = futures::stream::unfold(start, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(event), s));
            }
            if s.ended {
                return None;
            }
            match s.rx.recv().await {
                Some(Event::Text(piece)) => {
                    let chunk = s.reply.chunk(Some(&piece), false, None);
                    s.pending.push_back(chunk);
                }
                Some(Event::Done { finish_reason, .. }) => {
                    let chunk = s.reply.chunk(None, false, Some(finish_reason));
                    s.pending.push_back(chunk);
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.ended = true;
                }
                Some(Event::Error(message)) => {
                    let body = ApiError::internal(message).body();
                    let data = serde_json::to_string(&body).unwrap_or_default();
                    s.pending.push_back(SseEvent::default().data(data));
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.ended = true;
                }
                None => {
                    let body =
                        ApiError::unavailable("the model stopped before the answer was complete").body();
                    let data = serde_json::to_string(&body).unwrap_or_default();
                    s.pending.push_back(SseEvent::default().data(data));
                    s.pending.push_back(SseEvent::default().data("[DONE]"));
                    s.ended = true;
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
