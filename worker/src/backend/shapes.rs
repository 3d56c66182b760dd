//! Shape checks shared by the backends: each returns the dimensions an operation works with, or
//! the error that describes why the operands do not fit.

use super::{AttentionMask, BackendError, Result};

pub(crate) fn err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

pub(crate) fn host(op: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if n != Some(len) {
        return Err(err(op, format!("{len} values do not fill shape {shape:?}")));
    }
    Ok(())
}

pub(crate) fn reshape(from: &[usize], to: &[usize]) -> Result<()> {
    host("reshape", numel(from), to)
}

/// `(rows, cols)` of `x` viewed as rows of its last dimension; the last dimension must be non-empty.
pub(crate) fn rows(op: &'static str, x: &[usize]) -> Result<(usize, usize)> {
    match x.last() {
        Some(&d) if d > 0 => Ok((numel(x) / d, d)),
        _ => Err(err(
            op,
            format!("needs a non-empty last dimension, got shape {x:?}"),
        )),
    }
}

pub(crate) fn same(op: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    if a != b {
        return Err(err(op, format!("shapes differ: {a:?} and {b:?}")));
    }
    Ok(())
}

pub(crate) fn vector(op: &'static str, name: &str, v: &[usize], len: usize) -> Result<()> {
    if v != [len] {
        return Err(err(op, format!("{name} must have shape [{len}], got {v:?}")));
    }
    Ok(())
}

pub(crate) fn split_last(x: &[usize], widths: &[usize]) -> Result<(usize, usize)> {
    let (rows, d) = rows("split_last", x)?;
    if widths.iter().sum::<usize>() != d {
        return Err(err(
            "split_last",
            format!("widths {widths:?} do not sum to the last dimension of {x:?}"),
        ));
    }
    Ok((rows, d))
}

/// Linear dimensions `(n, k, m)`: `x [.., k]`, `weight [m, k]`, `bias [m]`.
pub(crate) fn linear(x: &[usize], w: &[usize], bias: Option<&[usize]>) -> Result<(usize, usize, usize)> {
    let op = "linear";
    let (n, k) = rows(op, x)?;
    let &[m, wk] = w else {
        return Err(err(op, format!("weight must be [out, in], got {w:?}")));
    };
    if wk != k {
        return Err(err(
            op,
            format!("input {x:?} has {k} features, weight {w:?} expects {wk}"),
        ));
    }
    if let Some(b) = bias {
        vector(op, "bias", b, m)?;
    }
    Ok((n, k, m))
}

/// Batched matmul dimensions: `[batch, n, k] · [batch, k, m]`, and the output shape.
pub(crate) struct MatmulDims {
    pub batch: usize,
    pub n: usize,
    pub k: usize,
    pub m: usize,
    pub out_shape: Vec<usize>,
}

pub(crate) fn matmul(a: &[usize], b: &[usize]) -> Result<MatmulDims> {
    let op = "matmul";
    match (a, b) {
        (&[n, k], &[k2, m]) if k == k2 => Ok(MatmulDims {
            batch: 1,
            n,
            k,
            m,
            out_shape: vec![n, m],
        }),
        (&[batch, n, k], &[bb, k2, m]) if k == k2 && batch == bb => Ok(MatmulDims {
            batch,
            n,
            k,
            m,
            out_shape: vec![batch, n, m],
        }),
        _ => Err(err(op, format!("cannot multiply {a:?} by {b:?}"))),
    }
}

/// Norm dimensions `(rows, d)` after checking the per-feature parameters.
pub(crate) fn norm(op: &'static str, x: &[usize], params: &[(&str, &[usize])]) -> Result<(usize, usize)> {
    let (rows, d) = rows(op, x)?;
    for (name, p) in params {
        vector(op, name, p, d)?;
    }
    Ok((rows, d))
}

