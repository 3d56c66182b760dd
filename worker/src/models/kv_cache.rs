//! The key/value cache of a decoder: a paged pool shared by all sequences, each sequence's handle
//! on it, and the forward step that writes and reads it.
//!
//! - [`BlockAllocator`]: which blocks of the pool are free (pure bookkeeping, no tensors).
//! - [`KvPool`]: the per-layer key and value pools, allocated once on the backend (device memory
//!   for a GPU) at load time and sized to the cache budget, plus the allocator.
//! - [`KvCache`]: one sequence's block table and length; its blocks go back to the pool when it
//!   is cleared or dropped.
//! - [`Step`]: one forward step over a batch of sequences, each with its own new tokens (a whole
//!   prompt, or one token while decoding). It grows each sequence's block table to fit, prepares
//!   the backend's [`PagedPlan`] once, and per layer writes the new keys and values into their
//!   pool rows and attends the packed queries to the cached keys in place: nothing is copied
//!   between steps, and sequences of any lengths share a step without padding.

use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{Backend, DecodeStep, PagedPlan, PagedSeq};
use crate::models::decoder::CacheLayout;
use crate::sampling::TokenDraw;
use crate::{Error, Result};

/// Positions per cache block. Small blocks waste little on short sequences; 16 keeps the block
/// tables short and each block's rows (16 × kv_heads × head_dim elements) contiguous.
pub const BLOCK_SIZE: usize = 16;

/// The free blocks of a pool. Blocks are handed out last-freed first, so a busy pool keeps
/// reusing the same memory.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    /// An allocator over blocks `0..total`, all free.
    pub fn new(total: usize) -> Self {
        Self {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }

    /// `n` blocks, or `None` (and nothing taken) when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        let keep = self.free.len().checked_sub(n)?;
        Some(self.free.split_off(keep))
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: &[u32]) {
        debug_assert!(blocks.iter().all(|&b| (b as usize) < self.total));
        self.free.extend(blocks.iter().rev());
    }

    /// Blocks free now.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.total
    }
}

type SharedAllocator = Arc<Mutex<BlockAllocator>>;

fn lock(a: &SharedAllocator) -> std::sync::MutexGuard<'_, BlockAllocator> {
    // The allocator's state is a list of free ids, valid after any panic.
    a.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key/value pools of one model on one backend.
pub struct KvPool<B: Backend> {
    layout: CacheLayout,
    /// The longest sequence a cache may hold (the model's context).
    max_positions: usize,
    /// Per layer, `[blocks * BLOCK_SIZE, kv_heads, head_dim]`.
    keys: Vec<B::Tensor>,
    values: Vec<B::Tensor>,
    blocks: SharedAllocator,
    /// Unique among the pools of this process: what a backend's recorded decode steps are keyed
    /// by (a pool serves one model, so its steps always launch the same work).
    id: u64,
}

