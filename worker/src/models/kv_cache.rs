//! The key/value cache of a decoder and the attention step that reads and extends it.
//!
//! Each sequence owns one [`KvCache`]: per layer, the keys and values of every position seen so
//! far, `[len, kv_heads, head_dim]` row-major. A forward step ([`Step`]) advances one or more
//! sequences together: each contributes its new tokens (a prompt, or one token while decoding),
//! so a sequence can join a running batch between steps with its own cache.
//!
//! The cache lives on the host for this CPU stage: the backend trait has no concatenation, so
//! each step copies the new keys and values out of the backend, appends them here, and uploads
//! the (padded) keys of the batch with `from_host`. This is the place a device backend replaces
//! with caches in device memory (paged blocks) and an attention kernel that reads them in place.

use crate::backend::{AttentionMask, Backend};
use crate::{Error, Result};

/// Keys and values of one layer of one sequence.
#[derive(Clone, Debug, Default)]
struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The key/value cache of one sequence.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// Positions committed by completed steps; layer buffers longer than this hold the partial
    /// writes of a step that failed and are cut back at the start of the next step.
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `layers` layers of `kv_heads` key/value heads of width
    /// `head_dim`, holding at most `capacity` positions (the model's context length). Memory
    /// grows with use; `capacity` is a limit, not an allocation.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); layers],
            kv_heads,
            head_dim,
            capacity,
            len: 0,
        }
    }

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

    /// Bytes one position takes across all layers (keys and values, `f32`).
    pub fn bytes_per_position(&self) -> usize {
        self.layers.len() * 2 * self.width() * std::mem::size_of::<f32>()
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Forgets every position, keeping the allocations (to reuse the cache for a new sequence).
    pub fn clear(&mut self) {
        self.len = 0;
        self.rollback();
    }

    fn width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Cuts every layer back to the committed length (undoes a failed step's writes).
    fn rollback(&mut self) {
        let n = self.len * self.width();
        for layer in &mut self.layers {
            layer.keys.truncate(n);
            layer.values.truncate(n);
        }
    }
}

/// One forward step over a batch of sequences, each with its own cache and its own new tokens.
///
/// Attention runs on the batch left-padded so that every sequence's last token sits in the last
/// query slot and its last key in the last key slot. With `s_q` query slots and `s_k` key slots,
/// query slot `j` then sits at key slot `s_k - s_q + j` for every sequence, so one causal mask
/// with offset `s_k - s_q` plus a padding mask over the leading empty key slots is exact for
/// sequences of any lengths, prompts and single decode tokens mixed.
pub struct Step<'c, 'k> {
    caches: &'c mut [&'k mut KvCache],
    /// New tokens per sequence.
    counts: Vec<usize>,
    /// Keys each sequence attends to in this step (all of them, or the sliding window).
    kept: Vec<usize>,
    /// All new token ids, sequence after sequence.
    pub ids: Vec<u32>,
    /// The position of each new token.
    pub positions: Vec<usize>,
    s_q: usize,
    s_k: usize,
    /// `[batch * s_k]`: real key slots.
    key_valid: Vec<bool>,
}

