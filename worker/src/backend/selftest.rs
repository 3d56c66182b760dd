//! A start-up check that a backend computes what the f64 [`ReferenceBackend`] computes, op by
//! op, on small seeded inputs, before a model is served on it. A GPU backend compiles its
//! kernels at start-up for whatever GPU it finds; a kernel that is wrong there (a compiler or
//! architecture difference, a launch shape the tests never tried) should stop the worker with
//! the op's name rather than serve wrong answers.
//!
//! Every op the models call runs once, at shapes that take each of a backend's paths (one and
//! six rows: the GPU's matrix-vector kernel, its k loop and tail block, and cuBLAS; prompts and
//! decode steps; dense, fused and paged attention; on the GPU the grouped decode kernel with
//! and without key splits, the per-head split kernel (head dim 80), flash and cuBLAS prompts,
//! sliding windows on both; products with cuBLASLt's bias epilogue and with a bias pass;
//! sentence pooling in every mode; greedy and cut token draws). One path no small shape reaches: the dense flash kernel,
//! which serves dense prompts only with the unfused cuBLAS path off (or one query's scores past
//! 256 MiB); the CUDA backend's `self_test` runs [`check_attention`] again with that path forced. The reference reads the
//! inputs rounded to the backend's storage precision. The bounds are twice the GPU tests' (8 roundings of the
//! precision, relative, and `8 + 4 sqrt(k)` absolute for a product of `k` terms): they catch a
//! wrong kernel, whose errors are of the order of the values, not rounding, which the backends'
//! own tests hold tighter. The whole check is a few dozen small launches.

use super::cpu::CpuTensor;
use super::paged::{PagedPlan, PagedSeq};
use super::{AttentionMask, Backend, BackendError, Pooling, Precision, ReferenceBackend, Result};
use crate::sampling::TokenDraw;

/// Sizes of the checked products: `k` terms, outputs per row, and the row counts (the GPU
/// takes its matrix-vector kernel at up to four rows and cuBLAS beyond). `K` is more than one
/// pass of the matrix-vector kernel's k loop (2048) and `M` not a multiple of the outputs a
/// block of it computes (4, or 2 with SwiGLU), so that its loop and its tail block both run.
const K: usize = 2056;
const M: usize = 27;
const ROWS: [usize; 2] = [2, 6];

/// `|got - want| <= atol + rtol · |want|` elementwise.
#[derive(Clone, Copy, Debug)]
struct Bound {
    atol: f32,
    rtol: f32,
}

impl Bound {
    /// Eight roundings of `p` relative, `8 + 4 sqrt(k)` absolute for a product of `k` terms
    /// (fp32's rounding counted as 2^-18, for its transcendental functions and sums).
    fn of(p: Precision, k: usize) -> Self {
        let u = unit(p);
        Self {
            atol: u * (8.0 + 4.0 * (k as f32).sqrt()),
            rtol: 8.0 * u,
        }
    }

    /// Eight roundings relative, and an absolute part only for values near zero: for outputs
    /// well below 1 that carry one rounding each, such as probabilities, where the product
    /// bound's absolute part would exceed the values themselves.
    fn relative(p: Precision) -> Self {
        Self {
            atol: 1e-6,
            rtol: 8.0 * unit(p),
        }
    }
}

/// The unit roundoff a stored value of `p` carries (fp32's counted as 2^-18, for its
/// transcendental functions and sums).
fn unit(p: Precision) -> f32 {
    match p {
        Precision::F32 => 1.0 / (1u32 << 18) as f32,
        Precision::F16 => 1.0 / 2048.0,
        Precision::Bf16 => 1.0 / 256.0,
    }
}

/// The first element outside `bound`, described, or `None` when all are within it.
fn first_mismatch(got: &[f32], want: &[f32], bound: Bound) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} values, expected {}", got.len(), want.len()));
    }
    got.iter().zip(want).enumerate().find_map(|(i, (&g, &w))| {
        let close = g == w || (g - w).abs() <= bound.atol + bound.rtol * w.abs();
        (!close).then(|| format!("element {i}: got {g}, expected {w}"))
    })
}

