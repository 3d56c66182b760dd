//! The CPU backend's elementwise and row kernels (GELU, SwiGLU, layer and RMS norm, softmax), each
//! compiled once per SIMD level and chosen at run time.
//!
//! The crate is built for the baseline x86-64 instruction set so that one binary runs on every
//! CPU. Each kernel is written once as plain scalar loops that the compiler vectorises, and
//! [`multiversion!`] compiles that body again for AVX2+FMA and for AVX-512, calling the widest
//! variant the CPU supports (4x and 8x the lanes of baseline SSE2). The loops spell out their order
//! of operations (no fused multiply-add, sums over a fixed number of interleaved lanes), so every
//! variant gives bit-identical results; tests compare them.

/// Defines `fn $name(args)` whose body is compiled for baseline x86-64, AVX2+FMA and AVX-512 and
/// dispatched on the features the running CPU has (std caches the detection, so a check costs an
/// atomic load). The body must only call `#[inline(always)]` helpers so that they are compiled
/// into each variant too.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn x86_v4($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn x86_v3($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                match simd_level() {
                    // SAFETY: `simd_level` detected the features these variants are compiled for.
                    SimdLevel::X86V4 => return unsafe { x86_v4($($arg),*) },
                    SimdLevel::X86V3 => return unsafe { x86_v3($($arg),*) },
                    SimdLevel::Portable => {}
                }
            }
            portable($($arg),*)
        }
    };
}

/// The instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// Whatever the crate is compiled for (SSE2 on x86-64, NEON on aarch64).
    Portable,
    /// AVX2 and FMA (x86-64-v3: Haswell, Zen 1 and later).
    X86V3,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4: Skylake-X, Ice Lake, Zen 4 and later).
    X86V4,
}

#[cfg(test)]
thread_local! {
    /// Tests force a lower level to compare the variants on one machine.
    static FORCED_LEVEL: std::cell::Cell<Option<SimdLevel>> = const { std::cell::Cell::new(None) };
}

/// The widest level the running CPU supports.
pub fn detected_simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return SimdLevel::X86V4;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return SimdLevel::X86V3;
        }
    }
    SimdLevel::Portable
}

/// The level the kernels run at: the detected one (tests may force a lower one).
#[inline]
pub(crate) fn simd_level() -> SimdLevel {
    #[cfg(test)]
    if let Some(level) = FORCED_LEVEL.with(|l| l.get()) {
        return level;
    }
    detected_simd_level()
}

/// Runs `f` with the kernels on this thread forced to `level` (which must not exceed the
/// detected level).
#[cfg(test)]
pub(crate) fn with_simd_level<R>(level: SimdLevel, f: impl FnOnce() -> R) -> R {
    FORCED_LEVEL.with(|l| l.set(Some(level)));
    let out = f();
    FORCED_LEVEL.with(|l| l.set(None));
    out
}

/// `e^x` to about 1 ulp, in plain arithmetic that the compiler vectorises (std's `exp` is a
/// libm call per element): `x = n·ln2 + r` with `|r| <= ln2/2`, `e^r` by its degree-7 Taylor
/// polynomial (truncation below 6e-9 relative), `2^n` built in the exponent bits. Underflows to 0
/// below -87 (so `-inf` gives 0) and saturates at `e^88`.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { p * scale }
}

/// `erf` (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7), returned as `1 + erf(z)` so
/// that negative arguments keep their relative precision.
#[inline(always)]
fn one_plus_erf(z: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152, 1.061_405_4];
    let a = z.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erfc = poly * fast_exp(-a * a); // erfc(|z|)
    if z >= 0.0 { 2.0 - erfc } else { erfc }
}

/// Lanes of the interleaved sums: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// `Σ f(x)` over [`LANES`] interleaved partial sums, which the compiler keeps in vector registers
/// (a single running sum is a serial dependency chain that cannot be vectorised).
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder().iter().map(|&v| f(v)).sum::<f32>();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest element (`-inf` for an empty slice), over interleaved lanes for the same reason as
/// [`lane_sum`]. NaN inputs are skipped, as `f32::max` does.
#[inline(always)]
fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