impl<'c, 'k> Step<'c, 'k> {
    /// Checks the request against the caches (each sequence has tokens, they fit the context and
    /// the attention window, the caches match the model) and lays out the batch.
    pub fn new(
        caches: &'c mut [&'k mut KvCache],
        tokens: &[&[u32]],
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
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
        let mut counts = Vec::with_capacity(tokens.len());
        let mut kept = Vec::with_capacity(tokens.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for (i, (cache, new)) in caches.iter_mut().zip(tokens).enumerate() {
            if cache.layers.len() != layers || cache.kv_heads != kv_heads || cache.head_dim != head_dim {
                return Err(Error::Input(format!(
                    "sequence {i}: the cache was made for a different model"
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
            cache.rollback();
            let total = cache.len + new.len();
            let keys = match window {
                Some(w) if total > w => {
                    if new.len() > 1 {
                        return Err(Error::Input(format!(
                            "sequence {i}: {total} tokens exceed the sliding window of {w} \
                             within one step (windowed prefill is not supported yet)"
                        )));
                    }
                    w
                }
                _ => total,
            };
            counts.push(new.len());
            kept.push(keys);
            ids.extend_from_slice(new);
            positions.extend(cache.len..total);
        }
        let s_q = counts.iter().copied().max().unwrap_or(0);
        let s_k = kept.iter().copied().max().unwrap_or(0);
        let key_valid = kept
            .iter()
            .flat_map(|&k| (0..s_k).map(move |slot| slot >= s_k - k))
            .collect();
        Ok(Self {
            caches,
            counts,
            kept,
            ids,
            positions,
            s_q,
            s_k,
            key_valid,
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

    /// Whether every sequence has the same number of new tokens (no query padding needed).
    fn uniform(&self) -> bool {
        self.counts.iter().all(|&n| n == self.s_q)
    }

    /// Appends this layer's new keys and values to the caches and attends the new queries to
    /// everything cached. `q [tokens, heads, head_dim]`, `k` and `v [tokens, kv_heads, head_dim]`
    /// (rotary embeddings already applied); returns `[tokens, heads * head_dim]`.
    pub fn attend<B: Backend>(
        &mut self,
        backend: &B,
        layer: usize,
        q: B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (b, s_q, s_k) = (self.batch(), self.s_q, self.s_k);
        let q_shape = backend.shape(&q).to_vec();
        let [tokens, heads, head_dim] = q_shape[..] else {
            return Err(Error::Input(format!("attention queries of shape {q_shape:?}")));
        };
        let kv_heads = self.caches[0].kv_heads;
        let w = kv_heads * head_dim;
        let keys = backend.to_host(k)?;
        let values = backend.to_host(v)?;
        if keys.len() != tokens * w || values.len() != tokens * w || tokens != self.tokens() {
            return Err(Error::Input("attention keys do not match the queries".to_owned()));
        }
        let mut padded_k = vec![0.0f32; b * s_k * w];
        let mut padded_v = vec![0.0f32; b * s_k * w];
        let mut row = 0;
        for (i, cache) in self.caches.iter_mut().enumerate() {
            let n = self.counts[i];
            let lc = &mut cache.layers[layer];
            lc.keys.extend_from_slice(&keys[row * w..(row + n) * w]);
            lc.values.extend_from_slice(&values[row * w..(row + n) * w]);
            row += n;
            let total = lc.keys.len() / w;
            let kept = self.kept[i];
            let src = (total - kept) * w..total * w;
            let dst = (i * s_k + s_k - kept) * w..(i + 1) * s_k * w;
            padded_k[dst.clone()].copy_from_slice(&lc.keys[src.clone()]);
            padded_v[dst].copy_from_slice(&lc.values[src]);
        }
        let k = backend.from_host(&padded_k, &[b, s_k, kv_heads, head_dim])?;
        let v = backend.from_host(&padded_v, &[b, s_k, kv_heads, head_dim])?;
        let mask = AttentionMask::causal(s_k - s_q).with_padding(&self.key_valid);
        let hw = heads * head_dim;
        if self.uniform() {
            let q = backend.reshape(q, &[b, s_q, heads, head_dim])?;
            let out = backend.attention(&q, &k, &v, &mask)?;
            return Ok(backend.reshape(out, &[tokens, hw])?);
        }
        // Sequences with fewer new tokens than the longest get empty leading query slots.
        let q_host = backend.to_host(&q)?;
        let mut padded_q = vec![0.0f32; b * s_q * hw];
        let mut row = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            let dst = (i * s_q + s_q - n) * hw..(i + 1) * s_q * hw;
            padded_q[dst].copy_from_slice(&q_host[row * hw..(row + n) * hw]);
            row += n;
        }
        let q = backend.from_host(&padded_q, &[b, s_q, heads, head_dim])?;
        let out = backend.to_host(&backend.attention(&q, &k, &v, &mask)?)?;
        let mut packed = Vec::with_capacity(tokens * hw);
        for (i, &n) in self.counts.iter().enumerate() {
            packed.extend_from_slice(&out[(i * s_q + s_q - n) * hw..(i + 1) * s_q * hw]);
        }
        Ok(backend.from_host(&packed, &[tokens, hw])?)
    }

    /// The rows of `x [tokens, d]` holding each sequence's last token: `[batch, d]`.
    pub fn last_rows<B: Backend>(&self, backend: &B, x: B::Tensor) -> Result<B::Tensor> {
        if self.counts.iter().all(|&n| n == 1) {
            return Ok(x);
        }
        let d = backend.shape(&x).last().copied().unwrap_or(0);
        let host = backend.to_host(&x)?;
        let mut rows = Vec::with_capacity(self.batch() * d);
        let mut end = 0;
        for &n in &self.counts {
            end += n;
            rows.extend_from_slice(&host[(end - 1) * d..end * d]);
        }
        Ok(backend.from_host(&rows, &[self.batch(), d])?)
    }

    /// Records the step's tokens as cached (call after every layer has attended).
    pub fn commit(self) {
        for (cache, n) in self.caches.iter_mut().zip(&self.counts) {
            cache.len += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_of(len: usize, capacity: usize) -> KvCache {
        let mut c = KvCache::new(1, 1, 2, capacity);
        c.layers[0].keys = vec![0.0; len * 2];
        c.layers[0].values = vec![0.0; len * 2];
        c.len = len;
        c
    }

    #[test]
    fn mixed_batch_is_left_padded() {
        let (mut a, mut b) = (cache_of(3, 16), cache_of(0, 16));
        let mut caches = [&mut a, &mut b];
        let step = Step::new(&mut caches, &[&[7], &[1, 2]], 1, 1, 2, None).unwrap();
        assert_eq!(step.positions, vec![3, 0, 1]);
        assert_eq!((step.s_q, step.s_k), (2, 4));
        assert_eq!(
            step.key_valid,
            vec![true, true, true, true, false, false, true, true]
        );
    }

    #[test]
    fn capacity_and_window_are_errors() {
        let mut a = cache_of(15, 16);
        let mut caches = [&mut a];
        assert!(Step::new(&mut caches, &[&[1, 2]], 1, 1, 2, None).is_err());
        assert!(Step::new(&mut caches, &[&[1]], 1, 1, 2, None).is_ok());
        // Past the window: decoding keeps the last `w` keys, a multi-token step is refused.
        let step = Step::new(&mut caches, &[&[1]], 1, 1, 2, Some(4)).unwrap();
        assert_eq!(step.s_k, 4);
        drop(step);
        let mut b = cache_of(3, 16);
        let mut caches = [&mut b];
        assert!(Step::new(&mut caches, &[&[1, 2]], 1, 1, 2, Some(4)).is_err());
        assert!(Step::new(&mut caches, &[&[]], 1, 1, 2, None).is_err());
        assert!(
            Step::new(&mut caches, &[&[1]], 2, 1, 2, None).is_err(),
            "wrong model"
        );
    }

    #[test]
    fn failed_step_writes_are_rolled_back() {
        let mut a = cache_of(2, 16);
        a.layers[0].keys.extend([9.0, 9.0]);
        a.layers[0].values.extend([9.0, 9.0]);
        let mut caches = [&mut a];
        let step = Step::new(&mut caches, &[&[1]], 1, 1, 2, None).unwrap();
        drop(step);
        assert_eq!(a.layers[0].keys.len(), 4);
        assert_eq!(a.len(), 2);
    }
}