/// Seeded values in `[-scale, scale)` (xorshift: reproducible without a dependency).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

fn failed(op: &str, detail: impl std::fmt::Display) -> BackendError {
    BackendError::Device(format!("start-up self-test: {op}: {detail}"))
}

/// Runs `$body` (an expression over `$be`, the backend, and `$t`, the uploaded `$inputs`) on
/// the backend and on the reference, both fed the inputs rounded to the precision (what the
/// backend stores anyway), and compares. A macro because the expression is instantiated for
/// both tensor types.
macro_rules! check_op {
    ($backend:expr, $p:expr, $what:expr, bound = $bound:expr, $inputs:expr, |$be:ident, $t:ident| $body:expr) => {{
        let what: String = $what.into();
        let inputs: &[(&[f32], &[usize])] = $inputs;
        let rounded: Vec<Vec<f32>> = inputs.iter().map(|(d, _)| $p.round(d)).collect();
        let want = {
            let $be = &ReferenceBackend;
            let $t: Vec<CpuTensor> = rounded
                .iter()
                .zip(inputs)
                .map(|(d, (_, s))| $be.from_host(d, s))
                .collect::<Result<_>>()?;
            let out: CpuTensor = $body.map_err(|e| failed(&what, format!("reference: {e}")))?;
            ReferenceBackend.to_host(&out)?
        };
        let got = {
            let $be = $backend;
            let $t: Vec<B::Tensor> = rounded
                .iter()
                .zip(inputs)
                .map(|(d, (_, s))| $be.from_host(d, s))
                .collect::<Result<_>>()?;
            let out: B::Tensor = $body.map_err(|e| failed(&what, e))?;
            $be.to_host(&out).map_err(|e| failed(&what, e))?
        };
        if let Some(mismatch) = first_mismatch(&got, &want, $bound) {
            return Err(failed(&what, mismatch));
        }
    }};
    // After the arm above: `bound = ...` would also parse as an expression.
    ($backend:expr, $p:expr, $what:expr, $k:expr, $inputs:expr, |$be:ident, $t:ident| $body:expr) => {
        check_op!(
            $backend,
            $p,
            $what,
            bound = Bound::of($p, $k),
            $inputs,
            |$be, $t| $body
        )
    };
}

/// Checks every op of `backend`, whose tensors are stored in `precision`, against the
/// reference; the first op that differs is an error naming it.
pub fn check<B: Backend>(backend: &B, precision: Precision) -> Result<()> {
    let p = precision;
    projections(backend, p)?;
    rows_and_gathers(backend, p)?;
    check_attention(backend, p)?;
    paged(backend, p)?;
    pooling(backend, p)?;
    sampling(backend, p)
}

/// Sentence pooling of a padded batch (a full sequence, a short one, one with a gap) in every
/// mode, with and without normalising, held to fp32's bound in every precision: the pooled
/// rows are never rounded to the storage precision.
fn pooling<B: Backend>(backend: &B, p: Precision) -> Result<()> {
    let (batch, seq, h) = (3, 5, 40);
    let valid: Vec<bool> = [
        [true; 5],
        [true, true, false, false, false],
        [true, false, true, false, false],
    ]
    .concat();
    let hidden = p.round(&values(90, batch * seq * h, 2.0));
    let uploaded = backend.from_host(&hidden, &[batch, seq, h])?;
    for pooling in Pooling::ALL {
        for normalize in [false, true] {
            let what = format!("pool {pooling:?}{}", if normalize { " normalized" } else { "" });
            let want = super::pooling::pool_host(&hidden, &valid, (batch, seq, h), pooling, normalize);
            let got = backend
                .pool_to_host(&uploaded, &valid, pooling, normalize)
                .map_err(|e| failed(&what, e))?;
            if got.len() != want.len() {
                return Err(failed(
                    &what,
                    format!("{} values, expected {}", got.len(), want.len()),
                ));
            }
            if let Some(mismatch) = first_mismatch(&got, &want, Bound::of(Precision::F32, seq)) {
                return Err(failed(&what, mismatch));
            }
        }
    }
    Ok(())
}

