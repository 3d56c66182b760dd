//! Text generation: a decode scheduler with continuous batching.
//!
//! One thread owns the decoder. It keeps a set of active sequences, each with its own
//! [`KvCache`], [`Sampler`] and incremental detokenizer, and every step advances all of them
//! together with [`CausalLm::step`]: a sequence that just joined contributes its whole prompt
//! (prefill), the others their last token. New requests join between steps; a sequence that
//! finishes (end-of-sequence token, stop string, `max_tokens`, full context) leaves at once.
//! Each sequence reports through a channel: text as it is produced (held back while it might be
//! the start of a stop string), with its tokens' log-probabilities when asked, then how it ended.
//!
//! Admission: every sequence reserves key/value cache for its prompt plus `max_tokens` (at most
//! the context) when it joins. Sequences join in arrival order while the reservations fit the
//! cache budget (`--kv-cache-mib`); the rest wait, so memory stays bounded under any load.
//!
//! A step that runs out of device memory runs again in smaller pieces of the batch ([`split`]),
//! and later steps in pieces of at most as many new tokens as the largest piece that ran (a
//! limit that doubles after steps go by without running out); only a sequence that runs out of
//! memory alone fails (503 `out_of_memory`).
//!
//! [`split`]: super::split

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::mpsc as tokio_mpsc;

use super::fault::DeviceFault;
use super::metrics::Metrics;
use super::split::{Failure, PieceLimit};
use crate::Error;
use crate::backend::{Backend, CpuBackend};
use crate::config::ModelConfig;
use crate::model_dir::ModelDir;
use crate::models::decoder::CausalLm;
use crate::models::gpt2::Gpt2;
use crate::models::kv_cache::{KvCache, KvPool, round_to_blocks};
use crate::models::llama::Llama;
use crate::sampling::{FinishReason, Sampler, SamplingParams, TokenDraw, find_stop, step_logprobs};
use crate::tokenizer::Tokenizer;

/// A decoder together with the backend it runs on and its key/value pool, the backend's type
/// erased, so that the generation thread and [`DecoderParts`] do not depend on which backend it
/// is.
pub trait Decoder: Send {
    /// [`CausalLm::step`] on the decoder's backend and pool.
    fn step(&mut self, caches: &mut [&mut KvCache], tokens: &[&[u32]]) -> crate::Result<Vec<Vec<f32>>>;
    /// [`CausalLm::step_sample`]: each sequence's next token, chosen on the backend by its
    /// [`TokenDraw`].
    fn step_sample(
        &mut self,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
        draws: &[TokenDraw],
    ) -> crate::Result<Vec<u32>>;
    /// Token ids that end generation.
    fn eos_token_ids(&self) -> &[u32];
    /// An empty cache for one sequence in the decoder's pool.
    fn new_cache(&self) -> KvCache;
    /// The model's context length.
    fn max_positions(&self) -> usize;
    /// Positions the key/value pool holds over all sequences.
    fn kv_capacity_positions(&self) -> usize;
    /// The device's counts for the metrics (`Backend::device_stats`).
    fn device_stats(&self) -> Option<crate::backend::DeviceStats> {
        None
    }
}

/// A [`CausalLm`] on backend `B`, with its key/value pool.
pub struct DecoderOn<B: Backend> {
    model: Box<dyn CausalLm<B> + Send>,
    backend: B,
    pool: KvPool<B>,
}

impl<B: Backend> DecoderOn<B> {
    /// The model on `backend` with a key/value pool of `kv_cache_bytes` (at least one block),
    /// allocated now so that running out of device memory shows at start-up.
    pub fn new(model: Box<dyn CausalLm<B> + Send>, backend: B, kv_cache_bytes: usize) -> crate::Result<Self> {
        let pool = KvPool::with_bytes(
            &backend,
            model.cache_layout(),
            model.max_positions(),
            kv_cache_bytes,
        )
        .map_err(|e| {
            Error::Setup(format!(
                "allocating the key/value pool of {} MiB (--kv-cache-mib): {e}",
                kv_cache_bytes >> 20
            ))
        })?;
        Ok(Self { model, backend, pool })
    }
}

