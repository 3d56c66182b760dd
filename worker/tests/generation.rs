//! Text generation over HTTP: each test starts a server in-process on 127.0.0.1:0 with a tiny
//! decoder fixture and checks completions, chat and streaming against the PyTorch references.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atomic_worker::Tokenizer;
use atomic_worker::models::kv_cache::KvCache;
use atomic_worker::server::scheduler::{Encoder, Output, Work};
use atomic_worker::server::{
    self, AppState, Decoder, DecoderParts, Engine, Limits, Metrics, ModelLimits, ModelParts,
};
use atomic_worker::tokenizer::Encoding;
use futures::future::join_all;
use serde_json::{Value, json};

mod common;
use common::fixture;

struct Server {
    base: String,
    http: reqwest::Client,
    tokenizer: Tokenizer,
    reference: Value,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    async fn start(name: &str) -> Server {
        Self::start_with(name, Limits::default(), ModelLimits::default()).await
    }

    async fn start_with(name: &str, limits: Limits, model_limits: ModelLimits) -> Server {
        Self::start_slow(name, limits, model_limits, None).await
    }

    /// A server whose decoder sleeps `step_delay` before each step, so that generations last.
    async fn start_slow(
        name: &str,
        limits: Limits,
        model_limits: ModelLimits,
        step_delay: Option<Duration>,
    ) -> Server {
        let wrap = step_delay.map(|delay| {
            Box::new(move |model| {
                Box::new(TestDecoder {
                    delay,
                    ..TestDecoder::new(model)
                }) as Box<dyn Decoder>
            }) as WrapDecoder
        });
        Self::start_wrapped(name, limits, model_limits, wrap).await
    }

    /// A server whose decoder is the fixture's wrapped by `wrap`.
    async fn start_wrapped(
        name: &str,
        limits: Limits,
        model_limits: ModelLimits,
        wrap: Option<WrapDecoder>,
    ) -> Server {
        let folder = fixture(name);
        let metrics = Arc::new(Metrics::new().unwrap());
        let state = AppState::new("tiny", limits, metrics.clone());
        let parts = match (wrap, server::load_model(&folder, 2, &model_limits).unwrap()) {
            (Some(wrap), ModelParts::Decoder(d)) => ModelParts::Decoder(DecoderParts {
                tokenizer: d.tokenizer,
                model: wrap(d.model),
            }),
            (_, parts) => parts,
        };
        state.set_engine(Engine::start_model(parts, vec![], &model_limits, metrics).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = server::router(state);
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        let dir = atomic_worker::ModelDir::open(&folder).unwrap();
        let reference =
            serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap()).unwrap();
        Server {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            tokenizer: dir.tokenizer,
            reference,
            shutdown: Some(tx),
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Posts a streaming request; the `data:` payloads of the events, in order.
    async fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        let text = resp.text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_owned)
            .collect()
    }

    fn prompts(&self) -> Vec<String> {
        serde_json::from_value(self.reference["prompts"].clone()).unwrap()
    }

    fn greedy_texts(&self) -> Vec<String> {
        let ids: Vec<Vec<u32>> = serde_json::from_value(self.reference["greedy_ids"].clone()).unwrap();
        ids.iter()
            .map(|i| self.tokenizer.decode(i, true).unwrap())
            .collect()
    }

    /// The Prometheus text of `/metrics`.
    async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        resp.text().await.unwrap()
    }

    /// The events of a stream parsed as JSON, checking that it ends with `[DONE]`.
    async fn stream_chunks(&self, path: &str, body: Value) -> Vec<Value> {
        let events = self.stream(path, body).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// An encoder that counts the passes it runs.
struct CountingEncoder(Box<dyn Encoder>, Arc<AtomicUsize>);

impl Encoder for CountingEncoder {
    fn run(&self, work: Work, encodings: &[Encoding]) -> atomic_worker::Result<Vec<Output>> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.run(work, encodings)
    }
}

/// What a test puts around the fixture's decoder.
type WrapDecoder = Box<dyn FnOnce(Box<dyn Decoder>) -> Box<dyn Decoder>>;