fn projections<B: Backend>(backend: &B, p: Precision) -> Result<()> {
    for rows in ROWS {
        let seed = rows as u64;
        let (x, norm, w) = (
            values(seed, rows * K, 2.0),
            values(seed + 10, K, 1.0),
            values(seed + 20, M * K, 0.3),
        );
        let (bias, residual) = (values(seed + 30, M, 1.0), values(seed + 40, rows * M, 2.0));
        let gate_up = values(seed + 50, 2 * M * K, 0.3);
        let inputs: &[(&[f32], &[usize])] = &[
            (&x, &[rows, K]),
            (&norm, &[K]),
            (&w, &[M, K]),
            (&bias, &[M]),
            (&residual, &[rows, M]),
            (&gate_up, &[2 * M, K]),
        ];
        check_op!(
            backend,
            p,
            format!("linear {rows}x{K}x{M}"),
            K,
            inputs,
            |be, t| be.linear(&t[0], &t[2], Some(&t[3]))
        );
        for act in [super::Activation::Gelu, super::Activation::GeluTanh] {
            check_op!(
                backend,
                p,
                format!("linear_act {act:?} {rows}x{K}x{M}"),
                K,
                inputs,
                |be, t| be.linear_act(&t[0], &t[2], Some(&t[3]), act)
            );
        }
        check_op!(
            backend,
            p,
            format!("rms_norm_linear {rows}x{K}x{M}"),
            K,
            inputs,
            |be, t| be.rms_norm_linear(&t[0], &t[1], 1e-6, &t[2], Some(&t[3]))
        );
        // Llama's projections: the norm folded in, no bias.
        check_op!(
            backend,
            p,
            format!("rms_norm_linear without bias {rows}x{K}x{M}"),
            K,
            inputs,
            |be, t| be.rms_norm_linear(&t[0], &t[1], 1e-6, &t[2], None)
        );
        check_op!(
            backend,
            p,
            format!("rms_norm_swiglu {rows}x{K}x{M}"),
            2 * K,
            inputs,
            |be, t| be.rms_norm_swiglu(&t[0], &t[1], 1e-6, &t[5])
        );
        check_op!(
            backend,
            p,
            format!("linear_add {rows}x{K}x{M}"),
            K,
            inputs,
            |be, t| {
                let residual = be.from_host(&p.round(&residual), &[rows, M])?;
                be.linear_add(&t[0], &t[2], Some(&t[3]), residual)
            }
        );
    }
    // Widths that are whole 16-byte rows in every precision: what a GPU's cuBLASLt takes with
    // the bias in its epilogue (it may refuse the odd width above, which then takes cuBLAS and
    // a bias pass).
    let (rows, k, m) = (40, 64, 48);
    let (x, w, bias, residual) = (
        values(70, rows * k, 2.0),
        values(71, m * k, 0.3),
        values(72, m, 1.0),
        values(73, rows * m, 2.0),
    );
    let inputs: &[(&[f32], &[usize])] = &[(&x, &[rows, k]), (&w, &[m, k]), (&bias, &[m])];
    check_op!(
        backend,
        p,
        format!("linear {rows}x{k}x{m}"),
        k,
        inputs,
        |be, t| be.linear(&t[0], &t[1], Some(&t[2]))
    );
    check_op!(
        backend,
        p,
        format!("linear_add {rows}x{k}x{m}"),
        k,
        inputs,
        |be, t| {
            let residual = be.from_host(&p.round(&residual), &[rows, m])?;
            be.linear_add(&t[0], &t[1], Some(&t[2]), residual)
        }
    );
    let (a, b) = (values(60, 2 * 5 * 8, 1.0), values(61, 2 * 8 * 3, 1.0));
    check_op!(
        backend,
        p,
        "matmul",
        8,
        &[(&a, &[2, 5, 8]), (&b, &[2, 8, 3])],
        |be, t| be.matmul(&t[0], &t[1])
    );
    Ok(())
}