/// The next pool's id.
static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl<B: Backend> KvPool<B> {
    /// Pools for at least `positions` positions (rounded up to whole blocks) of a model with this
    /// layout, whose sequences hold at most `max_positions` positions each.
    pub fn new(backend: &B, layout: CacheLayout, max_positions: usize, positions: usize) -> Result<Self> {
        let blocks = positions.div_ceil(BLOCK_SIZE).max(1);
        if blocks > u32::MAX as usize {
            return Err(Error::Input(format!(
                "a key/value pool of {blocks} blocks is too large"
            )));
        }
        let shape = [blocks * BLOCK_SIZE, layout.kv_heads, layout.head_dim];
        let mut keys = Vec::with_capacity(layout.layers);
        let mut values = Vec::with_capacity(layout.layers);
        for _ in 0..layout.layers {
            keys.push(backend.zeros(&shape)?);
            values.push(backend.zeros(&shape)?);
        }
        Ok(Self {
            layout,
            max_positions,
            keys,
            values,
            blocks: Arc::new(Mutex::new(BlockAllocator::new(blocks))),
            id: NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Pools of as many whole blocks as fit in `bytes` (at least one block).
    pub fn with_bytes(backend: &B, layout: CacheLayout, max_positions: usize, bytes: usize) -> Result<Self> {
        let positions = bytes / bytes_per_position(&layout, backend.element_bytes()).max(1);
        let whole_blocks = (positions / BLOCK_SIZE).max(1);
        Self::new(backend, layout, max_positions, whole_blocks * BLOCK_SIZE)
    }

    /// An empty cache for one sequence; it takes blocks as it grows.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            blocks: Vec::new(),
            len: 0,
            capacity: self.max_positions,
            pool: self.blocks.clone(),
        }
    }

    /// Positions the pool holds (whole blocks).
    pub fn capacity_positions(&self) -> usize {
        lock(&self.blocks).total_blocks() * BLOCK_SIZE
    }

    /// Positions in blocks no sequence holds.
    pub fn free_positions(&self) -> usize {
        lock(&self.blocks).free_blocks() * BLOCK_SIZE
    }

    /// The layout the pool was made for.
    pub fn layout(&self) -> CacheLayout {
        self.layout
    }
}

/// Bytes one position takes across all layers (keys and values, `element_bytes` each: the
/// backend's storage precision).
pub fn bytes_per_position(layout: &CacheLayout, element_bytes: usize) -> usize {
    layout.layers * 2 * layout.kv_heads * layout.head_dim * element_bytes
}

/// Positions reserved in whole blocks: what a sequence of `positions` positions takes from a pool.
pub fn round_to_blocks(positions: usize) -> usize {
    positions.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// One sequence's share of a [`KvPool`]: the blocks holding its positions, in order.
#[derive(Debug)]
pub struct KvCache {
    blocks: Vec<u32>,
    /// Positions committed by completed steps; a failed step's writes past it are overwritten
    /// by the next step.
    len: usize,
    capacity: usize,
    pool: SharedAllocator,
}

impl KvCache {
    /// Number of cached positions (prompt and generated tokens so far).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Forgets every position and returns the blocks to the pool (to reuse the handle for a new
    /// sequence).
    pub fn clear(&mut self) {
        lock(&self.pool).release(&self.blocks);
        self.blocks.clear();
        self.len = 0;
    }

    /// Takes blocks until `positions` positions fit.
    fn reserve(&mut self, positions: usize) -> Result<()> {
        let need = positions.div_ceil(BLOCK_SIZE).saturating_sub(self.blocks.len());
        if need == 0 {
            return Ok(());
        }
        let mut pool = lock(&self.pool);
        let free = pool.free_blocks();
        let blocks = pool.allocate(need).ok_or_else(|| {
            Error::Input(format!(
                "the key/value cache is full: {need} more blocks of {BLOCK_SIZE} positions \
                 needed, {free} free"
            ))
        })?;
        self.blocks.extend(blocks);
        Ok(())
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        lock(&self.pool).release(&self.blocks);
    }
}

/// One forward step over a batch of sequences, each with its own cache and its own new tokens.
pub struct Step<'p, 'c, 'k, B: Backend> {
    pool: &'p mut KvPool<B>,
    caches: &'c mut [&'k mut KvCache],
    /// New tokens per sequence.
    counts: Vec<usize>,
    paged: B::Paged,
    /// All new token ids, sequence after sequence.
    pub ids: Vec<u32>,
    /// The position of each new token.
    pub positions: Vec<usize>,
}

