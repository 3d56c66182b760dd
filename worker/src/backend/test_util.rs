//! Test helpers shared by the backends' tests: a seeded input generator, an elementwise
//! closeness check with explicit tolerances, and the message of a skipped test.

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

/// Reports that a test skips and why, straight to stderr: the test harness would swallow an
/// `eprintln!` of a passing test, and a skip must never look like a pass. (Only the CUDA tests
/// skip so far.)
#[cfg(feature = "cuda")]
pub(crate) fn print_skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}
