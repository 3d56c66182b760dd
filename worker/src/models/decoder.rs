//! What every causal language model (GPT-2, the Llama family) offers the generation loop: a
//! key/value pool, a cache per sequence in it, and a step that advances several sequences
//! together.

use crate::Result;
use crate::backend::Backend;
use crate::models::kv_cache::{KvCache, KvPool, Step};
use crate::sampling::TokenDraw;

/// How a model's KV cache is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    /// Transformer layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Sliding attention window (Mistral), if any.
    pub window: Option<usize>,
}

/// A decoder-only language model run against backend `B`. A model provides its cache layout
/// and [`CausalLm::run`]; batching, prefill and decode are built on those once.
pub trait CausalLm<B: Backend> {
    /// The layout of this model's KV cache.
    fn cache_layout(&self) -> CacheLayout;

    /// The longest sequence (prompt and generated tokens) the model's positions allow.
    fn max_positions(&self) -> usize;

    /// Number of logits per position.
    fn vocab_size(&self) -> usize;

    /// Token ids that end generation.
    fn eos_token_ids(&self) -> &[u32];

    /// Runs a prepared step's tokens through the model, writing their keys and values into the
    /// pool; the logits (`[rows, vocab]`, on the backend) of every new token (`all`) or of each
    /// sequence's last one. The caller commits the step once it has what it needs; running a
    /// step twice writes the same keys again and gives the same logits.
    fn run(&self, backend: &B, step: &mut Step<'_, '_, '_, B>, all: bool) -> Result<B::Tensor>;

    /// A key/value pool for this model holding `positions` positions over all its sequences.
    fn new_pool(&self, backend: &B, positions: usize) -> Result<KvPool<B>> {
        KvPool::new(backend, self.cache_layout(), self.max_positions(), positions)
    }

    /// Advances each sequence by its new tokens (a whole prompt, or one token) in one batched
    /// forward pass and returns the logits of each sequence's last new token. Sequences may be
    /// at different lengths; a sequence can join or leave between steps. On error no cache
    /// changes length.
    fn step(
        &self,
        backend: &B,
        pool: &mut KvPool<B>,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>> {
        let mut step = Step::new(backend, pool, caches, tokens)?;
        let logits = backend.to_host(&self.run(backend, &mut step, false)?)?;
        step.commit();
        Ok(split_rows(logits, self.vocab_size()))
    }

    /// [`CausalLm::step`] followed by greedy selection on the backend: the next token of each
    /// sequence, without bringing the logits to the host.
    fn step_greedy(
        &self,
        backend: &B,
        pool: &mut KvPool<B>,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
    ) -> Result<Vec<u32>> {
        let draws = vec![TokenDraw::GREEDY; tokens.len()];
        self.step_sample(backend, pool, caches, tokens, &draws)
    }

    /// [`CausalLm::step`] followed by [`Backend::sample_rows`] with one [`TokenDraw`] per
    /// sequence: the next tokens, drawn where the logits are (see [`Step::choose_tokens`]: a
    /// backend may replay a recorded decode step instead of running the model again).
    fn step_sample(
        &self,
        backend: &B,
        pool: &mut KvPool<B>,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
        draws: &[TokenDraw],
    ) -> Result<Vec<u32>> {
        Step::new(backend, pool, caches, tokens)?
            .choose_tokens(backend, draws, |backend, step| self.run(backend, step, false))
    }

    /// Logits for every position of `ids` (`[ids.len() * vocab]`), run in a pool of its own.
    fn forward_all(&self, backend: &B, ids: &[u32]) -> Result<Vec<f32>> {
        let mut pool = self.new_pool(backend, ids.len())?;
        let mut cache = pool.new_cache();
        let mut caches = [&mut cache];
        let mut step = Step::new(backend, &mut pool, &mut caches, &[ids])?;
        Ok(backend.to_host(&self.run(backend, &mut step, true)?)?)
    }

    /// Runs a prompt into an empty (or partly filled) cache; the logits of its last token.
    fn prefill(
        &self,
        backend: &B,
        pool: &mut KvPool<B>,
        cache: &mut KvCache,
        ids: &[u32],
    ) -> Result<Vec<f32>> {
        let mut logits = self.step(backend, pool, &mut [cache], &[ids])?;
        Ok(logits.pop().unwrap_or_default())
    }

    /// Feeds one token; the logits for the next.
    fn decode_step(
        &self,
        backend: &B,
        pool: &mut KvPool<B>,
        cache: &mut KvCache,
        id: u32,
    ) -> Result<Vec<f32>> {
        let mut logits = self.step(backend, pool, &mut [cache], &[&[id]])?;
        Ok(logits.pop().unwrap_or_default())
    }

    /// Feeds one token to each of several sequences together; the next logits of each.
    fn decode_batch(
        &self,
        backend: &B,
        pool: &mut KvPool<B>,
        caches: &mut [&mut KvCache],
        ids: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let tokens: Vec<&[u32]> = ids.iter().map(std::slice::from_ref).collect();
        self.step(backend, pool, caches, &tokens)
    }
}

/// Splits host logits `[rows * vocab]` into one vector per row.
pub(crate) fn split_rows(logits: Vec<f32>, vocab: usize) -> Vec<Vec<f32>> {
    logits.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect()
}