impl<'p, 'c, 'k, B: Backend> Step<'p, 'c, 'k, B> {
    /// Checks the request against the caches (each sequence has tokens, they fit its context,
    /// the caches belong to this pool), takes the blocks the new tokens need and prepares the
    /// step's plan on the backend. A full pool is an error that leaves every cache's contents
    /// as they were.
    pub fn new(
        backend: &B,
        pool: &'p mut KvPool<B>,
        caches: &'c mut [&'k mut KvCache],
        tokens: &[&[u32]],
    ) -> Result<Self> {
        if caches.len() != tokens.len() {
            return Err(Error::Input(format!(
                "{} caches for {} sequences",
                caches.len(),
                tokens.len()
            )));
        }
        if tokens.is_empty() {
            return Err(Error::Input("a step needs at least one sequence".to_owned()));
        }
        for (i, (cache, new)) in caches.iter().zip(tokens).enumerate() {
            if !Arc::ptr_eq(&cache.pool, &pool.blocks) {
                return Err(Error::Input(format!(
                    "sequence {i}: the cache belongs to another model's pool"
                )));
            }
            if new.is_empty() {
                return Err(Error::Input(format!("sequence {i}: no tokens to run")));
            }
            if new.len() > cache.remaining() {
                return Err(Error::Input(format!(
                    "sequence {i}: {} cached + {} new tokens exceed the model's {} positions",
                    cache.len,
                    new.len(),
                    cache.capacity
                )));
            }
        }
        let mut counts = Vec::with_capacity(tokens.len());
        let mut seqs = Vec::with_capacity(tokens.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for (cache, new) in caches.iter_mut().zip(tokens) {
            let total = cache.len + new.len();
            cache.reserve(total)?;
            counts.push(new.len());
            seqs.push(PagedSeq {
                q_len: new.len(),
                k_len: total,
                blocks: cache.blocks.clone(),
            });
            ids.extend_from_slice(new);
            positions.extend(cache.len..total);
        }
        let plan = PagedPlan {
            block_size: BLOCK_SIZE,
            window: pool.layout.window,
            seqs,
        };
        let paged = backend.prepare_paged(&plan)?;
        Ok(Self {
            pool,
            caches,
            counts,
            paged,
            ids,
            positions,
        })
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.counts.len()
    }

    /// Total new tokens (the rows of the step's hidden states).
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Writes this layer's new keys and values into the pool and attends the new queries to
    /// everything cached. `q [tokens, heads, head_dim]`, `k` and `v [tokens, kv_heads, head_dim]`
    /// (rotary embeddings already applied); returns `[tokens, heads * head_dim]`.
    pub fn attend(
        &mut self,
        backend: &B,
        layer: usize,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (keys, values) = layer_pools(self.pool, layer)?;
        backend.write_paged(keys, k, &self.paged)?;
        backend.write_paged(values, v, &self.paged)?;
        self.attend_written(backend, layer, q)
    }

    /// [`Step::attend`] from a fused projection `qkv [tokens, (heads + 2 kv_heads) · head_dim]`:
    /// q and k rotated at the step's positions ([`Backend::split_qkv_rope_paged`], which writes
    /// the keys and values into the pool), then attention; returns `[tokens, heads · head_dim]`.
    pub fn attend_qkv(
        &mut self,
        backend: &B,
        layer: usize,
        qkv: &B::Tensor,
        heads: (usize, usize),
        theta: f32,
    ) -> Result<B::Tensor> {
        let (keys, values) = layer_pools(self.pool, layer)?;
        let q =
            backend.split_qkv_rope_paged(qkv, heads, &self.positions, theta, keys, values, &self.paged)?;
        self.attend_written(backend, layer, &q)
    }

    /// Attention of `q [tokens, heads, head_dim]` over the pool, the step's keys already
    /// written: `[tokens, heads · head_dim]`.
    fn attend_written(&self, backend: &B, layer: usize, q: &B::Tensor) -> Result<B::Tensor> {
        let (Some(keys), Some(values)) = (self.pool.keys.get(layer), self.pool.values.get(layer)) else {
            return Err(Error::Input(format!("layer {layer} has no key/value pool")));
        };
        let out = backend.paged_attention(q, keys, values, &self.paged)?;
        let &[tokens, heads, d] = backend.shape(&out) else {
            return Err(Error::Input(
                "paged attention returned an unexpected shape".to_owned(),
            ));
        };
        Ok(backend.reshape(out, &[tokens, heads * d])?)
    }

    /// The rows of `x [tokens, d]` holding each sequence's last token: `[batch, d]`.
    pub fn last_rows(&self, backend: &B, x: B::Tensor) -> Result<B::Tensor> {
        if self.counts.iter().all(|&n| n == 1) {
            return Ok(x);
        }
        let last: Vec<u32> = self
            .counts
            .iter()
            .scan(0u32, |end, &n| {
                *end += n as u32;
                Some(*end - 1)
            })
            .collect();
        // A gather of rows is an embedding lookup with `x` as the table.
        Ok(backend.embedding(&last, &x)?)
    }

    /// Runs the step's forward pass (`forward`: the model's [`CausalLm::run`], which gives the
    /// logits of each sequence's last token), picks each sequence's next token by its draw on
    /// the backend ([`Backend::forward_and_sample`]), and commits the step. When every
    /// sequence has one new token, the backend gets the step's ids, keyed by the pool, and may
    /// replay the launches it recorded for an earlier step of this pool and batch size instead
    /// of calling `forward` (CUDA graphs); the caches advance either way.
    ///
    /// [`CausalLm::run`]: crate::models::decoder::CausalLm::run
    pub fn choose_tokens(
        mut self,
        backend: &B,
        draws: &[TokenDraw],
        mut forward: impl FnMut(&B, &mut Self) -> Result<B::Tensor>,
    ) -> Result<Vec<u32>> {
        let decode_ids = self.counts.iter().all(|&n| n == 1).then(|| self.ids.clone());
        let decode = decode_ids.as_deref().map(|ids| DecodeStep {
            key: self.pool.id,
            ids,
        });
        let tokens = backend.forward_and_sample(decode, draws, &mut || forward(backend, &mut self))?;
        self.commit();
        Ok(tokens)
    }

    /// Records the step's tokens as cached (call after every layer has attended).
    pub fn commit(self) {
        for (cache, n) in self.caches.iter_mut().zip(&self.counts) {
            cache.len += n;
        }
    }
}

