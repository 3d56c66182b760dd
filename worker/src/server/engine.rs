//! The model being served: loading a model folder into an [`Engine`], and what each kind of
//! model can do: encoders (embeddings, classification, extraction) run on the batching
//! [`Scheduler`], decoders (text generation) on the continuous-batching [`Generator`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::Task;
use super::fault::DeviceFault;
use super::generator::{DecoderParts, Generator, load_decoder_on};
use super::metrics::Metrics;
use super::scheduler::{BertEncoder, Encoder, Scheduler, Work};
use crate::Error;
use crate::backend::{Backend, CpuBackend};
use crate::config::{BertHead, ModelConfig};
use crate::model_dir::ModelDir;
use crate::models::bert::Bert;
use crate::models::kv_cache::round_to_blocks;
use crate::tokenizer::{Encoding, Tokenizer};

/// What sits on top of an encoder, with its class names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// No head: embeddings, and zero-shot classification by embedding similarity.
    None,
    /// Sequence classification over these labels.
    Sequence(Vec<String>),
    /// Token classification over these (BIO) labels.
    Token(Vec<String>),
}

/// What the loaded model can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// An encoder (BERT family) with its head.
    Encoder(Head),
    /// A decoder (GPT-2, Llama family): text generation.
    Decoder,
}

/// A loaded model of either kind, before it is started.
pub enum ModelParts {
    /// An encoder.
    Encoder(EncoderParts),
    /// A decoder.
    Decoder(DecoderParts),
}

/// Opens `dir` and loads whichever kind of model it holds on a CPU backend with `threads`
/// threads (0: all cores); a decoder gets a key/value pool of `limits.kv_cache_bytes`.
pub fn load_model(dir: &Path, threads: usize, limits: &ModelLimits) -> crate::Result<ModelParts> {
    load_model_on(dir, CpuBackend::new(threads)?, limits)
}

/// Opens `dir` and loads whichever kind of model it holds onto `backend`; a decoder gets a
/// key/value pool of `limits.kv_cache_bytes`.
pub fn load_model_on<B: Backend + 'static>(
    dir: &Path,
    backend: B,
    limits: &ModelLimits,
) -> crate::Result<ModelParts> {
    let opened = ModelDir::open(dir)?;
    match opened.config {
        ModelConfig::Bert(_) => load_encoder_on(opened, backend).map(ModelParts::Encoder),
        ModelConfig::Gpt2(_) | ModelConfig::Llama(_) => {
            load_decoder_on(opened, backend, limits.kv_cache_bytes).map(ModelParts::Decoder)
        }
    }
}

/// Runs the largest forward pass `limits` allow and discards it, so that a GPU's buffer
/// cache holds the peak working set before the worker reports ready: running out of memory
/// shows at start-up rather than on the first large batch, and later passes take their
/// buffers from what the cache already holds. The largest pass is what the schedulers can
/// run: encoders, as many sequences of the tokenizer's maximum length as `max_batch_tokens`
/// admits, or one such sequence when it is longer than the budget (it then runs alone);
/// decoders, prompts of `max_batch_tokens` tokens together, or one prompt of the whole context
/// when that is longer (the first waiting prompt joins whatever its length), within the
/// key/value pool. Returns the tokens run. The worker calls it on a GPU and only warns when
/// it fails (smaller batches may still fit).
pub fn reserve_working_set(parts: &mut ModelParts, limits: &ModelLimits) -> crate::Result<usize> {
    let budget = limits.max_batch_tokens.max(1);
    match parts {
        ModelParts::Encoder(p) => {
            // Without a known limit, BERT's usual 512 positions.
            let len = p.tokenizer.max_length().unwrap_or(512).max(1);
            let dummy = Encoding {
                ids: vec![0; len],
                type_ids: vec![0; len],
                offsets: vec![(0, 0); len],
                special_tokens_mask: vec![false; len],
            };
            let encodings = vec![dummy; (budget / len).max(1)];
            p.encoder.run(Work::Embed, &encodings)?;
            Ok(encodings.len() * len)
        }
        ModelParts::Decoder(p) => {
            let model = &mut p.model;
            let context = model.max_positions().max(1);
            let capacity = model.kv_capacity_positions();
            // Prompts of at most the context each, while their blocks fit the pool.
            let mut left = budget.max(context).min(capacity).max(1);
            let (mut prompts, mut reserved) = (Vec::new(), 0);
            while left > 0 {
                let len = left.min(context);
                reserved += round_to_blocks(len);
                if !prompts.is_empty() && reserved > capacity {
                    break;
                }
                prompts.push(vec![0u32; len]);
                left -= len;
            }
            let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            // Dropped, the caches give their blocks back to the pool.
            let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
            let mut cache_refs: Vec<_> = caches.iter_mut().collect();
            model.step(&mut cache_refs, &prompt_refs)?;
            Ok(prompts.iter().map(Vec::len).sum())
        }
    }
}

