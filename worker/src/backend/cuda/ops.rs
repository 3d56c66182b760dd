//! The [`Backend`] operations on the GPU, plus the device-only extras the models can use once
//! they are specialised for it (fused linear + activation, embedding gather with positions, argmax
//! on device). Shapes are checked on the host with the same checks as every backend before any
//! launch; matrix products go to cuBLAS, everything else to the kernels in `kernels/`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig};

use super::bias_epilogue::{BiasOperands, BiasProduct};
use super::context::{ATTN_MAX_D, CudaBackend, driver_err, flash_smem_bytes};
use super::dense_chunks::{UNFUSED_MAX_SCORE_BYTES, dense_chunks, one_query_fits};
use super::gemm::{Batch, Gemm};
use super::gemv::Folded;
use super::launch::{BLOCK, elementwise_cfg, int, launch, rows_cfg};
use super::paged::{CudaPaged, UNFUSED_MIN_PROMPT};
use super::tensor::{CudaTensor, DeviceArray};
use crate::backend::shapes::{self, AttnDims};
use crate::backend::{Activation, AttentionMask, Backend, DecodeStep, PagedPlan, Pooling, Result};
use crate::sampling::TokenDraw;

/// The `ACT_*` constant of `common.cuh` for an activation.
pub(super) fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Identity => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Silu => 3,
    }
}

/// The `POOL_*` constant of `pooling.cu` for a pooling.
pub(crate) fn pooling_code(pooling: Pooling) -> i32 {
    match pooling {
        Pooling::Cls => 0,
        Pooling::Mean => 1,
        Pooling::Max => 2,
        Pooling::MeanSqrtLen => 3,
        Pooling::LastToken => 4,
    }
}

/// The widest hidden state `pool_rows` takes: its fp32 row (dynamic) and its reduction's 32
/// floats (static) in the 48 KiB of shared memory a block gets without opting in (no encoder
/// comes near; BERT-large is 1024). Wider rows are pooled on the host.
pub(crate) const POOL_MAX_HIDDEN: usize = (48 << 10) / size_of::<f32>() - 32;

/// Which attention kernel runs; [`Backend::attention`] picks by the number of queries, tests
/// run both over every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttentionKernel {
    /// Tiles of 16 queries x 32 keys in shared memory (prompts, encoders).
    Flash,
    /// Tiles of 64 queries x 64 keys, products on tensor cores (prompts, encoders in half
    /// precision at head dimensions 32, 64 and 128; [`CudaBackend::flash_kernel`]).
    TensorCoreFlash,
    /// One block per query, warps splitting the keys (decode steps over a KV cache).
    Decode,
    /// Paged decode steps only (one query per sequence): each sequence's keys split across
    /// `splits` blocks, then merged (`paged_decode_split` + `decode_merge`).
    SplitDecode { splits: usize },
    /// Paged decode steps only: the query heads of one key/value head in one block, which
    /// reads each cache row once for all of them it serves (`paged_decode_grouped`, its heads
    /// tiled as [`grouped_heads`] says; merged by `decode_merge` when `splits > 1`).
    GroupedDecode { splits: usize },
}

/// The most query heads one `paged_decode_grouped` block serves (`GQ_HEADS` in attention.cu):
/// each lane keeps a query chunk and an output chunk per head in registers.
pub(crate) const GROUPED_MAX_HEADS: usize = 4;

/// How `paged_decode_grouped` tiles the `heads / kv_heads` query heads of each key head:
/// `(heads_per_block, tiles)`, with tiles as even as they can be (8 heads: two of 4; 6: two
/// of 3; 3: one of 3).
pub(crate) fn grouped_heads(heads: usize, kv_heads: usize) -> (usize, usize) {
    let group = (heads / kv_heads.max(1)).max(1);
    let tiles = group.div_ceil(GROUPED_MAX_HEADS);
    let per_block = group.div_ceil(tiles);
    (per_block, group.div_ceil(per_block))
}

/// Whether `paged_decode_grouped` takes head dimension `d`: whole 8-element chunks, read by a
/// power-of-two number of lanes (at most a warp).
pub(crate) fn grouped_decode_fits(d: usize) -> bool {
    d > 0 && d.is_multiple_of(8) && (d / 8).is_power_of_two() && d <= ATTN_MAX_D
}

/// What masks one product of the unfused attention ([`CudaBackend::attention_unfused_into`]):
/// a causal offset, and the padding mask on the device with the entry its first sequence's
/// keys start at (uploaded once for every piece of a prompt and every layer).
#[derive(Clone, Copy, Default)]
pub(crate) struct DeviceMask<'a> {
    pub causal_offset: Option<usize>,
    pub key_valid: Option<(&'a DeviceArray<u8>, usize)>,
}

/// Where the rows of one `[batch, seq, heads, d]`-shaped attention operand sit in its buffer,
/// in elements: head `h` of token `s` of sequence `b` starts at
/// `offset + b · batch_stride + s · row_stride + h · d`. A tensor of that shape is
/// [`HeadRows::dense`]; q, k and v inside a fused projection `[batch · seq, 3 · heads · d]` are
/// [`HeadRows::fused_qkv`], read where they are instead of split out first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeadRows {
    pub offset: usize,
    pub row_stride: usize,
    pub batch_stride: usize,
}

impl HeadRows {
    /// A dense `[batch, seq, heads, d]` tensor.
    pub(crate) fn dense(seq: usize, heads: usize, d: usize) -> Self {
        Self {
            offset: 0,
            row_stride: heads * d,
            batch_stride: seq * heads * d,
        }
    }

    /// Part `part` (0 for q, 1 for k, 2 for v) of a fused projection `[batch · seq, 3 · heads · d]`.
    pub(crate) fn fused_qkv(part: usize, seq: usize, heads: usize, d: usize) -> Self {
        Self {
            offset: part * heads * d,
            row_stride: 3 * heads * d,
            batch_stride: seq * 3 * heads * d,
        }
    }

    /// The element where head `h` of sequence `b`'s first row starts.
    fn start(&self, b: usize, h: usize, d: usize) -> usize {
        self.offset + b * self.batch_stride + h * d
    }

    /// One past the last element `batch` sequences of `seq` rows of `heads` heads address.
    pub(crate) fn end(&self, batch: usize, seq: usize, heads: usize, d: usize) -> usize {
        if batch * seq * heads * d == 0 {
            return 0;
        }
        self.start(batch - 1, heads - 1, d) + (seq - 1) * self.row_stride + d
    }
}

/// The unfused attention's two products, each one cuBLAS batch of `batch · heads` matrices
/// given by address, in cuBLAS's column-major terms (a row-major `C = A · B` is the
/// column-major `Cᵀ = Bᵀ · Aᵀ`; a row-major matrix's leading dimension is its row stride):
/// - scores `S(b, h) = Q · Kᵀ`, `[s_q × s_k]` fp32, one contiguous matrix per (b, h) for the
///   softmax: A is K (row-major `[s_k × d]`, read transposed), B is Q (`[s_q × d]`);
/// - outputs `O(b, h) = P · V`, `[s_q × d]`, written straight into the output's rows: A is V
///   (`[s_k × d]`), B is P (`[s_q × s_k]`, contiguous per (b, h)).
///
/// With each matrix's element offset in its buffer, (b, h) in order: q, k and v where the
/// views say (key/value head `h / group` for query head `h`), the scores (fp32 elements), the
/// probabilities and the output (where its view says: `[batch, s_q, heads, d]`, or a prompt's
/// rows inside a step's packed output).
#[derive(Debug)]
pub(crate) struct UnfusedPlan {
    pub scores: Gemm,
    pub values: Gemm,
    pub q: Vec<usize>,
    pub k: Vec<usize>,
    pub v: Vec<usize>,
    pub scores_at: Vec<usize>,
    pub probs_at: Vec<usize>,
    pub out_at: Vec<usize>,
}