fn rows_and_gathers<B: Backend>(backend: &B, p: Precision) -> Result<()> {
    let (rows, d) = (3, 64);
    let (x, r, gamma, beta) = (
        values(70, rows * d, 2.0),
        values(71, rows * d, 2.0),
        values(72, d, 1.0),
        values(73, d, 0.5),
    );
    let inputs: &[(&[f32], &[usize])] = &[(&x, &[rows, d]), (&r, &[rows, d]), (&gamma, &[d]), (&beta, &[d])];
    check_op!(backend, p, "layer_norm", 1, inputs, |be, t| be
        .layer_norm(&t[0], &t[2], &t[3], 1e-5));
    check_op!(backend, p, "rms_norm", 1, inputs, |be, t| be
        .rms_norm(&t[0], &t[2], 1e-6));
    check_op!(backend, p, "add", 1, inputs, |be, t| be.add(&t[0], &t[1]));
    check_op!(backend, p, "gelu", 1, inputs, |be, t| be.gelu(&t[0]));
    check_op!(backend, p, "swiglu", 1, inputs, |be, t| be.swiglu(&t[0]));
    // The residual sum is stored before its statistics: both sides normalise the stored sum.
    let sum: Vec<f32> = p.round(
        &p.round(&x)
            .iter()
            .zip(&p.round(&r))
            .map(|(a, b)| a + b)
            .collect::<Vec<f32>>(),
    );
    let (got, want) = {
        let (xs, rs, gs, bs) = (
            backend.from_host(&p.round(&x), &[rows, d])?,
            backend.from_host(&p.round(&r), &[rows, d])?,
            backend.from_host(&p.round(&gamma), &[d])?,
            backend.from_host(&p.round(&beta), &[d])?,
        );
        let got = backend
            .add_layer_norm(&xs, &rs, &gs, &bs, 1e-5)
            .and_then(|t| backend.to_host(&t))
            .map_err(|e| failed("add_layer_norm", e))?;
        let r = ReferenceBackend;
        let want = r.to_host(&r.layer_norm(
            &r.from_host(&sum, &[rows, d])?,
            &r.from_host(&p.round(&gamma), &[d])?,
            &r.from_host(&p.round(&beta), &[d])?,
            1e-5,
        )?)?;
        (got, want)
    };
    if let Some(mismatch) = first_mismatch(&got, &want, Bound::of(p, 1)) {
        return Err(failed("add_layer_norm", mismatch));
    }
    // BERT's output projection, bias, residual and norm (the GPU adds the bias in the norm).
    let k = 16;
    let (xk, wk, bias) = (
        values(100, rows * k, 1.0),
        values(101, d * k, 0.25),
        values(102, d, 1.0),
    );
    check_op!(
        backend,
        p,
        "linear_add_layer_norm",
        k,
        &[
            (&xk, &[rows, k]),
            (&wk, &[d, k]),
            (&bias, &[d]),
            (&r, &[rows, d]),
            (&gamma, &[d]),
            (&beta, &[d]),
        ],
        |be, t| be.linear_add_layer_norm(&t[0], &t[1], Some(&t[2]), &t[3], (&t[4], &t[5]), 1e-5)
    );
    let mut logits = values(74, 3 * 40, 4.0);
    logits[40..52].fill(f32::NEG_INFINITY);
    check_op!(
        backend,
        p,
        "softmax_rows",
        bound = Bound::relative(p),
        &[(&logits, &[3, 40])],
        |be, t| be.softmax_rows(&t[0])
    );

    let table = values(75, 10 * 16, 1.0);
    let ids = [3u32, 0, 9, 3, 7];
    check_op!(backend, p, "embedding", 1, &[(&table, &[10, 16])], |be, t| be
        .embedding(&ids, &t[0]));
    for part in 0..3 {
        check_op!(
            backend,
            p,
            format!("split_last part {part}"),
            1,
            &[(&table, &[10, 16])],
            |be, t| {
                let pieces = be.split_last(&t[0], &[5, 8, 3])?;
                pieces
                    .into_iter()
                    .nth(part)
                    .ok_or_else(|| failed("split_last", "no part"))
            }
        );
    }
    let (tokens, heads, kv_heads, hd) = (3, 2, 1, 8);
    let positions = [0usize, 5, 4000];
    let qkv = values(76, tokens * (heads + 2 * kv_heads) * hd, 2.0);
    let fused: &[(&[f32], &[usize])] = &[(&qkv, &[tokens, (heads + 2 * kv_heads) * hd])];
    check_op!(
        backend,
        p,
        "rope",
        1,
        &[(&qkv[..tokens * heads * hd], &[tokens, heads, hd])],
        |be, t| be.rope(&t[0], &positions, 1e4)
    );
    for part in 0..3 {
        check_op!(
            backend,
            p,
            format!("split_qkv_rope part {part}"),
            1,
            fused,
            |be, t| {
                let (q, k, v) = be.split_qkv_rope(&t[0], (heads, kv_heads), &positions, 1e4)?;
                Ok::<_, BackendError>(
                    [q, k, v]
                        .into_iter()
                        .nth(part)
                        .ok_or_else(|| failed("split_qkv_rope", "no part"))?,
                )
            }
        );
    }
    Ok(())
}