/// The fixture's decoder with what a test adds: a sleep before each step (so that generations
/// last), running out of device memory on steps of more than `oom_above` tokens in all (a GPU
/// too small for long prompts), and a count of the steps run.
struct TestDecoder {
    inner: Box<dyn Decoder>,
    delay: Duration,
    oom_above: usize,
    steps: Arc<AtomicUsize>,
}

impl TestDecoder {
    fn new(inner: Box<dyn Decoder>) -> Self {
        Self {
            inner,
            delay: Duration::ZERO,
            oom_above: usize::MAX,
            steps: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn before_step(&self, tokens: &[&[u32]]) -> atomic_worker::Result<()> {
        self.steps.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(self.delay);
        let n: usize = tokens.iter().map(|t| t.len()).sum();
        if n > self.oom_above {
            return Err(atomic_worker::Error::Backend(
                atomic_worker::backend::BackendError::OutOfMemory(format!(
                    "allocating a step of {n} tokens: out of GPU memory"
                )),
            ));
        }
        Ok(())
    }
}

impl Decoder for TestDecoder {
    fn step(
        &mut self,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
    ) -> atomic_worker::Result<Vec<Vec<f32>>> {
        self.before_step(tokens)?;
        self.inner.step(caches, tokens)
    }

    fn step_sample(
        &mut self,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
        draws: &[atomic_worker::sampling::TokenDraw],
    ) -> atomic_worker::Result<Vec<u32>> {
        self.before_step(tokens)?;
        self.inner.step_sample(caches, tokens, draws)
    }

    fn eos_token_ids(&self) -> &[u32] {
        self.inner.eos_token_ids()
    }

    fn new_cache(&self) -> KvCache {
        self.inner.new_cache()
    }

    fn max_positions(&self) -> usize {
        self.inner.max_positions()
    }

    fn kv_capacity_positions(&self) -> usize {
        self.inner.kv_capacity_positions()
    }
}

/// A server on tiny-llama whose decoder is the fixture's in a [`TestDecoder`] set up by `adjust`.
async fn start_test_decoder(adjust: impl FnOnce(TestDecoder) -> TestDecoder + 'static) -> Server {
    let wrap: WrapDecoder = Box::new(move |model| Box::new(adjust(TestDecoder::new(model))));
    Server::start_wrapped(
        "tiny-llama",
        Limits::default(),
        ModelLimits::default(),
        Some(wrap),
    )
    .await
}

fn greedy(prompt: &str) -> Value {
    json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0})
}

