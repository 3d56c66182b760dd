//! Test helpers shared by the backends' tests: a seeded input generator, an elementwise
//! closeness check with explicit tolerances, the attention cases every backend is checked on,
//! and the message of a skipped test.

use super::{AttentionMask, PagedPlan, PagedSeq};

/// Seeded xorshift generator: reproducible inputs without a dependency.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub(crate) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) / 2.0 * n as f32) as usize % n
    }
}

/// Seeded inputs of a projection of `rows` rows, `k` terms and `m` outputs with everything the
/// folded ops take, in the order the tests index them: x `[rows, k]`, an RMS norm weight
/// `[k]`, the weight `[m, k]`, a bias `[m]`, a residual `[rows, m]` and a fused gate/up weight
/// `[2m, k]`.
pub(crate) struct ProjectionInputs {
    data: [Vec<f32>; 6],
    shapes: [Vec<usize>; 6],
}

impl ProjectionInputs {
    pub(crate) fn new(rng: &mut Rng, rows: usize, k: usize, m: usize) -> Self {
        Self {
            data: [
                rng.vec(rows * k, 2.0),
                rng.vec(k, 1.0),
                rng.vec(m * k, 0.3),
                rng.vec(m, 1.0),
                rng.vec(rows * m, 2.0),
                rng.vec(2 * m * k, 0.3),
            ],
            shapes: [
                vec![rows, k],
                vec![k],
                vec![m, k],
                vec![m],
                vec![rows, m],
                vec![2 * m, k],
            ],
        }
    }

    /// Every input with its shape, for the tests' compare helpers.
    pub(crate) fn inputs(&self) -> Vec<(&[f32], &[usize])> {
        self.data
            .iter()
            .zip(&self.shapes)
            .map(|(d, s)| (d.as_slice(), s.as_slice()))
            .collect()
    }
}

/// `|got - want| <= atol + rtol * |want|`, elementwise.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tol {
    pub atol: f32,
    pub rtol: f32,
}

pub(crate) const EXACT: Tol = Tol { atol: 0.0, rtol: 0.0 };

pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tol) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= tol.atol + tol.rtol * w.abs() || (g == w);
        assert!(ok, "{what}: element {i}: got {g}, want {w} ({tol:?})");
    }
}

/// One attention test case: the shapes, whether the batch is padded (then batch row 0 is fully
/// masked, which must give zeros), and the causal offset.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnCase {
    pub batch: usize,
    pub s_q: usize,
    pub s_k: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub padding: bool,
    pub causal: Option<usize>,
}

/// Seeded inputs of one [`AttnCase`].
pub(crate) struct AttnInputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// `[batch * s_k]` padding mask: row 0 all false, the others random.
    pub valid: Vec<bool>,
}

impl AttnCase {
    #[allow(clippy::too_many_arguments, reason = "a table row")]
    pub(crate) const fn new(
        batch: usize,
        s_q: usize,
        s_k: usize,
        heads: usize,
        kv_heads: usize,
        d: usize,
        padding: bool,
        causal: Option<usize>,
    ) -> Self {
        Self {
            batch,
            s_q,
            s_k,
            heads,
            kv_heads,
            d,
            padding,
            causal,
        }
    }

    /// The cases every backend's attention is checked on.
    pub(crate) const COMMON: [AttnCase; 8] = [
        Self::new(1, 1, 1, 1, 1, 8, false, None),
        Self::new(5, 17, 17, 12, 4, 32, true, None), // encoder batch with padding, GQA 12/4
        Self::new(1, 65, 65, 12, 12, 64, false, None), // plain multi-head
        Self::new(2, 7, 7, 9, 3, 64, false, Some(0)), // causal prompt, GQA 9/3
        Self::new(3, 1, 33, 12, 4, 64, true, Some(32)), // decode step with a KV cache and padding
        Self::new(2, 5, 20, 4, 4, 8, false, Some(15)), // several new tokens after a cache
        Self::new(5, 13, 13, 9, 3, 32, true, Some(0)), // causal with left padding
        Self::new(1, 128, 128, 12, 12, 32, false, None),
    ];