#[inline(always)]
fn layer_norm_in_place(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = row.len() as f32;
    let mean = lane_sum(row, |v| v) / d;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / d;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let max = lane_max(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    // Exponentials and their sum in separate loops: both vectorise that way.
    row.iter_mut().for_each(|v| *v = fast_exp(*v - max));
    let inv = 1.0 / lane_sum(row, |v| v);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// GELU, exact erf form, of one value.
#[inline(always)]
fn gelu_erf_one(x: f32) -> f32 {
    0.5 * x * one_plus_erf(x * std::f32::consts::FRAC_1_SQRT_2)
}

/// GELU, tanh approximation, of one value, through `1 + tanh(y) = 2 - 2 / (e^(2y) + 1)`.
#[inline(always)]
fn gelu_tanh_one(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let y = C * (x + 0.044_715 * x * x * x);
    0.5 * x * (2.0 - 2.0 / (fast_exp(2.0 * y) + 1.0))
}

/// `silu(g) · u`.
#[inline(always)]
fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + fast_exp(-g)) * u
}

multiversion! {
    /// `out = gelu(x)`, exact erf form: `x/2 · (1 + erf(x/√2))`.
    pub(crate) fn gelu_erf(out: &mut [f32], xs: &[f32]) {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = gelu_erf_one(x);
        }
    }
}

multiversion! {
    /// `out = gelu(x)`, tanh approximation.
    pub(crate) fn gelu_tanh(out: &mut [f32], xs: &[f32]) {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = gelu_tanh_one(x);
        }
    }
}

multiversion! {
    /// `xs = gelu(xs)` in place, exact erf form (a linear layer's epilogue).
    pub(crate) fn gelu_erf_in_place(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = gelu_erf_one(*x);
        }
    }
}

multiversion! {
    /// `xs = gelu(xs)` in place, tanh approximation.
    pub(crate) fn gelu_tanh_in_place(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = gelu_tanh_one(*x);
        }
    }
}

multiversion! {
    /// `xs = silu(xs)` in place.
    pub(crate) fn silu_in_place(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = silu_mul_one(*x, 1.0);
        }
    }
}

multiversion! {
    /// `out = silu(gate) · up`.
    pub(crate) fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu_mul_one(g, u);
        }
    }
}

multiversion! {
    /// SwiGLU over fused rows: each `2 · out_row.len()`-wide row of `x` is `[gate | up]`, and
    /// `out`'s row is `silu(gate) · up`.
    pub(crate) fn swiglu(out: &mut [f32], x: &[f32], n: usize) {
        for (o, row) in out.chunks_exact_mut(n).zip(x.chunks_exact(2 * n)) {
            let (gate, up) = row.split_at(n);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = silu_mul_one(g, u);
            }
        }
    }
}