impl<B: Backend> Decoder for DecoderOn<B> {
    fn step(&mut self, caches: &mut [&mut KvCache], tokens: &[&[u32]]) -> crate::Result<Vec<Vec<f32>>> {
        self.model.step(&self.backend, &mut self.pool, caches, tokens)
    }

    fn step_sample(
        &mut self,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
        draws: &[TokenDraw],
    ) -> crate::Result<Vec<u32>> {
        self.model
            .step_sample(&self.backend, &mut self.pool, caches, tokens, draws)
    }

    fn eos_token_ids(&self) -> &[u32] {
        self.model.eos_token_ids()
    }

    fn new_cache(&self) -> KvCache {
        self.pool.new_cache()
    }

    fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    fn kv_capacity_positions(&self) -> usize {
        self.pool.capacity_positions()
    }

    fn device_stats(&self) -> Option<crate::backend::DeviceStats> {
        self.backend.device_stats()
    }
}

/// A loaded decoder, before it is started.
pub struct DecoderParts {
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The model on its backend.
    pub model: Box<dyn Decoder>,
}

/// Loads a decoder (GPT-2 or Llama family) from an opened model folder on a CPU backend with
/// `threads` threads (0: all cores) and a key/value pool of `kv_cache_bytes`.
pub fn load_decoder_dir(dir: ModelDir, threads: usize, kv_cache_bytes: usize) -> crate::Result<DecoderParts> {
    load_decoder_on(dir, CpuBackend::new(threads)?, kv_cache_bytes)
}

/// Loads a decoder (GPT-2 or Llama family) from an opened model folder onto `backend`, with a
/// key/value pool of `kv_cache_bytes`.
pub fn load_decoder_on<B: Backend + 'static>(
    dir: ModelDir,
    backend: B,
    kv_cache_bytes: usize,
) -> crate::Result<DecoderParts> {
    let model: Box<dyn CausalLm<B> + Send> = match &dir.config {
        ModelConfig::Gpt2(c) => Box::new(Gpt2::load(&backend, c, &dir.weights, &dir.tensor_prefix)?),
        ModelConfig::Llama(c) => Box::new(Llama::load(&backend, c, &dir.weights, &dir.tensor_prefix)?),
        ModelConfig::Bert(_) => {
            return Err(Error::Setup(format!(
                "{}: the model is an encoder, not a decoder",
                dir.path.display()
            )));
        }
    };
    Ok(DecoderParts {
        tokenizer: dir.tokenizer,
        model: Box::new(DecoderOn::new(model, backend, kv_cache_bytes)?),
    })
}

/// Opens `dir` and loads its decoder on a CPU backend with `threads` threads (0: all cores)
/// and a key/value pool of `kv_cache_bytes`.
pub fn load_decoder(dir: &Path, threads: usize, kv_cache_bytes: usize) -> crate::Result<DecoderParts> {
    load_decoder_dir(ModelDir::open(dir)?, threads, kv_cache_bytes)
}

/// A token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChoice {
    /// The token's text (in the context of the token before it, so leading spaces show; U+FFFD
    /// for a token that is only part of a character).
    pub text: String,
    /// The raw bytes the token stands for.
    pub bytes: Vec<u8>,
    /// Its natural-log probability under the model.
    pub logprob: f64,
}

/// A generated token with its log-probability and the likeliest alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The generated token.
    pub token: TokenChoice,
    /// The likeliest tokens at this position, likeliest first.
    pub top: Vec<TokenChoice>,
    /// Byte offset of the token's text in the generated text.
    pub offset: usize,
}

/// What a sequence reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text, and the tokens it came from when log-probabilities were asked for. The text
    /// is empty only in a last event that carries the log-probabilities of tokens with no text.
    Text {
        /// The new text.
        text: String,
        /// Log-probabilities of the tokens behind `text` (empty unless requested).
        logprobs: Vec<TokenLogprob>,
    },
    /// Generation ended, with the number of tokens generated.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Tokens generated (an end-of-sequence token is not counted).
        completion_tokens: usize,
    },
    /// The model failed; nothing more comes.
    Error(String),
    /// The device ran out of memory on the step holding this sequence (it stays usable);
    /// nothing more comes.
    OutOfMemory(String),
}

