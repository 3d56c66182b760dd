//! How a dense prompt's attention (encoders: `[batch, seq, heads, d]`, a padding mask or a
//! causal one) is cut into pieces whose fp32 scores fit the unfused path's limit, so that every
//! prompt takes the two cuBLAS products and the masked softmax instead of the flash kernel,
//! which runs its dot products from shared memory without tensor cores: BERT-base at 32 × 512
//! tokens has 402 MB of scores a layer, two pieces (21 and 11 sequences) under the 256 MiB
//! limit.
//!
//! Pieces are whole sequences while one sequence's scores fit; a sequence whose scores alone
//! do not is cut into runs of queries ([`prompt_chunks`]), each over the keys its queries can
//! see (all of them, or up to the last query's causal limit). Pure: the backend turns each
//! piece into views of its operands, its causal offset and its first sequence's entry in the
//! padding mask (`CudaBackend::attention_unfused`).

use super::paged::prompt_chunks;
use crate::backend::shapes::AttnDims;

/// The most bytes of fp32 scores one product of the unfused attention materialises (with the
/// half as many bytes of probabilities in half precision): prompts with more run in pieces.
pub(crate) const UNFUSED_MAX_SCORE_BYTES: usize = 256 << 20;

/// Whether one query's fp32 scores over `keys` keys of `heads` heads fit
/// [`UNFUSED_MAX_SCORE_BYTES`]: the least piece the unfused path can run, so a prompt for which
/// this fails keeps the flash kernel.
pub(crate) fn one_query_fits(heads: usize, keys: usize) -> bool {
    heads * keys * size_of::<f32>() <= UNFUSED_MAX_SCORE_BYTES
}

/// One piece: sequences `first_seq .. first_seq + seqs`, their queries
/// `first_query .. first_query + queries`, over keys `0 .. keys`. More than one sequence only
/// with every query and every key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DenseChunk {
    pub first_seq: usize,
    pub seqs: usize,
    pub first_query: usize,
    pub queries: usize,
    pub keys: usize,
}