pub(crate) fn unfused_plan(dims: &AttnDims, [q, k, v, out]: [HeadRows; 4]) -> Result<UnfusedPlan> {
    let op = "attention";
    let AttnDims {
        batch,
        s_q,
        s_k,
        heads,
        head_dim: d,
        ..
    } = *dims;
    let group = dims.group();
    let scores = Gemm {
        transa: true,
        transb: false,
        m: int(op, s_k)?,
        n: int(op, s_q)?,
        k: int(op, d)?,
        lda: int(op, k.row_stride)?,
        ldb: int(op, q.row_stride)?,
        ldc: int(op, s_k)?,
        c_f32: true,
        accumulate: false,
    };
    let values = Gemm {
        transa: false,
        transb: false,
        m: int(op, d)?,
        n: int(op, s_q)?,
        k: int(op, s_k)?,
        lda: int(op, v.row_stride)?,
        ldb: int(op, s_k)?,
        ldc: int(op, out.row_stride)?,
        c_f32: false,
        accumulate: false,
    };
    let pairs = || (0..batch).flat_map(|b| (0..heads).map(move |h| (b, h)));
    let at = |rows: HeadRows, per_group: bool| -> Vec<usize> {
        pairs()
            .map(|(b, h)| rows.start(b, if per_group { h / group } else { h }, d))
            .collect()
    };
    let matrices = |size: usize| -> Vec<usize> { (0..batch * heads).map(|i| i * size).collect() };
    Ok(UnfusedPlan {
        scores,
        values,
        q: at(q, false),
        k: at(k, true),
        v: at(v, true),
        scores_at: matrices(s_q * s_k),
        probs_at: matrices(s_q * s_k),
        out_at: at(out, false),
    })
}

/// The device address of a buffer of this backend's stream.
fn addr_u64<T>(buf: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (ptr, _sync) = buf.device_ptr(stream);
    ptr
}

/// The most blocks one sequence's keys are split across in a decode step.
pub(super) const MAX_DECODE_SPLITS: usize = 16;

/// Splits for a decode step of `seqs` sequences of `heads` heads on a GPU of `sms`
/// multiprocessors: enough blocks for two per multiprocessor, at most [`MAX_DECODE_SPLITS`]; 1
/// (no split) once heads x sequences fill the GPU. It depends on the launch shape alone, not
/// on the cache lengths, so a recorded decode graph keeps its meaning as caches grow.
pub(super) fn decode_splits(sms: usize, heads: usize, seqs: usize) -> usize {
    (2 * sms)
        .div_ceil((heads * seqs).max(1))
        .clamp(1, MAX_DECODE_SPLITS)
}

/// A mask's causal offset as the kernels take it: -1 for none.
fn causal_arg(op: &'static str, mask: &AttentionMask<'_>) -> Result<i32> {
    mask.causal_offset.map_or(Ok(-1), |off| int(op, off))
}

fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