/// Embedding dimensions `(vocab, d)`.
pub(crate) fn embedding(ids: &[u32], table: &[usize]) -> Result<(usize, usize)> {
    let op = "embedding";
    let &[v, d] = table else {
        return Err(err(op, format!("table must be [vocab, dim], got {table:?}")));
    };
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= v) {
        return Err(BackendError::OutOfRange {
            op,
            index: bad as usize,
            len: v,
        });
    }
    Ok((v, d))
}

/// Rope dimensions `(tokens, heads, head_dim)`.
pub(crate) fn rope(x: &[usize], positions: &[usize]) -> Result<(usize, usize, usize)> {
    let op = "rope";
    let &[t, h, d] = x else {
        return Err(err(op, format!("x must be [tokens, heads, head_dim], got {x:?}")));
    };
    if d % 2 != 0 {
        return Err(err(op, format!("head_dim {d} must be even")));
    }
    if positions.len() != t {
        return Err(err(op, format!("{} positions for {t} tokens", positions.len())));
    }
    Ok((t, h, d))
}

/// Attention dimensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnDims {
    pub batch: usize,
    pub s_q: usize,
    pub s_k: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnDims {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// `(tokens, head_dim)` of a fused projection `[tokens, (heads + 2 kv_heads) · head_dim]` to
/// split and rotate at one position per token (the rotation pairs need an even head_dim).
pub(crate) fn qkv_rope(
    op: &'static str,
    shape: &[usize],
    (heads, kv_heads): (usize, usize),
    positions: usize,
) -> Result<(usize, usize)> {
    let (tokens, width) = rows(op, shape)?;
    let groups = heads + 2 * kv_heads;
    if groups == 0 || width % groups != 0 || (width / groups) % 2 != 0 || positions != tokens {
        return Err(err(
            op,
            format!(
                "{shape:?} with {positions} positions does not split into {heads} + 2 x {kv_heads} heads of even width"
            ),
        ));
    }
    Ok((tokens, width / groups))
}

/// `(seq, head_dim)` of a fused projection `[tokens, width]` holding q, k and v of `heads`
/// heads for `batch` sequences of equal length.
pub(crate) fn fused_qkv(tokens: usize, width: usize, batch: usize, heads: usize) -> Result<(usize, usize)> {
    if batch == 0 || heads == 0 || !tokens.is_multiple_of(batch) || !width.is_multiple_of(3 * heads) {
        return Err(err(
            "attention_qkv",
            format!("[{tokens}, {width}] is not {batch} sequences of q, k and v of {heads} heads"),
        ));
    }
    Ok((tokens / batch, width / (3 * heads)))
}

pub(crate) fn attention(q: &[usize], k: &[usize], v: &[usize], mask: &AttentionMask<'_>) -> Result<AttnDims> {
    let op = "attention";
    let &[batch, s_q, heads, head_dim] = q else {
        return Err(err(
            op,
            format!("q must be [batch, seq, heads, head_dim], got {q:?}"),
        ));
    };
    let &[kb, s_k, kv_heads, kd] = k else {
        return Err(err(
            op,
            format!("k must be [batch, seq, kv_heads, head_dim], got {k:?}"),
        ));
    };
    same(op, k, v)?;
    if kb != batch || kd != head_dim {
        return Err(err(
            op,
            format!("k {k:?} does not match q {q:?} in batch or head_dim"),
        ));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(err(
            op,
            format!("{heads} query heads are not a multiple of {kv_heads} key/value heads"),
        ));
    }
    if let Some(valid) = mask.key_valid
        && valid.len() != batch * s_k
    {
        return Err(err(
            op,
            format!(
                "padding mask has {} entries, expected {batch} x {s_k}",
                valid.len()
            ),
        ));
    }
    if let Some(offset) = mask.causal_offset
        && offset + s_q > s_k
    {
        return Err(err(
            op,
            format!("causal offset {offset} + {s_q} queries exceeds {s_k} keys"),
        ));
    }
    Ok(AttnDims {
        batch,
        s_q,
        s_k,
        heads,
        kv_heads,
        head_dim,
    })
}
