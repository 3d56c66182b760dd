//! Text generation over HTTP: each test starts a server in-process on 127.0.0.1:0 with a tiny
//! decoder fixture and checks completions, chat and streaming against the PyTorch references.

use std::sync::Arc;

use atomic_worker::Tokenizer;
use atomic_worker::server::{self, AppState, Engine, Limits, Metrics};
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
        Self::start_with(name, Limits::default()).await
    }

    async fn start_with(name: &str, limits: Limits) -> Server {
        let folder = fixture(name);
        let metrics = Arc::new(Metrics::new().unwrap());
        let state = AppState::new("tiny", limits, metrics.clone());
        let parts = server::load_model(&folder, 2).unwrap();
        state.set_engine(Engine::start_model(parts, vec![], 16384, metrics).unwrap());
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

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
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
        let events = s.stream("/v1/completions", body).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert!(chunks.len() > 2, "{events:?}");
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
    let events = s.stream("/v1/completions", body).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
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
    let events = s.stream("/v1/chat/completions", streamed).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
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
    ];
    for (mut body, code) in cases {
        body["model"] = json!("tiny");
        let (status, got) = s.post("/v1/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {got}");
        assert_eq!(got["error"]["code"], code, "{body} -> {got}");
        assert_eq!(got["error"]["type"], "invalid_request_error");
        assert!(got["error"]["message"].is_string());
    }
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
    let mut s = Server::start_with("tiny-gpt2", limits).await;
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