/// The attention checks of [`check`], public for a backend that runs them again with one of
/// its paths forced (the CUDA backend's dense flash kernel).
pub fn check_attention<B: Backend>(backend: &B, p: Precision) -> Result<()> {
    // A padded encoder batch with grouped heads, a decode step over a cache, and a fused
    // projection (BERT's layout), each through whatever path the backend picks.
    let (batch, seq, heads, kv_heads, d) = (2, 5, 4, 2, 8);
    let valid: Vec<bool> = (0..batch * seq).map(|i| i < seq + 2).collect();
    let q = values(80, batch * seq * heads * d, 2.0);
    let (k, v) = (
        values(81, batch * seq * kv_heads * d, 2.0),
        values(82, batch * seq * kv_heads * d, 1.0),
    );
    let inputs: &[(&[f32], &[usize])] = &[
        (&q, &[batch, seq, heads, d]),
        (&k, &[batch, seq, kv_heads, d]),
        (&v, &[batch, seq, kv_heads, d]),
    ];
    let mask = AttentionMask::padding(&valid);
    check_op!(backend, p, "attention (prompt, padding)", d, inputs, |be, t| be
        .attention(&t[0], &t[1], &t[2], &mask));
    let q1 = &q[..batch * heads * d];
    let decode: &[(&[f32], &[usize])] = &[
        (q1, &[batch, 1, heads, d]),
        (&k, &[batch, seq, kv_heads, d]),
        (&v, &[batch, seq, kv_heads, d]),
    ];
    let causal = AttentionMask::causal(seq - 1);
    check_op!(backend, p, "attention (decode)", d, decode, |be, t| be
        .attention(&t[0], &t[1], &t[2], &causal));
    // Eight new tokens after 128 cached at head dimension 64 (BERT-base's and Llama's): on
    // the GPU's tensor-core flash kernel, which serves such prompts in half precision when the
    // unfused path is off, three tiles of keys, so its running softmax rescales.
    let (new, keys, d64) = (8, 136, 64);
    let q64 = values(84, new * heads * d64, 2.0);
    let (k64, v64) = (
        values(85, keys * kv_heads * d64, 2.0),
        values(86, keys * kv_heads * d64, 1.0),
    );
    let inputs64: &[(&[f32], &[usize])] = &[
        (&q64, &[1, new, heads, d64]),
        (&k64, &[1, keys, kv_heads, d64]),
        (&v64, &[1, keys, kv_heads, d64]),
    ];
    let after_cache = AttentionMask::causal(keys - new);
    check_op!(
        backend,
        p,
        "attention (prompt after a cache, head dim 64)",
        d64,
        inputs64,
        |be, t| be.attention(&t[0], &t[1], &t[2], &after_cache)
    );
    let qkv = values(83, batch * seq * 3 * heads * d, 2.0);
    check_op!(
        backend,
        p,
        "attention_qkv",
        d,
        &[(&qkv, &[batch * seq, 3 * heads * d])],
        |be, t| be.attention_qkv(&t[0], (batch, heads), &mask)
    );
    Ok(())
}