async fn greedy_matches_reference(name: &str) {
    let mut s = Server::start(name).await;
    let prompts = s.prompts();
    let want = s.greedy_texts();
    // Sequentially.
    let mut sequential = Vec::new();
    for (prompt, want) in prompts.iter().zip(&want) {
        let (status, body) = s.post("/v1/completions", greedy(prompt)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["choices"][0]["text"], json!(want), "{name}: {prompt}");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        let prompt_tokens = s.tokenizer.encode(prompt).unwrap().ids.len();
        assert_eq!(body["usage"]["prompt_tokens"], json!(prompt_tokens));
        assert_eq!(body["usage"]["completion_tokens"], json!(12));
        assert_eq!(body["usage"]["total_tokens"], json!(prompt_tokens + 12));
        sequential.push(body["choices"][0]["text"].clone());
    }
    // Concurrently, several copies of each prompt with different lengths joining the running
    // batch: continuous batching gives what one sequence alone gives.
    let requests: Vec<_> = (0..4)
        .flat_map(|_| prompts.iter())
        .enumerate()
        .map(|(i, p)| {
            let mut body = greedy(p);
            body["max_tokens"] = json!(6 + i % 7);
            s.post("/v1/completions", body)
        })
        .collect();
    let answers = join_all(requests).await;
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "{body}");
        let n = 6 + i % 7;
        let ids: Vec<Vec<u32>> = serde_json::from_value(s.reference["greedy_ids"].clone()).unwrap();
        let want = s.tokenizer.decode(&ids[i % prompts.len()][..n], true).unwrap();
        assert_eq!(body["choices"][0]["text"], json!(want), "{name}: concurrent {i}");
        assert_eq!(body["usage"]["completion_tokens"], json!(n));
    }
    // Streaming gives the same text in pieces, then [DONE].
    for (prompt, whole) in prompts.iter().zip(&sequential) {
        let mut body = greedy(prompt);
        body["stream"] = json!(true);
        let chunks = s.stream_chunks("/v1/completions", body).await;
        assert!(chunks.len() > 2, "{chunks:?}");
        let text: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(json!(text), *whole);
        assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    }
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpt2_greedy_batched_and_streamed_match_the_reference() {
    greedy_matches_reference("tiny-gpt2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_greedy_batched_and_streamed_match_the_reference() {
    greedy_matches_reference("tiny-llama").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_greedy_batched_and_streamed_match_the_reference() {
    greedy_matches_reference("tiny-qwen2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistral_greedy_batched_and_streamed_match_the_reference() {
    // A sliding window of 4 positions: every sequence outgrows it within the continuation.
    greedy_matches_reference("tiny-mistral").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible() {
    let mut s = Server::start("tiny-gpt2").await;
    let prompt = s.prompts()[0].clone();
    let body = |seed: u64| {
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 1.5,
               "top_k": 50, "top_p": 0.95, "seed": seed})
    };
    let (_, a) = s.post("/v1/completions", body(7)).await;
    let (_, b) = s.post("/v1/completions", body(7)).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // Concurrently with other sequences, the same seed still gives the same text.
    let many = join_all((0..4).map(|_| s.post("/v1/completions", body(7)))).await;
    for (status, c) in &many {
        assert_eq!(*status, 200);
        assert_eq!(c["choices"][0]["text"], a["choices"][0]["text"]);
    }
    let mut differs = false;
    for seed in 8..12 {
        let (_, c) = s.post("/v1/completions", body(seed)).await;
        differs |= c["choices"][0]["text"] != a["choices"][0]["text"];
    }
    assert!(differs, "other seeds give other texts");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_trim_and_finish_with_stop() {
    let mut s = Server::start("tiny-gpt2").await;
    let prompt = s.prompts()[0].clone();
    let full = s.greedy_texts()[0].clone();
    // A stop string from the middle of the reference text.
    let chars: Vec<char> = full.chars().collect();
    let start = chars.len() / 2;
    let stop: String = chars[start..start + 2].iter().collect();
    let at = full.find(&stop).unwrap();
    let mut body = greedy(&prompt);
    body["stop"] = json!(stop);
    let (status, got) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["text"], json!(&full[..at]));
    assert_eq!(got["choices"][0]["finish_reason"], "stop");
    // Streamed: the same text; the held-back start of the stop string is never sent.
    body["stream"] = json!(true);
    let chunks = s.stream_chunks("/v1/completions", body).await;
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(text, &full[..at]);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_renders_the_template_and_answers() {
    let mut s = Server::start("tiny-llama").await;
    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "My kettle stopped"}]);
    let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nMy kettle stopped<|im_end|>\n<|im_start|>assistant\n";
    let (status, tokens) = s
        .post("/v1/tokenize", json!({"model": "tiny", "input": rendered}))
        .await;
    assert_eq!(status, 200, "{tokens}");
    let prompt_tokens = tokens["data"][0]["tokens"].as_array().unwrap().len();
    let body = json!({"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0});
    let (status, got) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["object"], "chat.completion");
    assert_eq!(got["choices"][0]["message"]["role"], "assistant");
    assert!(got["choices"][0]["message"]["content"].is_string());
    assert_eq!(got["usage"]["prompt_tokens"], json!(prompt_tokens));
    // The answer is the greedy continuation of the rendered prompt.
    let (_, completion) = s
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": rendered, "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(
        got["choices"][0]["message"]["content"],
        completion["choices"][0]["text"]
    );
    assert_eq!(
        got["choices"][0]["finish_reason"],
        completion["choices"][0]["finish_reason"]
    );

    // Streamed chat: a role chunk, content deltas, a finish chunk, [DONE].
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = s.stream_chunks("/v1/chat/completions", streamed).await;
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(json!(text), got["choices"][0]["message"]["content"]);
    assert!(!chunks.last().unwrap()["choices"][0]["finish_reason"].is_null());
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_a_template_is_refused() {
    let mut s = Server::start("tiny-gpt2").await;
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "no_chat_template");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("chat template")
    );
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_400_with_the_error_body() {
    let mut s = Server::start("tiny-llama").await;
    let prompt = s.prompts()[0].clone();
    let long = "word ".repeat(200);
    let cases = [
        (
            json!({"prompt": prompt, "temperature": 2.5}),
            "invalid_temperature",
        ),
        (
            json!({"prompt": prompt, "temperature": -0.1}),
            "invalid_temperature",
        ),
        (json!({"prompt": prompt, "max_tokens": 0}), "invalid_max_tokens"),
        (
            json!({"prompt": prompt, "max_tokens": 100000}),
            "invalid_max_tokens",
        ),
        (json!({"prompt": prompt, "top_p": 0}), "invalid_top_p"),
        (json!({"prompt": prompt, "stop": [""]}), "invalid_stop"),
        (json!({"prompt": long}), "context_length_exceeded"),
        (json!({"prompt": prompt, "n": 0}), "invalid_n"),
        (json!({"prompt": prompt, "n": 17}), "invalid_n"),
        (json!({"prompt": prompt, "logprobs": 6}), "invalid_logprobs"),
        (
            json!({"prompt": prompt, "stream_options": {"include_usage": true}}),
            "invalid_stream_options",
        ),
        (json!({"prompt": prompt, "echo": true}), "unsupported_parameter"),
        (
            json!({"prompt": prompt, "presence_penalty": 0.5}),
            "unsupported_parameter",
        ),
        (
            json!({"prompt": prompt, "logit_bias": {"7": 100}}),
            "unsupported_parameter",
        ),
        (json!({"prompt": prompt, "best_of": 3}), "unsupported_parameter"),
    ];
    for (mut body, code) in cases {
        body["model"] = json!("tiny");
        let (status, got) = s.post("/v1/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {got}");
        assert_eq!(got["error"]["code"], code, "{body} -> {got}");
        assert_eq!(got["error"]["type"], "invalid_request_error");
        assert!(got["error"]["message"].is_string());
    }
    // Their inert values, and fields the API ignores, are accepted.
    let inert = json!({"model": "tiny", "prompt": prompt, "max_tokens": 2, "echo": false,
                       "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                       "best_of": 1, "user": "someone", "tools": null});
    let (status, got) = s.post("/v1/completions", inert).await;
    assert_eq!(status, 200, "{got}");
    // Chat-only checks.
    let message = json!([{"role": "user", "content": "hi"}]);
    let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
    for (extra, status_want, code) in [
        (json!({"top_logprobs": 2}), 400, "invalid_top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            400,
            "invalid_logprobs",
        ),
        (json!({"messages": image}), 422, "invalid_request"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            400,
            "unsupported_parameter",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            400,
            "unsupported_parameter",
        ),
    ] {
        let mut body = json!({"model": "tiny", "messages": message});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, got) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, status_want, "{body} -> {got}");
        assert_eq!(got["error"]["code"], code, "{body} -> {got}");
    }
    let (_, got) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": image}),
        )
        .await;
    let message = got["error"]["message"].as_str().unwrap();
    assert!(message.contains("`image_url` are not supported"), "{message}");
    // Encoder routes on a decoder.
    for (path, body) in [
        ("/v1/embeddings", json!({"model": "tiny", "input": "hello"})),
        (
            "/v1/classify",
            json!({"model": "tiny", "input": "hello", "labels": ["a", "b"]}),
        ),
        ("/v1/extract", json!({"model": "tiny", "input": "hello"})),
    ] {
        let (status, got) = s.post(path, body).await;
        assert_eq!(status, 400, "{path}: {got}");
        assert_eq!(got["error"]["code"], "model_not_encoder", "{path}");
    }
    // /v1/models lists the decoder.
    let models: Value = s
        .http
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_hold_their_permit_and_the_limit_answers_429() {
    let limits = Limits {
        max_concurrent_requests: 1,
        ..Limits::default()
    };
    // 20 ms a step: the stream below lasts about 400 ms.
    let delay = Some(Duration::from_millis(20));
    let mut s = Server::start_slow("tiny-gpt2", limits, ModelLimits::default(), delay).await;
    let prompt = s.prompts()[0].clone();
    // Open a stream and keep it unread; a second request meanwhile is refused.
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 20, "stream": true});
    let open = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(open.status().as_u16(), 200);
    let (status, got) = s.post("/v1/completions", greedy(&prompt)).await;
    assert_eq!(status, 429, "{got}");
    assert_eq!(got["error"]["type"], "rate_limit_error");
    let _ = open.text().await.unwrap();
    // Once the stream is done, the permit is back.
    let mut ok = false;
    for _ in 0..50 {
        let (status, _) = s.post("/v1/completions", greedy(&prompt)).await;
        if status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_equal_single_requests_seeded_one_apart() {
    let mut s = Server::start("tiny-gpt2").await;
    let prompt = s.prompts()[0].clone();
    let body = |seed: u64, n: u32| {
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 1.5,
               "seed": seed, "n": n})
    };
    let (status, many) = s.post("/v1/completions", body(40, 3)).await;
    assert_eq!(status, 200, "{many}");
    let choices = many["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut total = 0;
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], json!(i));
        let (_, one) = s.post("/v1/completions", body(40 + i as u64, 1)).await;
        assert_eq!(choice["text"], one["choices"][0]["text"], "choice {i}");
        total += one["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(many["usage"]["completion_tokens"], json!(total));
    assert_eq!(many["usage"]["prompt_tokens"], one_prompt_tokens(&s, &prompt));

    // Streamed, with usage: chunks of the three choices interleave; each choice's pieces add up
    // to its text, each finishes once, and a last chunk without choices carries the usage.
    let mut streamed = body(40, 3);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = s.stream_chunks("/v1/completions", streamed).await;
    let (usage_chunk, chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], many["usage"]);
    let mut texts = vec![String::new(); 3];
    let mut finishes = [0; 3];
    for chunk in chunks {
        assert!(
            chunk.get("usage").is_none(),
            "usage only in the last chunk: {chunk}"
        );
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        texts[i].push_str(choice["text"].as_str().unwrap());
        finishes[i] += usize::from(!choice["finish_reason"].is_null());
    }
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(json!(texts[i]), choice["text"], "streamed choice {i}");
        assert_eq!(finishes[i], 1, "choice {i} finishes once");
    }
    s.stop();
}