/// The launch shape of an attention kernel (dense or paged) over `queries` query rows per
/// sequence (the most of any sequence), `heads` query heads over `kv_heads`, `seqs` sequences
/// and head dimension `d`; see the launch notes in `attention.cu`.
pub(super) fn attention_cfg(
    kernel: AttentionKernel,
    queries: usize,
    (heads, kv_heads): (usize, usize),
    seqs: usize,
    d: usize,
) -> LaunchConfig {
    match kernel {
        AttentionKernel::Flash => LaunchConfig {
            grid_dim: (queries.div_ceil(16) as u32, heads as u32, seqs as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: flash_smem_bytes(d) as u32,
        },
        AttentionKernel::TensorCoreFlash => LaunchConfig {
            grid_dim: (queries.div_ceil(TC_FLASH_ROWS) as u32, heads as u32, seqs as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: tc_flash_smem_bytes(d) as u32,
        },
        AttentionKernel::Decode => LaunchConfig {
            grid_dim: (heads as u32, queries as u32, seqs as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: ((d + 8 * (d + 2)) * size_of::<f32>()) as u32,
        },
        AttentionKernel::SplitDecode { splits } => LaunchConfig {
            grid_dim: (heads as u32, splits as u32, seqs as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: ((d + 8 * (d + 2)) * size_of::<f32>()) as u32,
        },
        AttentionKernel::GroupedDecode { splits } => {
            let (heads_per_block, tiles) = grouped_heads(heads, kv_heads);
            LaunchConfig {
                grid_dim: ((kv_heads * tiles) as u32, splits as u32, seqs as u32),
                block_dim: (256, 1, 1),
                shared_mem_bytes: (8 * heads_per_block * (d + 2) * size_of::<f32>()) as u32,
            }
        }
    }
}

/// Query rows (and keys) per block of the tensor-core flash kernels (`TC_BQ`, `TC_BK` in
/// attention.cu).
const TC_FLASH_ROWS: usize = 64;

/// The head dimensions the tensor-core flash kernels are built for (`flash_attention_tc{d}`).
pub(super) const TC_FLASH_HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Dynamic shared memory of a tensor-core flash block at head dimension `d`: the key and value
/// tiles with rows padded by 8 elements, 2-byte elements (the query tile is staged where the
/// key tile goes). At most 34 KiB, within the 48 KiB every kernel has.
pub(super) const fn tc_flash_smem_bytes(d: usize) -> usize {
    2 * TC_FLASH_ROWS * (d + 8) * 2
}

/// The launch shape of `decode_merge`.
pub(super) fn decode_merge_cfg(heads: usize, seqs: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (heads as u32, seqs as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    fn elementwise(&self, op: &'static str, x: &CudaTensor) -> Result<(CudaTensor, i32)> {
        let n = x.numel();
        Ok((self.alloc(x.shape.clone())?, int(op, n)?))
    }

    fn unary(&self, op: &'static str, x: &CudaTensor) -> Result<CudaTensor> {
        let (mut out, n) = self.elementwise(op, x)?;
        if n > 0 {
            let cfg = elementwise_cfg(n as usize);
            match op {
                "gelu" => launch!(self, "gelu_erf", cfg, &mut out.buf, &x.buf, &n)?,
                _ => launch!(self, "gelu_tanh", cfg, &mut out.buf, &x.buf, &n)?,
            }
        }
        Ok(out)
    }

    fn binary(&self, op: &'static str, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        shapes::same(op, &a.shape, &b.shape)?;
        let (mut out, n) = self.elementwise(op, a)?;
        if n > 0 {
            let cfg = elementwise_cfg(n as usize);
            match op {
                "add" => launch!(self, "add", cfg, &mut out.buf, &a.buf, &b.buf, &n)?,
                _ => launch!(self, "silu_mul", cfg, &mut out.buf, &a.buf, &b.buf, &n)?,
            }
        }
        Ok(out)
    }

    /// `act(x · weightᵀ + bias)`, onto `residual` when given (then `act` must be the
    /// identity): the matrix-vector kernel for a few rows, bias and activation folded in; else
    /// the cuBLAS product (accumulating into the residual in place) with the bias, and GELU's
    /// tanh form, in cuBLASLt's epilogue, or followed by one kernel that adds the bias and
    /// applies the activation in the same pass over the output.
    fn fused_linear(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
        residual: Option<CudaTensor>,
    ) -> Result<CudaTensor> {
        let (n, k, _) = shapes::linear(&x.shape, &weight.shape, bias.map(|b| b.shape.as_slice()))?;
        let mut operands = vec![x, weight];
        operands.extend(bias);
        if self.gemv_fits(n, k, &operands) {
            return self.gemv(
                x,
                weight,
                Folded {
                    bias,
                    act,
                    ..Folded::default()
                },
                residual,
            );
        }
        self.cublas_linear(x, weight, bias, act, residual)
    }

    /// [`CudaBackend::fused_linear`] through cuBLAS whatever the number of rows.
    fn cublas_linear(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
        residual: Option<CudaTensor>,
    ) -> Result<CudaTensor> {
        let op = "linear";
        let (n, k, m) = shapes::linear(&x.shape, &weight.shape, bias.map(|b| b.shape.as_slice()))?;
        let shape = with_last(&x.shape, m);
        if let Some(r) = &residual {
            shapes::same("linear_add", &r.shape, &shape)?;
            if act != Activation::Identity {
                return Err(shapes::err(
                    op,
                    "an activation cannot follow a residual add".into(),
                ));
            }
        }
        let accumulate = residual.is_some();
        if n * m == 0 {
            return residual.map_or_else(|| self.alloc(shape), Ok);
        }
        let (ni, ki, mi) = (int(op, n)?, int(op, k)?, int(op, m)?);
        int(op, n * m)?;
        let mut out = match residual {
            Some(r) => r,
            None if k == 0 => self.alloc_zeros(shape)?,
            None => self.alloc(shape)?,
        };
        if let Some(bias) = bias
            && matches!(act, Activation::Identity | Activation::GeluTanh)
        {
            let product = BiasProduct {
                n: n as u64,
                k: k as u64,
                m: m as u64,
                accumulate,
                gelu_tanh: act == Activation::GeluTanh,
            };
            if self.bias_in_epilogue(x, weight, bias, &mut out, product)? {
                return Ok(out);
            }
        }
        if k > 0 {
            // Row-major out[n × m] = x[n × k] · Wᵀ is column-major outᵀ[m × n] = W · xᵀ, where the
            // row-major buffers of W [m × k] and x [n × k] read column-major are Wᵀ (so op T)
            // and xᵀ (op N).
            let g = Gemm {
                transa: true,
                transb: false,
                m: mi,
                n: ni,
                k: ki,
                lda: ki,
                ldb: ki,
                ldc: mi,
                c_f32: false,
                accumulate,
            };
            // SAFETY: the shapes were checked: W holds m·k, x n·k and out n·m elements.
            unsafe {
                self.gemm(
                    &format!("{n}x{k}x{m}"),
                    g,
                    None,
                    &weight.buf,
                    &x.buf,
                    &mut out.buf,
                )?
            };
        }
        if bias.is_some() || act != Activation::Identity {
            let has_bias = i32::from(bias.is_some());
            let act = act_code(act);
            let bias_buf = bias.map_or(&self.placeholder_elem, |b| &b.buf);
            launch!(
                self,
                "bias_act",
                elementwise_cfg(n * m),
                &mut out.buf,
                bias_buf,
                &has_bias,
                &ni,
                &mi,
                &act
            )?;
        }
        Ok(out)
    }

    /// `out (+)= x · weightᵀ + bias`, through GELU (tanh form) when the product says so, by
    /// cuBLASLt's epilogue (`bias_epilogue.rs`); `Ok(false)`, with nothing enqueued, when it
    /// does not take this product.
    fn bias_in_epilogue(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: &CudaTensor,
        out: &mut CudaTensor,
        product: BiasProduct,
    ) -> Result<bool> {
        let Some(epilogue) = &self.bias_epilogue else {
            return Ok(false);
        };
        self.bind()?;
        // The guards order the buffers' other uses around the product; they live until it is
        // enqueued.
        let (weight_ptr, _w) = weight.buf.device_ptr(&self.stream);
        let (x_ptr, _x) = x.buf.device_ptr(&self.stream);
        let (bias_ptr, _b) = bias.buf.device_ptr(&self.stream);
        let (out_ptr, _o) = out.buf.device_ptr_mut(&self.stream);
        let operands = BiasOperands {
            weight: weight_ptr,
            x: x_ptr,
            bias: bias_ptr,
            out: out_ptr,
        };
        // SAFETY: the caller checked the shapes: W holds m·k, x n·k, the bias m and out n·m
        // elements, all in the backend's precision, on its stream.
        unsafe { epilogue.run(product, operands, self.stream.cu_stream().cast()) }
    }

    /// The cuBLAS product (and bias epilogue) whatever the number of rows: what `linear` takes
    /// for more rows than the matrix-vector kernel's; public so that benchmarks can time both.
    pub fn linear_cublas(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        self.cublas_linear(x, weight, bias, Activation::Identity, None)
    }

    /// `embedding`'s gather, reading `ids` from the buffer `staged` finds for them (a decode
    /// graph's fixed inputs) or else from an upload.
    fn gather_rows(
        &self,
        op: &'static str,
        ids: &[u32],
        table: &CudaTensor,
        staged: impl Fn(&[u32]) -> Option<Arc<DeviceArray<u32>>>,
    ) -> Result<CudaTensor> {
        let (vocab, d) = shapes::embedding(ids, &table.shape)?;
        let mut out = self.alloc(vec![ids.len(), d])?;
        if ids.is_empty() || d == 0 {
            return Ok(out);
        }
        int(op, ids.len() * d)?;
        let (tokens, vocab, di) = (int(op, ids.len())?, int(op, vocab)?, int(op, d)?);
        let ids_dev = match staged(ids) {
            Some(staged) => staged,
            None => Arc::new(self.upload(op, ids)?),
        };
        let cfg = rows_cfg(ids.len(), (d.min(BLOCK as usize) as u32).next_multiple_of(32));
        launch!(
            self,
            "embedding",
            cfg,
            &mut out.buf,
            &table.buf,
            &*ids_dev,
            &tokens,
            &vocab,
            &di
        )?;
        Ok(out)
    }

    /// `table[ids] + pos_table[positions]` in one pass (BERT and GPT-2 embeddings); the lookup
    /// tables are `[vocab, d]` and `[max_positions, d]`, one position per id.
    pub fn embedding_add(
        &self,
        ids: &[u32],
        table: &CudaTensor,
        positions: &[usize],
        pos_table: &CudaTensor,
    ) -> Result<CudaTensor> {
        let op = "embedding_add";
        let (vocab, d) = shapes::embedding(ids, &table.shape)?;
        let pos: Vec<u32> = positions
            .iter()
            .map(|&p| u32::try_from(p).unwrap_or(u32::MAX))
            .collect();
        let (max_pos, pd) = shapes::embedding(&pos, &pos_table.shape)?;
        if pd != d || positions.len() != ids.len() {
            return Err(shapes::err(
                op,
                format!(
                    "{} ids over table {:?} with {} positions over {:?}",
                    ids.len(),
                    table.shape,
                    positions.len(),
                    pos_table.shape
                ),
            ));
        }
        let mut out = self.alloc(vec![ids.len(), d])?;
        if ids.is_empty() || d == 0 {
            return Ok(out);
        }
        let (tokens, vocab, max_pos, di) = (
            int(op, ids.len())?,
            int(op, vocab)?,
            int(op, max_pos)?,
            int(op, d)?,
        );
        int(op, ids.len() * d)?;
        let (ids_dev, pos_dev) = (self.upload("token ids", ids)?, self.upload("positions", &pos)?);
        let cfg = rows_cfg(ids.len(), (d.min(BLOCK as usize) as u32).next_multiple_of(32));
        launch!(
            self,
            "embedding_add",
            cfg,
            &mut out.buf,
            &table.buf,
            &ids_dev,
            &pos_table.buf,
            &pos_dev,
            &tokens,
            &vocab,
            &max_pos,
            &di
        )?;
        Ok(out)
    }

    /// Queues `sample_rows` over `logits [rows, vocab]` with the draws already on the device
    /// (four doubles a row, see [`draw_words`]), writing one id per row into `ids`.
    pub(super) fn sample_rows_into(
        &self,
        logits: &CudaTensor,
        draws: &DeviceArray<f64>,
        ids: &mut DeviceArray<u32>,
    ) -> Result<()> {
        let op = "sample_rows";
        let (rows, vocab) = shapes::rows(op, &logits.shape)?;
        if draws.len() < 4 * rows || ids.len() < rows {
            return Err(shapes::err(
                op,
                format!(
                    "{} draw values and {} outputs for {rows} rows",
                    draws.len(),
                    ids.len()
                ),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let (ri, vi) = (int(op, rows)?, int(op, vocab)?);
        int(op, logits.numel())?;
        launch!(
            self,
            "sample_rows",
            rows_cfg(rows, BLOCK),
            ids,
            &logits.buf,
            draws,
            &ri,
            &vi
        )
    }

    /// A buffer for one token id per row.
    fn alloc_ids(&self, rows: usize) -> Result<DeviceArray<u32>> {
        self.alloc_array("token ids", rows)
    }

    /// The chosen token ids, once the kernels that chose them have run.
    pub(super) fn download_ids(&self, ids: &DeviceArray<u32>) -> Result<Vec<u32>> {
        self.download_array("token ids", ids)
    }

    /// The values of `array` on the host (`what` names them in errors), once the work queued
    /// before has run.
    pub(super) fn download_array<T: DeviceRepr + Default + Clone>(
        &self,
        what: &str,
        array: &DeviceArray<T>,
    ) -> Result<Vec<T>> {
        let host = self
            .stream
            .clone_dtoh(&array.view()?)
            .map_err(|e| driver_err(&format!("copying {what} to the host"), e))?;
        self.synchronize()?;
        Ok(host)
    }

    /// A device-to-device copy of `x` into a new tensor of the same shape (queued on the stream,
    /// like every op). Models never need one (ops allocate their outputs); it measures the copy
    /// bandwidth that bounds every memory-bound kernel, decode steps above all.
    pub fn copy(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let mut out = self.alloc(x.shape.clone())?;
        let n = x.numel() * self.precision.bytes();
        if n > 0 {
            self.stream
                .memcpy_dtod(&x.buf.slice(..n), &mut out.buf.slice_mut(..n))
                .map_err(|e| driver_err(&format!("copying {n} bytes on the GPU"), e))?;
        }
        Ok(out)
    }

    /// Attention through the chosen kernel (the trait method picks one by the number of queries).
    pub(crate) fn attention_with(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: &AttentionMask<'_>,
        kernel: AttentionKernel,
    ) -> Result<CudaTensor> {
        let op = "attention";
        let dims = shapes::attention(&q.shape, &k.shape, &v.shape, mask)?;
        let AttnDims {
            batch,
            s_q,
            s_k,
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        if d > ATTN_MAX_D {
            return Err(shapes::err(
                op,
                format!("head_dim {d} exceeds the CUDA kernels' maximum of {ATTN_MAX_D}"),
            ));
        }
        if q.numel() == 0 || s_k == 0 {
            // Nothing to compute, or no keys at all: every query row is fully masked.
            return self.alloc_zeros(q.shape.clone());
        }
        let mut out = self.alloc(q.shape.clone())?;
        int(op, q.numel())?;
        int(op, k.numel())?;
        let valid_dev = self.upload_key_valid(mask)?;
        let valid_buf = valid_dev
            .as_deref()
            .map_or(&self.placeholder_u8, DeviceArray::bytes);
        let has_valid = i32::from(valid_dev.is_some());
        let causal = causal_arg(op, mask)?;
        let (bi, sqi, ski, hi, kvi, di) = (
            int(op, batch)?,
            int(op, s_q)?,
            int(op, s_k)?,
            int(op, heads)?,
            int(op, kv_heads)?,
            int(op, d)?,
        );
        let scale = 1.0 / (d as f32).sqrt();
        let cfg = attention_cfg(kernel, s_q, (heads, kv_heads), batch, d);
        if batch > 65_535 || (kernel == AttentionKernel::Decode && s_q > 65_535) {
            return Err(shapes::err(op, format!("grid too large for {:?}", q.shape)));
        }
        macro_rules! attn {
            ($name:literal) => {
                launch!(
                    self,
                    $name,
                    cfg,
                    &mut out.buf,
                    &q.buf,
                    &k.buf,
                    &v.buf,
                    valid_buf,
                    &has_valid,
                    &causal,
                    &bi,
                    &sqi,
                    &ski,
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
                attn!("flash_attention")?
            }
            AttentionKernel::TensorCoreFlash => {
                self.check_tensor_core_flash(op, d, &[q, k, v])?;
                match d {
                    32 => attn!("flash_attention_tc32")?,
                    64 => attn!("flash_attention_tc64")?,
                    _ => attn!("flash_attention_tc128")?,
                }
            }
            AttentionKernel::Decode => attn!("decode_attention")?,
            AttentionKernel::SplitDecode { .. } | AttentionKernel::GroupedDecode { .. } => {
                return Err(shapes::err(
                    op,
                    "the split and grouped decode kernels read paged caches only".to_owned(),
                ));
            }
        }
        Ok(out)
    }

    /// Dense attention through a fused flash kernel whatever the size ([`Self::flash_kernel`]
    /// picks which): what the trait's `attention` takes only with the unfused path off, or for
    /// a prompt so long that one query's scores alone pass its limit; public so that
    /// benchmarks can time both.
    pub fn attention_flash(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: &AttentionMask<'_>,
    ) -> Result<CudaTensor> {
        let d = q.shape.last().copied().unwrap_or(0);
        self.attention_with(q, k, v, mask, self.flash_kernel(d, &[q, k, v]))
    }

    /// The flash kernel for a prompt at head dimension `d` over `tensors` (queries, keys,
    /// values): the tensor-core one where it fits (half precision on compute capability 8.0
    /// or later, `d` one it is built for, 16-byte aligned tensors for its vector loads, not
    /// turned off), else the SIMT one, which takes every precision and head dimension.
    pub(super) fn flash_kernel(&self, d: usize, tensors: &[&CudaTensor]) -> AttentionKernel {
        if self.tensor_core_flash_fits(d)
            && self.tensor_core_flash_enabled.load(Ordering::Relaxed)
            && self.aligned_16(tensors)
        {
            AttentionKernel::TensorCoreFlash
        } else {
            AttentionKernel::Flash
        }
    }

    /// An error naming what is missing when the tensor-core flash kernel cannot run at head
    /// dimension `d` over `tensors` (a caller that chose it without [`Self::flash_kernel`]).
    pub(super) fn check_tensor_core_flash(
        &self,
        op: &'static str,
        d: usize,
        tensors: &[&CudaTensor],
    ) -> Result<()> {
        if !self.half_precision_mma {
            return Err(shapes::err(
                op,
                format!(
                    "the tensor-core flash kernel needs fp16 or bf16 on compute capability 8.0 or later ({} in {})",
                    self.name(),
                    self.precision
                ),
            ));
        }
        if !TC_FLASH_HEAD_DIMS.contains(&d) || !self.aligned_16(tensors) {
            return Err(shapes::err(
                op,
                format!(
                    "the tensor-core flash kernel takes head_dim 32, 64 or 128 and 16-byte aligned tensors (got d = {d})"
                ),
            ));
        }
        Ok(())
    }

    /// Whether a dense prompt's attention takes the unfused path: it is on (unless turned off)
    /// and one query's fp32 scores over every key fit [`UNFUSED_MAX_SCORE_BYTES`], so that
    /// the prompt can be cut into pieces that fit.
    fn unfused_fits(&self, dims: &AttnDims) -> bool {
        self.unfused_attention_enabled.load(Ordering::Relaxed) && one_query_fits(dims.heads, dims.s_k)
    }

    /// The padding mask on the device, if the mask has one (uploaded once for all the layers
    /// of a batch).
    fn upload_key_valid(&self, mask: &AttentionMask<'_>) -> Result<Option<Arc<DeviceArray<u8>>>> {
        match mask.key_valid {
            Some(valid) if !valid.is_empty() => {
                let bytes: Vec<u8> = valid.iter().map(|&b| u8::from(b)).collect();
                Ok(Some(self.upload_unless_same(
                    &self.key_valid,
                    "padding mask",
                    &bytes,
                )?))
            }
            _ => Ok(None),
        }
    }

    /// [`CudaBackend::attention_unfused`] over dense `q [batch, s_q, heads, d]`, `k` and `v`
    /// `[batch, s_k, kv_heads, d]`: what the trait's `attention` takes for prompts; for tests
    /// and benchmarks, which time every path.
    pub(crate) fn attention_unfused_dense(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: &AttentionMask<'_>,
    ) -> Result<CudaTensor> {
        let dims = shapes::attention(&q.shape, &k.shape, &v.shape, mask)?;
        let (d, heads, kv_heads) = (dims.head_dim, dims.heads, dims.kv_heads);
        let views = [
            HeadRows::dense(dims.s_q, heads, d),
            HeadRows::dense(dims.s_k, kv_heads, d),
            HeadRows::dense(dims.s_k, kv_heads, d),
        ];
        self.attention_unfused((q, k, v), views, dims, mask)
    }

    /// Dense attention without a fused kernel, reading q, k and v where their views say (see
    /// [`HeadRows`]; the three may be one fused projection): fp32 scores from one batched cuBLAS
    /// product over the (sequence, head) pairs given by address (tensor cores in half
    /// precision), the masked softmax, and a second product that writes each head's output
    /// straight into `[batch, s_q, heads, d]`. No copies of the inputs are made. A prompt whose
    /// scores exceed the unfused limit runs in pieces ([`dense_chunks`]: whole sequences, or
    /// runs of one sequence's queries), each reading the padding mask (uploaded once) from its
    /// first sequence's entry, with its own causal offset, writing its rows of the output.
    pub(crate) fn attention_unfused(
        &self,
        (q, k, v): (&CudaTensor, &CudaTensor, &CudaTensor),
        views: [HeadRows; 3],
        dims: AttnDims,
        mask: &AttentionMask<'_>,
    ) -> Result<CudaTensor> {
        let AttnDims {
            batch,
            s_q,
            s_k,
            heads,
            head_dim: d,
            ..
        } = dims;
        if batch * s_q * heads * d == 0 || s_k == 0 {
            return self.alloc_zeros(vec![batch, s_q, heads, d]);
        }
        let mut out = self.alloc(vec![batch, s_q, heads, d])?;
        let out_rows = HeadRows::dense(s_q, heads, d);
        // The padding mask goes up once; each piece reads it from its first sequence's entry.
        let valid_dev = self.upload_key_valid(mask)?;
        let limit = self.unfused_score_limit.load(Ordering::Relaxed);
        for c in dense_chunks(&dims, mask.causal_offset, limit) {
            // A piece's rows: its first sequence's, from its first query on.
            let from = |rows: HeadRows, query: usize| HeadRows {
                offset: rows.offset + c.first_seq * rows.batch_stride + query * rows.row_stride,
                ..rows
            };
            let piece_mask = DeviceMask {
                causal_offset: mask.causal_offset.map(|o| o + c.first_query),
                key_valid: valid_dev.as_deref().map(|valid| (valid, c.first_seq * s_k)),
            };
            let piece_dims = AttnDims {
                batch: c.seqs,
                s_q: c.queries,
                s_k: c.keys,
                ..dims
            };
            let [qv, kv, vv] = views;
            self.attention_unfused_into(
                (q, k, v),
                [from(qv, c.first_query), from(kv, 0), from(vv, 0)],
                piece_dims,
                piece_mask,
                None,
                (&mut out, from(out_rows, c.first_query)),
            )?;
        }
        Ok(out)
    }

    /// [`CudaBackend::attention_unfused`] of one piece (all its scores at once), writing into
    /// `out` where its view says (every element of those rows is written), with a sliding
    /// window of `window` keys on top of a causal mask when given (query i sees keys
    /// causal_offset + i + 1 - window ..= causal_offset + i).
    pub(crate) fn attention_unfused_into(
        &self,
        (q, k, v): (&CudaTensor, &CudaTensor, &CudaTensor),
        views: [HeadRows; 3],
        dims: AttnDims,
        mask: DeviceMask<'_>,
        window: Option<usize>,
        (out, out_rows): (&mut CudaTensor, HeadRows),
    ) -> Result<()> {
        let op = "attention";
        let AttnDims {
            batch,
            s_q,
            s_k,
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        if batch * s_q * heads * d == 0 || s_k == 0 {
            return Err(shapes::err(op, "the unfused path needs queries and keys".into()));
        }
        for (name, t, rows, seq, h) in [
            ("q", q, views[0], s_q, heads),
            ("k", k, views[1], s_k, kv_heads),
            ("v", v, views[2], s_k, kv_heads),
            ("out", &*out, out_rows, s_q, heads),
        ] {
            if rows.end(batch, seq, h, d) > t.numel() {
                return Err(shapes::err(
                    op,
                    format!("{name} rows {rows:?} reach past a tensor of {:?}", t.shape),
                ));
            }
            int(op, t.numel())?;
        }
        let bh = batch * heads;
        let score_bytes = bh * s_q * s_k * size_of::<f32>();
        if score_bytes > UNFUSED_MAX_SCORE_BYTES {
            return Err(shapes::err(
                op,
                format!("{score_bytes} bytes of scores exceed the unfused attention's limit"),
            ));
        }
        int(op, bh * s_q * s_k)?;
        let [qv, kv, vv] = views;
        // Every refusal before the first product is queued.
        let causal = mask.causal_offset.map_or(Ok(-1), |o| int(op, o))?;
        let valid_view = match mask.key_valid {
            // s_k entries for each of the piece's sequences, from its first one's.
            Some((valid, from)) if from + batch * s_k <= valid.len() => Some(valid.bytes().slice(from..)),
            Some((valid, from)) => {
                return Err(shapes::err(
                    op,
                    format!(
                        "{batch} sequences of {s_k} keys from entry {from} reach past a padding mask of {}",
                        valid.len()
                    ),
                ));
            }
            None => None,
        };
        if window.is_some() && mask.causal_offset.is_none() {
            return Err(shapes::err(op, "a sliding window needs a causal mask".into()));
        }
        let window = int(op, window.unwrap_or(0))?;
        let plan = unfused_plan(&dims, [qv, kv, vv, out_rows])?;
        #[cfg(test)]
        self.unfused_pieces.fetch_add(1, Ordering::Relaxed);
        let scores = self.alloc_bytes("attention scores", score_bytes)?;
        let mut probs = self.alloc(vec![bh, s_q, s_k])?;
        let eb = self.precision.bytes() as u64;
        let addr = |t: &CudaSlice<u8>| addr_u64(t, &self.stream);
        let (q0, k0, v0) = (addr(&q.buf), addr(&k.buf), addr(&v.buf));
        let (s0, p0, o0) = (addr(&scores), addr(&probs.buf), addr(&out.buf));
        fn addresses(base: u64, at: &[usize], bytes: u64) -> impl Iterator<Item = u64> + '_ {
            at.iter().map(move |&i| base + i as u64 * bytes)
        }
        // One upload: the scores product's A (K), B (Q) and C (S) pointers, then the values
        // product's A (V), B (P) and C (O).
        let pointers: Vec<u64> = addresses(k0, &plan.k, eb)
            .chain(addresses(q0, &plan.q, eb))
            .chain(addresses(s0, &plan.scores_at, 4))
            .chain(addresses(v0, &plan.v, eb))
            .chain(addresses(p0, &plan.probs_at, eb))
            .chain(addresses(o0, &plan.out_at, eb))
            .collect();
        let pointers_dev =
            self.upload_unless_same(&self.attention_pointers, "attention matrix pointers", &pointers)?;
        let table = addr_u64(pointers_dev.bytes(), &self.stream);
        let slot = |i: u64| table + i * bh as u64 * 8;
        let what = format!("attention scores {bh}x{s_q}x{s_k}x{d}");
        // SAFETY: every address points into a live buffer of this stream, at a matrix whose
        // extent the plan's leading dimensions describe: q, k and v were checked against their
        // tensors above, the scores and probabilities hold bh matrices of s_q x s_k and the
        // output bh of s_q rows of d at its row stride.
        unsafe { self.gemm_pointers(&what, plan.scores, bh, [slot(0), slot(1), slot(2)])? };
        let has_valid = i32::from(valid_view.is_some());
        let valid_buf = valid_view.unwrap_or_else(|| self.placeholder_u8.slice(..));
        let scale = 1.0 / (d as f32).sqrt();
        let (rows, sqi, ski, hi) = (int(op, bh * s_q)?, int(op, s_q)?, int(op, s_k)?, int(op, heads)?);
        launch!(
            self,
            "attn_softmax",
            rows_cfg(bh * s_q, BLOCK),
            &mut probs.buf,
            &scores,
            &valid_buf,
            &has_valid,
            &causal,
            &window,
            &rows,
            &sqi,
            &ski,
            &hi,
            &scale
        )?;
        let what = format!("attention values {bh}x{s_q}x{s_k}x{d}");
        // SAFETY: as above.
        unsafe { self.gemm_pointers(&what, plan.values, bh, [slot(3), slot(4), slot(5)])? };
        // The pointer table, scores and probabilities are freed in stream order, after the
        // products that read them.
        drop((pointers_dev, scores, probs));
        Ok(())
    }

    /// `layer_norm(x (+ bias) (+ residual))` in one launch.
    fn norm_launch(
        &self,
        x: &CudaTensor,
        (residual, bias): (Option<&CudaTensor>, Option<&CudaTensor>),
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
        (rows, d): (usize, usize),
    ) -> Result<CudaTensor> {
        let op = "layer_norm";
        let mut out = self.alloc(x.shape.clone())?;
        if rows == 0 {
            return Ok(out);
        }
        int(op, x.numel())?;
        let (ri, di) = (int(op, rows)?, int(op, d)?);
        let (has_residual, has_bias) = (i32::from(residual.is_some()), i32::from(bias.is_some()));
        let res = residual.map_or(&x.buf, |r| &r.buf);
        let bias_buf = bias.map_or(&self.placeholder_elem, |b| &b.buf);
        launch!(
            self,
            "layer_norm",
            rows_cfg(rows, BLOCK),
            &mut out.buf,
            &x.buf,
            res,
            &has_residual,
            bias_buf,
            &has_bias,
            &gamma.buf,
            &beta.buf,
            &ri,
            &di,
            &eps
        )?;
        Ok(out)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Paged = CudaPaged;

    fn name(&self) -> &str {
        self.backend_name()
    }

    fn element_bytes(&self) -> usize {
        self.precision.bytes()
    }

    fn device_stats(&self) -> Option<crate::backend::DeviceStats> {
        Some(crate::backend::DeviceStats {
            buffers: self.buffer_stats(),
            graph_replays: self.graph_replays.load(Ordering::Relaxed),
            graph_recordings: self.graph_recordings.load(Ordering::Relaxed),
        })
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor> {
        shapes::host("from_host", data.len(), shape)?;
        if data.is_empty() {
            return self.alloc_zeros(shape.to_vec());
        }
        // Weights, above all: allocated at their exact size (see `alloc_exact`).
        let encoded = self.precision.encode(data);
        let mut buf = self.alloc_exact("a tensor from the host", encoded.len())?;
        self.stream
            .memcpy_htod(&encoded, &mut *buf)
            .map_err(|e| driver_err(&format!("copying {} values to the GPU", data.len()), e))?;
        Ok(CudaTensor {
            buf,
            shape: shape.to_vec(),
        })
    }

    fn to_host(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let bytes = t.numel() * self.precision.bytes();
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let host = self
            .stream
            .clone_dtoh(&t.buf.slice(..bytes))
            .map_err(|e| driver_err("copying a tensor to the host", e))?;
        self.synchronize()?;
        Ok(self.precision.decode(&host))
    }

    fn zeros(&self, shape: &[usize]) -> Result<CudaTensor> {
        self.alloc_zeros(shape.to_vec())
    }

    fn shape<'t>(&self, t: &'t CudaTensor) -> &'t [usize] {
        &t.shape
    }

    fn reshape(&self, t: CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        shapes::reshape(&t.shape, shape)?;
        Ok(CudaTensor {
            buf: t.buf,
            shape: shape.to_vec(),
        })
    }

    fn split_last(&self, x: &CudaTensor, widths: &[usize]) -> Result<Vec<CudaTensor>> {
        let op = "split_last";
        let (rows, d) = shapes::split_last(&x.shape, widths)?;
        int(op, x.numel())?;
        let (ri, di) = (int(op, rows)?, int(op, d)?);
        let mut start = 0;
        let mut pieces = Vec::with_capacity(widths.len());
        for &w in widths {
            let mut piece = self.alloc(with_last(&x.shape, w))?;
            if rows * w > 0 {
                let (si, wi) = (int(op, start)?, int(op, w)?);
                launch!(
                    self,
                    "split_columns",
                    elementwise_cfg(rows * w),
                    &mut piece.buf,
                    &x.buf,
                    &ri,
                    &di,
                    &si,
                    &wi
                )?;
            }
            start += w;
            pieces.push(piece);
        }
        Ok(pieces)
    }

    fn linear(&self, x: &CudaTensor, weight: &CudaTensor, bias: Option<&CudaTensor>) -> Result<CudaTensor> {
        self.fused_linear(x, weight, bias, Activation::Identity, None)
    }

    fn linear_act(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
    ) -> Result<CudaTensor> {
        self.fused_linear(x, weight, bias, act, None)
    }

    fn rms_norm_linear(
        &self,
        x: &CudaTensor,
        norm: &CudaTensor,
        eps: f32,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (rows, k, _) = shapes::linear(&x.shape, &weight.shape, bias.map(|b| b.shape.as_slice()))?;
        let mut operands = vec![x, norm, weight];
        operands.extend(bias);
        if self.gemv_fits(rows, k, &operands) {
            let folded = Folded {
                norm: Some((norm, eps)),
                bias,
                ..Folded::default()
            };
            return self.gemv(x, weight, folded, None);
        }
        let normed = self.rms_norm(x, norm, eps)?;
        self.fused_linear(&normed, weight, bias, Activation::Identity, None)
    }

    fn rms_norm_swiglu(
        &self,
        x: &CudaTensor,
        norm: &CudaTensor,
        eps: f32,
        gate_up: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (rows, k, m) = shapes::linear(&x.shape, &gate_up.shape, None)?;
        if m % 2 == 0 && self.gemv_fits(rows, k, &[x, norm, gate_up]) {
            let folded = Folded {
                norm: Some((norm, eps)),
                swiglu: true,
                ..Folded::default()
            };
            return self.gemv(x, gate_up, folded, None);
        }
        let normed = self.rms_norm(x, norm, eps)?;
        self.swiglu(&self.fused_linear(&normed, gate_up, None, Activation::Identity, None)?)
    }

    fn linear_add(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        residual: CudaTensor,
    ) -> Result<CudaTensor> {
        self.fused_linear(x, weight, bias, Activation::Identity, Some(residual))
    }

    fn swiglu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let op = "swiglu";
        let (rows, two_n) = shapes::rows(op, &x.shape)?;
        if two_n % 2 != 0 {
            return Err(shapes::err(
                op,
                format!("the last dimension of {:?} is not even", x.shape),
            ));
        }
        let n = two_n / 2;
        let mut out = self.alloc(with_last(&x.shape, n))?;
        if rows == 0 {
            return Ok(out);
        }
        int(op, x.numel())?;
        let (ri, ni) = (int(op, rows)?, int(op, n)?);
        launch!(
            self,
            "swiglu",
            elementwise_cfg(rows * n),
            &mut out.buf,
            &x.buf,
            &ri,
            &ni
        )?;
        Ok(out)
    }

    fn matmul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let op = "matmul";
        let shapes::MatmulDims {
            batch,
            n,
            k,
            m,
            out_shape,
        } = shapes::matmul(&a.shape, &b.shape)?;
        if batch * n * m == 0 || k == 0 {
            return self.alloc_zeros(out_shape);
        }
        int(op, batch * n * m)?;
        int(op, a.numel())?;
        int(op, b.numel())?;
        let (ni, ki, mi, bi) = (int(op, n)?, int(op, k)?, int(op, m)?, int(op, batch)?);
        let mut out = self.alloc(out_shape)?;
        // Row-major c[n × m] = a[n × k] · b[k × m] is column-major cᵀ = bᵀ · aᵀ, and the row-major
        // buffers of b and a read column-major are exactly bᵀ [m × k] and aᵀ [k × n]: no transposes.
        let g = Gemm {
            transa: false,
            transb: false,
            m: mi,
            n: ni,
            k: ki,
            lda: mi,
            ldb: ki,
            ldc: mi,
            c_f32: false,
            accumulate: false,
        };
        let strides = Batch {
            count: bi,
            stride_a: (k * m) as i64,
            stride_b: (n * k) as i64,
            stride_c: (n * m) as i64,
        };
        let what = format!("{batch}x{n}x{k}x{m}");
        // SAFETY: the shapes were checked: b holds batch·k·m, a batch·n·k, out batch·n·m elements.
        unsafe { self.gemm(&what, g, Some(strides), &b.buf, &a.buf, &mut out.buf)? };
        Ok(out)
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("add", a, b)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let dims = shapes::norm(
            "layer_norm",
            &x.shape,
            &[("gamma", &gamma.shape), ("beta", &beta.shape)],
        )?;
        self.norm_launch(x, (None, None), gamma, beta, eps, dims)
    }

    fn add_layer_norm(
        &self,
        x: &CudaTensor,
        residual: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let op = "add_layer_norm";
        shapes::same(op, &x.shape, &residual.shape)?;
        let dims = shapes::norm(op, &x.shape, &[("gamma", &gamma.shape), ("beta", &beta.shape)])?;
        self.norm_launch(x, (Some(residual), None), gamma, beta, eps, dims)
    }

    fn linear_add_layer_norm(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        residual: &CudaTensor,
        (gamma, beta): (&CudaTensor, &CudaTensor),
        eps: f32,
    ) -> Result<CudaTensor> {
        let op = "linear_add_layer_norm";
        shapes::linear(&x.shape, &weight.shape, bias.map(|b| b.shape.as_slice()))?;
        // The product without its bias; the bias is added by the norm, which reads the row
        // anyway, so it costs no pass of its own.
        let product = self.fused_linear(x, weight, None, Activation::Identity, None)?;
        shapes::same(op, &product.shape, &residual.shape)?;
        let dims = shapes::norm(
            op,
            &product.shape,
            &[("gamma", &gamma.shape), ("beta", &beta.shape)],
        )?;
        self.norm_launch(&product, (Some(residual), bias), gamma, beta, eps, dims)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let op = "rms_norm";
        let (rows, d) = shapes::norm(op, &x.shape, &[("weight", &weight.shape)])?;
        let mut out = self.alloc(x.shape.clone())?;
        if rows == 0 {
            return Ok(out);
        }
        int(op, x.numel())?;
        let (ri, di) = (int(op, rows)?, int(op, d)?);
        launch!(
            self,
            "rms_norm",
            rows_cfg(rows, BLOCK),
            &mut out.buf,
            &x.buf,
            &weight.buf,
            &ri,
            &di,
            &eps
        )?;
        Ok(out)
    }

    fn gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary("gelu", x)
    }

    fn gelu_tanh(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary("gelu_tanh", x)
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        self.binary("silu_mul", gate, up)
    }

    fn softmax_rows(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let op = "softmax_rows";
        let (rows, d) = shapes::rows(op, &x.shape)?;
        let mut out = self.alloc(x.shape.clone())?;
        if rows == 0 {
            return Ok(out);
        }
        int(op, x.numel())?;
        let (ri, di) = (int(op, rows)?, int(op, d)?);
        launch!(
            self,
            "softmax_rows",
            rows_cfg(rows, BLOCK),
            &mut out.buf,
            &x.buf,
            &ri,
            &di
        )?;
        Ok(out)
    }

    fn pool_to_host(
        &self,
        hidden: &CudaTensor,
        valid: &[bool],
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Vec<f32>> {
        let op = "pool";
        let (batch, seq, h) = crate::backend::pooling::dims(&hidden.shape, valid.len())?;
        if h > POOL_MAX_HIDDEN {
            // Wider than the kernel's shared memory (no encoder is): pooled on the host, as
            // exactly, after a copy of every state.
            let states = self.to_host(hidden)?;
            return Ok(crate::backend::pooling::pool_host(
                &states,
                valid,
                (batch, seq, h),
                pooling,
                normalize,
            ));
        }
        if batch * h == 0 || seq == 0 {
            // Nothing to pool, or no tokens at all (CLS has no first position either): zeros.
            return Ok(vec![0.0; batch * h]);
        }
        int(op, hidden.numel())?;
        let (seq_i, h_i) = (int(op, seq)?, int(op, h)?);
        // The attention of the same batch uploaded these flags already (its padding mask);
        // then they do not cross the bus again.
        let valid_dev = self
            .upload_key_valid(&AttentionMask::padding(valid))?
            .ok_or_else(|| shapes::err(op, "no validity flags".into()))?;
        let mut out = self.alloc_array::<f32>("pooled rows", batch * h)?;
        let (mode, normalize) = (pooling_code(pooling), i32::from(normalize));
        let cfg = LaunchConfig {
            shared_mem_bytes: (h * size_of::<f32>()) as u32,
            ..rows_cfg(batch, BLOCK)
        };
        launch!(
            self,
            "pool_rows",
            cfg,
            &mut out,
            &hidden.buf,
            valid_dev.bytes(),
            &seq_i,
            &h_i,
            &mode,
            &normalize
        )?;
        self.download_array("pooled rows", &out)
    }

    fn embedding(&self, ids: &[u32], table: &CudaTensor) -> Result<CudaTensor> {
        self.gather_rows("embedding", ids, table, |ids| self.staged_ids(ids))
    }

    fn position_embedding(&self, positions: &[u32], table: &CudaTensor) -> Result<CudaTensor> {
        self.gather_rows("position_embedding", positions, table, |positions| {
            self.staged_positions(positions)
        })
    }

    fn rope(&self, x: &CudaTensor, positions: &[usize], theta: f32) -> Result<CudaTensor> {
        let op = "rope";
        let (tokens, heads, d) = shapes::rope(&x.shape, positions)?;
        let mut out = self.alloc(x.shape.clone())?;
        if x.numel() == 0 {
            return Ok(out);
        }
        int(op, x.numel())?;
        let pos_dev = self.positions_on_device(op, positions)?;
        let (ti, hi, di) = (int(op, tokens)?, int(op, heads)?, int(op, d)?);
        launch!(
            self,
            "rope",
            rows_cfg(tokens, 128),
            &mut out.buf,
            &x.buf,
            &*pos_dev,
            &ti,
            &hi,
            &di,
            &theta
        )?;
        Ok(out)
    }

    fn split_qkv_rope(
        &self,
        qkv: &CudaTensor,
        (heads, kv_heads): (usize, usize),
        positions: &[usize],
        theta: f32,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let op = "split_qkv_rope";
        let (tokens, d) = shapes::qkv_rope(op, &qkv.shape, (heads, kv_heads), positions.len())?;
        let mut q = self.alloc(vec![tokens, heads, d])?;
        let mut k = self.alloc(vec![tokens, kv_heads, d])?;
        let mut v = self.alloc(vec![tokens, kv_heads, d])?;
        if tokens == 0 || d == 0 {
            return Ok((q, k, v));
        }
        int(op, qkv.numel())?;
        let pos_dev = self.positions_on_device(op, positions)?;
        let (ti, hi, kvi, di) = (int(op, tokens)?, int(op, heads)?, int(op, kv_heads)?, int(op, d)?);
        launch!(
            self,
            "qkv_rope",
            rows_cfg(tokens, 128),
            &mut q.buf,
            &mut k.buf,
            &mut v.buf,
            &qkv.buf,
            &*pos_dev,
            &ti,
            &hi,
            &kvi,
            &di,
            &theta
        )?;
        Ok((q, k, v))
    }

    fn split_qkv_rope_paged(
        &self,
        qkv: &CudaTensor,
        heads: (usize, usize),
        positions: &[usize],
        theta: f32,
        keys: &mut CudaTensor,
        values: &mut CudaTensor,
        paged: &CudaPaged,
    ) -> Result<CudaTensor> {
        self.qkv_rope_paged(qkv, heads, positions, theta, keys, values, paged)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: &AttentionMask<'_>,
    ) -> Result<CudaTensor> {
        // One query row per sequence (a decode step) leaves 15 of flash's 16 rows per block idle;
        // the decode kernel spreads that row's keys over 8 warps instead. Prompts go through
        // cuBLAS (tensor cores in half precision), in pieces when their scores are large;
        // a flash kernel only with the unfused path turned off, or past its limit for one
        // query.
        let dims = shapes::attention(&q.shape, &k.shape, &v.shape, mask)?;
        if dims.s_q == 1 {
            return self.attention_with(q, k, v, mask, AttentionKernel::Decode);
        }
        if self.unfused_fits(&dims) {
            return self.attention_unfused_dense(q, k, v, mask);
        }
        self.attention_with(q, k, v, mask, self.flash_kernel(dims.head_dim, &[q, k, v]))
    }

    fn attention_qkv(
        &self,
        qkv: &CudaTensor,
        (batch, heads): (usize, usize),
        mask: &AttentionMask<'_>,
    ) -> Result<CudaTensor> {
        let (tokens, width) = shapes::rows("attention_qkv", &qkv.shape)?;
        let (seq, d) = shapes::fused_qkv(tokens, width, batch, heads)?;
        let dims = shapes::attention(
            &[batch, seq, heads, d],
            &[batch, seq, heads, d],
            &[batch, seq, heads, d],
            mask,
        )?;
        if seq > 1 && self.unfused_fits(&dims) {
            let views = [0, 1, 2].map(|part| HeadRows::fused_qkv(part, seq, heads, d));
            let out = self.attention_unfused((qkv, qkv, qkv), views, dims, mask)?;
            return self.reshape(out, &[tokens, heads * d]);
        }
        crate::backend::split_attention_qkv(self, qkv, (batch, heads), mask)
    }

    fn prepare_paged(&self, plan: &PagedPlan) -> Result<CudaPaged> {
        self.prepare_paged_plan(plan)
    }

    fn write_paged(&self, pool: &mut CudaTensor, new: &CudaTensor, paged: &CudaPaged) -> Result<()> {
        self.write_paged_rows(pool, new, paged)
    }

    fn paged_attention(
        &self,
        q: &CudaTensor,
        keys: &CudaTensor,
        values: &CudaTensor,
        paged: &CudaPaged,
    ) -> Result<CudaTensor> {
        let kernel = self.paged_kernel(paged, q, keys, values);
        // Steps with a long enough prompt (prefill, or a prompt joining running decodes) take
        // cuBLAS for their prompts, unless one query's scores over its keys would pass the
        // unfused limit (millions of keys); decode steps and short prompts the kernels.
        let seqs = &paged.plan().seqs;
        let longest = seqs.iter().map(|s| s.q_len).max().unwrap_or(0);
        let most_keys = seqs.iter().map(|s| s.k_len).max().unwrap_or(0);
        let heads = q.shape.get(1).copied().unwrap_or(0);
        if matches!(kernel, AttentionKernel::Flash | AttentionKernel::TensorCoreFlash)
            && longest >= UNFUSED_MIN_PROMPT
            && one_query_fits(heads, most_keys)
        {
            return self.paged_prompts_unfused(q, keys, values, paged);
        }
        self.paged_attention_with(q, keys, values, paged, kernel)
    }

    fn argmax_rows(&self, logits: &CudaTensor) -> Result<Vec<u32>> {
        let op = "argmax_rows";
        let (rows, vocab) = shapes::rows(op, &logits.shape)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let (ri, vi) = (int(op, rows)?, int(op, vocab)?);
        int(op, rows * vocab)?;
        let mut ids = self.alloc_ids(rows)?;
        launch!(
            self,
            "argmax_rows",
            rows_cfg(rows, BLOCK),
            &mut ids,
            &logits.buf,
            &ri,
            &vi
        )?;
        self.download_ids(&ids)
    }

    fn sample_rows(&self, logits: &CudaTensor, draws: &[TokenDraw]) -> Result<Vec<u32>> {
        let (rows, _) = shapes::rows("sample_rows", &logits.shape)?;
        if draws.len() != rows {
            return Err(shapes::err(
                "sample_rows",
                format!("{} draws for {rows} rows", draws.len()),
            ));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let draws_dev = self.upload("token draws", &draw_words(draws))?;
        let mut ids = self.alloc_ids(rows)?;
        self.sample_rows_into(logits, &draws_dev, &mut ids)?;
        self.download_ids(&ids)
    }

    fn forward_and_sample(
        &self,
        decode: Option<DecodeStep<'_>>,
        draws: &[TokenDraw],
        forward: &mut dyn FnMut() -> crate::Result<CudaTensor>,
    ) -> crate::Result<Vec<u32>> {
        if let Some(decode) = decode
            && let Some(tokens) = self.graph_step(decode, draws, forward)?
        {
            return Ok(tokens);
        }
        let logits = forward()?;
        Ok(self.sample_rows(&logits, draws)?)
    }
}

/// The draws as `sample_rows` reads them: four doubles a row, (temperature, top-k, top-p,
/// uniform). Each field converts to a double exactly, so one upload carries them all.
pub(crate) fn draw_words(draws: &[TokenDraw]) -> Vec<f64> {
    draws
        .iter()
        .flat_map(|d| {
            [
                f64::from(d.temperature),
                f64::from(d.top_k),
                f64::from(d.top_p),
                d.uniform,
            ]
        })
        .collect()
}