/// Steps over a key/value pool, their blocks scattered: a sequence decoding one token after 20
/// cached beside a prompt of 3 (the prompt kernel), two decoding alone at head dimensions 8
/// and 64 (on a GPU the grouped-heads decode kernel, split across blocks), a prompt of 17
/// beside a decoding sequence and two prompts alone (the GPU's cuBLAS path); the pools after
/// the fused rotation and write, then attention.
fn paged<B: Backend>(backend: &B, p: Precision) -> Result<()> {
    let seq = |q_len: usize, k_len: usize, blocks: Vec<u32>| PagedSeq { q_len, k_len, blocks };
    let mixed = vec![seq(1, 21, vec![3, 0]), seq(3, 3, vec![2])];
    let decode = vec![seq(1, 21, vec![3, 0]), seq(1, 4, vec![2])];
    // A prompt long enough for the GPU's cuBLAS path, beside a decoding sequence and alone
    // (after a cache of 4, with a short one).
    let joining = vec![seq(1, 21, vec![3, 0]), seq(17, 17, vec![2, 1])];
    let prompts = vec![seq(17, 21, vec![3, 0]), seq(4, 4, vec![2])];
    let counting = |from: usize, to: usize| (from..to).collect::<Vec<usize>>();
    // Heads, key/value heads and head dimension: small, and a decode step as Llama's are
    // shaped (a group of 4 query heads per key head at d = 64, which on a GPU puts 8 lanes on
    // each key row of the grouped decode kernel).
    // Head dimension 80 (Phi's) does not fit the grouped kernel: the per-head decode kernel,
    // split across blocks on a GPU.
    let (small, llama, phi) = ((4, 2, 8), (8, 2, 64), (4, 2, 80));
    // Forty sequences of TinyLlama's heads (32 over 4 key heads: 8 blocks each): enough blocks
    // to fill a GPU of up to 160 multiprocessors (an H100, H200 or A100) without splitting the
    // keys, so the grouped kernel writes its output itself.
    let tinyllama = (32, 4, 64);
    let many: Vec<PagedSeq> = (0..40).map(|i| seq(1, 2 + i % 5, vec![i as u32])).collect();
    let many_positions: Vec<usize> = many.iter().map(|s| s.k_len - 1).collect();
    let window = Some(4);
    for (what, seqs, positions, dims, window) in [
        ("mixed", mixed.clone(), vec![20usize, 0, 1, 2], small, None),
        ("decode", decode.clone(), vec![20, 3], small, None),
        ("decode at head dim 64", decode.clone(), vec![20, 3], llama, None),
        // A prompt of 3 beside a decode: the GPU's tensor-core flash kernel in half precision.
        (
            "mixed at head dim 64",
            mixed.clone(),
            vec![20usize, 0, 1, 2],
            llama,
            None,
        ),
        ("decode at head dim 80", decode, vec![20, 3], phi, None),
        ("decode of 40 sequences", many, many_positions, tinyllama, None),
        (
            "joining prompt",
            joining.clone(),
            [vec![20], counting(0, 17)].concat(),
            small,
            None,
        ),
        (
            "prompts",
            prompts,
            [counting(4, 21), counting(0, 4)].concat(),
            small,
            None,
        ),
        // Mistral's sliding window, on the flash kernel and on the cuBLAS prompt path.
        ("windowed mixed", mixed, vec![20usize, 0, 1, 2], small, window),
        (
            "windowed joining prompt",
            joining,
            [vec![20], counting(0, 17)].concat(),
            small,
            window,
        ),
    ] {
        paged_step(backend, p, what, seqs, &positions, dims, window)?;
    }
    Ok(())
}

