//! The compute backend: a small set of tensor operations that the transformer models (BERT encoders,
//! GPT-2, Llama/Qwen2 decoders) are written against once.
//!
//! A backend owns its tensors (`Backend::Tensor`: host memory for the CPU backend, device buffers
//! for a GPU backend). Tensors are dense and row-major, `f32` at the host boundary (a GPU backend
//! may store them in fp16 or bf16, see [`Precision`]). Every operation but the key/value pool
//! write allocates its output, and every one checks its shapes first, so a mismatch is an `Err`,
//! never a panic or an out-of-bounds read. Host data crosses the boundary only through
//! `from_host`/`to_host` and the small host-side arguments (token ids, positions, attention
//! masks), which a device backend uploads per call.
//!
//! - [`cpu::CpuBackend`]: the fast CPU implementation (gemm for matrix products, rayon for rows).
//! - [`reference::ReferenceBackend`]: naive loops in `f64`, the ground truth for tests of every
//!   other backend.
//! - `cuda::CudaBackend` (cargo feature `cuda`): NVIDIA GPUs, our kernels compiled by NVRTC and
//!   cuBLAS for matrix products.
//! - [`device::DeviceSpec`]: the `--device auto|cpu|cuda:N` choice and its fallback rules.
//! - [`pooling`]: sentence pooling on the host (the CPU and reference backends'
//!   [`Backend::pool_to_host`]).
//! - [`selftest::check`]: every op against the reference on small inputs, run when a backend
//!   starts serving.
//!
//! Layout conventions (the Hugging Face / PyTorch ones, so checkpoints load without reshuffling):
//! - `linear` weights are `[out, in]` (`nn.Linear`); GPT-2's `Conv1D` weights are transposed at load.
//! - attention tensors are `[batch, seq, heads, head_dim]`, which is what a linear projection of
//!   `[batch * seq, hidden]` already is; no transposes are needed between projection and attention.
//! - rotary embeddings use the "rotate_half" pairing: element `i` rotates with `i + head_dim / 2`.
//!
//! Decoders keep their keys and values in backend-owned pools that are written in place
//! ([`Backend::write_paged`]) and read in place ([`Backend::paged_attention`]); see [`paged`].

pub mod buffer_cache;
pub mod cpu;
pub mod cpu_kernels;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod graph_book;
pub mod paged;
pub mod pooling;
pub mod reference;
pub mod selftest;
mod shapes;

#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

pub use cpu::{CpuBackend, CpuTensor};
#[cfg(feature = "cuda")]
pub use cuda::{CudaBackend, CudaTensor};
pub use device::{DeviceSpec, Precision, Selected};
pub use paged::{PagedPlan, PagedSeq};

/// A device backend's counts since it opened (see [`Backend::device_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// The buffer cache's counts (its misses include the upload caches' own buffers).
    pub buffers: buffer_cache::BufferStats,
    /// Decode steps replayed from a CUDA graph, and those recorded into one.
    pub graph_replays: u64,
    pub graph_recordings: u64,
}
pub use reference::ReferenceBackend;

/// Errors from backend operations.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The operands' shapes do not fit the operation.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// An index (a token id) is outside the table it selects from.
    #[error("{op}: index {index} is out of range for {len} rows")]
    OutOfRange {
        op: &'static str,
        index: usize,
        len: usize,
    },
    /// The device failed (launch, copy, a lost context): it may be unusable from now on.
    #[error("device error: {0}")]
    Device(String),
    /// An allocation did not fit in the device's memory: this pass failed, smaller ones may
    /// still run, and the device is fine.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// An activation applied in a linear layer's epilogue ([`Backend::linear_act`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    #[default]
    Identity,
    /// GELU, exact erf form.
    Gelu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// SiLU: `x · sigmoid(x)`.
    Silu,
}

/// How [`Backend::pool_to_host`] reduces a sequence's token states to one embedding
/// (sentence-transformers' pooling modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The first position's state, whatever the mask.
    Cls,
    /// The mean over the valid tokens.
    Mean,
    /// The elementwise maximum over the valid tokens.
    Max,
    /// The sum over the valid tokens divided by the square root of their count.
    MeanSqrtLen,
    /// The last valid token's state.
    LastToken,
}

impl Pooling {
    /// Every mode, for the checks that run them all.
    pub const ALL: [Pooling; 5] = [
        Pooling::Cls,
        Pooling::Mean,
        Pooling::Max,
        Pooling::MeanSqrtLen,
        Pooling::LastToken,
    ];
}