    /// The cases of the tensor-core flash kernels (head dimensions 32, 64 and 128; tiles of 64
    /// queries and 64 keys): a padded encoder batch whose first row is fully masked, GQA,
    /// prompts over several query blocks and key tiles with ragged tails, causal prompts and
    /// queries after a cache, and a causal prompt whose first rows see nothing of the second
    /// key tile that later rows of their block see (a fully masked tile after a finite maximum).
    #[cfg(feature = "cuda")]
    pub(crate) const TENSOR_CORE: [AttnCase; 6] = [
        Self::new(5, 17, 17, 12, 4, 32, true, None),
        Self::new(1, 130, 130, 4, 4, 64, false, None),
        Self::new(2, 70, 70, 3, 1, 64, false, Some(0)),
        Self::new(3, 2, 33, 4, 2, 128, true, Some(31)),
        Self::new(2, 5, 100, 2, 2, 128, false, Some(95)),
        Self::new(1, 100, 110, 2, 2, 64, false, Some(10)),
    ];

    /// For the tensor-core flash kernels: a padded batch whose second row's first 70 keys are
    /// all padding ([`AttnCase::leading_padding_inputs`]), so that its rows see no key in the
    /// first 64-key tile and start their sums afresh in the second (the rescale of a `-inf`
    /// maximum is 0).
    #[cfg(feature = "cuda")]
    pub(crate) const TENSOR_CORE_LEFT_PADDED: (AttnCase, usize) =
        (Self::new(2, 80, 130, 2, 2, 64, true, None), 70);

    /// Seeded inputs as [`AttnCase::inputs`], with the first `padded` keys of batch row 1 made
    /// padding and the rest valid.
    #[cfg(feature = "cuda")]
    pub(crate) fn leading_padding_inputs(&self, rng: &mut Rng, padded: usize) -> AttnInputs {
        let mut inputs = self.inputs(rng);
        for (j, valid) in inputs.valid[self.s_k..2 * self.s_k].iter_mut().enumerate() {
            *valid = j >= padded;
        }
        inputs
    }

    /// Seeded q, k, v and padding mask for this case.
    pub(crate) fn inputs(&self, rng: &mut Rng) -> AttnInputs {
        let q = rng.vec(self.batch * self.s_q * self.heads * self.d, 2.0);
        let k = rng.vec(self.batch * self.s_k * self.kv_heads * self.d, 2.0);
        let v = rng.vec(self.batch * self.s_k * self.kv_heads * self.d, 1.0);
        let valid = (0..self.batch * self.s_k)
            .map(|i| i >= self.s_k && (!self.padding || rng.next() > -0.6))
            .collect();
        AttnInputs { q, k, v, valid }
    }

    /// The mask of this case over `valid` (used only when the case is padded).
    pub(crate) fn mask<'a>(&self, valid: &'a [bool]) -> AttentionMask<'a> {
        AttentionMask {
            key_valid: self.padding.then_some(valid),
            causal_offset: self.causal,
        }
    }

    /// `[batch, s_q, heads, d]`.
    pub(crate) fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.s_q, self.heads, self.d]
    }

    /// `[batch, s_k, kv_heads, d]`, the shape of keys and values.
    pub(crate) fn kv_shape(&self) -> [usize; 4] {
        [self.batch, self.s_k, self.kv_heads, self.d]
    }
}

/// One paged-attention test case: sequences as `(new tokens, cached positions after the step)`,
/// the head shapes, the block size and the sliding window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PagedCase {
    pub seqs: &'static [(usize, usize)],
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub block_size: usize,
    pub window: Option<usize>,
}

/// Seeded inputs of one [`PagedCase`]: a pool whose rows are all random (so a wrong row read
/// shows), block tables that scatter each sequence over the pool, and the step's new rows.
pub(crate) struct PagedInputs {
    pub plan: PagedPlan,
    /// `[rows, kv_heads, d]`.
    pub pool_shape: [usize; 3],
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    /// `[tokens, kv_heads, d]`: the step's new keys and values.
    pub new_keys: Vec<f32>,
    pub new_values: Vec<f32>,
    /// `[tokens, heads, d]`.
    pub q: Vec<f32>,
}