fn paged_step<B: Backend>(
    backend: &B,
    p: Precision,
    what: &str,
    seqs: Vec<PagedSeq>,
    positions: &[usize],
    (heads, kv_heads, d): (usize, usize, usize),
    window: Option<usize>,
) -> Result<()> {
    let block_size = 16;
    let blocks = seqs
        .iter()
        .flat_map(|s| s.blocks.iter())
        .max()
        .map_or(1, |&b| b as usize + 1);
    let plan = PagedPlan {
        block_size,
        window,
        seqs,
    };
    let pool_shape = [blocks * block_size, kv_heads, d];
    let pool_len = blocks * block_size * kv_heads * d;
    let (keys, vals) = (
        p.round(&values(90, pool_len, 2.0)),
        p.round(&values(91, pool_len, 1.0)),
    );
    let tokens = plan.tokens();
    let qkv = p.round(&values(92, tokens * (heads + 2 * kv_heads) * d, 2.0));
    macro_rules! step {
        ($be:expr) => {{
            let be = $be;
            let paged = be.prepare_paged(&plan)?;
            let mut k_pool = be.from_host(&keys, &pool_shape)?;
            let mut v_pool = be.from_host(&vals, &pool_shape)?;
            let x = be.from_host(&qkv, &[tokens, (heads + 2 * kv_heads) * d])?;
            let q = be.split_qkv_rope_paged(
                &x,
                (heads, kv_heads),
                positions,
                1e4,
                &mut k_pool,
                &mut v_pool,
                &paged,
            )?;
            let out = be.paged_attention(&q, &k_pool, &v_pool, &paged)?;
            // GPT-2's way too: new keys written by `write_paged` (any rows of the right shape:
            // the rotated queries' first heads), then attention again.
            let rows = be.split_last(
                &be.reshape(q, &[tokens, heads * d])?,
                &[kv_heads * d, (heads - kv_heads) * d],
            )?;
            let new_keys = rows
                .into_iter()
                .next()
                .ok_or_else(|| failed("split_last", "no part"))?;
            be.write_paged(
                &mut k_pool,
                &be.reshape(new_keys, &[tokens, kv_heads, d])?,
                &paged,
            )?;
            let again = be.paged_attention(
                &be.from_host(&qkv[..tokens * heads * d], &[tokens, heads, d])?,
                &k_pool,
                &v_pool,
                &paged,
            )?;
            (
                be.to_host(&k_pool)?,
                be.to_host(&v_pool)?,
                [be.to_host(&out)?, be.to_host(&again)?].concat(),
            )
        }};
    }
    let got =
        (|| -> Result<_> { Ok(step!(backend)) })().map_err(|e| failed(&format!("paged {what} step"), e))?;
    let want = step!(&ReferenceBackend);
    for (part, g, w) in [
        ("split_qkv_rope_paged (key pool)", &got.0, &want.0),
        ("split_qkv_rope_paged (value pool)", &got.1, &want.1),
        ("paged_attention", &got.2, &want.2),
    ] {
        if let Some(mismatch) = first_mismatch(g, w, Bound::of(p, d)) {
            return Err(failed(&format!("{part}, {what} step"), mismatch));
        }
    }
    Ok(())
}

/// Token choice on the backend: greedy (the first index of each row's largest stored logit),
/// then draws cut by top-k, by top-p and by both, against the host's `sampling::choose`.
fn sampling<B: Backend>(backend: &B, p: Precision) -> Result<()> {
    let (rows, vocab) = (3, 1000);
    // Steps of 1/64 in scrambled order: in half precision many round to the same value, and
    // both sides choose the first of the largest.
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7919) % (rows * vocab)) as f32 / 64.0)
        .collect();
    choices(
        backend,
        p,
        "sample_rows (greedy)",
        &logits,
        &[TokenDraw::GREEDY; 3],
    )?;
    // Five likely tokens 2 apart in logit (probabilities about 0.865, 0.117, 0.016, 0.002,
    // 0.0003) among 995 unlikely ones. In index order (17, 64, 211, 503, 999) the top five's
    // cumulative sums are about 0.865, 0.865, 0.881, 0.998, 1: a uniform of 0.95 picks 503 with
    // a margin of 0.05 either side. Top-p 0.9 (and top-3 with top-p 0.95) keeps 17 and 503
    // (0.881, 0.119 renormalised): 0.95 picks 503 and 0.3 picks 17. Every margin is far wider
    // than rounding, so the same tokens must come back however the sums are ordered.
    let draws = cut_draws();
    let cut = cut_logits(rows, vocab);
    choices(backend, p, "sample_rows (top-k, top-p)", &cut, &draws)
}