/// Masking for [`Backend::attention`]. The default attends every query to every key.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionMask<'a> {
    /// `[batch * s_k]`, row-major: `true` where a key position holds a real token (padding mask).
    pub key_valid: Option<&'a [bool]>,
    /// Causal masking with an offset: query `i` attends keys `0..=offset + i`. The offset is the
    /// number of cached positions before this call's queries (0 for a prompt, the cache length
    /// when decoding), so `offset + s_q <= s_k`.
    pub causal_offset: Option<usize>,
}

impl<'a> AttentionMask<'a> {
    /// Every query attends every key (a bidirectional encoder without padding).
    pub fn none() -> Self {
        Self::default()
    }

    /// Bidirectional attention over the keys marked valid (an encoder batch with padding).
    pub fn padding(key_valid: &'a [bool]) -> Self {
        Self {
            key_valid: Some(key_valid),
            causal_offset: None,
        }
    }

    /// Causal attention for queries that follow `offset` cached positions.
    pub fn causal(offset: usize) -> Self {
        Self {
            key_valid: None,
            causal_offset: Some(offset),
        }
    }

    /// Adds a padding mask to this mask.
    pub fn with_padding(self, key_valid: &'a [bool]) -> Self {
        Self {
            key_valid: Some(key_valid),
            ..self
        }
    }
}

/// A step in which every sequence has one new token, as [`Backend::forward_and_sample`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct DecodeStep<'a> {
    /// What the forward pass reads besides the step's inputs (its key/value pool, and so its
    /// model): steps with the same key and batch size launch the same work on new inputs.
    pub key: u64,
    /// The new token of each sequence.
    pub ids: &'a [u32],
}

/// The tensor operations the models need. All tensors are dense and row-major; host data is `f32`.
///
/// "Rows" below means all leading dimensions flattened: an op over rows of `x` with shape
/// `[.., d]` treats it as `[x.len() / d, d]` and returns the same shape as `x`.
pub trait Backend: Send + Sync {
    /// A tensor owned by this backend (host vector, device buffer) together with its shape.
    type Tensor: Send + Sync;

    /// A checked [`PagedPlan`] in the form this backend's paged ops read (for a GPU, its
    /// indices in device memory): prepared once per forward step, used by every layer.
    type Paged: Send + Sync;

    /// A short name for logs ("cpu", "cuda:0").
    fn name(&self) -> &str;

    /// Bytes one tensor element takes in this backend's memory: 4 (fp32) unless it stores a
    /// narrower precision (the CUDA backend in fp16/bf16: 2). What memory budgets divide by.
    fn element_bytes(&self) -> usize {
        4
    }

    /// What a GPU's memory reuse and decode graphs have done so far, for the worker's metrics;
    /// `None` for backends that keep no such counts (the CPU).
    fn device_stats(&self) -> Option<DeviceStats> {
        None
    }