/// What a caller asks the generation thread for.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// The prompt's token ids (at least one).
    pub prompt: Vec<u32>,
    /// How to sample and when to stop.
    pub params: SamplingParams,
    /// Report each token's log-probability and this many alternatives (`None`: none).
    pub top_logprobs: Option<usize>,
}

struct Request {
    request: GenerationRequest,
    events: tokio_mpsc::UnboundedSender<Event>,
    enqueued: Instant,
}

/// The handle request handlers use to start generations. Dropping every handle stops the thread
/// once the sequences already running are done.
#[derive(Clone)]
pub struct Generator {
    tx: mpsc::Sender<Request>,
    max_positions: usize,
    kv_budget: usize,
}

impl Generator {
    /// Starts the generation thread, which owns the model; prefills joining in one step are
    /// limited to `max_batch_tokens` prompt tokens (at least one prompt joins), and the running
    /// sequences' key/value cache reservations to the decoder's pool.
    pub fn start(
        mut model: Box<dyn Decoder>,
        tokenizer: Arc<Tokenizer>,
        max_batch_tokens: usize,
        fault: DeviceFault,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let max_positions = model.max_positions();
        let kv_budget = model.kv_capacity_positions();
        metrics.kv_cache_capacity.set(kv_budget as i64);
        std::thread::Builder::new()
            .name("generator".to_owned())
            .spawn(move || {
                run(
                    model.as_mut(),
                    &tokenizer,
                    rx,
                    Budgets {
                        prefill_tokens: max_batch_tokens.max(1),
                        kv_positions: kv_budget,
                    },
                    &fault,
                    &metrics,
                )
            })?;
        Ok(Self {
            tx,
            max_positions,
            kv_budget,
        })
    }

    /// The most key/value cache positions the running sequences may reserve together: a
    /// request whose prompt plus `max_tokens` needs more can never run.
    pub fn kv_budget_positions(&self) -> usize {
        self.kv_budget
    }

    /// The model's context length (prompt and generated tokens).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Starts generating a continuation of `prompt`; its events arrive on the receiver. `None`
    /// when the generation thread has stopped. Dropping the receiver cancels the sequence.
    pub fn submit(&self, request: GenerationRequest) -> Option<tokio_mpsc::UnboundedReceiver<Event>> {
        let (events, rx) = tokio_mpsc::unbounded_channel();
        self.tx
            .send(Request {
                request,
                events,
                enqueued: Instant::now(),
            })
            .ok()?;
        Some(rx)
    }
}

/// Turns generated ids into text piece by piece, decoding only a window of recent tokens (as
/// Hugging Face's text-generation-inference does): the text of `ids[prefix..]` minus that of
/// `ids[prefix..read]` is what the newest tokens add, once it no longer ends in an incomplete
/// character.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds a token; the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> crate::Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tokenizer.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let added = now.get(before.len()..).unwrap_or_default().to_owned();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(added)
        } else {
            Ok(String::new())
        }
    }

    /// Text still pending at the end (an incomplete character, shown as it decodes).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> crate::Result<String> {
        let before = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tokenizer.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_owned())
    }
}

/// The length of the longest end of `text` that is a proper beginning of one of `stops`: text
/// that must be held back because the next tokens may complete a stop string.
pub fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut held = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if i > held && text.ends_with(&stop[..i]) {
                held = i;
            }
        }
    }
    held
}

/// Key/value cache positions a request reserves: its prompt and every token it may generate,
/// within the model's context, in whole blocks of the pool (so that reservations that fit the
/// pool always find their blocks free).
pub fn kv_reservation(prompt_tokens: usize, max_tokens: usize, max_positions: usize) -> usize {
    round_to_blocks(prompt_tokens.saturating_add(max_tokens).min(max_positions))
}

struct Sequence {
    cache: KvCache,
    sampler: Sampler,
    params: SamplingParams,
    /// Tokens to feed next step: the prompt, then the last generated token.
    next: Vec<u32>,
    generated: usize,
    detokenizer: Detokenizer,
    /// Text so far, and how much of it was sent.
    text: String,
    sent: usize,
    /// Alternatives to report per token, when log-probabilities were asked for.
    top_logprobs: Option<usize>,
    /// Tokens whose log-probabilities are not sent yet.
    logprobs: Vec<TokenLogprob>,
    /// Key/value cache positions reserved for this sequence.
    reserved: usize,
    events: tokio_mpsc::UnboundedSender<Event>,
    enqueued: Option<Instant>,
}