/// `rows` rows of `vocab` logits with five likely tokens (17, 503, 211, 999, 64 at logits 10,
/// 8, 6, 4, 2) among unlikely ones (about -4).
fn cut_logits(rows: usize, vocab: usize) -> Vec<f32> {
    let mut cut = values(95, rows * vocab, 0.5);
    for row in cut.chunks_mut(vocab) {
        row.iter_mut().for_each(|x| *x -= 4.0);
        for (&i, logit) in [17usize, 503, 211, 999, 64]
            .iter()
            .zip([10.0, 8.0, 6.0, 4.0, 2.0])
        {
            row[i] = logit;
        }
    }
    cut
}

/// The draws over [`cut_logits`]: top-k 5 at 0.95, top-p 0.9 at 0.95, top-3 and top-p 0.95 at 0.3.
fn cut_draws() -> [TokenDraw; 3] {
    let draw = |top_k: u32, top_p: f32, uniform: f64| TokenDraw {
        temperature: 1.0,
        top_k,
        top_p,
        uniform,
    };
    [draw(5, 1.0, 0.95), draw(0, 0.9, 0.95), draw(3, 0.95, 0.3)]
}

fn choices<B: Backend>(
    backend: &B,
    p: Precision,
    what: &str,
    logits: &[f32],
    draws: &[TokenDraw],
) -> Result<()> {
    let stored = p.round(logits);
    let vocab = logits.len() / draws.len();
    let want: Vec<u32> = stored
        .chunks(vocab)
        .zip(draws)
        .map(|(row, draw)| crate::sampling::choose(row, draw))
        .collect();
    let t = backend.from_host(&stored, &[draws.len(), vocab])?;
    let got = backend.sample_rows(&t, draws).map_err(|e| failed(what, e))?;
    if got != want {
        return Err(failed(what, format!("chose {got:?}, expected {want:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    #[test]
    fn the_cpu_backend_passes() {
        let cpu = CpuBackend::new(2).unwrap();
        check(&cpu, Precision::F32).unwrap();
        // The reference against itself in each precision (both sides read the same rounded
        // inputs), which runs every comparison with each precision's bounds.
        for p in Precision::ALL {
            check(&ReferenceBackend, p).unwrap();
        }
    }

    #[test]
    fn the_cut_draws_pick_different_tokens() {
        // The margins the comment in `sampling` claims: the three draws pick 503, 503 and 17,
        // so a backend that always returned the argmax would fail.
        let row = cut_logits(1, 1000);
        let picks: Vec<u32> = cut_draws()
            .iter()
            .map(|d| crate::sampling::choose(&row, d))
            .collect();
        assert_eq!(picks, [503, 503, 17]);
        // And 0.05 either way of 0.95 keeps the first pick.
        for uniform in [0.9, 0.99] {
            let draw = TokenDraw {
                uniform,
                ..cut_draws()[0]
            };
            assert_eq!(crate::sampling::choose(&row, &draw), 503);
        }
    }

    #[test]
    fn a_wrong_value_is_named() {
        let want = values(1, 100, 1.0);
        let mut got = want.clone();
        assert_eq!(first_mismatch(&got, &want, Bound::of(Precision::Bf16, 64)), None);
        got[37] += 0.5;
        let m = first_mismatch(&got, &want, Bound::of(Precision::Bf16, 64)).unwrap();
        assert!(m.contains("element 37"), "{m}");
        // A bf16 rounding is within the bound; a wrong layout (another element) is not.
        let rounded = Precision::Bf16.round(&want);
        assert_eq!(
            first_mismatch(&rounded, &want, Bound::of(Precision::Bf16, 1)),
            None
        );
        let shifted: Vec<f32> = want.iter().cycle().skip(1).take(100).copied().collect();
        assert!(first_mismatch(&shifted, &want, Bound::of(Precision::Bf16, 64)).is_some());
        assert!(first_mismatch(&got[..99], &want, Bound::of(Precision::F32, 1)).is_some());
    }
}
