//! Sentence pooling, sentence-transformers' `Pooling` module and optionally its `Normalize`:
//! the token states of each sequence of a padded batch reduced to one embedding. The host
//! implementation (in `f64`) serves the CPU and reference backends; a GPU backend pools on the
//! device, so that only the pooled rows cross the bus (in fp32).

use super::cpu::CpuTensor;
use super::{Pooling, Result, shapes};

/// The smallest norm a row is divided by when normalising (`torch.nn.functional.normalize`'s
/// `eps`), so that a zero row stays zero.
pub const NORM_EPS: f64 = 1e-12;

/// `(batch, seq, hidden)` of a pooling's input `hidden [batch, seq, hidden]` with `valid`
/// holding `batch · seq` flags.
pub(crate) fn dims(hidden: &[usize], valid: usize) -> Result<(usize, usize, usize)> {
    let &[batch, seq, h] = hidden else {
        return Err(shapes::err(
            "pool",
            format!("needs hidden states [batch, seq, hidden], got shape {hidden:?}"),
        ));
    };
    if batch.checked_mul(seq) != Some(valid) {
        return Err(shapes::err(
            "pool",
            format!("{valid} validity flags for {batch} sequences of {seq} tokens"),
        ));
    }
    Ok((batch, seq, h))
}

/// Pools `hidden [batch, seq, h]` (row-major) over each sequence's valid tokens. Every mode
/// but `Cls` gives zeros for a sequence without valid tokens (which a tokenizer never
/// produces: every sequence holds at least its first special token); `Cls` does when there is
/// no position at all (`seq` 0). `hidden` must hold `batch · seq · h` values and `valid`
/// `batch · seq` flags, as [`dims`] and the tensor types guarantee for the callers.
pub(crate) fn pool_host(
    hidden: &[f32],
    valid: &[bool],
    (batch, seq, h): (usize, usize, usize),
    pooling: Pooling,
    normalize: bool,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch * h);
    for b in 0..batch {
        let rows = &hidden[b * seq * h..(b + 1) * seq * h];
        let tokens: Vec<usize> = (0..seq).filter(|&t| valid[b * seq + t]).collect();
        let state = |t: usize, c: usize| f64::from(rows[t * h + c]);
        let pooled: Vec<f64> = (0..h)
            .map(|c| match pooling {
                Pooling::Cls => {
                    if seq > 0 {
                        state(0, c)
                    } else {
                        0.0
                    }
                }
                Pooling::LastToken => tokens.last().map_or(0.0, |&t| state(t, c)),
                _ if tokens.is_empty() => 0.0,
                Pooling::Max => tokens
                    .iter()
                    .map(|&t| state(t, c))
                    .fold(f64::NEG_INFINITY, f64::max),
                Pooling::Mean => tokens.iter().map(|&t| state(t, c)).sum::<f64>() / tokens.len() as f64,
                Pooling::MeanSqrtLen => {
                    tokens.iter().map(|&t| state(t, c)).sum::<f64>() / (tokens.len() as f64).sqrt()
                }
            })
            .collect();
        let scale = if normalize {
            1.0 / pooled.iter().map(|v| v * v).sum::<f64>().sqrt().max(NORM_EPS)
        } else {
            1.0
        };
        out.extend(pooled.iter().map(|v| (v * scale) as f32));
    }
    out
}

/// [`pool_host`] of a host tensor, shapes checked: the CPU and reference backends'
/// `pool_to_host`.
pub(crate) fn pool_tensor(
    hidden: &CpuTensor,
    valid: &[bool],
    pooling: Pooling,
    normalize: bool,
) -> Result<Vec<f32>> {
    let dims = dims(hidden.shape(), valid.len())?;
    Ok(pool_host(hidden.data(), valid, dims, pooling, normalize))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sequences of three tokens, hidden size 2; the second has one padding token.
    fn batch() -> (Vec<f32>, Vec<bool>) {
        let hidden = vec![
            1.0, -2.0, /**/ 3.0, 4.0, /**/ 5.0, 0.0, //
            -1.0, 2.0, /**/ 7.0, 1.0, /**/ 100.0, 100.0,
        ];
        (hidden, vec![true, true, true, true, true, false])
    }

    fn pooled(pooling: Pooling, normalize: bool) -> Vec<f32> {
        let (hidden, valid) = batch();
        pool_host(&hidden, &valid, (2, 3, 2), pooling, normalize)
    }

    #[test]
    fn each_mode_reduces_the_valid_tokens_only() {
        assert_eq!(pooled(Pooling::Cls, false), [1.0, -2.0, -1.0, 2.0]);
        assert_eq!(pooled(Pooling::Mean, false), [3.0, 2.0 / 3.0, 3.0, 1.5]);
        assert_eq!(pooled(Pooling::Max, false), [5.0, 4.0, 7.0, 2.0]);
        let r3 = 3f32.sqrt();
        let sqrt_len = pooled(Pooling::MeanSqrtLen, false);
        for (got, want) in sqrt_len
            .iter()
            .zip([9.0 / r3, 2.0 / r3, 6.0 / 2f32.sqrt(), 3.0 / 2f32.sqrt()])
        {
            assert!((got - want).abs() < 1e-6, "{sqrt_len:?}");
        }
        // The last valid token, not the last position.
        assert_eq!(pooled(Pooling::LastToken, false), [5.0, 0.0, 7.0, 1.0]);
    }

    #[test]
    fn normalised_rows_have_unit_length_and_zero_rows_stay_zero() {
        let rows = pooled(Pooling::Max, true);
        for row in rows.chunks(2) {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6, "{rows:?}");
        }
        let none = pool_host(&[3.0, 4.0], &[false], (1, 1, 2), Pooling::Mean, true);
        assert_eq!(none, [0.0, 0.0], "a sequence without valid tokens");
        let cls = pool_host(&[3.0, 4.0], &[false], (1, 1, 2), Pooling::Cls, true);
        assert_eq!(cls, [0.6, 0.8], "CLS takes the first position whatever the mask");
        for pooling in Pooling::ALL {
            assert_eq!(
                pool_host(&[], &[], (2, 0, 3), pooling, true),
                [0.0; 6],
                "{pooling:?} of no tokens"
            );
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(dims(&[2, 3, 4], 6).unwrap(), (2, 3, 4));
        assert!(dims(&[6, 4], 6).is_err(), "rank 2");
        assert!(dims(&[2, 3, 4], 5).is_err(), "flags for another batch");
    }
}