/// The text `id` adds after `previous` (so that a leading space, which tokenizers attach to the
/// following word, shows); special tokens are kept so an end-of-text alternative is visible.
fn token_text(tokenizer: &Tokenizer, previous: Option<u32>, id: u32) -> String {
    if let Some(prev) = previous
        && let (Ok(before), Ok(both)) = (
            tokenizer.decode(&[prev], false),
            tokenizer.decode(&[prev, id], false),
        )
        && let Some(added) = both.strip_prefix(before.as_str())
    {
        return added.to_owned();
    }
    tokenizer.decode(&[id], false).unwrap_or_default()
}

impl Sequence {
    /// Sends the text up to byte `upto` and the log-probabilities of the tokens that start
    /// before it.
    fn send_text(&mut self, upto: usize) {
        if upto <= self.sent {
            return;
        }
        let Some(piece) = self.text.get(self.sent..upto) else {
            return;
        };
        let ready = self.logprobs.iter().take_while(|t| t.offset < upto).count();
        let logprobs = self.logprobs.drain(..ready).collect();
        let _ = self.events.send(Event::Text {
            text: piece.to_owned(),
            logprobs,
        });
        self.sent = upto;
    }

    /// Cuts the text before a stop string at `at`, with the tokens that lie wholly inside it.
    fn truncate(&mut self, at: usize) {
        self.text.truncate(at);
        self.logprobs.retain(|t| t.offset < at);
    }

    fn finish(&mut self, finish_reason: FinishReason) {
        self.send_text(self.text.len());
        if !self.logprobs.is_empty() {
            // Tokens that added no text of their own (a special token, say).
            let logprobs = std::mem::take(&mut self.logprobs);
            let _ = self.events.send(Event::Text {
                text: String::new(),
                logprobs,
            });
        }
        let _ = self.events.send(Event::Done {
            finish_reason,
            completion_tokens: self.generated,
        });
    }

    /// Whether the backend can choose this sequence's next token where the logits are: nothing
    /// else is read from them (no log-probabilities).
    fn device_choosable(&self) -> bool {
        self.top_logprobs.is_none()
    }

    /// Takes the next token; whether the sequence is finished (and has reported so).
    fn advance(&mut self, model: &dyn Decoder, tokenizer: &Tokenizer, next: Next) -> bool {
        let (id, logits) = match &next {
            Next::Logits(logits) => (self.sampler.sample(logits), Some(logits.as_slice())),
            Next::Token(id) => (*id, None),
        };
        if model.eos_token_ids().contains(&id) {
            if let Ok(rest) = self.detokenizer.flush(tokenizer) {
                self.text.push_str(&rest);
            }
            if let Some(at) = find_stop(&self.text, &self.params.stop) {
                self.truncate(at);
            }
            self.finish(FinishReason::Stop);
            return true;
        }
        self.generated += 1;
        let piece = match self.detokenizer.push(tokenizer, id) {
            Ok(piece) => piece,
            Err(e) => {
                let _ = self.events.send(Event::Error(e.to_string()));
                return true;
            }
        };
        self.text.push_str(&piece);
        if let (Some(top), Some(logits)) = (self.top_logprobs, logits) {
            let previous = self.next.last().copied();
            let step = step_logprobs(logits, id, top);
            let choice = |id: u32, logprob: f64| TokenChoice {
                text: token_text(tokenizer, previous, id),
                bytes: tokenizer.token_bytes(id).unwrap_or_default(),
                logprob,
            };
            let token = choice(id, step.logprob);
            let text = &token.text;
            // The piece may also hold earlier tokens' text (bytes that only now made a whole
            // character); this token's own text is at its end when it shows there.
            let offset = if !text.is_empty() && piece.ends_with(text.as_str()) {
                self.text.len() - text.len()
            } else {
                self.text.len() - piece.len()
            };
            self.logprobs.push(TokenLogprob {
                top: step.top.into_iter().map(|(alt, lp)| choice(alt, lp)).collect(),
                token,
                offset,
            });
        }
        let length = self.generated >= self.params.max_tokens || self.cache.remaining() == 0;
        if length && let Ok(rest) = self.detokenizer.flush(tokenizer) {
            self.text.push_str(&rest);
        }
        if let Some(at) = find_stop(&self.text, &self.params.stop) {
            self.truncate(at);
            self.finish(FinishReason::Stop);
            return true;
        }
        if length {
            self.finish(FinishReason::Length);
            return true;
        }
        let held = stop_prefix_len(&self.text, &self.params.stop);
        self.send_text(self.text.len() - held);
        self.next = vec![id];
        false
    }
}