#[cfg(feature = "cuda")]
impl PagedInputs {
    /// Every input rounded to `p`, as a backend in that precision stores it: the pools, the
    /// step's new rows and the queries.
    pub(crate) fn round_to(&mut self, p: super::Precision) {
        for v in [
            &mut self.keys,
            &mut self.values,
            &mut self.new_keys,
            &mut self.new_values,
            &mut self.q,
        ] {
            *v = p.round(v);
        }
    }
}

impl PagedCase {
    pub(crate) const fn new(
        seqs: &'static [(usize, usize)],
        (heads, kv_heads, d): (usize, usize, usize),
        block_size: usize,
        window: Option<usize>,
    ) -> Self {
        Self {
            seqs,
            heads,
            kv_heads,
            d,
            block_size,
            window,
        }
    }

    /// The cases every backend's paged attention is checked on.
    pub(crate) const COMMON: [PagedCase; 8] = [
        Self::new(&[(1, 1)], (1, 1, 8), 16, None),
        // Decode steps over caches of 1, 17, 33 and 64 positions (block edges), GQA 12/4.
        Self::new(&[(1, 1), (1, 17), (1, 33), (1, 64)], (12, 4, 64), 16, None),
        Self::new(&[(7, 7)], (9, 3, 64), 16, None), // a prompt
        // A running batch with prompts joining: decode, fresh prompt, prompt after a cache.
        Self::new(&[(1, 20), (13, 13), (5, 40)], (4, 4, 8), 16, None),
        // Sliding window of 8 over decode, a windowed prompt after a cache, and a short one.
        Self::new(&[(1, 40), (9, 30), (3, 3)], (4, 2, 32), 16, Some(8)),
        Self::new(&[(70, 70), (1, 9)], (4, 1, 128), 16, None), // tiles of 16 queries, 32 keys
        Self::new(&[(3, 19), (1, 5)], (4, 4, 80), 5, None),    // odd block size, d = 80
        Self::new(&[(2, 50)], (2, 2, 256), 16, None),          // the widest head
    ];

    /// Steps with prompts for the tensor-core flash kernels: decode beside prompts, a sliding
    /// window, a prompt over two query blocks with one key head, an odd block size with a
    /// prompt after a cache over two key tiles, and a window of 20 over a long prompt after a
    /// cache, where a block's first warp sees none of the second key tile its last warp sees
    /// and the last sees none of the first tile's first 48 keys.
    #[cfg(feature = "cuda")]
    pub(crate) const TENSOR_CORE: [PagedCase; 5] = [
        Self::new(&[(1, 20), (13, 13), (5, 40)], (4, 4, 32), 16, None),
        Self::new(&[(1, 40), (9, 30), (3, 3)], (4, 2, 32), 16, Some(8)),
        Self::new(&[(70, 70), (1, 9)], (4, 1, 128), 16, None),
        Self::new(&[(3, 19), (20, 85)], (4, 2, 64), 5, None),
        Self::new(&[(100, 130)], (2, 1, 64), 16, Some(20)),
    ];

    /// Decode steps only (one query per sequence), for the kernels that split each sequence's
    /// keys across blocks and that serve a key head's query heads together: caches from 1 key
    /// to many blocks, a sliding window over long caches, an odd block size with d = 80 (which
    /// the grouped kernel does not take), and grouped heads as the grouped kernel tiles them
    /// (3, 2, 8 as two tiles of 4, 8 with one key head, 3 at d = 256, one head at d = 8).
    #[cfg(feature = "cuda")]
    pub(crate) const DECODE: [PagedCase; 7] = [
        Self::new(&[(1, 1), (1, 17), (1, 33), (1, 64)], (12, 4, 64), 16, None),
        Self::new(&[(1, 40), (1, 100), (1, 3)], (4, 2, 32), 16, Some(8)),
        Self::new(&[(1, 75)], (2, 1, 80), 5, None),
        Self::new(&[(1, 1), (1, 130), (1, 7)], (32, 4, 64), 16, None),
        Self::new(&[(1, 45)], (8, 1, 128), 16, None),
        Self::new(&[(1, 20), (1, 2)], (6, 2, 256), 16, None),
        Self::new(&[(1, 3), (1, 40)], (1, 1, 8), 4, None),
    ];

