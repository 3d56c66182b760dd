//! Paged key/value pools on the GPU (see [`crate::backend::paged`]): a step's plan is uploaded
//! once ([`CudaPaged`]: per-sequence metadata, block tables, the new tokens' pool rows), every
//! layer then writes its new keys and values into their rows with one kernel each and attends
//! through the block tables in place, so nothing of the cache crosses the bus between steps.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::context::{ATTN_MAX_D, CudaBackend};
use super::launch::{elementwise_cfg, int, launch, rows_cfg};
use super::ops::{AttentionKernel, MAX_DECODE_SPLITS, attention_cfg, decode_merge_cfg, decode_splits};
use super::tensor::CudaTensor;
use crate::backend::{PagedPlan, Result, shapes};

/// A step's [`PagedPlan`] on the device.
#[derive(Debug)]
pub struct CudaPaged {
    plan: PagedPlan,
    /// 4 ints per sequence: first query row, new tokens, keys, first block table entry.
    meta: Arc<CudaSlice<i32>>,
    /// Every sequence's block table, one after another (the buffer may be longer).
    tables: Arc<CudaSlice<u32>>,
    /// The pool row of each new token, in packed order.
    slots: Arc<CudaSlice<u32>>,
    /// The most new tokens of any sequence (the query extent of the launch grids).
    max_q_len: usize,
}

impl CudaPaged {
    /// A decode plan whose device layout was staged into a graph's fixed buffers.
    pub(super) fn staged(
        plan: PagedPlan,
        meta: Arc<CudaSlice<i32>>,
        tables: Arc<CudaSlice<u32>>,
        slots: Arc<CudaSlice<u32>>,
    ) -> Self {
        Self {
            plan,
            meta,
            tables,
            slots,
            max_q_len: 1,
        }
    }
}

impl CudaBackend {
    pub(super) fn prepare_paged_plan(&self, plan: &PagedPlan) -> Result<CudaPaged> {
        let op = "paged";
        plan.check()?;
        let mut meta = Vec::with_capacity(4 * plan.seqs.len());
        let mut tables = Vec::new();
        let mut q_start = 0;
        for s in &plan.seqs {
            meta.extend([
                int(op, q_start)?,
                int(op, s.q_len)?,
                int(op, s.k_len)?,
                int(op, tables.len())?,
            ]);
            q_start += s.q_len;
            tables.extend_from_slice(&s.blocks);
        }
        int(op, plan.window.unwrap_or(0))?;
        int(op, plan.block_size)?;
        let slots = plan.new_slots();
        if let Some(staged) = self.stage_decode_plan(plan, &meta, &tables, &slots)? {
            return Ok(staged);
        }
        Ok(CudaPaged {
            meta: Arc::new(self.upload("block table metadata", &meta)?),
            tables: Arc::new(self.upload("block tables", &tables)?),
            slots: Arc::new(self.upload("cache slots", &slots)?),
            max_q_len: plan.seqs.iter().map(|s| s.q_len).max().unwrap_or(0),
            plan: plan.clone(),
        })
    }

    pub(super) fn write_paged_rows(
        &self,
        pool: &mut CudaTensor,
        new: &CudaTensor,
        paged: &CudaPaged,
    ) -> Result<()> {
        let op = "write_paged";
        paged.plan.check_write(&pool.shape, &new.shape)?;
        int(op, pool.numel())?;
        let (tokens, width) = (int(op, new.shape[0])?, int(op, new.shape[1] * new.shape[2])?);
        if new.numel() == 0 {
            return Ok(());
        }
        launch!(
            self,
            "kv_write",
            elementwise_cfg(new.numel()),
            &mut pool.buf,
            &new.buf,
            &*paged.slots,
            &tokens,
            &width
        )
    }