/// What a step gives one sequence: its logits, or, when the backend can choose every sequence's
/// next token (greedy, or sampling with nothing cut, and no log-probabilities), that token (so a
/// GPU sends ids instead of a vocabulary of logits per sequence).
enum Next {
    Logits(Vec<f32>),
    Token(u32),
}

fn reserved_positions(active: &[Sequence]) -> i64 {
    active.iter().map(|s| s.reserved as i64).sum()
}

/// The generation thread's limits.
#[derive(Clone, Copy, Debug)]
struct Budgets {
    /// Prompt tokens that may join in one step (at least one prompt always joins).
    prefill_tokens: usize,
    /// Key/value cache positions the running sequences may reserve together.
    kv_positions: usize,
}

fn run(
    model: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    rx: mpsc::Receiver<Request>,
    budgets: Budgets,
    fault: &DeviceFault,
    metrics: &Metrics,
) {
    let mut active: Vec<Sequence> = Vec::new();
    let mut limit = PieceLimit::new();
    let max_positions = model.max_positions();
    let mut waiting: std::collections::VecDeque<Request> = std::collections::VecDeque::new();
    loop {
        if active.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(request) => waiting.push_back(request),
                Err(_) => return,
            }
        }
        while let Ok(request) = rx.try_recv() {
            waiting.push_back(request);
        }
        // Join between steps, in arrival order, under the prefill and cache budgets.
        let mut joining = 0;
        let mut reserved: usize = active.iter().map(|s| s.reserved).sum();
        while let Some(waiter) = waiting.front() {
            let GenerationRequest { prompt, params, .. } = &waiter.request;
            if waiter.events.is_closed() {
                waiting.pop_front();
                continue;
            }
            let need = kv_reservation(prompt.len(), params.max_tokens, max_positions);
            if prompt.is_empty() || prompt.len() > max_positions || need > budgets.kv_positions {
                let message = if need > budgets.kv_positions {
                    format!(
                        "the request needs {need} key/value cache positions; this worker holds {}",
                        budgets.kv_positions
                    )
                } else {
                    format!(
                        "the prompt has {} tokens; the model takes 1 to {max_positions}",
                        prompt.len()
                    )
                };
                let _ = waiter.events.send(Event::Error(message));
                waiting.pop_front();
                continue;
            }
            let over_prefill = joining > 0 && joining + prompt.len() > budgets.prefill_tokens;
            if over_prefill || reserved + need > budgets.kv_positions {
                break;
            }
            let Some(Request {
                request,
                events,
                enqueued,
            }) = waiting.pop_front()
            else {
                break;
            };
            joining += request.prompt.len();
            reserved += need;
            active.push(Sequence {
                cache: model.new_cache(),
                sampler: Sampler::new(&request.params),
                params: request.params,
                next: request.prompt,
                generated: 0,
                detokenizer: Detokenizer::default(),
                text: String::new(),
                sent: 0,
                top_logprobs: request.top_logprobs,
                logprobs: Vec::new(),
                reserved: need,
                events,
                enqueued: Some(enqueued),
            });
        }
        // Sequences whose caller has gone (client disconnected) are not worth running.
        active.retain(|s| !s.events.is_closed());
        metrics.queue_size.set(waiting.len() as i64);
        metrics.kv_cache_reserved.set(reserved_positions(&active));
        if active.is_empty() {
            continue;
        }
        for s in &mut active {
            if let Some(enqueued) = s.enqueued.take() {
                metrics.observe_stage("queue", enqueued.elapsed().as_secs_f64());
            }
        }

        // Drawn once for the whole step: a piece retried after running out of memory samples
        // with the same draws (split.rs).
        let inputs: Vec<Vec<u32>> = active.iter().map(|s| s.next.clone()).collect();
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let draws: Option<Vec<TokenDraw>> = active
            .iter()
            .all(Sequence::device_choosable)
            .then(|| active.iter_mut().map(|s| s.sampler.next_draw()).collect());
        let started = Instant::now();
        let outcome = limit.run(
            active.len(),
            |piece| refs[piece].iter().map(|t| t.len()).sum(),
            |piece| {
                let mut caches: Vec<&mut KvCache> =
                    active[piece.clone()].iter_mut().map(|s| &mut s.cache).collect();
                let refs = &refs[piece.clone()];
                fault.run_pass(
                    || match &draws {
                        Some(draws) => model
                            .step_sample(&mut caches, refs, &draws[piece.clone()])
                            .map(|ids| ids.into_iter().map(Next::Token).collect::<Vec<_>>()),
                        None => model
                            .step(&mut caches, refs)
                            .map(|rows| rows.into_iter().map(Next::Logits).collect()),
                    },
                    Error::to_string,
                    || "the model panicked on this step".to_owned(),
                )
            },
            |got, want| format!("the model gave {got} rows for {want} sequences"),
        );
        metrics.observe_stage("decode_step", started.elapsed().as_secs_f64());
        if let Some(stats) = model.device_stats() {
            metrics.record_device(&stats);
        }
        metrics.record_pieces("decode", &outcome.ran, outcome.splits, limit.most());
        let mut done = vec![false; active.len()];
        for ((s, d), result) in active.iter_mut().zip(&mut done).zip(outcome.results) {
            *d = match result {
                Ok(next) => s.advance(model, tokenizer, next),
                Err(failure) => {
                    let event = match failure {
                        Failure::OutOfMemory(message) => Event::OutOfMemory(message),
                        Failure::Failed(message) => Event::Error(message),
                    };
                    tracing::error!(?event, "decode step failed");
                    let _ = s.events.send(event);
                    true
                }
            };
        }
        let mut flags = done.into_iter();
        active.retain(|_| !flags.next().unwrap_or(true));
        metrics.kv_cache_reserved.set(reserved_positions(&active));
    }
}