multiversion! {
    /// `out = a + b`.
    pub(crate) fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

multiversion! {
    /// Layer norm of each `gamma.len()`-wide row of `rows`, in place:
    /// `(x - mean) / sqrt(var + eps) · gamma + beta`.
    pub(crate) fn layer_norm(rows: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        for row in rows.chunks_exact_mut(gamma.len()) {
            layer_norm_in_place(row, gamma, beta, eps);
        }
    }
}

multiversion! {
    /// `out = layer_norm(x + residual)` for each `gamma.len()`-wide row.
    pub(crate) fn add_layer_norm(
        out: &mut [f32],
        x: &[f32],
        residual: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let d = gamma.len();
        for ((row, xs), rs) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(residual.chunks_exact(d)) {
            for ((o, &a), &b) in row.iter_mut().zip(xs).zip(rs) {
                *o = a + b;
            }
            layer_norm_in_place(row, gamma, beta, eps);
        }
    }
}

multiversion! {
    /// RMS norm of each `weight.len()`-wide row, in place: `x / sqrt(mean(x²) + eps) · weight`.
    pub(crate) fn rms_norm(rows: &mut [f32], weight: &[f32], eps: f32) {
        let d = weight.len();
        for row in rows.chunks_exact_mut(d) {
            let ms = lane_sum(row, |v| v * v) / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (v, &w) in row.iter_mut().zip(weight) {
                *v *= inv * w;
            }
        }
    }
}

multiversion! {
    /// Softmax of each `width`-wide row, in place; an all `-inf` row becomes zeros.
    pub(crate) fn softmax(rows: &mut [f32], width: usize) {
        for row in rows.chunks_exact_mut(width) {
            softmax_in_place(row);
        }
    }
}

multiversion! {
    /// Attention probabilities from raw scores, in place: each `s_k`-wide row `i` (query `i`)
    /// has the keys it may not see set to `-inf` (beyond `causal_offset + i` when causal, before
    /// `causal_offset + i + 1 - window` when also windowed, and where `key_valid` is false) and
    /// is then softmaxed.
    pub(crate) fn masked_softmax(
        scores: &mut [f32],
        s_k: usize,
        causal_offset: Option<usize>,
        window: Option<usize>,
        key_valid: Option<&[bool]>,
    ) {
        for (i, row) in scores.chunks_exact_mut(s_k).enumerate() {
            let visible = causal_offset.map_or(s_k, |off| (off + i + 1).min(s_k));
            row[visible..].fill(f32::NEG_INFINITY);
            if let (Some(w), Some(off)) = (window, causal_offset) {
                let first = (off + i + 1).saturating_sub(w).min(s_k);
                row[..first].fill(f32::NEG_INFINITY);
            }
            if let Some(valid) = key_valid {
                for (s, &ok) in row.iter_mut().zip(valid) {
                    if !ok {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
            softmax_in_place(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_a_few_ulps() {
        // Relative error against f64 `exp` below 3e-7 (~2.5 ulp) over the whole normal range.
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        assert!(fast_exp(f32::INFINITY).is_finite());
    }

    #[test]
    fn lane_max_matches_a_plain_fold() {
        for len in [0, 1, 15, 16, 17, 40] {
            let xs: Vec<f32> = (0..len).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.5).collect();
            let want = xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(lane_max(&xs), want, "len {len}");
        }
        assert_eq!(lane_max(&[f32::NEG_INFINITY, 2.0, f32::NAN]), 2.0);
    }

    /// The levels this machine can run, lowest first.
    fn levels() -> Vec<SimdLevel> {
        let all = [SimdLevel::Portable, SimdLevel::X86V3, SimdLevel::X86V4];
        let top = all.iter().position(|&l| l == detected_simd_level()).unwrap_or(0);
        all[..=top].to_vec()
    }

    /// Values with the awkward cases: zeros, large magnitudes, lengths not a multiple of any
    /// vector width.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let v = (s % 20_000) as f32 / 1000.0 - 10.0;
                if i % 29 == 0 {
                    0.0
                } else {
                    v * if i % 7 == 0 { 9.0 } else { 1.0 }
                }
            })
            .collect()
    }

    /// Every kernel gives bit-identical results at every SIMD level this machine has.
    #[test]
    fn every_simd_level_gives_identical_bits() {
        let (rows, d) = (7, 45);
        let x = values(rows * d, 1);
        let y = values(rows * d, 2);
        let gamma = values(d, 3);
        let beta = values(d, 4);
        let valid: Vec<bool> = (0..d).map(|i| i % 5 != 3).collect();
        let run = |level| {
            with_simd_level(level, || {
                let mut outs = Vec::new();
                let mut o = vec![0.0; x.len()];
                gelu_erf(&mut o, &x);
                outs.push(o.clone());
                gelu_tanh(&mut o, &x);
                outs.push(o.clone());
                silu_mul(&mut o, &x, &y);
                outs.push(o.clone());
                let mut r = x.clone();
                gelu_erf_in_place(&mut r);
                outs.push(r);
                let mut r = x.clone();
                gelu_tanh_in_place(&mut r);
                outs.push(r);
                let mut r = x.clone();
                silu_in_place(&mut r);
                outs.push(r);
                let mut r = vec![0.0; x.len() / 2];
                swiglu(&mut r, &x, d / 2);
                outs.push(r);
                add(&mut o, &x, &y);
                outs.push(o.clone());
                add_layer_norm(&mut o, &x, &y, &gamma, &beta, 1e-5);
                outs.push(o.clone());
                let mut r = x.clone();
                layer_norm(&mut r, &gamma, &beta, 1e-12);
                outs.push(r);
                let mut r = x.clone();
                rms_norm(&mut r, &gamma, 1e-6);
                outs.push(r);
                let mut r = x.clone();
                softmax(&mut r, d);
                outs.push(r);
                let mut r = x.clone();
                masked_softmax(&mut r, d, Some(2), Some(3), Some(&valid));
                outs.push(r);
                outs.into_iter()
                    .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            })
        };
        let levels = levels();
        println!("comparing SIMD levels {levels:?}");
        let portable = run(SimdLevel::Portable);
        for &level in &levels[1..] {
            assert_eq!(
                run(level),
                portable,
                "{level:?} differs from the portable kernels"
            );
        }
    }
}
