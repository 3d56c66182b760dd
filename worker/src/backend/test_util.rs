//! Test helpers shared by the backends' tests: a seeded input generator, an elementwise
//! closeness check with explicit tolerances, the attention cases every backend is checked on,
//! and the message of a skipped test.

use super::AttentionMask;

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

/// Reports that a test skips and why, straight to stderr: the test harness would swallow an
/// `eprintln!` of a passing test, and a skip must never look like a pass. (Only the CUDA tests
/// skip so far.)
#[cfg(feature = "cuda")]
pub(crate) fn print_skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}