/// Renders a chat with a Hugging Face chat template (Jinja), as `apply_chat_template` does with
/// `add_generation_prompt=True`.
pub fn render_chat(
    template: &str,
    messages: &[atomic_protocol::ChatMessage],
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| format!("the chat template does not parse: {e}"))?;
    let template = env
        .get_template("chat")
        .map_err(|e| format!("the chat template does not parse: {e}"))?;
    template
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => bos_token.unwrap_or_default(),
            eos_token => eos_token.unwrap_or_default(),
        })
        .map_err(|e| format!("the chat template failed on these messages: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use atomic_protocol::ChatMessage;

    #[test]
    fn held_back_text_is_a_stop_prefix() {
        let stops = vec!["END".to_owned(), "\n\n".to_owned()];
        assert_eq!(stop_prefix_len("hello", &stops), 0);
        assert_eq!(stop_prefix_len("hello E", &stops), 1);
        assert_eq!(stop_prefix_len("hello EN", &stops), 2);
        assert_eq!(stop_prefix_len("hello\n", &stops), 1);
        assert_eq!(
            stop_prefix_len("hello END", &stops),
            0,
            "a whole stop is found, not held"
        );
    }

    #[test]
    fn chatml_renders() {
        let template = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
                        message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if \
                        add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let messages = vec![
            ChatMessage {
                role: "system".to_owned(),
                content: "Be brief.".to_owned(),
            },
            ChatMessage {
                role: "user".to_owned(),
                content: "Hi".to_owned(),
            },
        ];
        let got = render_chat(template, &messages, None, Some("<|im_end|>")).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = render_chat("{{ raise_exception('no system role') }}", &messages, None, None).unwrap_err();
        assert!(err.contains("no system role"), "{err}");
    }
}
