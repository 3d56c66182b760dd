//! Paged key/value pools on the GPU (see [`crate::backend::paged`]): a step's plan is uploaded
//! once ([`CudaPaged`]: per-sequence metadata, block tables, the new tokens' pool rows), every
//! layer then writes its new keys and values into their rows with one kernel each and attends
//! through the block tables in place, so nothing of the cache crosses the bus between steps.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::context::{ATTN_MAX_D, CudaBackend};
use super::launch::{elementwise_cfg, int, launch, rows_cfg};
use super::ops::{
    AttentionKernel, DeviceMask, HeadRows, MAX_DECODE_SPLITS, attention_cfg, decode_merge_cfg, decode_splits,
    grouped_decode_fits, grouped_heads,
};
use super::tensor::{CudaTensor, DeviceArray, DeviceBuffer};
use crate::backend::shapes::AttnDims;
use crate::backend::{PagedPlan, Result, shapes};

/// A step's [`PagedPlan`] on the device.
#[derive(Debug)]
pub struct CudaPaged {
    plan: PagedPlan,
    /// 4 ints per sequence: first query row, new tokens, keys, first block table entry.
    meta: Arc<DeviceArray<i32>>,
    /// Every sequence's block table, one after another (the buffer may be longer).
    tables: Arc<DeviceArray<u32>>,
    /// The pool row of each new token, in packed order.
    slots: Arc<DeviceArray<u32>>,
    /// The most new tokens of any sequence (the query extent of the launch grids).
    max_q_len: usize,
}

impl CudaPaged {
    /// The plan this was prepared from.
    pub(crate) fn plan(&self) -> &PagedPlan {
        &self.plan
    }

