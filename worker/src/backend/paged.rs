//! Paged key/value caches as the backends see them: a pool tensor per layer holding the keys (or
//! values) of every cached position of every sequence, in fixed-size blocks, and a [`PagedPlan`]
//! per forward step saying where each sequence's positions live.
//!
//! A pool is `[blocks * block_size, kv_heads, head_dim]`: row `slot` holds one position of one
//! sequence. A sequence's block table lists its blocks in order, so its position `p` lives in row
//! `table[p / block_size] * block_size + p % block_size`. Which blocks belong to which sequence
//! is decided by the block allocator in `models::kv_cache`; the backends only read and write the
//! rows a plan names, and check first that every one of them is inside the pool.
//!
//! A step's queries are packed: sequence after sequence, each with its `q_len` new tokens, which
//! are its last `q_len` positions (`k_len - q_len ..k_len`). Query `i` of a sequence sits at
//! position `p = k_len - q_len + i` and attends the keys at positions `max(0, p + 1 - window)
//! ..= p` (causal; the window is Mistral's sliding window, unlimited when `None`).

use super::shapes::err;
use super::{BackendError, Result};

/// One sequence of a paged step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagedSeq {
    /// New tokens (queries) of this sequence in this step; at least one.
    pub q_len: usize,
    /// Positions cached for this sequence once this step's keys are written (`>= q_len`).
    pub k_len: usize,
    /// Its block table: pool blocks holding positions `0..`, `block_size` each; it must cover
    /// `k_len` positions.
    pub blocks: Vec<u32>,
}

/// Where every sequence of one forward step reads and writes its keys and values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagedPlan {
    /// Positions per block.
    pub block_size: usize,
    /// Keys each query may look back over, itself included (`None`: all earlier positions).
    pub window: Option<usize>,
    /// The sequences, in the order of their packed queries.
    pub seqs: Vec<PagedSeq>,
}