/// Checks that a decoder can do `task`: generation only, and no labels.
pub fn check_decoder_task(task: Option<Task>, labels: &[String]) -> crate::Result<()> {
    if !labels.is_empty() {
        return Err(Error::Setup(
            "--labels: the model is a decoder (text generation) and does not classify".to_string(),
        ));
    }
    match task {
        None | Some(Task::Generate) => Ok(()),
        Some(_) => Err(Error::Setup(
            "--task: the model is a decoder and only generates text; use --task generate".to_string(),
        )),
    }
}

/// A loaded encoder, before it is started: the pieces an [`Engine`] is made of. Tests replace
/// `encoder` with a wrapper (to slow it down, say).
pub struct EncoderParts {
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The head and its labels.
    pub head: Head,
    /// The model, run by the scheduler.
    pub encoder: Box<dyn Encoder>,
}

/// Opens `dir` and loads the model on a CPU backend with `threads` threads (0: all cores).
pub fn load_encoder(dir: &Path, threads: usize) -> crate::Result<EncoderParts> {
    load_encoder_on(ModelDir::open(dir)?, CpuBackend::new(threads)?)
}

/// Loads an encoder from an opened model folder onto `backend`.
pub fn load_encoder_on<B: Backend + 'static>(dir: ModelDir, backend: B) -> crate::Result<EncoderParts> {
    let config = match &dir.config {
        ModelConfig::Bert(c) => c.clone(),
        ModelConfig::Gpt2(_) | ModelConfig::Llama(_) => {
            return Err(Error::Setup(format!(
                "{}: the model is a decoder (text generation); load it with load_model",
                dir.path.display()
            )));
        }
    };
    let model = Bert::load(&backend, &config, &dir.weights, &dir.tensor_prefix)?;
    let labels = || {
        let labels = config.id2label.clone();
        match &config.head {
            BertHead::SequenceClassification { num_labels }
            | BertHead::TokenClassification { num_labels }
                if labels.len() != *num_labels =>
            {
                (0..*num_labels).map(|i| format!("LABEL_{i}")).collect()
            }
            _ => labels,
        }
    };
    let head = match config.head {
        BertHead::None => Head::None,
        BertHead::SequenceClassification { .. } => Head::Sequence(labels()),
        BertHead::TokenClassification { .. } => Head::Token(labels()),
    };
    Ok(EncoderParts {
        tokenizer: dir.tokenizer,
        head,
        encoder: Box::new(BertEncoder {
            model,
            backend,
            pooling: dir.pooling,
        }),
    })
}

/// Checks that the model can do `task` with the configured `labels`, so that a deployment that
/// cannot work fails at start-up rather than on every request.
pub fn check_task(task: Option<Task>, head: &Head, labels: &[String]) -> crate::Result<()> {
    if let Head::Sequence(known) = head
        && let Some(unknown) = labels.iter().find(|l| !known.contains(l))
    {
        return Err(Error::Setup(format!(
            "--labels: `{unknown}` is not a label of the model's classification head ({})",
            known.join(", ")
        )));
    }
    match (task, head) {
        (None | Some(Task::Embed), _) => Ok(()),
        (Some(Task::Classify), Head::None | Head::Sequence(_)) => Ok(()),
        (Some(Task::Classify), Head::Token(_)) => Err(Error::Setup(
            "--task classify: the model is a token classifier; use --task extract".to_string(),
        )),
        (Some(Task::Extract), Head::Token(_)) => Ok(()),
        (Some(Task::Extract), _) => Err(Error::Setup(
            "--task extract: the model has no token classification head".to_string(),
        )),
        (Some(Task::Generate), _) => Err(Error::Setup(
            "--task generate: the model is an encoder and does not generate text".to_string(),
        )),
    }
}