fn one_prompt_tokens(s: &Server, prompt: &str) -> Value {
    json!(s.tokenizer.encode(prompt).unwrap().ids.len())
}

/// `log_softmax(logits)`, in f64.
fn log_softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z = logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|l| l - z).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_the_models_log_softmax() {
    let mut s = Server::start("tiny-llama").await;
    let prompt = s.prompts()[0].clone();
    let greedy_text = s.greedy_texts()[0].clone();
    let last_logits: Vec<Vec<f64>> = serde_json::from_value(s.reference["last_logits"].clone()).unwrap();
    let greedy_ids: Vec<Vec<u32>> = serde_json::from_value(s.reference["greedy_ids"].clone()).unwrap();
    let reference = log_softmax(&last_logits[0]);
    let mut best: Vec<f64> = reference.clone();
    best.sort_by(|a, b| b.total_cmp(a));

    let mut body = greedy(&prompt);
    body["logprobs"] = json!(3);
    let (status, got) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{got}");
    let choice = &got["choices"][0];
    assert_eq!(choice["text"], json!(greedy_text));
    let logprobs = &choice["logprobs"];
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 12, "one entry per generated token");
    // Each token's text sits at its offset. Tokens that are part of a character (byte
    // fallback in this random model) show as U+FFFD; they share the character's offset.
    let offsets: Vec<usize> = serde_json::from_value(logprobs["text_offset"].clone()).unwrap();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    for (token, &offset) in tokens.iter().zip(&offsets) {
        if !token.contains('\u{FFFD}') {
            assert!(greedy_text[offset..].starts_with(token), "{token:?} at {offset}");
        }
    }
    if !greedy_text.contains('\u{FFFD}') && tokens.iter().all(|t| !t.contains('\u{FFFD}')) {
        assert_eq!(tokens.concat(), greedy_text, "the tokens spell the text");
    }
    // The first token's log-probability and its alternatives against PyTorch's logits.
    let first = logprobs["token_logprobs"][0].as_f64().unwrap();
    assert!(
        (first - reference[greedy_ids[0][0] as usize]).abs() < 1e-4,
        "{first}"
    );
    let mut top: Vec<f64> = logprobs["top_logprobs"][0]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .collect();
    top.sort_by(|a, b| b.total_cmp(a));
    assert!(!top.is_empty() && top.len() <= 3);
    assert!(
        (top[0] - best[0]).abs() < 1e-4,
        "greedy picks the likeliest: {top:?}"
    );
    // Greedy: each chosen token is the likeliest at its position.
    for (i, lp) in logprobs["token_logprobs"].as_array().unwrap().iter().enumerate() {
        let top_here = logprobs["top_logprobs"][i].as_object().unwrap();
        let max = top_here
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((lp.as_f64().unwrap() - max).abs() < 1e-6, "token {i}");
    }
    // Without the field there are none.
    let (_, plain) = s.post("/v1/completions", greedy(&prompt)).await;
    assert!(plain["choices"][0]["logprobs"].is_null());

    // Streamed: the chunks' tokens add up to the same list.
    body["stream"] = json!(true);
    let chunks = s.stream_chunks("/v1/completions", body).await;
    let streamed: Vec<Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["logprobs"].is_null())
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()
                .clone()
        })
        .collect();
    assert_eq!(json!(streamed), logprobs["token_logprobs"]);

    // Chat: the `content` list with bytes and `top_logprobs` entries.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (status, got) = s.post("/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{got}");
    let content = got["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        got["usage"]["completion_tokens"].as_u64().unwrap()
    );
    // The tokens' raw bytes spell the answer exactly, also where a character is split across
    // tokens (whose text then shows U+FFFD).
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|e| serde_json::from_value::<Vec<u8>>(e["bytes"].clone()).unwrap())
        .collect();
    let answer = got["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&bytes), answer);
    for entry in content {
        let token = entry["token"].as_str().unwrap();
        if !token.contains('\u{FFFD}') {
            assert_eq!(entry["bytes"], json!(token.as_bytes()));
        }
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the likeliest.
        assert_eq!(entry["logprob"], top[0]["logprob"]);
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_content_parts_read_as_their_text() {
    let mut s = Server::start("tiny-llama").await;
    let ask = |content: Value| {
        json!({"model": "tiny", "messages": [{"role": "user", "content": content}],
               "max_tokens": 6, "temperature": 0})
    };
    let (_, plain) = s.post("/v1/chat/completions", ask(json!("first\nsecond"))).await;
    let parts = json!([{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]);
    let (status, got) = s.post("/v1/chat/completions", ask(parts)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["message"], plain["choices"][0]["message"]);
    assert_eq!(got["usage"], plain["usage"]);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_cache_budget_queues_sequences_and_refuses_what_cannot_fit() {
    // tiny-gpt2: 2 layers x (keys + values) x 32 wide x 4 bytes = 512 bytes a position; room for
    // 50 positions, which the pool holds as 3 blocks of 16 (48). A 7-token prompt + 12 new
    // tokens (19) reserves 2 blocks, so one sequence runs at a time.
    let model_limits = ModelLimits {
        kv_cache_bytes: 50 * 512,
        ..ModelLimits::default()
    };
    let mut s = Server::start_with("tiny-gpt2", Limits::default(), model_limits).await;
    let prompts = s.prompts();
    let want = s.greedy_texts();
    let answers =
        join_all((0..6).map(|i| s.post("/v1/completions", greedy(&prompts[i % prompts.len()])))).await;
    assert_greedy_texts(&answers, &want);
    let metrics = s.metrics().await;
    // Every sequence ran one at a time: the largest batch was one sequence.
    let ones = metric(&metrics, "atomic_worker_batch_size_bucket{le=\"1\"}");
    let all = metric(&metrics, "atomic_worker_batch_size_count");
    assert_eq!(ones, all, "no step ran two sequences");
    assert!(all >= 72.0, "six sequences of 12 tokens took {all} steps");
    // The reservation is released once the thread has retired the sequences (just after they
    // answer).
    let mut reserved = f64::NAN;
    for _ in 0..100 {
        reserved = metric(&s.metrics().await, "atomic_worker_kv_cache_reserved_positions");
        if reserved == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(reserved, 0.0);
    assert_eq!(
        metric(&metrics, "atomic_worker_kv_cache_capacity_positions"),
        48.0
    );
    // A request that needs more than the whole budget is refused up front.
    let mut body = greedy(&prompts[0]);
    body["max_tokens"] = json!(45);
    let (status, got) = s.post("/v1/completions", body).await;
    assert_eq!(status, 400, "{got}");
    assert_eq!(got["error"]["code"], "kv_cache_exceeded");
    assert!(
        got["error"]["message"].as_str().unwrap().contains("holds 48"),
        "{got}"
    );
    s.stop();
}

/// The value of the first sample line of `name` in a Prometheus text exposition.
/// Checks that answer `i` is a 200 completion with the greedy text of prompt `i % want.len()`.
fn assert_greedy_texts(answers: &[(u16, Value)], want: &[String]) {
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {body}");
        assert_eq!(
            body["choices"][0]["text"],
            json!(want[i % want.len()]),
            "request {i}"
        );
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

/// Decode throughput through HTTP: 1 and 8 concurrent greedy completions on each tiny model,
/// printed; run with `cargo test --release -p atomic-worker --test generation -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing, not a check"]
async fn http_decode_throughput() {
    for name in ["tiny-gpt2", "tiny-llama", "tiny-qwen2"] {
        let mut s = Server::start(name).await;
        let prompt = s.prompts()[0].clone();
        let prompt_tokens = s.tokenizer.encode(&prompt).unwrap().ids.len();
        let max_tokens = 64 - prompt_tokens;
        for concurrency in [1usize, 8] {
            let rounds = 10;
            let started = std::time::Instant::now();
            let mut tokens = 0;
            for _ in 0..rounds {
                let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                  "temperature": 0});
                let answers =
                    join_all((0..concurrency).map(|_| s.post("/v1/completions", body.clone()))).await;
                for (status, a) in answers {
                    assert_eq!(status, 200, "{a}");
                    tokens += a["usage"]["completion_tokens"].as_u64().unwrap();
                }
            }
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{name}: {concurrency} concurrent: {tokens} tokens in {secs:.2} s: {:.0} tokens/s through HTTP",
                tokens as f64 / secs
            );
        }
        s.stop();
    }
}

#[test]
fn a_key_value_pool_too_large_for_memory_is_a_clear_error() {
    // 2^50 bytes (a pebibyte) cannot be had: loading fails with an error that names the flag
    // (here the block count is refused before any allocation is tried), rather than the process
    // aborting on a failed allocation.
    let limits = ModelLimits {
        kv_cache_bytes: 1 << 50,
        ..ModelLimits::default()
    };
    let err = match server::load_model(&fixture("tiny-llama"), 1, &limits) {
        Ok(_) => panic!("a pebibyte key/value pool was allocated"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("--kv-cache-mib") && err.contains("too large"),
        "{err}"
    );
}

#[test]
fn the_largest_pass_runs_once_at_start_up() {
    // What a GPU worker does before it reports ready (its buffer cache then holds the peak
    // working set), checked here on the CPU: the largest pass the schedulers can run, and no
    // more. tiny-bert: two sequences of its 64-token maximum fit 130 tokens, and with a budget
    // of 40 one such sequence still runs (alone). The decoders' context is 64 positions; a pool
    // of 16 KiB holds 64 positions of tiny-llama and 32 of tiny-gpt2 (twice as wide), which
    // caps the pass below the budget and the context; with a pool of 1 MiB (4096 positions of
    // tiny-llama) a budget of 150 runs as prompts of 64, 64 and 22 tokens together, and a budget
    // of 10 as one prompt of the whole context (the first waiting prompt joins whatever its
    // length).
    for (name, budget, kv_cache_bytes, want) in [
        ("tiny-bert", 130, 16 << 10, 128),
        ("tiny-bert", 40, 16 << 10, 64),
        ("tiny-llama", 100, 16 << 10, 64),
        ("tiny-gpt2", 40, 16 << 10, 32),
        ("tiny-llama", 150, 1 << 20, 150),
        ("tiny-llama", 10, 1 << 20, 64),
    ] {
        let limits = ModelLimits {
            max_batch_tokens: budget,
            kv_cache_bytes,
        };
        let passes = Arc::new(AtomicUsize::new(0));
        let mut parts = match server::load_model(&fixture(name), 1, &limits).unwrap() {
            ModelParts::Decoder(d) => ModelParts::Decoder(DecoderParts {
                tokenizer: d.tokenizer,
                model: Box::new(TestDecoder {
                    steps: passes.clone(),
                    ..TestDecoder::new(d.model)
                }),
            }),
            ModelParts::Encoder(mut e) => {
                e.encoder = Box::new(CountingEncoder(e.encoder, passes.clone()));
                ModelParts::Encoder(e)
            }
        };
        let tokens = server::reserve_working_set(&mut parts, &limits).unwrap();
        assert_eq!(tokens, want, "{name}, budget {budget}");
        assert_eq!(
            passes.load(Ordering::Relaxed),
            1,
            "{name}, budget {budget}: passes run"
        );
        if let ModelParts::Decoder(d) = &mut parts {
            // The pass gave its blocks back: the whole pool is free for new sequences.
            let (capacity, context) = (d.model.kv_capacity_positions(), d.model.max_positions());
            let prompts: Vec<Vec<u32>> = (0..capacity / context.min(capacity))
                .map(|_| vec![0; context.min(capacity)])
                .collect();
            let mut caches: Vec<_> = prompts.iter().map(|_| d.model.new_cache()).collect();
            let mut refs: Vec<_> = caches.iter_mut().collect();
            let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            d.model.step(&mut refs, &prompt_refs).unwrap();
        }
    }
}

/// A step the device cannot hold runs in smaller pieces of the batch: concurrent requests whose
/// prompts do not fit one step together each get the text they get alone, and the splits show
/// in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_out_of_device_memory_runs_in_pieces_and_every_request_gets_its_text() {
    let dir = atomic_worker::ModelDir::open(&fixture("tiny-llama")).unwrap();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama").join("reference.json")).unwrap())
            .unwrap();
    let prompts: Vec<String> = serde_json::from_value(reference["prompts"].clone()).unwrap();
    // Every prompt fits a step alone; two together do not.
    let longest = prompts
        .iter()
        .map(|p| dir.tokenizer.encode(p).unwrap().ids.len())
        .max()
        .unwrap();
    let mut s = start_test_decoder(move |d| TestDecoder {
        oom_above: longest,
        delay: Duration::from_millis(10),
        ..d
    })
    .await;
    let want = s.greedy_texts();
    let requests: Vec<_> = (0..3)
        .flat_map(|_| prompts.iter())
        .map(|p| s.post("/v1/completions", greedy(p)))
        .collect();
    assert_greedy_texts(&join_all(requests).await, &want);
    let metrics = s.metrics().await;
    let splits = metric(
        &metrics,
        "atomic_worker_out_of_memory_splits_total{pass=\"decode\"}",
    );
    assert!(splits > 0.0, "no step was split:\n{metrics}");
    s.stop();
}

/// A step that runs out of device memory fails its requests with 503 `out_of_memory` (plain and
/// streamed), and the worker stays ready and answers the next, smaller request as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_out_of_device_memory_answers_503_and_the_worker_goes_on() {
    let mut s = start_test_decoder(|d| TestDecoder { oom_above: 8, ..d }).await;
    let long = "the parcel never arrived and nobody answers the phone";
    assert!(
        s.tokenizer.encode(long).unwrap().ids.len() > 8,
        "the prompt must be longer than 8 tokens"
    );
    let (status, body) = s.post("/v1/completions", greedy(long)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "out_of_memory", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("allocating a step of"), "{message}");
    let mut streamed = greedy(long);
    streamed["stream"] = json!(true);
    let events = s.stream("/v1/completions", streamed).await;
    assert!(
        events.iter().any(|e| e.contains("out_of_memory")),
        "no out_of_memory error in the stream: {events:?}"
    );
    let ready = s
        .http
        .get(format!("{}/ready", s.base))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(
        ready.as_u16(),
        200,
        "a step out of memory made the worker unready"
    );
    let short = "hi";
    assert!(
        s.tokenizer.encode(short).unwrap().ids.len() <= 8,
        "the prompt must fit 8 tokens"
    );
    let (status, body) = s
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": short, "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], json!(2));
    s.stop();
}