    /// Seeded inputs; each sequence's blocks are taken from a shuffled pool with spare blocks.
    pub(crate) fn inputs(&self, rng: &mut Rng) -> PagedInputs {
        let bs = self.block_size;
        let needed: usize = self.seqs.iter().map(|&(_, k)| k.div_ceil(bs)).sum();
        let total = needed + 3;
        let mut order: Vec<u32> = (0..total as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut next = order.into_iter();
        let seqs = self
            .seqs
            .iter()
            .map(|&(q_len, k_len)| PagedSeq {
                q_len,
                k_len,
                blocks: next.by_ref().take(k_len.div_ceil(bs)).collect(),
            })
            .collect();
        let plan = PagedPlan {
            block_size: bs,
            window: self.window,
            seqs,
        };
        let tokens = plan.tokens();
        let w = self.kv_heads * self.d;
        PagedInputs {
            pool_shape: [total * bs, self.kv_heads, self.d],
            keys: rng.vec(total * bs * w, 2.0),
            values: rng.vec(total * bs * w, 1.0),
            new_keys: rng.vec(tokens * w, 2.0),
            new_values: rng.vec(tokens * w, 1.0),
            q: rng.vec(tokens * self.heads * self.d, 2.0),
            plan,
        }
    }

    /// `[tokens, heads, d]` of the queries and the output.
    pub(crate) fn q_shape(&self) -> [usize; 3] {
        let tokens = self.seqs.iter().map(|&(q, _)| q).sum();
        [tokens, self.heads, self.d]
    }

    /// `[tokens, kv_heads, d]` of the new keys and values.
    pub(crate) fn new_shape(&self) -> [usize; 3] {
        let tokens = self.seqs.iter().map(|&(q, _)| q).sum();
        [tokens, self.kv_heads, self.d]
    }
}

/// Rows of logits and one draw per row that cover what `sample_rows` must get right: greedy,
/// whole-distribution draws, top-k and top-p cuts alone and together (k = 1 and p tiny are
/// greedy in disguise), on rows with distinct logits and on rows rounded to steps of 0.5 so that
/// many logits tie at the cut. `round` applies the storage precision.
#[cfg(feature = "cuda")]
pub(crate) fn sampling_case(
    rng: &mut Rng,
    rows: usize,
    vocab: usize,
    round: impl Fn(&[f32]) -> Vec<f32>,
) -> (Vec<f32>, Vec<crate::sampling::TokenDraw>) {
    use crate::sampling::TokenDraw;
    const CUTS: [(f32, u32, f32); 9] = [
        (0.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.0, 5, 1.0),
        (1.5, 0, 0.9),
        (0.8, 40, 0.5),
        (1.0, 1, 1.0),
        (1.0, 0, 1e-6),
        (2.0, 3, 0.95),
        (1.2, 0, 0.3),
    ];
    let mut x = rng.vec(rows * vocab, 8.0);
    for (r, row) in x.chunks_mut(vocab).enumerate() {
        if r % 2 == 1 {
            row.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
        }
    }
    let draws = (0..rows)
        .map(|r| {
            let (temperature, top_k, top_p) = CUTS[r % CUTS.len()];
            let uniform = f64::from(rng.next() + 1.0) / 2.0;
            TokenDraw {
                temperature,
                top_k,
                top_p,
                uniform,
            }
        })
        .collect();
    (round(&x), draws)
}

/// Reports that a test skips and why, straight to stderr: the test harness would swallow an
/// `eprintln!` of a passing test, and a skip must never look like a pass. (Only the CUDA tests
/// skip so far.)
#[cfg(feature = "cuda")]
pub(crate) fn print_skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}
