//! Projections of a few rows (decode steps) through our matrix-vector kernel (`gemv.cu`)
//! instead of cuBLAS, with the neighbouring ops folded in: the RMS norm before the product,
//! the bias, an activation (GELU, SiLU) or SwiGLU over a fused gate/up projection, and the
//! residual add after it. At one to
//! four rows a projection is a pass over its weight at memory bandwidth, and folding saves the
//! launches of the separate norm, activation and add kernels, which at batch 1 cost about as
//! much as the smaller products.
//!
//! [`CudaBackend::gemv_fits`] decides which products qualify (rows, alignment, the switch that
//! benchmarks and tests flip with [`CudaBackend::set_gemv`]); the callers in `ops.rs` compose
//! cuBLAS and the separate kernels for everything else.

use std::sync::atomic::Ordering;

use cudarc::driver::LaunchConfig;

use super::context::CudaBackend;
use super::launch::{int, launch};
use super::ops::act_code;
use super::tensor::CudaTensor;
use crate::backend::{Activation, Result, shapes};

/// The most rows the kernel takes (`GEMV_MAX_ROWS` in `gemv.cu`); more go to cuBLAS, whose
/// tensor cores win once each weight element serves several rows.
pub const GEMV_MAX_ROWS: usize = 4;

/// Weight rows per block (`GEMV_COLS`): four outputs, or two SwiGLU outputs (gate and up rows).
const GEMV_COLS: usize = 4;

/// Elements per vector load (`GEMV_CHUNK`): `k` must be a multiple.
const GEMV_CHUNK: usize = 8;

/// What a projection folds around its product (see `gemv.cu` for the math).
#[derive(Clone, Copy, Default)]
pub(super) struct Folded<'a> {
    /// RMS norm of each row of `x` first: its weight `[k]` and epsilon.
    pub norm: Option<(&'a CudaTensor, f32)>,
    /// `[weight rows]`.
    pub bias: Option<&'a CudaTensor>,
    /// The weight is `[2n, k]` (gate rows, then up rows) and the output `silu(gate) · up`.
    pub swiglu: bool,
    /// Applied to each output after its bias (the identity with SwiGLU or a residual).
    pub act: Activation,
}

/// The kernel's launch shape for `outputs` outputs per row.
pub(crate) fn gemv_cfg(outputs: usize, swiglu: bool) -> LaunchConfig {
    let per_block = if swiglu { GEMV_COLS / 2 } else { GEMV_COLS };
    LaunchConfig {
        grid_dim: (outputs.div_ceil(per_block).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Turns the matrix-vector kernel on or off (on by default); off, every product goes to
    /// cuBLAS and every folded op runs as its own kernel. Benchmarks time both; tests compare
    /// them. Recorded decode graphs are dropped on a change, since they launch the kernels of
    /// the setting they were recorded under.
    pub fn set_gemv(&self, enabled: bool) {
        if self.gemv_enabled.swap(enabled, Ordering::Relaxed) != enabled {
            self.forget_decode_graphs();
        }
    }

    /// Whether `x [rows, k]` times a weight goes to the kernel: at most [`GEMV_MAX_ROWS`] rows,
    /// `k` a whole number of vector loads and every buffer 16-byte aligned (allocations are;
    /// the check keeps the kernel's vector loads safe whatever a tensor's origin).
    pub(super) fn gemv_fits(&self, rows: usize, k: usize, tensors: &[&CudaTensor]) -> bool {
        self.gemv_enabled.load(Ordering::Relaxed)
            && (1..=GEMV_MAX_ROWS).contains(&rows)
            && k > 0
            && k.is_multiple_of(GEMV_CHUNK)
            && self.aligned_16(tensors)
    }

    /// `x [.., k]` through `weight [m, k]` with `folded` around the product, onto `residual`
    /// when given (in place; not with SwiGLU or an activation). The caller has checked the shapes of `x`,
    /// `weight` and the bias and that [`CudaBackend::gemv_fits`] holds; this checks the rest.
    pub(super) fn gemv(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        folded: Folded<'_>,
        residual: Option<CudaTensor>,
    ) -> Result<CudaTensor> {
        let op = "gemv";
        let (rows, k, m) = shapes::linear(&x.shape, &weight.shape, folded.bias.map(|b| b.shape.as_slice()))?;
        let n = if folded.swiglu { m / 2 } else { m };
        let activated = folded.act != Activation::Identity;
        if (folded.swiglu && (m % 2 != 0 || residual.is_some() || activated))
            || (activated && residual.is_some())
            || rows > GEMV_MAX_ROWS
        {
            return Err(shapes::err(
                op,
                format!(
                    "{rows} rows of {:?} through {:?} (swiglu: {}, activation: {:?}, residual: {})",
                    x.shape,
                    weight.shape,
                    folded.swiglu,
                    folded.act,
                    residual.is_some()
                ),
            ));
        }
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        if let Some((norm, _)) = folded.norm {
            shapes::vector(op, "norm weight", &norm.shape, k)?;
        }
        let accumulating = residual.is_some();
        let mut out = match residual {
            Some(r) => {
                shapes::same(op, &r.shape, &shape)?;
                r
            }
            None => self.alloc(shape)?,
        };
        int(op, x.numel())?;
        int(op, weight.numel())?;
        let accumulate = i32::from(accumulating);
        let (norm_buf, has_norm, eps) = match folded.norm {
            Some((w, eps)) => (&*w.buf, 1, eps),
            None => (&self.placeholder_elem, 0, 0.0),
        };
        let (bias_buf, has_bias) = folded.bias.map_or((&self.placeholder_elem, 0), |b| (&b.buf, 1));
        let (swiglu, act) = (i32::from(folded.swiglu), act_code(folded.act));
        let (ri, ni, ki) = (int(op, rows)?, int(op, n)?, int(op, k)?);
        launch!(
            self,
            "gemv",
            gemv_cfg(n, folded.swiglu),
            &mut out.buf,
            &x.buf,
            &weight.buf,
            norm_buf,
            &has_norm,
            &eps,
            bias_buf,
            &has_bias,
            &accumulate,
            &swiglu,
            &act,
            &ri,
            &ni,
            &ki
        )?;
        Ok(out)
    }
}