impl PagedPlan {
    /// Total new tokens: the rows of the packed queries, keys and values of the step.
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.q_len).sum()
    }

    /// The pool row of position `pos` of sequence `seq` (the plan must be checked).
    pub fn slot(&self, seq: usize, pos: usize) -> usize {
        self.seqs[seq].blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// The pool rows the step's new keys and values go to, in packed token order.
    pub fn new_slots(&self) -> Vec<u32> {
        let mut slots = Vec::with_capacity(self.tokens());
        for (i, s) in self.seqs.iter().enumerate() {
            for pos in s.k_len - s.q_len..s.k_len {
                slots.push(self.slot(i, pos) as u32);
            }
        }
        slots
    }

    /// The first key position query `p` (an absolute position) attends.
    pub fn first_key(&self, p: usize) -> usize {
        self.window.map_or(0, |w| (p + 1).saturating_sub(w))
    }

    /// The largest block id any table names, plus one (0 for no blocks).
    pub fn blocks_needed(&self) -> usize {
        self.seqs
            .iter()
            .flat_map(|s| &s.blocks)
            .map(|&b| b as usize + 1)
            .max()
            .unwrap_or(0)
    }

    /// Checks that the plan is self-consistent: at least one sequence, every sequence has new
    /// tokens, no more than its keys, and a block table that covers its keys.
    pub fn check(&self) -> Result<()> {
        let op = "paged";
        if self.block_size == 0 || self.window == Some(0) {
            return Err(err(op, "block size and window must be positive".into()));
        }
        if self.seqs.is_empty() {
            return Err(err(op, "a step needs at least one sequence".into()));
        }
        for (i, s) in self.seqs.iter().enumerate() {
            if s.q_len == 0 || s.q_len > s.k_len {
                return Err(err(
                    op,
                    format!("sequence {i}: {} new tokens with {} keys", s.q_len, s.k_len),
                ));
            }
            if s.blocks.len() * self.block_size < s.k_len {
                return Err(err(
                    op,
                    format!(
                        "sequence {i}: {} blocks of {} cannot hold {} positions",
                        s.blocks.len(),
                        self.block_size,
                        s.k_len
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks a pool `[rows, kv_heads, head_dim]` against the plan: whole blocks, and every
    /// block the tables name inside it. Returns `(kv_heads, head_dim)`.
    pub fn check_pool(&self, op: &'static str, pool: &[usize]) -> Result<(usize, usize)> {
        let &[rows, kv_heads, d] = pool else {
            return Err(err(
                op,
                format!("a pool must be [slots, kv_heads, head_dim], got {pool:?}"),
            ));
        };
        if rows % self.block_size != 0 {
            return Err(err(
                op,
                format!("pool of {rows} rows is not whole blocks of {}", self.block_size),
            ));
        }
        let have = rows / self.block_size;
        let need = self.blocks_needed();
        if need > have {
            return Err(BackendError::OutOfRange {
                op,
                index: need - 1,
                len: have,
            });
        }
        Ok((kv_heads, d))
    }

    /// Checks packed queries `[tokens, heads, head_dim]` against the plan and a pool; returns
    /// `(heads, kv_heads, head_dim)`.
    pub fn check_attention(
        &self,
        q: &[usize],
        keys: &[usize],
        values: &[usize],
    ) -> Result<(usize, usize, usize)> {
        let op = "paged_attention";
        if keys != values {
            return Err(err(
                op,
                format!("key pool {keys:?} and value pool {values:?} differ"),
            ));
        }
        let (kv_heads, d) = self.check_pool(op, keys)?;
        let &[tokens, heads, qd] = q else {
            return Err(err(
                op,
                format!("queries must be [tokens, heads, head_dim], got {q:?}"),
            ));
        };
        if tokens != self.tokens() || qd != d || d == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(err(
                op,
                format!(
                    "queries {q:?} do not fit {} new tokens over pools {keys:?}",
                    self.tokens()
                ),
            ));
        }
        Ok((heads, kv_heads, d))
    }

    /// Checks new keys or values `[tokens, kv_heads, head_dim]` against the plan and a pool.
    pub fn check_write(&self, pool: &[usize], new: &[usize]) -> Result<()> {
        let op = "write_paged";
        let (kv_heads, d) = self.check_pool(op, pool)?;
        if new != [self.tokens(), kv_heads, d] {
            return Err(err(
                op,
                format!(
                    "new rows {new:?} do not fit {} tokens into a pool {pool:?}",
                    self.tokens()
                ),
            ));
        }
        Ok(())
    }
}

/// A checked plan with the indices the host backends derive from it once per step.
#[derive(Clone, Debug)]
pub struct HostPaged {
    pub plan: PagedPlan,
    /// Pool rows of the new tokens, in packed order.
    pub slots: Vec<u32>,
    /// The first packed query row of each sequence.
    pub q_starts: Vec<usize>,
}

impl HostPaged {
    pub fn new(plan: &PagedPlan) -> Result<Self> {
        plan.check()?;
        let q_starts = plan
            .seqs
            .iter()
            .scan(0, |row, s| {
                let start = *row;
                *row += s.q_len;
                Some(start)
            })
            .collect();
        Ok(Self {
            plan: plan.clone(),
            slots: plan.new_slots(),
            q_starts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> PagedPlan {
        PagedPlan {
            block_size: 4,
            window: None,
            seqs: vec![
                PagedSeq {
                    q_len: 1,
                    k_len: 6,
                    blocks: vec![3, 0],
                },
                PagedSeq {
                    q_len: 3,
                    k_len: 3,
                    blocks: vec![1],
                },
            ],
        }
    }

    #[test]
    fn slots_follow_the_block_tables() {
        let p = plan();
        p.check().unwrap();
        assert_eq!(p.tokens(), 4);
        // Sequence 0's position 5 is block 0's row 1; sequence 1's positions 0..3 block 1's.
        assert_eq!(p.new_slots(), vec![1, 4, 5, 6]);
        assert_eq!(p.slot(0, 2), 14);
        assert_eq!(p.blocks_needed(), 4);
    }

    #[test]
    fn windows_start_at_the_right_key() {
        let mut p = plan();
        assert_eq!(p.first_key(9), 0);
        p.window = Some(4);
        assert_eq!((p.first_key(2), p.first_key(3), p.first_key(9)), (0, 0, 6));
    }

    #[test]
    fn inconsistent_plans_and_pools_are_refused() {
        let mut p = plan();
        p.seqs[0].blocks.pop();
        assert!(p.check().is_err(), "table too short");
        let mut p = plan();
        p.seqs[1].q_len = 4;
        assert!(p.check().is_err(), "more queries than keys");
        let p = plan();
        assert!(p.check_pool("t", &[16, 2, 8]).is_ok());
        assert!(
            p.check_pool("t", &[12, 2, 8]).is_err(),
            "block 3 outside the pool"
        );
        assert!(p.check_pool("t", &[18, 2, 8]).is_err(), "partial block");
        assert!(p.check_write(&[16, 2, 8], &[4, 2, 8]).is_ok());
        assert!(p.check_write(&[16, 2, 8], &[3, 2, 8]).is_err());
        assert!(p.check_attention(&[4, 4, 8], &[16, 2, 8], &[16, 2, 8]).is_ok());
        assert!(
            p.check_attention(&[4, 3, 8], &[16, 2, 8], &[16, 2, 8]).is_err(),
            "GQA"
        );
        assert!(p.check_attention(&[4, 4, 8], &[16, 2, 8], &[8, 2, 8]).is_err());
    }
}