/// The pieces, in order, of attention with `dims` (its `batch`, `s_q`, `s_k` and `heads`
/// count) and a causal mask at `causal_offset` if any, whose fp32 scores fit `limit` bytes
/// each (a single query over every key always makes a piece, whatever the limit). Empty when
/// there are no queries or keys.
pub(crate) fn dense_chunks(dims: &AttnDims, causal_offset: Option<usize>, limit: usize) -> Vec<DenseChunk> {
    let AttnDims {
        batch,
        s_q,
        s_k,
        heads,
        ..
    } = *dims;
    if batch * s_q * s_k * heads == 0 {
        return Vec::new();
    }
    let per_seq = heads * s_q * s_k * size_of::<f32>();
    if per_seq <= limit {
        let per_chunk = (limit / per_seq).min(batch);
        return (0..batch)
            .step_by(per_chunk)
            .map(|first_seq| DenseChunk {
                first_seq,
                seqs: per_chunk.min(batch - first_seq),
                first_query: 0,
                queries: s_q,
                keys: s_k,
            })
            .collect();
    }
    let runs = prompt_chunks(s_q, s_k, heads, limit);
    (0..batch)
        .flat_map(|seq| {
            runs.iter().map(move |&(first_query, queries)| DenseChunk {
                first_seq: seq,
                seqs: 1,
                first_query,
                queries,
                // A causal query i sees keys up to offset + i.
                keys: causal_offset.map_or(s_k, |o| (o + first_query + queries).min(s_k)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(batch: usize, s_q: usize, s_k: usize, heads: usize) -> AttnDims {
        AttnDims {
            batch,
            s_q,
            s_k,
            heads,
            kv_heads: heads,
            head_dim: 64,
        }
    }

    /// Every (sequence, query) pair in exactly one piece, in order, each piece's scores
    /// within `limit` unless it is a single query.
    fn assert_cover(d: &AttnDims, chunks: &[DenseChunk], limit: usize) {
        let mut next = (0, 0);
        for c in chunks {
            assert!(c.seqs >= 1 && c.queries >= 1 && c.keys >= 1, "{c:?}");
            assert_eq!(
                (c.first_seq, c.first_query),
                next,
                "{c:?} leaves a gap or overlaps"
            );
            assert!(c.seqs == 1 || (c.queries == d.s_q && c.keys == d.s_k), "{c:?}");
            let bytes = c.seqs * d.heads * c.queries * c.keys * 4;
            assert!(
                bytes <= limit || (c.seqs == 1 && c.queries == 1),
                "{c:?}: {bytes} > {limit}"
            );
            next = if c.first_query + c.queries == d.s_q {
                (c.first_seq + c.seqs, 0)
            } else {
                (c.first_seq, c.first_query + c.queries)
            };
        }
        assert_eq!(next, (d.batch, 0), "not every sequence was covered");
    }

    #[test]
    fn a_batch_that_fits_is_one_piece() {
        let d = dims(32, 128, 128, 12);
        let chunks = dense_chunks(&d, None, 256 << 20);
        assert_eq!(
            chunks,
            [DenseChunk {
                first_seq: 0,
                seqs: 32,
                first_query: 0,
                queries: 128,
                keys: 128
            }]
        );
    }

    #[test]
    fn a_larger_batch_is_cut_by_whole_sequences() {
        // BERT-base at 32 x 512: 12.6 MB of scores a sequence, 21 of them under 256 MiB.
        let d = dims(32, 512, 512, 12);
        let chunks = dense_chunks(&d, None, 256 << 20);
        assert_eq!(chunks.iter().map(|c| c.seqs).collect::<Vec<_>>(), [21, 11]);
        assert_cover(&d, &chunks, 256 << 20);
    }

    #[test]
    fn a_sequence_too_large_alone_is_cut_by_queries() {
        let d = dims(2, 10, 10, 1);
        // 40 bytes a query: two queries a piece.
        let chunks = dense_chunks(&d, None, 80);
        assert_eq!(chunks.len(), 10);
        assert!(chunks.iter().all(|c| c.keys == 10));
        assert_cover(&d, &chunks, 80);
        // Causal: each piece reads the keys up to its last query's.
        let causal = dense_chunks(&d, Some(0), 80);
        assert_eq!(
            causal.iter().map(|c| c.keys).collect::<Vec<_>>(),
            [2, 4, 6, 8, 10, 2, 4, 6, 8, 10]
        );
        assert_cover(&d, &causal, 80);
        // Queries after cached keys see them all.
        let after = dims(1, 4, 10, 1);
        let offset = dense_chunks(&after, Some(6), 8);
        assert_eq!(offset.iter().map(|c| c.keys).collect::<Vec<_>>(), [7, 8, 9, 10]);
        assert_cover(&after, &offset, 40);
    }

    #[test]
    fn a_limit_below_one_query_still_makes_pieces_of_one() {
        let d = dims(3, 5, 7, 2);
        let chunks = dense_chunks(&d, None, 1);
        assert_eq!(chunks.len(), 15);
        assert_cover(&d, &chunks, 1);
    }

    #[test]
    fn odd_shapes_are_covered() {
        for batch in [1, 2, 7] {
            for (s_q, s_k) in [(1, 1), (3, 17), (17, 17), (33, 40)] {
                for limit in [4, 100, 1000, 5000, 1 << 20] {
                    let d = dims(batch, s_q, s_k, 3);
                    assert_cover(&d, &dense_chunks(&d, None, limit), limit);
                    if s_k >= s_q {
                        let causal = dense_chunks(&d, Some(s_k - s_q), limit);
                        assert_cover(&d, &causal, limit);
                    }
                }
            }
        }
        assert!(dense_chunks(&dims(0, 4, 4, 2), None, 100).is_empty());
        assert!(dense_chunks(&dims(2, 4, 0, 2), None, 100).is_empty());
    }
}