    /// `split_qkv_rope` with the keys and values written into their pool rows by the same
    /// kernel (`qkv_rope_paged`); returns q.
    #[allow(
        clippy::too_many_arguments,
        reason = "the trait method's arguments, which fuse a split and a write"
    )]
    pub(super) fn qkv_rope_paged(
        &self,
        qkv: &CudaTensor,
        (heads, kv_heads): (usize, usize),
        positions: &[usize],
        theta: f32,
        keys: &mut CudaTensor,
        values: &mut CudaTensor,
        paged: &CudaPaged,
    ) -> Result<CudaTensor> {
        let op = "split_qkv_rope_paged";
        let (tokens, d) = shapes::qkv_rope(op, &qkv.shape, (heads, kv_heads), positions.len())?;
        let new_shape = [tokens, kv_heads, d];
        paged.plan.check_write(&keys.shape, &new_shape)?;
        paged.plan.check_write(&values.shape, &new_shape)?;
        let mut q = self.alloc(vec![tokens, heads, d])?;
        if tokens == 0 || d == 0 {
            return Ok(q);
        }
        int(op, qkv.numel())?;
        int(op, keys.numel())?;
        int(op, values.numel())?;
        let pos_dev = self.positions_on_device(op, positions)?;
        let (ti, hi, kvi, di) = (int(op, tokens)?, int(op, heads)?, int(op, kv_heads)?, int(op, d)?);
        launch!(
            self,
            "qkv_rope_paged",
            rows_cfg(tokens, 128),
            &mut q.buf,
            &mut keys.buf,
            &mut values.buf,
            &qkv.buf,
            &*pos_dev,
            &*paged.slots,
            &ti,
            &hi,
            &kvi,
            &di,
            &theta
        )?;
        Ok(q)
    }

    /// Attention over the pools through the chosen kernel (the trait method picks one).
    pub(crate) fn paged_attention_with(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        paged: &CudaPaged,
        kernel: AttentionKernel,
    ) -> Result<CudaTensor> {
        let op = "paged_attention";
        let plan = &paged.plan;
        let (heads, kv_heads, d) = plan.check_attention(&q.shape, &keys.shape, &values.shape)?;
        if d > ATTN_MAX_D {
            return Err(shapes::err(
                op,
                format!("head_dim {d} exceeds the CUDA kernels' maximum of {ATTN_MAX_D}"),
            ));
        }
        let seqs = plan.seqs.len();
        let splits = match kernel {
            AttentionKernel::SplitDecode { splits } => {
                if paged.max_q_len != 1 || !(1..=MAX_DECODE_SPLITS).contains(&splits) {
                    return Err(shapes::err(
                        op,
                        format!(
                            "the split decode kernel takes one query per sequence and 1 to {MAX_DECODE_SPLITS} splits \
                             (got {} queries, {splits} splits)",
                            paged.max_q_len
                        ),
                    ));
                }
                splits
            }
            _ => 1,
        };
        if seqs > 65_535 || heads > 65_535 || (kernel == AttentionKernel::Decode && paged.max_q_len > 65_535)
        {
            return Err(shapes::err(
                op,
                format!("grid too large for {seqs} sequences of {:?}", q.shape),
            ));
        }
        int(op, q.numel())?;
        int(op, keys.numel())?;
        let mut out = self.alloc(q.shape.clone())?;
        let (seqs_i, bs, window) = (
            int(op, seqs)?,
            int(op, plan.block_size)?,
            int(op, plan.window.unwrap_or(0))?,
        );
        let (hi, kvi, di) = (int(op, heads)?, int(op, kv_heads)?, int(op, d)?);
        let scale = 1.0 / (d as f32).sqrt();
        let cfg = attention_cfg(kernel, paged.max_q_len, heads, seqs, d);
        // The attention kernels share every argument but the first: where they write.
        macro_rules! attn {
            ($name:literal, $dest:expr) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    $dest,
                    &q.buf,
                    &keys.buf,
                    &values.buf,
                    &*paged.meta,
                    &*paged.tables,
                    &seqs_i,
                    &bs,
                    &window,
                    &hi,
                    &kvi,
                    &di,
                    &scale
                )
            };
        }
        match kernel {
            AttentionKernel::Flash => attn!("paged_flash_attention", &mut out.buf)?,
            AttentionKernel::Decode => attn!("paged_decode_attention", &mut out.buf)?,
            AttentionKernel::SplitDecode { .. } => {
                let mut partials =
                    self.alloc_slice::<f32>("decode partials", seqs * heads * splits * (d + 2))?;
                let splits_i = int(op, splits)?;
                int(op, partials.len())?;
                attn!("paged_decode_split", &mut partials)?;
                launch!(
                    self,
                    "decode_merge",
                    decode_merge_cfg(heads, seqs),
                    &mut out.buf,
                    &partials,
                    &*paged.meta,
                    &seqs_i,
                    &splits_i,
                    &hi,
                    &di
                )?;
            }
        }
        Ok(out)
    }

    /// The kernel for a step of `heads` query heads: decode steps (one new token per sequence)
    /// spread each query's keys over 8 warps, and across several blocks when heads x sequences
    /// blocks would leave most of the GPU idle; anything with a prompt in it goes to flash.
    pub(super) fn paged_kernel(&self, paged: &CudaPaged, heads: usize) -> AttentionKernel {
        if paged.max_q_len != 1 {
            return AttentionKernel::Flash;
        }
        match decode_splits(self.sm_count, heads, paged.plan.seqs.len()) {
            1 => AttentionKernel::Decode,
            splits => AttentionKernel::SplitDecode { splits },
        }
    }
}
