//! The generation routes: `/v1/completions` and `/v1/chat/completions`, answered as one JSON
//! object or, with `stream: true`, as server-sent events of OpenAI-shaped chunks ending with
//! `data: [DONE]` (after a usage chunk when `stream_options.include_usage` asks for one).
//!
//! `n` alternatives run as `n` sequences of the generation thread (choice `i` seeded with
//! `seed + i`), batched with everything else; their chunks interleave in the stream, each tagged
//! with its choice index. Log-probabilities come from the model's raw distribution.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use atomic_protocol::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatTokenLogprob,
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, CompletionUsage,
    SamplingOptions, TopLogprob,
};
use axum::Json;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use super::AppState;
use super::engine::{Capability, Engine};
use super::error::ApiError;
use super::generator::{Event, GenerationRequest, TokenLogprob, kv_reservation, render_chat};
use super::routes::{Admitted, Body, parse};
use crate::sampling::{FinishReason, SamplingParams};

/// `max_tokens` when a request gives none (OpenAI's default for completions).
const DEFAULT_MAX_TOKENS: usize = 16;

/// The most alternatives (`n`) one request may ask for.
const MAX_CHOICES: u32 = 16;

/// The most alternatives per token the completions API reports (`logprobs`), as OpenAI's.
const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// The most alternatives per token the chat API reports (`top_logprobs`), as OpenAI's.
const MAX_CHAT_TOP_LOGPROBS: u32 = 20;

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
    /// Alternatives to generate.
    choices: u32,
    /// Alternatives per token to report, when log-probabilities were asked for.
    top_logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
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
        let mut receivers = Vec::with_capacity(prepared.choices as usize);
        for choice in 0..prepared.choices {
            let request = GenerationRequest {
                prompt: prepared.prompt.clone(),
                params: SamplingParams {
                    seed: prepared.params.seed.wrapping_add(u64::from(choice)),
                    ..prepared.params.clone()
                },
                top_logprobs: prepared.top_logprobs,
            };
            let rx = generator
                .submit(request)
                .ok_or_else(|| ApiError::unavailable("the model has stopped"))?;
            receivers.push(rx);
        }
        let reply = Reply {
            id: new_id(chat),
            created: now(),
            model: state.0.model_name.clone(),
            chat,
            logprobs: prepared.top_logprobs.is_some(),
        };
        if prepared.stream {
            Ok(stream(
                reply,
                receivers,
                prompt_tokens,
                prepared.include_usage,
                admitted,
            ))
        } else {
            let started = Instant::now();
            let outputs = futures::future::join_all(receivers.into_iter().map(collect))
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?;
            state
                .metrics()
                .observe_stage("generate", started.elapsed().as_secs_f64());
            drop(admitted);
            Ok(reply.whole(outputs, prompt_tokens))
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
    let (text, add_special_tokens, sampling, top_logprobs, stream, stream_options) = if chat {
        let (req, extra): (ChatCompletionRequest, _) = parse(&body, &[])?;
        refuse_unsupported(&extra)?;
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
        let top_logprobs = match (req.logprobs, req.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            (false, None) => None,
            (true, top) => Some(top.unwrap_or(0)),
        };
        let top_logprobs = checked_logprobs(top_logprobs, MAX_CHAT_TOP_LOGPROBS, "top_logprobs")?;
        (
            rendered,
            false,
            sampling,
            top_logprobs,
            req.stream,
            req.stream_options,
        )
    } else {
        let (req, extra): (CompletionRequest, _) = parse(&body, &[])?;
        refuse_unsupported(&extra)?;
        state.check_model(&req.model)?;
        check_decoder(state, engine)?;
        let top_logprobs = checked_logprobs(req.logprobs, MAX_COMPLETION_LOGPROBS, "logprobs")?;
        (
            req.prompt,
            true,
            req.sampling,
            top_logprobs,
            req.stream,
            req.stream_options,
        )
    };
    if stream_options.is_some() && !stream {
        return Err(ApiError::bad_request(
            "invalid_stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    let choices = sampling.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&choices) {
        return Err(ApiError::bad_request(
            "invalid_n",
            format!("n must be between 1 and {MAX_CHOICES}, got {choices}"),
        ));
    }
    state.check_inputs(std::slice::from_ref(&text))?;
    let generator = engine
        .generator
        .as_ref()
        .ok_or_else(|| ApiError::internal("the decoder has no generation thread"))?;
    let context = generator.max_positions();
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
    let need = kv_reservation(prompt.len(), params.max_tokens, context);
    if need > generator.kv_budget_positions() {
        return Err(ApiError::bad_request(
            "kv_cache_exceeded",
            format!(
                "the prompt ({} tokens) plus max_tokens ({}) needs {need} key/value cache positions; \
                 this worker holds {} (--kv-cache-mib): lower max_tokens or shorten the prompt",
                prompt.len(),
                params.max_tokens,
                generator.kv_budget_positions()
            ),
        ));
    }
    Ok(Prepared {
        prompt,
        params,
        choices,
        top_logprobs,
        stream,
        include_usage: stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Whether a parameter's value changes nothing.
type IsInert = fn(&Value) -> bool;

/// OpenAI (and vLLM) parameters this worker does not implement, each with a test for the value
/// that changes nothing. Other unknown fields (`user`, `metadata`, ...) are ignored, as OpenAI's
/// API ignores what it does not use; these are refused when set, so that a client never gets a
/// silently different answer from the one it asked for.
const UNSUPPORTED: &[(&str, IsInert)] = &[
    ("echo", |v| v == &Value::Bool(false)),
    ("best_of", |v| v.as_u64() == Some(1)),
    ("suffix", |v| v.as_str() == Some("")),
    ("logit_bias", |v| v.as_object().is_some_and(Map::is_empty)),
    ("presence_penalty", |v| v.as_f64() == Some(0.0)),
    ("frequency_penalty", |v| v.as_f64() == Some(0.0)),
    ("repetition_penalty", |v| v.as_f64() == Some(1.0)),
    ("min_p", |v| v.as_f64() == Some(0.0)),
    ("tools", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("functions", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("tool_choice", |v| v.as_str() == Some("none")),
    ("function_call", |v| v.as_str() == Some("none")),
    ("response_format", |v| {
        v.get("type").and_then(Value::as_str) == Some("text")
    }),
];

/// Refuses a request that sets a parameter from [`UNSUPPORTED`] to a value that matters.
fn refuse_unsupported(fields: &Map<String, Value>) -> Result<(), ApiError> {
    for (name, inert) in UNSUPPORTED {
        if let Some(value) = fields.get(*name)
            && !value.is_null()
            && !inert(value)
        {
            return Err(ApiError::bad_request(
                "unsupported_parameter",
                format!("`{name}` is not supported by this worker (got {value}); leave it out"),
            ));
        }
    }
    Ok(())
}

/// Checks a requested number of log-probability alternatives against the API's maximum.
fn checked_logprobs(requested: Option<u32>, max: u32, field: &str) -> Result<Option<usize>, ApiError> {
    match requested {
        Some(n) if n > max => Err(ApiError::bad_request(
            "invalid_logprobs",
            format!("`{field}` must be between 0 and {max}, got {n}"),
        )),
        other => Ok(other.map(|n| n as usize)),
    }
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
    logprobs: Vec<TokenLogprob>,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Output, ApiError> {
    let mut text = String::new();
    let mut all_logprobs = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text {
                text: piece,
                logprobs,
            } => {
                text.push_str(&piece);
                all_logprobs.extend(logprobs);
            }
            Event::Done {
                finish_reason,
                completion_tokens,
            } => {
                return Ok(Output {
                    text,
                    finish_reason,
                    completion_tokens,
                    logprobs: all_logprobs,
                });
            }
            Event::Error(message) => return Err(ApiError::internal(message)),
            Event::OutOfMemory(message) => return Err(ApiError::out_of_memory(message)),
        }
    }
    Err(ApiError::unavailable(
        "the model stopped before the answer was complete",
    ))
}

/// Log-probabilities in the completions API's column layout.
fn completion_logprobs(tokens: &[TokenLogprob]) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: tokens.iter().map(|t| t.token.text.clone()).collect(),
        token_logprobs: tokens.iter().map(|t| t.token.logprob).collect(),
        top_logprobs: tokens
            .iter()
            .map(|t| {
                // A map keyed by text: alternatives that decode alike keep the likelier one.
                let mut top = BTreeMap::new();
                for alt in t.top.iter().rev() {
                    top.insert(alt.text.clone(), alt.logprob);
                }
                top
            })
            .collect(),
        text_offset: tokens.iter().map(|t| t.offset).collect(),
    }
}

/// Log-probabilities in the chat API's layout.
fn chat_logprobs(tokens: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.text.clone(),
                logprob: t.token.logprob,
                bytes: t.token.bytes.clone(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|alt| TopLogprob {
                        token: alt.text.clone(),
                        logprob: alt.logprob,
                        bytes: alt.bytes.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// What every answer of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
}

impl Reply {
    fn whole(self, outputs: Vec<Output>, prompt_tokens: usize) -> Response {
        let completion_tokens: usize = outputs.iter().map(|o| o.completion_tokens).sum();
        let usage = usage(prompt_tokens, completion_tokens);
        let choices = outputs.into_iter().zip(0u32..);
        if self.chat {
            let choices = choices
                .map(|(out, index)| ChatChoice {
                    index,
                    logprobs: self.logprobs.then(|| chat_logprobs(&out.logprobs)),
                    message: ChatMessage {
                        role: "assistant".to_owned(),
                        content: out.text,
                    },
                    finish_reason: Some(out.finish_reason.as_str().to_owned()),
                })
                .collect();
            Json(ChatCompletionResponse {
                id: self.id,
                object: "chat.completion".to_owned(),
                created: self.created,
                model: self.model,
                choices,
                usage,
            })
            .into_response()
        } else {
            let choices = choices
                .map(|(out, index)| CompletionChoice {
                    index,
                    logprobs: self.logprobs.then(|| completion_logprobs(&out.logprobs)),
                    text: out.text,
                    finish_reason: Some(out.finish_reason.as_str().to_owned()),
                })
                .collect();
            Json(CompletionResponse {
                id: self.id,
                object: "text_completion".to_owned(),
                created: self.created,
                model: self.model,
                choices,
                usage,
            })
            .into_response()
        }
    }

    fn object(&self) -> &'static str {
        if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        }
    }

    /// One streamed chunk of choice `index`: new text with its tokens' log-probabilities (or
    /// the assistant role, for chat's first chunk), or the end.
    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        logprobs: &[TokenLogprob],
        finish_reason: Option<FinishReason>,
    ) -> SseEvent {
        let finish = finish_reason.map(FinishReason::as_str);
        let logprobs = match (self.logprobs && text.is_some(), self.chat) {
            (false, _) => Value::Null,
            (true, true) => serde_json::to_value(chat_logprobs(logprobs)).unwrap_or(Value::Null),
            (true, false) => serde_json::to_value(completion_logprobs(logprobs)).unwrap_or(Value::Null),
        };
        let choice = if self.chat {
            let mut delta = Map::new();
            if role {
                delta.insert("role".to_owned(), json!("assistant"));
                delta.insert("content".to_owned(), json!(""));
            }
            if let Some(text) = text {
                delta.insert("content".to_owned(), json!(text));
            }
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            json!({
                "index": index,
                "text": text.unwrap_or_default(),
                "logprobs": logprobs,
                "finish_reason": finish
            })
        };
        self.event(json!([choice]), None)
    }

    /// A chunk with these choices (and usage).
    fn event(&self, choices: Value, usage: Option<CompletionUsage>) -> SseEvent {
        let mut value = json!({
            "id": self.id,
            "object": self.object(),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let (Some(usage), Some(map)) = (usage, value.as_object_mut()) {
            map.insert("usage".to_owned(), json!(usage));
        }
        SseEvent::default().data(value.to_string())
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> CompletionUsage {
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    CompletionUsage {
        prompt_tokens: clamp(prompt_tokens),
        completion_tokens: clamp(completion_tokens),
        total_tokens: clamp(prompt_tokens + completion_tokens),
    }
}

/// An error as the last data of a stream, then the end marker.
fn stream_error(pending: &mut VecDeque<SseEvent>, error: ApiError) {
    let data = serde_json::to_string(&error.body()).unwrap_or_default();
    pending.push_back(SseEvent::default().data(data));
    pending.push_back(SseEvent::default().data("[DONE]"));
}

struct StreamState {
    reply: Reply,
    /// Every choice's events, tagged with the choice index; `None` once a choice's channel
    /// has closed.
    events: BoxStream<'static, (usize, Option<Event>)>,
    pending: VecDeque<SseEvent>,
    /// Which choices have finished.
    done: Vec<bool>,
    prompt_tokens: usize,
    completion_tokens: usize,
    include_usage: bool,
    ended: bool,
    _admitted: Admitted,
}

impl StreamState {
    /// Turns one event of choice `index` into chunks.
    fn on_event(&mut self, index: usize, event: Option<Event>) {
        match event {
            Some(Event::Text { text, logprobs }) => {
                let chunk = self.reply.chunk(index, Some(&text), false, &logprobs, None);
                self.pending.push_back(chunk);
            }
            Some(Event::Done {
                finish_reason,
                completion_tokens,
            }) => {
                let chunk = self.reply.chunk(index, None, false, &[], Some(finish_reason));
                self.pending.push_back(chunk);
                self.completion_tokens += completion_tokens;
                if let Some(d) = self.done.get_mut(index) {
                    *d = true;
                }
                if self.done.iter().all(|&d| d) {
                    if self.include_usage {
                        let usage = usage(self.prompt_tokens, self.completion_tokens);
                        let chunk = self.reply.event(json!([]), Some(usage));
                        self.pending.push_back(chunk);
                    }
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                    self.ended = true;
                }
            }
            Some(Event::Error(message)) => {
                stream_error(&mut self.pending, ApiError::internal(message));
                self.ended = true;
            }
            Some(Event::OutOfMemory(message)) => {
                stream_error(&mut self.pending, ApiError::out_of_memory(message));
                self.ended = true;
            }
            None if !self.done.get(index).copied().unwrap_or(true) => {
                let error = ApiError::unavailable("the model stopped before the answer was complete");
                stream_error(&mut self.pending, error);
                self.ended = true;
            }
            None => {}
        }
    }
}

/// Streams the generations as server-sent events. The permit is held until the stream ends; a
/// client that goes away drops the stream, which cancels the sequences.
fn stream(
    reply: Reply,
    receivers: Vec<UnboundedReceiver<Event>>,
    prompt_tokens: usize,
    include_usage: bool,
    admitted: Admitted,
) -> Response {
    let mut pending = VecDeque::new();
    if reply.chat {
        for index in 0..receivers.len() {
            pending.push_back(reply.chunk(index, None, true, &[], None));
        }
    }
    let choices = receivers.len();
    let tagged = receivers.into_iter().enumerate().map(|(index, rx)| {
        let events = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        events
            .map(Some)
            .chain(futures::stream::once(async { None }))
            .map(move |event| (index, event))
            .boxed()
    });
    let start = StreamState {
        reply,
        events: futures::stream::select_all(tagged).boxed(),
        pending,
        done: vec![false; choices],
        prompt_tokens,
        completion_tokens: 0,
        include_usage,
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
            match s.events.next().await {
                Some((index, event)) => s.on_event(index, event),
                None => s.ended = true,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