/// The key and value pools of `layer`.
fn layer_pools<B: Backend>(pool: &mut KvPool<B>, layer: usize) -> Result<(&mut B::Tensor, &mut B::Tensor)> {
    match (pool.keys.get_mut(layer), pool.values.get_mut(layer)) {
        (Some(keys), Some(values)) => Ok((keys, values)),
        _ => Err(Error::Input(format!("layer {layer} has no key/value pool"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ReferenceBackend;

    fn layout(window: Option<usize>) -> CacheLayout {
        CacheLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
            window,
        }
    }

    #[test]
    fn allocator_hands_out_and_takes_back() {
        let mut a = BlockAllocator::new(4);
        let first = a.allocate(3).unwrap();
        assert_eq!(first, vec![2, 1, 0]);
        assert_eq!(a.free_blocks(), 1);
        assert!(a.allocate(2).is_none(), "too few free");
        assert_eq!(a.free_blocks(), 1, "a failed allocation takes nothing");
        a.release(&first);
        assert_eq!(a.free_blocks(), 4);
        let again = a.allocate(3).unwrap();
        let mut sorted = again.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2], "freed blocks are reused first");
    }

    #[test]
    fn caches_take_blocks_as_they_grow_and_return_them() {
        let backend = ReferenceBackend;
        let mut pool = KvPool::new(&backend, layout(None), 64, 3 * BLOCK_SIZE).unwrap();
        assert_eq!(pool.capacity_positions(), 48);
        let mut a = pool.new_cache();
        let mut b = pool.new_cache();
        let prompt: Vec<u32> = (0..17).collect();
        let mut caches = [&mut a, &mut b];
        let step = Step::new(&backend, &mut pool, &mut caches, &[&prompt, &[1]]).unwrap();
        assert_eq!(step.positions[..3], [0, 1, 2]);
        assert_eq!(step.tokens(), 18);
        step.commit();
        assert_eq!((a.len(), b.len(), a.blocks.len(), b.blocks.len()), (17, 1, 2, 1));
        assert_eq!(pool.free_positions(), 0);
        // Block 4 of `b` does not exist: the step is refused and nothing is committed.
        let too_much: Vec<u32> = (0..16).collect();
        assert!(Step::new(&backend, &mut pool, &mut [&mut b], &[&too_much]).is_err());
        assert_eq!(b.len(), 1);
        drop(a);
        assert_eq!(pool.free_positions(), 32);
        b.clear();
        assert_eq!(pool.free_positions(), 48);
    }

    /// Attends `q`, `k` and `v` (one head of two dimensions per token) over `cache` in `pool`,
    /// committing the step only when `commit`.
    fn attend(
        pool: &mut KvPool<ReferenceBackend>,
        cache: &mut KvCache,
        ids: &[u32],
        (q, k, v): (&[f32], &[f32], &[f32]),
        commit: bool,
    ) -> Vec<f32> {
        let backend = ReferenceBackend;
        let n = ids.len();
        let mut caches = [cache];
        let mut step = Step::new(&backend, pool, &mut caches, &[ids]).unwrap();
        let tensor = |x: &[f32]| backend.from_host(x, &[n, 1, 2]).unwrap();
        let out = step
            .attend(&backend, 0, &tensor(q), &tensor(k), &tensor(v))
            .unwrap();
        if commit {
            step.commit();
        }
        backend.to_host(&out).unwrap()
    }

    /// A step that fails after writing its keys and values (a layer ran, the next ran out of
    /// memory) commits nothing, and the step run again in its place attends as if the failed
    /// one had never written: what the generator's retry of a step in smaller pieces relies on.
    #[test]
    fn a_failed_steps_writes_are_overwritten_by_the_step_that_replaces_it() {
        let prompt = (
            [0.1, 0.2, 0.3, -0.1, 0.5, 0.4],
            [1.0, 0.0, 0.0, 1.0, 0.5, 0.5],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        );
        let next = (
            [0.3, 0.1, -0.2, 0.6],
            [0.2, 0.9, -0.4, 0.3],
            [7.0, 8.0, 9.0, 10.0],
        );
        let garbage = [1e3f32, -1e3, 1e3, -1e3];
        // A pool with the prompt's three positions committed.
        let prompted = || {
            let mut pool = KvPool::new(&ReferenceBackend, layout(None), 16, 16).unwrap();
            let mut cache = pool.new_cache();
            attend(
                &mut pool,
                &mut cache,
                &[1, 2, 3],
                (&prompt.0, &prompt.1, &prompt.2),
                true,
            );
            (pool, cache)
        };
        let (mut pool, mut cache) = prompted();
        let polluted = attend(
            &mut pool,
            &mut cache,
            &[4, 5],
            (&next.0, &garbage, &garbage),
            false,
        );
        assert_eq!(cache.len(), 3, "the failed step committed nothing");
        let retried = attend(&mut pool, &mut cache, &[4, 5], (&next.0, &next.1, &next.2), true);
        let (mut fresh_pool, mut fresh) = prompted();
        let want = attend(
            &mut fresh_pool,
            &mut fresh,
            &[4, 5],
            (&next.0, &next.1, &next.2),
            true,
        );
        assert_eq!(retried, want);
        assert_eq!(cache.len(), 5);
        // The garbage would have shown: the failed step, attending over it, gave other values.
        assert_ne!(polluted, want);
    }

    #[test]
    fn steps_check_their_sequences() {
        let backend = ReferenceBackend;
        let mut pool = KvPool::new(&backend, layout(None), 4, 64).unwrap();
        let mut other = KvPool::new(&backend, layout(None), 4, 64).unwrap();
        let mut a = pool.new_cache();
        assert!(
            Step::new(&backend, &mut pool, &mut [&mut a], &[&[1, 2, 3, 4, 5]]).is_err(),
            "context"
        );
        assert!(
            Step::new(&backend, &mut pool, &mut [&mut a], &[&[]]).is_err(),
            "no tokens"
        );
        assert!(
            Step::new(&backend, &mut pool, &mut [], &[]).is_err(),
            "no sequences"
        );
        assert!(
            Step::new(&backend, &mut other, &mut [&mut a], &[&[1]]).is_err(),
            "foreign cache"
        );
        assert!(Step::new(&backend, &mut pool, &mut [&mut a], &[&[1, 2, 3, 4]]).is_ok());
    }
}