    /// Copies host data into a new tensor; `data.len()` must equal the product of `shape`.
    #[allow(
        clippy::wrong_self_convention,
        reason = "the backend builds the tensor; the name says where the data comes from"
    )]
    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;

    /// Copies a tensor back to host memory (row-major).
    fn to_host(&self, t: &Self::Tensor) -> Result<Vec<f32>>;

    /// A tensor of zeros (key/value pools are made with it).
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;

    /// The tensor's shape.
    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize];

    /// The same data under a new shape with the same number of elements (no copy).
    fn reshape(&self, t: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    /// Splits `x [.., d]` along its last dimension into pieces of the given widths (which must sum
    /// to `d`), e.g. GPT-2's fused `c_attn` output into q, k, v.
    fn split_last(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>>;

    /// `x [.., k] · weightᵀ + bias`, with `weight [m, k]` (PyTorch `nn.Linear`) and `bias [m]`;
    /// the result is `[.., m]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// `act(x · weightᵀ + bias)`: [`Backend::linear`] with its activation, which a backend can
    /// fuse into the product's epilogue (one pass over the output instead of two). The default
    /// composes the separate ops.
    fn linear_act(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        let y = self.linear(x, weight, bias)?;
        match act {
            Activation::Identity => Ok(y),
            Activation::Gelu => self.gelu(&y),
            Activation::GeluTanh => self.gelu_tanh(&y),
            Activation::Silu => {
                let ones = self.from_host(&vec![1.0; shapes::numel(self.shape(&y))], self.shape(&y))?;
                self.silu_mul(&y, &ones)
            }
        }
    }

    /// SwiGLU on a fused gate/up projection: `x [.., 2n]` gives `silu(x[.., :n]) · x[.., n:]`,
    /// `[.., n]` (Llama's MLP). The default splits and multiplies; backends read `x` once.
    fn swiglu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let (_, two_n) = shapes::rows("swiglu", self.shape(x))?;
        if two_n % 2 != 0 {
            return Err(shapes::err(
                "swiglu",
                format!("the last dimension of {:?} is not even", self.shape(x)),
            ));
        }
        let mut halves = self.split_last(x, &[two_n / 2, two_n / 2])?.into_iter();
        let (Some(gate), Some(up)) = (halves.next(), halves.next()) else {
            return Err(shapes::err("swiglu", "split gave fewer than two halves".into()));
        };
        self.silu_mul(&gate, &up)
    }

    /// `linear(rms_norm(x, norm, eps), weight, bias)`: a pre-norm block's projection (Llama's
    /// q/k/v, its output head). A backend can fold the norm into the product (a few rows read
    /// the weight once either way) instead of storing the normalised rows. The default composes.
    fn rms_norm_linear(
        &self,
        x: &Self::Tensor,
        norm: &Self::Tensor,
        eps: f32,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let normed = self.rms_norm(x, norm, eps)?;
        self.linear(&normed, weight, bias)
    }

    /// `swiglu(linear(rms_norm(x, norm, eps), gate_up))` with `gate_up [2n, k]` the fused gate
    /// and up projections: Llama's MLP up to its down projection, `[.., n]`. The default composes.
    fn rms_norm_swiglu(
        &self,
        x: &Self::Tensor,
        norm: &Self::Tensor,
        eps: f32,
        gate_up: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let normed = self.rms_norm(x, norm, eps)?;
        self.swiglu(&self.linear(&normed, gate_up, None)?)
    }

    /// `residual + linear(x, weight, bias)`: a block's output projection added to the residual
    /// stream, which is taken by value so that a backend can accumulate into it in place. The
    /// default composes.
    fn linear_add(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        residual: Self::Tensor,
    ) -> Result<Self::Tensor> {
        let y = self.linear(x, weight, bias)?;
        self.add(&residual, &y)
    }

    /// Batched matrix product: `a [b, n, k] · b [b, k, m] -> [b, n, m]` (rank 2 operands are a
    /// batch of one and give a rank 2 result).
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// Elementwise `a + b`; the shapes must be equal.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// Layer normalisation over the last dimension `d`: `(x - mean) / sqrt(var + eps) * gamma + beta`
    /// with the biased variance (as PyTorch); `gamma`, `beta` are `[d]`.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// `layer_norm(x + residual)` in one pass (BERT's post-norm residual blocks).
    fn add_layer_norm(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// `layer_norm(linear(x, weight, bias) + residual)`: BERT's post-norm residual blocks
    /// after their output projections. The GPU adds the bias inside the norm's pass instead of
    /// a pass of its own; the default composes the two ops.
    fn linear_add_layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        residual: &Self::Tensor,
        (gamma, beta): (&Self::Tensor, &Self::Tensor),
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.add_layer_norm(&self.linear(x, weight, bias)?, residual, gamma, beta, eps)
    }

    /// RMS normalisation over the last dimension: `x / sqrt(mean(x²) + eps) * weight` (Llama).
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;

    /// GELU, exact erf form: `x/2 · (1 + erf(x/√2))` (BERT, PyTorch's default).
    fn gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// GELU, tanh approximation (GPT-2's "gelu_new").
    fn gelu_tanh(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// SwiGLU: `silu(gate) * up` elementwise; the shapes must be equal.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;

    /// Softmax over the last dimension, numerically stable. `-inf` entries are masked out; a row
    /// that is entirely `-inf` gives zeros.
    fn softmax_rows(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// The index of the largest value of each row of `x [.., d]` (the first on ties; NaN never
    /// wins), as the greedy sampler picks it. The default reads the rows back to the host; a GPU
    /// backend reduces on the device so that only the ids cross the bus.
    fn argmax_rows(&self, x: &Self::Tensor) -> Result<Vec<u32>> {
        let (_, d) = shapes::rows("argmax_rows", self.shape(x))?;
        Ok(self.to_host(x)?.chunks(d).map(crate::sampling::argmax).collect())
    }

    /// Runs a step's forward pass (`forward`, which returns its logits `[rows, vocab]`) and
    /// picks each row's token as [`Backend::sample_rows`] does. `decode` is given when every
    /// sequence has exactly one new token. A backend may record such a step's work once per key
    /// and batch size and replay it for later steps without calling `forward` (CUDA graphs), or
    /// call `forward` more than once; the default calls it once.
    fn forward_and_sample(
        &self,
        decode: Option<DecodeStep<'_>>,
        draws: &[crate::sampling::TokenDraw],
        forward: &mut dyn FnMut() -> crate::Result<Self::Tensor>,
    ) -> crate::Result<Vec<u32>> {
        let _ = decode;
        let logits = forward()?;
        Ok(self.sample_rows(&logits, draws)?)
    }

    /// One token per row of logits `x [rows, vocab]`: row `r` gets
    /// [`crate::sampling::choose`] with `draws[r]` (argmax, a draw from the tempered softmax, or
    /// one cut by top-k and top-p). The default reads the rows back; a GPU backend draws on the
    /// device so that only the ids cross the bus (its sums run in another order, so a uniform or
    /// a top-p within rounding of a boundary between two tokens may pick the neighbour).
    fn sample_rows(&self, x: &Self::Tensor, draws: &[crate::sampling::TokenDraw]) -> Result<Vec<u32>> {
        let (rows, d) = shapes::rows("sample_rows", self.shape(x))?;
        if draws.len() != rows {
            return Err(shapes::err(
                "sample_rows",
                format!("{} draws for {rows} rows", draws.len()),
            ));
        }
        let host = self.to_host(x)?;
        Ok(host
            .chunks(d)
            .zip(draws)
            .map(|(row, draw)| crate::sampling::choose(row, draw))
            .collect())
    }

    /// Rows of `table [v, d]` selected by `ids`: `[ids.len(), d]`. An id `>= v` is an error.
    fn embedding(&self, ids: &[u32], table: &Self::Tensor) -> Result<Self::Tensor>;

    /// [`Backend::embedding`] of token positions (learned position embeddings): the same
    /// gather. Said apart from ids because a backend that stages a decode step's ids and
    /// positions in fixed buffers (CUDA graphs) must read the positions' buffer even when the
    /// two hold the same numbers.
    fn position_embedding(&self, positions: &[u32], table: &Self::Tensor) -> Result<Self::Tensor> {
        self.embedding(positions, table)
    }

    /// Rotary position embedding of `x [tokens, heads, head_dim]` at `positions` (one per token),
    /// in the Hugging Face "rotate_half" convention: with `h = head_dim / 2` and
    /// `freq_i = theta^(-2i / head_dim)`, the pair `(x_i, x_{i+h})` is rotated by `pos · freq_i`.
    fn rope(&self, x: &Self::Tensor, positions: &[usize], theta: f32) -> Result<Self::Tensor>;

    /// Splits a fused projection `qkv [tokens, (heads + 2 kv_heads) · head_dim]` (q heads, then
    /// k heads, then v heads) into `q [tokens, heads, head_dim]`, `k` and `v [tokens, kv_heads,
    /// head_dim]`, with [`Backend::rope`] applied to `q` and `k` (Llama's attention input). The
    /// default splits, reshapes and rotates; a backend can do it in one pass.
    fn split_qkv_rope(
        &self,
        qkv: &Self::Tensor,
        (heads, kv_heads): (usize, usize),
        positions: &[usize],
        theta: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let (tokens, d) = shapes::qkv_rope(
            "split_qkv_rope",
            self.shape(qkv),
            (heads, kv_heads),
            positions.len(),
        )?;
        let mut parts = self
            .split_last(qkv, &[heads * d, kv_heads * d, kv_heads * d])?
            .into_iter();
        let (Some(q), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(shapes::err(
                "split_qkv_rope",
                "split gave fewer than three parts".into(),
            ));
        };
        let q = self.rope(&self.reshape(q, &[tokens, heads, d])?, positions, theta)?;
        let k = self.rope(&self.reshape(k, &[tokens, kv_heads, d])?, positions, theta)?;
        Ok((q, k, self.reshape(v, &[tokens, kv_heads, d])?))
    }

    /// [`Backend::split_qkv_rope`] with the rotated keys and the values written into their
    /// pool rows ([`Backend::write_paged`]) instead of returned: only `q [tokens, heads,
    /// head_dim]` comes back. The default splits, then writes; a backend can write the pools
    /// from the same pass.
    #[allow(
        clippy::too_many_arguments,
        reason = "the split's arguments and the write's, which it fuses"
    )]
    fn split_qkv_rope_paged(
        &self,
        qkv: &Self::Tensor,
        heads: (usize, usize),
        positions: &[usize],
        theta: f32,
        keys: &mut Self::Tensor,
        values: &mut Self::Tensor,
        paged: &Self::Paged,
    ) -> Result<Self::Tensor> {
        let (q, k, v) = self.split_qkv_rope(qkv, heads, positions, theta)?;
        self.write_paged(keys, &k, paged)?;
        self.write_paged(values, &v, paged)?;
        Ok(q)
    }

    /// Scaled dot-product attention with grouped-query heads.
    ///
    /// `q [b, s_q, h, d]`, `k` and `v [b, s_k, h_kv, d]` with `h` a multiple of `h_kv` (query head
    /// `j` reads key/value head `j / (h / h_kv)`); scores are scaled by `1/sqrt(d)`. The result is
    /// `[b, s_q, h, d]`. A query row whose keys are all masked gives zeros.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: &AttentionMask<'_>,
    ) -> Result<Self::Tensor>;

    /// Attention straight from a fused projection `qkv [batch · seq, 3 · heads · head_dim]`
    /// (per token: the q heads, then the k heads, then the v heads, as many of each; BERT's
    /// layout), masked as in [`Backend::attention`]; returns `[batch · seq, heads · head_dim]`.
    /// The default splits and reshapes first; a backend can read q, k and v where they are.
    fn attention_qkv(
        &self,
        qkv: &Self::Tensor,
        heads: (usize, usize),
        mask: &AttentionMask<'_>,
    ) -> Result<Self::Tensor> {
        split_attention_qkv(self, qkv, heads, mask)
    }

    /// Pools `hidden [batch, seq, h]` over each sequence's valid tokens (`valid`: `batch · seq`
    /// flags, true for real tokens) as `pooling` says, then scales each row to unit length when
    /// `normalize` (dividing by its norm or [`pooling::NORM_EPS`], whichever is larger), and
    /// returns the `[batch, h]` rows on the host. Pooled in fp32 at least and never rounded to
    /// the storage precision, so half-precision hidden states give embeddings as exact as
    /// pooling them on the host would. A sequence without valid tokens pools to zeros (except
    /// [`Pooling::Cls`]).
    fn pool_to_host(
        &self,
        hidden: &Self::Tensor,
        valid: &[bool],
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Vec<f32>>;

    /// Checks a step's plan and prepares it for [`Backend::write_paged`] and
    /// [`Backend::paged_attention`].
    fn prepare_paged(&self, plan: &PagedPlan) -> Result<Self::Paged>;

    /// Writes the step's new keys (or values) `new [tokens, kv_heads, head_dim]` into their pool
    /// rows (see [`PagedPlan::new_slots`]); `pool` is `[slots, kv_heads, head_dim]`.
    fn write_paged(&self, pool: &mut Self::Tensor, new: &Self::Tensor, paged: &Self::Paged) -> Result<()>;

    /// Causal attention of the step's packed queries `q [tokens, heads, head_dim]` over each
    /// sequence's cached keys and values, read in place from the pools (grouped-query heads as
    /// in [`Backend::attention`], scale `1/sqrt(head_dim)`, the plan's sliding window). The
    /// result is `[tokens, heads, head_dim]`. The step's own keys must be written first.
    fn paged_attention(
        &self,
        q: &Self::Tensor,
        keys: &Self::Tensor,
        values: &Self::Tensor,
        paged: &Self::Paged,
    ) -> Result<Self::Tensor>;
}

/// [`Backend::attention_qkv`] by splitting the projection into q, k and v, reshaping them to
/// `[batch, seq, heads, head_dim]` and calling [`Backend::attention`].
pub(crate) fn split_attention_qkv<B: Backend + ?Sized>(
    backend: &B,
    qkv: &B::Tensor,
    (batch, heads): (usize, usize),
    mask: &AttentionMask<'_>,
) -> Result<B::Tensor> {
    let (tokens, width) = shapes::rows("attention_qkv", backend.shape(qkv))?;
    let (seq, d) = shapes::fused_qkv(tokens, width, batch, heads)?;
    let mut parts = backend.split_last(qkv, &[heads * d; 3])?.into_iter();
    let (Some(q), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(shapes::err(
            "attention_qkv",
            "split gave fewer than three parts".into(),
        ));
    };
    let shape = [batch, seq, heads, d];
    let (q, k, v) = (
        backend.reshape(q, &shape)?,
        backend.reshape(k, &shape)?,
        backend.reshape(v, &shape)?,
    );
    let out = backend.attention(&q, &k, &v, mask)?;
    backend.reshape(out, &[tokens, heads * d])
}