/// How much work the model threads take on at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// Most padded tokens in one encoder forward pass; for decoders, most prompt tokens joining
    /// a running batch in one step.
    pub max_batch_tokens: usize,
    /// Bytes of the decoder's key/value pool (allocated at load, in device memory on a GPU),
    /// which the running sequences' reservations share.
    pub kv_cache_bytes: usize,
}

impl Default for ModelLimits {
    fn default() -> Self {
        Self {
            max_batch_tokens: 16384,
            kv_cache_bytes: 2 << 30,
        }
    }
}

/// Label embeddings of zero-shot classification, per label set. Bounded: when full it is
/// cleared, which only costs re-embedding the label sets still in use.
const LABEL_CACHE_SETS: usize = 1024;

/// Embeddings of a label set, one per label, shared between the cache and requests.
pub type LabelEmbeddings = Arc<Vec<Vec<f32>>>;

/// The served model: tokenizer, capability, default labels and the scheduler running it.
pub struct Engine {
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// What the model can do.
    pub capability: Capability,
    /// Labels used when a classification request gives none (`--labels`).
    pub default_labels: Vec<String>,
    /// The batching scheduler owning an encoder.
    pub scheduler: Option<Scheduler>,
    /// The generation thread owning a decoder.
    pub generator: Option<Generator>,
    /// The compute device's failure, once the model thread has seen one.
    pub fault: DeviceFault,
    label_cache: Mutex<HashMap<Vec<String>, LabelEmbeddings>>,
}

impl Engine {
    /// Starts the scheduler for `parts`.
    pub fn start(
        parts: EncoderParts,
        default_labels: Vec<String>,
        max_batch_tokens: usize,
        metrics: Arc<Metrics>,
    ) -> crate::Result<Self> {
        let fault = DeviceFault::new();
        let scheduler = Scheduler::start(parts.encoder, max_batch_tokens, fault.clone(), metrics)
            .map_err(|e| Error::Setup(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Self {
            tokenizer: Arc::new(parts.tokenizer),
            capability: Capability::Encoder(parts.head),
            default_labels,
            scheduler: Some(scheduler),
            generator: None,
            fault,
            label_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Starts the generation thread for a decoder under `limits`.
    pub fn start_decoder(
        parts: DecoderParts,
        limits: &ModelLimits,
        metrics: Arc<Metrics>,
    ) -> crate::Result<Self> {
        let tokenizer = Arc::new(parts.tokenizer);
        let fault = DeviceFault::new();
        let generator = Generator::start(
            parts.model,
            tokenizer.clone(),
            limits.max_batch_tokens,
            fault.clone(),
            metrics,
        )
        .map_err(|e| Error::Setup(format!("cannot start the generation thread: {e}")))?;
        Ok(Self {
            tokenizer,
            capability: Capability::Decoder,
            default_labels: Vec::new(),
            scheduler: None,
            generator: Some(generator),
            fault,
            label_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Starts whichever kind of model `parts` holds.
    pub fn start_model(
        parts: ModelParts,
        default_labels: Vec<String>,
        limits: &ModelLimits,
        metrics: Arc<Metrics>,
    ) -> crate::Result<Self> {
        match parts {
            ModelParts::Encoder(p) => Self::start(p, default_labels, limits.max_batch_tokens, metrics),
            ModelParts::Decoder(p) => Self::start_decoder(p, limits, metrics),
        }
    }

    /// The cached embeddings of a label set.
    pub fn cached_labels(&self, labels: &[String]) -> Option<LabelEmbeddings> {
        self.label_cache.lock().ok()?.get(labels).cloned()
    }

    /// Caches the embeddings of a label set.
    pub fn cache_labels(&self, labels: Vec<String>, embeddings: LabelEmbeddings) {
        if let Ok(mut cache) = self.label_cache.lock() {
            if cache.len() >= LABEL_CACHE_SETS {
                cache.clear();
            }
            cache.insert(labels, embeddings);
        }
    }
}