    /// A decode plan whose device layout was staged into a graph's fixed buffers.
    pub(super) fn staged(
        plan: PagedPlan,
        meta: Arc<DeviceArray<i32>>,
        tables: Arc<DeviceArray<u32>>,
        slots: Arc<DeviceArray<u32>>,
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

    /// Paged attention through a flash kernel whatever the prompts' lengths (the tensor-core
    /// one where it fits, [`CudaBackend::flash_kernel`]): what the trait's `paged_attention`
    /// takes for steps whose prompts are all shorter than [`UNFUSED_MIN_PROMPT`]; public so
    /// that benchmarks can time it against the cuBLAS prompt path.
    pub fn paged_attention_flash(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        paged: &CudaPaged,
    ) -> Result<CudaTensor> {
        let d = q.shape.last().copied().unwrap_or(0);
        self.paged_attention_with(q, keys, values, paged, self.flash_kernel(d, &[q, keys, values]))
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
        self.paged_attention_queries(q, keys, values, paged, kernel, paged.max_q_len)
    }

    /// [`CudaBackend::paged_attention_with`] over each sequence's first `queries` new tokens
    /// (the launch grid's query extent; the rows of later queries are left unwritten).
    fn paged_attention_queries(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        paged: &CudaPaged,
        kernel: AttentionKernel,
        queries: usize,
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
            AttentionKernel::SplitDecode { splits } | AttentionKernel::GroupedDecode { splits, .. } => {
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
        if seqs > 65_535 || heads > 65_535 || (kernel == AttentionKernel::Decode && queries > 65_535) {
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
        let cfg = attention_cfg(kernel, queries, (heads, kv_heads), seqs, d);
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
            AttentionKernel::Flash => {
                self.check_flash_smem(op, d)?;
                attn!("paged_flash_attention", &mut out.buf)?
            }
            AttentionKernel::TensorCoreFlash => {
                self.check_tensor_core_flash(op, d, &[q, keys, values])?;
                match d {
                    32 => attn!("paged_flash_attention_tc32", &mut out.buf)?,
                    64 => attn!("paged_flash_attention_tc64", &mut out.buf)?,
                    _ => attn!("paged_flash_attention_tc128", &mut out.buf)?,
                }
            }
            AttentionKernel::Decode => attn!("paged_decode_attention", &mut out.buf)?,
            AttentionKernel::GroupedDecode { .. } => {
                if !grouped_decode_fits(d) || !self.aligned_16(&[q, keys, values]) {
                    return Err(shapes::err(
                        op,
                        format!(
                            "the grouped decode kernel takes head_dim 8, 16, 32, 64, 128 or 256 and 16-byte \
                             aligned tensors (got d = {d})"
                        ),
                    ));
                }
                // One split writes the output itself (the partials pointer is never read);
                // more leave partials for decode_merge.
                let partials = match splits {
                    1 => None,
                    _ => Some(self.decode_partials(op, seqs * heads * splits * (d + 2))?),
                };
                let hpb = int(op, grouped_heads(heads, kv_heads).0)?;
                launch!(
                    self,
                    "paged_decode_grouped",
                    cfg,
                    &mut out.buf,
                    partials.as_ref().map_or(&self.placeholder_elem, |p| &**p),
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
                    &scale,
                    &hpb
                )?;
                if let Some(partials) = &partials {
                    self.merge_decode_partials(&mut out, partials, paged, splits, heads, d)?;
                }
            }
            AttentionKernel::SplitDecode { .. } => {
                let mut partials = self.decode_partials(op, seqs * heads * splits * (d + 2))?;
                attn!("paged_decode_split", &mut partials)?;
                self.merge_decode_partials(&mut out, &partials, paged, splits, heads, d)?;
            }
        }
        Ok(out)
    }

    /// Room for `floats` fp32 decode partials (a running maximum, a sum and `d` weighted
    /// values per sequence, head and split).
    fn decode_partials(&self, op: &'static str, floats: usize) -> Result<DeviceBuffer> {
        int(op, floats)?;
        self.alloc_bytes("decode partials", floats * size_of::<f32>())
    }

    /// `decode_merge`: every sequence's and head's split partials normalised into `out`.
    fn merge_decode_partials(
        &self,
        out: &mut CudaTensor,
        partials: &DeviceBuffer,
        paged: &CudaPaged,
        splits: usize,
        heads: usize,
        d: usize,
    ) -> Result<()> {
        let op = "paged_attention";
        let seqs = paged.plan.seqs.len();
        let (seqs_i, splits_i, hi, di) = (int(op, seqs)?, int(op, splits)?, int(op, heads)?, int(op, d)?);
        launch!(
            self,
            "decode_merge",
            decode_merge_cfg(heads, seqs),
            &mut out.buf,
            partials,
            &*paged.meta,
            &seqs_i,
            &splits_i,
            &hi,
            &di
        )
    }

    /// Paged attention of a step with prompts in it with the prompts through cuBLAS: each
    /// prompt's keys and values gathered out of the pools into dense rows (`paged_gather`),
    /// then the unfused attention over them, in chunks of queries whose fp32 scores fit the
    /// unfused path's limit (`dense_chunks::UNFUSED_MAX_SCORE_BYTES`), each over the keys it can see ([`chunk_keys`]: with a
    /// sliding window, only its window's) and writing its rows of the step's output.
    /// Sequences decoding one token beside them (continuous batching) take the decode kernel,
    /// launched over the first query of every sequence (a prompt's first row is written again
    /// by its products). Tensor cores do the products that the flash kernel runs from shared
    /// memory, which is what a long prompt's time to first token is made of.
    pub(crate) fn paged_prompts_unfused(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        paged: &CudaPaged,
    ) -> Result<CudaTensor> {
        let op = "paged_attention";
        let plan = &paged.plan;
        let (heads, kv_heads, d) = plan.check_attention(&q.shape, &keys.shape, &values.shape)?;
        int(op, keys.numel())?;
        let width = kv_heads * d;
        let (wi, bs) = (int(op, width)?, int(op, plan.block_size)?);
        let mut out = if plan.seqs.iter().any(|s| s.q_len == 1) {
            self.paged_attention_queries(q, keys, values, paged, AttentionKernel::Decode, 1)?
        } else {
            self.alloc(q.shape.clone())?
        };
        let (mut q_start, mut table_start) = (0, 0);
        for s in &plan.seqs {
            if s.q_len == 1 {
                q_start += 1;
                table_start += s.blocks.len();
                continue;
            }
            let mut k_dense = self.alloc(vec![1, s.k_len, kv_heads, d])?;
            let mut v_dense = self.alloc(vec![1, s.k_len, kv_heads, d])?;
            let (ts, kl) = (int(op, table_start)?, int(op, s.k_len)?);
            int(op, s.k_len * width)?;
            launch!(
                self,
                "paged_gather",
                elementwise_cfg(s.k_len * width),
                &mut k_dense.buf,
                &mut v_dense.buf,
                &keys.buf,
                &values.buf,
                &*paged.tables,
                &ts,
                &bs,
                &kl,
                &wi
            )?;
            let limit = self.unfused_score_limit.load(Ordering::Relaxed);
            for chunk in prompt_chunks(s.q_len, s.k_len, heads, limit) {
                let c = prompt_chunk(
                    q_start,
                    (s.q_len, s.k_len),
                    chunk,
                    (heads, kv_heads, d),
                    plan.window,
                );
                self.attention_unfused_into(
                    (q, &k_dense, &v_dense),
                    [c.rows, c.kv_rows, c.kv_rows],
                    c.dims,
                    DeviceMask {
                        causal_offset: Some(c.causal_offset),
                        key_valid: None,
                    },
                    plan.window,
                    (&mut out, c.rows),
                )?;
            }
            q_start += s.q_len;
            table_start += s.blocks.len();
        }
        Ok(out)
    }

    /// The kernel for a step: decode steps (one new token per sequence) take the grouped-heads
    /// kernel where it fits (head dimension, 16-byte aligned tensors, not turned off), else
    /// the per-head ones, split across blocks when the blocks of a step would leave most of
    /// the GPU idle; anything with a prompt in it goes to a flash kernel, the tensor-core one
    /// where it fits (the trait method sends steps with a long enough prompt to
    /// `paged_prompts_unfused` instead).
    pub(super) fn paged_kernel(
        &self,
        paged: &CudaPaged,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
    ) -> AttentionKernel {
        let seqs = paged.plan.seqs.len();
        let (heads, kv_heads, d) = match (q.shape.as_slice(), keys.shape.as_slice()) {
            (&[_, heads, d], &[_, kv_heads, _]) => (heads, kv_heads, d),
            _ => (1, 1, 0), // malformed: paged_attention_queries reports it
        };
        if paged.max_q_len != 1 {
            return self.flash_kernel(d, &[q, keys, values]);
        }
        if self.grouped_decode_enabled.load(Ordering::Relaxed)
            && grouped_decode_fits(d)
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && self.aligned_16(&[q, keys, values])
        {
            let (_, tiles) = grouped_heads(heads, kv_heads);
            return AttentionKernel::GroupedDecode {
                splits: decode_splits(self.sm_count, kv_heads * tiles, seqs),
            };
        }
        match decode_splits(self.sm_count, heads, seqs) {
            1 => AttentionKernel::Decode,
            splits => AttentionKernel::SplitDecode { splits },
        }
    }

    /// Decode steps take `paged_decode_grouped` where it fits (on unless turned off); off, they
    /// take the per-head decode kernels, as benchmarks and tests compare. Recorded decode graphs
    /// are dropped when the setting changes, since they hold the kernel chosen when recorded.
    pub fn set_grouped_decode(&self, enabled: bool) {
        if self.grouped_decode_enabled.swap(enabled, Ordering::Relaxed) != enabled {
            self.forget_decode_graphs();
        }
    }
}

/// Steps whose longest prompt has fewer new tokens keep the flash kernel (one launch) rather
/// than gather and run products per prompt. An estimate of where the two cross, to be set by
/// the GPU benchmark's prefill figures.
pub(super) const UNFUSED_MIN_PROMPT: usize = 16;

/// The keys one query chunk of a prompt reads in the unfused path: `count` keys from `first`
/// (of the prompt's gathered keys), and the causal offset of the chunk's first query within
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkKeys {
    pub first: usize,
    pub count: usize,
    pub causal_offset: usize,
}

/// [`ChunkKeys`] for the queries `first .. first + count` of a prompt of `q_len` new tokens
/// after `k_len - q_len` cached ones: up to the chunk's last query's own position and, with a
/// sliding window, from the first key its first query sees (keys before every query's window
/// are not multiplied at all).
pub(crate) fn chunk_keys(
    q_len: usize,
    k_len: usize,
    (first, count): (usize, usize),
    window: Option<usize>,
) -> ChunkKeys {
    let first_pos = k_len - q_len + first;
    let begin = window.map_or(0, |w| (first_pos + 1).saturating_sub(w));
    ChunkKeys {
        first: begin,
        count: first_pos + count - begin,
        causal_offset: first_pos - begin,
    }
}

/// One query chunk of a prompt on the unfused path: where its queries (and its output rows)
/// sit in the step's packed `[tokens, heads, d]`, where the keys it reads ([`chunk_keys`]) sit
/// in the prompt's gathered `[k_len, kv_heads, d]`, the products' dimensions and the causal
/// offset of its first query within those keys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PromptChunk {
    pub rows: HeadRows,
    pub kv_rows: HeadRows,
    pub dims: AttnDims,
    pub causal_offset: usize,
}

/// [`PromptChunk`] for the queries `first .. first + count` of a prompt of `q_len` new tokens
/// over `k_len` keys whose first query is packed row `q_start`.
pub(crate) fn prompt_chunk(
    q_start: usize,
    (q_len, k_len): (usize, usize),
    (first, count): (usize, usize),
    (heads, kv_heads, d): (usize, usize, usize),
    window: Option<usize>,
) -> PromptChunk {
    let keys = chunk_keys(q_len, k_len, (first, count), window);
    PromptChunk {
        rows: HeadRows {
            offset: (q_start + first) * heads * d,
            row_stride: heads * d,
            batch_stride: 0,
        },
        kv_rows: HeadRows {
            offset: keys.first * kv_heads * d,
            row_stride: kv_heads * d,
            batch_stride: 0,
        },
        dims: AttnDims {
            batch: 1,
            s_q: count,
            s_k: keys.count,
            heads,
            kv_heads,
            head_dim: d,
        },
        causal_offset: keys.causal_offset,
    }
}

/// The query chunks `(first, count)` of a prompt of `q_len` queries over `k_len` keys and
/// `heads` heads whose fp32 scores fit `limit` bytes (at least one query each), in order.
pub(crate) fn prompt_chunks(q_len: usize, k_len: usize, heads: usize, limit: usize) -> Vec<(usize, usize)> {
    let per_query = (heads * k_len * size_of::<f32>()).max(1);
    let chunk = (limit / per_query).clamp(1, q_len.max(1));
    (0..q_len)
        .step_by(chunk)
        .map(|first| (first, chunk.min(q_len - first)))
        .collect()
}
