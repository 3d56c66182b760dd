//! The CPU backend: `f32` row-major host tensors. Matrix products go through `gemm` (packed SIMD
//! kernels, multithreaded); the row-wise operations are single-pass loops over contiguous rows,
//! split across the backend's own rayon pool when a tensor is large enough to pay for it; the
//! loops themselves are in [`super::cpu_kernels`], compiled per SIMD level.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::cpu_kernels as kernels;
use super::paged::HostPaged;
use super::shapes::{self, AttnDims};
use super::{Activation, AttentionMask, Backend, BackendError, PagedPlan, Result};

/// A dense row-major `f32` tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    data: Vec<f32>,
    shape: Vec<usize>,
}

impl CpuTensor {
    pub(crate) fn new(data: Vec<f32>, shape: Vec<usize>) -> Self {
        debug_assert_eq!(data.len(), shapes::numel(&shape), "shape {shape:?}");
        Self { data, shape }
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The elements, for ops that write a tensor in place (key/value pools).
    pub(crate) fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

/// Below this many output elements an operation runs on the calling thread: splitting costs more
/// than it saves.
const PARALLEL_MIN: usize = 1 << 15;

/// Below this many multiply-adds a matrix product (or an attention call) runs on the calling
/// thread: handing work to the pool costs a thread wake-up and a context switch (microseconds),
/// more than splitting such a product saves. Decode steps of small models are made of them; with
/// every op handed over, a tiny model decoded at a tenth of the speed.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Elements per task for elementwise operations.
const ELEMENTWISE_CHUNK: usize = 1 << 13;

/// The CPU backend, with its own thread pool (shared by gemm and the row loops).
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads)
            .finish()
    }
}

impl CpuBackend {
    /// A backend running on `threads` threads; 0 means one per available core.
    pub fn new(threads: usize) -> Result<Self> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cpu-backend-{i}"))
            .build()
            .map_err(|e| BackendError::Device(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(Self { pool, threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(first_row, rows)` over groups of whole `row_len`-wide rows of `out` (elementwise
    /// operations pass [`ELEMENTWISE_CHUNK`] as the row length; the last row may then be shorter),
    /// in parallel when `out` is large.
    fn for_rows(&self, out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Send + Sync) {
        if row_len == 0 || out.is_empty() {
            return;
        }
        if self.threads == 1 || out.len() < PARALLEL_MIN {
            f(0, out);
            return;
        }
        // Several small rows per task, so that the per-task overhead stays small.
        let per_task = (ELEMENTWISE_CHUNK / row_len).max(1);
        self.pool.install(|| {
            out.par_chunks_mut(per_task * row_len)
                .enumerate()
                .for_each(|(t, group)| f(t * per_task, group))
        });
    }

    /// `out = kernel(x)` elementwise.
    fn unary(&self, x: &CpuTensor, kernel: fn(&mut [f32], &[f32])) -> CpuTensor {
        let mut out = vec![0.0; x.data.len()];
        self.for_rows(&mut out, ELEMENTWISE_CHUNK, |i, o| {
            kernel(o, &x.data[i * ELEMENTWISE_CHUNK..][..o.len()])
        });
        CpuTensor::new(out, x.shape.clone())
    }

    /// `out = kernel(a, b)` elementwise over equal shapes.
    fn binary(
        &self,
        op: &'static str,
        a: &CpuTensor,
        b: &CpuTensor,
        kernel: fn(&mut [f32], &[f32], &[f32]),
    ) -> Result<CpuTensor> {
        shapes::same(op, &a.shape, &b.shape)?;
        let mut out = vec![0.0; a.data.len()];
        self.for_rows(&mut out, ELEMENTWISE_CHUNK, |i, o| {
            let start = i * ELEMENTWISE_CHUNK;
            kernel(o, &a.data[start..][..o.len()], &b.data[start..][..o.len()])
        });
        Ok(CpuTensor::new(out, a.shape.clone()))
    }

    /// Runs `f` on the calling thread without splitting when the work (`macs` multiply-adds)
    /// is small or the backend has one thread, else in the pool with every thread.
    fn run_sized<R: Send>(&self, macs: usize, f: impl FnOnce(Parallelism) -> R + Send) -> R {
        if self.threads == 1 || macs < PARALLEL_MIN_MACS {
            f(Parallelism::None)
        } else {
            self.pool.install(|| f(Parallelism::Rayon(self.threads)))
        }
    }
}

/// `n` zeros, or an error when the memory cannot be had (instead of the abort a failed `vec!`
/// allocation is). The allocation is a zeroed one: the kernel hands out zero pages on first
/// touch, so a large key/value pool costs memory only as sequences fill it.
fn zeroed(n: usize) -> Result<Vec<f32>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let too_large = || BackendError::OutOfMemory(format!("allocating {n} values"));
    let layout = std::alloc::Layout::array::<f32>(n).map_err(|_| too_large())?;
    // SAFETY: the layout has a non-zero size. A non-null result is `n` zeroed f32 slots (all-zero
    // bits are 0.0) allocated with the global allocator and exactly the layout `Vec` uses for a
    // capacity of `n`, so the Vec may own and free it.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<f32>();
        if ptr.is_null() {
            return Err(too_large());
        }
        Ok(Vec::from_raw_parts(ptr, n, n))
    }
}

/// A matrix operand for [`sgemm`]: a pointer to element (0, 0) and its row and column strides.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// `dst[m×n] = (dst if accumulate) + scale · lhs[m×k] · rhs[k×n]`; `dst` has unit column stride.
///
/// # Safety
/// Every element addressed by the pointers and strides must be in bounds, and `dst` must not
/// overlap the operands or be written by another thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 || k == 0 {
        return; // nothing to add: the destination already holds its initial value
    }
    // gemm computes dst := alpha·dst + beta·lhs·rhs, reading dst only when asked to.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks holding a `SharedOut` write disjoint elements (see `attention`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay within the buffer the pointer came from.
        unsafe { self.0.add(offset) }
    }

    fn offset(self, offset: usize) -> Self {
        Self(self.at(offset))
    }
}

/// Which keys a query row of one attention head sees: key `j` of query `i` is visible when
/// `j <= causal_offset + i` (if causal), `j + window > causal_offset + i` (if windowed) and
/// `key_valid[j]` (if given).
#[derive(Clone, Copy, Debug, Default)]
struct HeadMask<'a> {
    causal_offset: Option<usize>,
    window: Option<usize>,
    key_valid: Option<&'a [bool]>,
}

/// One head of attention: `q [s_q × d]`, `k`, `v [s_k × d]` (rows at the given strides, elements
/// contiguous) into `out [s_q × d]` at row stride `out_rs`.
#[derive(Clone, Copy)]
struct HeadJob<'a> {
    q: *const f32,
    q_rs: usize,
    k: *const f32,
    v: *const f32,
    kv_rs: usize,
    out: SharedOut,
    out_rs: usize,
    s_q: usize,
    s_k: usize,
    d: usize,
    mask: HeadMask<'a>,
}

impl HeadJob<'_> {
    /// `softmax(q kᵀ · scale + mask) v`, written into `out`.
    ///
    /// # Safety
    /// Every row the job addresses must be in bounds, and `out`'s rows must be written by no
    /// other task.
    unsafe fn run(&self, scores: &mut Vec<f32>) {
        let (s_q, s_k, d) = (self.s_q, self.s_k, self.d);
        scores.clear();
        scores.resize(s_q * s_k, 0.0);
        let scale = 1.0 / (d as f32).sqrt();
        // scores[s_q × s_k] = scale · q · kᵀ; kᵀ is k read with swapped strides.
        unsafe {
            sgemm(
                (s_q, s_k, d),
                scores.as_mut_ptr(),
                s_k,
                false,
                Mat {
                    ptr: self.q,
                    rs: self.q_rs,
                    cs: 1,
                },
                Mat {
                    ptr: self.k,
                    rs: 1,
                    cs: self.kv_rs,
                },
                scale,
                Parallelism::None,
            );
        }
        let m = self.mask;
        kernels::masked_softmax(scores, s_k, m.causal_offset, m.window, m.key_valid);
        // out[s_q × d] = p · v, into the strided rows of this head.
        unsafe {
            sgemm(
                (s_q, d, s_k),
                self.out.at(0),
                self.out_rs,
                false,
                Mat {
                    ptr: scores.as_ptr(),
                    rs: s_k,
                    cs: 1,
                },
                Mat {
                    ptr: self.v,
                    rs: self.kv_rs,
                    cs: 1,
                },
                1.0,
                Parallelism::None,
            );
        }
    }
}

impl CpuBackend {
    /// `x · weightᵀ + bias`, accumulated onto `residual` when one is given (the product adds
    /// into its buffer, so a residual add costs no pass of its own).
    fn linear_into(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        residual: Option<CpuTensor>,
    ) -> Result<CpuTensor> {
        let (n, k, m) = shapes::linear(&x.shape, &weight.shape, bias.map(|b| b.shape.as_slice()))?;
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = m;
        }
        let accumulate = bias.is_some() || residual.is_some();
        let mut out = match residual {
            Some(r) => {
                shapes::same("linear_add", &r.shape, &shape)?;
                r.data
            }
            None => vec![0.0; n * m],
        };
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(m.max(1)) {
                row.iter_mut().zip(&b.data).for_each(|(o, b)| *o += b);
            }
        }
        // out[n × m] (+)= x[n × k] · weightᵀ, weightᵀ being weight [m × k] with swapped strides.
        // SAFETY: the shapes were checked against the buffers' lengths above.
        self.run_sized(n * m * k, |parallelism| unsafe {
            sgemm(
                (n, m, k),
                out.as_mut_ptr(),
                m,
                accumulate,
                Mat {
                    ptr: x.data.as_ptr(),
                    rs: k,
                    cs: 1,
                },
                Mat {
                    ptr: weight.data.as_ptr(),
                    rs: 1,
                    cs: k,
                },
                1.0,
                parallelism,
            )
        });
        Ok(CpuTensor::new(out, shape))
    }

    /// Runs attention jobs on this thread or the pool, by their total work.
    fn run_heads(&self, jobs: &[HeadJob<'_>]) {
        // Two products (scores and values) of s_q x s_k x head_dim per job.
        let macs: usize = jobs.iter().map(|j| 2 * j.s_q * j.s_k * j.d).sum();
        // SAFETY (both branches): the callers built every job inside its buffers, each writing
        // rows no other job writes.
        if self.threads == 1 || jobs.len() == 1 || macs < PARALLEL_MIN_MACS {
            let mut scores = Vec::new();
            jobs.iter().for_each(|j| unsafe { j.run(&mut scores) });
        } else {
            self.pool.install(|| {
                jobs.par_iter()
                    .for_each_init(Vec::new, |scores, j| unsafe { j.run(scores) })
            });
        }
    }
}

// SAFETY: a job's pointers address buffers that outlive `run_heads`, read-only except `out`,
// whose rows are disjoint between jobs.
unsafe impl Send for HeadJob<'_> {}
unsafe impl Sync for HeadJob<'_> {}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Paged = HostPaged;

    fn name(&self) -> &str {
        "cpu"
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        shapes::host("from_host", data.len(), shape)?;
        Ok(CpuTensor::new(data.to_vec(), shape.to_vec()))
    }

    fn to_host(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| shapes::err("zeros", format!("shape {shape:?} overflows")))?;
        Ok(CpuTensor::new(zeroed(n)?, shape.to_vec()))
    }

    fn shape<'t>(&self, t: &'t CpuTensor) -> &'t [usize] {
        &t.shape
    }

    fn reshape(&self, t: CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        shapes::reshape(&t.shape, shape)?;
        Ok(CpuTensor::new(t.data, shape.to_vec()))
    }

    fn split_last(&self, x: &CpuTensor, widths: &[usize]) -> Result<Vec<CpuTensor>> {
        let (rows, d) = shapes::split_last(&x.shape, widths)?;
        let mut start = 0;
        let pieces = widths
            .iter()
            .map(|&w| {
                let mut data = Vec::with_capacity(rows * w);
                for row in x.data.chunks_exact(d) {
                    data.extend_from_slice(&row[start..start + w]);
                }
                start += w;
                let mut shape = x.shape.clone();
                if let Some(last) = shape.last_mut() {
                    *last = w;
                }
                CpuTensor::new(data, shape)
            })
            .collect();
        Ok(pieces)
    }

    fn linear(&self, x: &CpuTensor, weight: &CpuTensor, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
        self.linear_into(x, weight, bias, None)
    }

    fn linear_add(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        residual: CpuTensor,
    ) -> Result<CpuTensor> {
        self.linear_into(x, weight, bias, Some(residual))
    }

    fn linear_act(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        act: Activation,
    ) -> Result<CpuTensor> {
        // The bias is already folded into the product; the activation runs in place over it.
        let mut y = self.linear(x, weight, bias)?;
        let kernel: fn(&mut [f32]) = match act {
            Activation::Identity => return Ok(y),
            Activation::Gelu => kernels::gelu_erf_in_place,
            Activation::GeluTanh => kernels::gelu_tanh_in_place,
            Activation::Silu => kernels::silu_in_place,
        };
        self.for_rows(&mut y.data, ELEMENTWISE_CHUNK, |_, chunk| kernel(chunk));
        Ok(y)
    }

    fn swiglu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let (rows, two_n) = shapes::rows("swiglu", &x.shape)?;
        if two_n % 2 != 0 {
            return Err(shapes::err(
                "swiglu",
                format!("the last dimension of {:?} is not even", x.shape),
            ));
        }
        let n = two_n / 2;
        let mut out = vec![0.0; rows * n];
        self.for_rows(&mut out, n, |r, o| {
            kernels::swiglu(o, &x.data[r * two_n..][..2 * o.len()], n)
        });
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok(CpuTensor::new(out, shape))
    }

    fn matmul(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        let shapes::MatmulDims {
            batch,
            n,
            k,
            m,
            out_shape: shape,
        } = shapes::matmul(&a.shape, &b.shape)?;
        let mut out = vec![0.0; batch * n * m];
        if out.is_empty() {
            return Ok(CpuTensor::new(out, shape));
        }
        let one = |z: usize, dst: &mut [f32], par: Parallelism| {
            // SAFETY: each product reads its own [n × k] and [k × m] blocks and writes `dst`.
            unsafe {
                sgemm(
                    (n, m, k),
                    dst.as_mut_ptr(),
                    m,
                    false,
                    Mat {
                        ptr: a.data[z * n * k..].as_ptr(),
                        rs: k,
                        cs: 1,
                    },
                    Mat {
                        ptr: b.data[z * k * m..].as_ptr(),
                        rs: m,
                        cs: 1,
                    },
                    1.0,
                    par,
                )
            }
        };
        self.run_sized(batch * n * m * k, |par| {
            if matches!(par, Parallelism::Rayon(_)) && batch > 1 && n * m * k < 1 << 18 {
                // Many small products: one per task.
                out.par_chunks_mut(n * m)
                    .enumerate()
                    .for_each(|(z, dst)| one(z, dst, Parallelism::None));
            } else {
                out.chunks_mut(n * m)
                    .enumerate()
                    .for_each(|(z, dst)| one(z, dst, par));
            }
        });
        Ok(CpuTensor::new(out, shape))
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        self.binary("add", a, b, kernels::add)
    }

    fn layer_norm(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (_, d) = shapes::norm(
            "layer_norm",
            &x.shape,
            &[("gamma", &gamma.shape), ("beta", &beta.shape)],
        )?;
        let mut out = x.data.clone();
        self.for_rows(&mut out, d, |_, rows| {
            kernels::layer_norm(rows, &gamma.data, &beta.data, eps)
        });
        Ok(CpuTensor::new(out, x.shape.clone()))
    }

    fn add_layer_norm(
        &self,
        x: &CpuTensor,
        residual: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        let op = "add_layer_norm";
        shapes::same(op, &x.shape, &residual.shape)?;
        let (_, d) = shapes::norm(op, &x.shape, &[("gamma", &gamma.shape), ("beta", &beta.shape)])?;
        let mut out = vec![0.0; x.data.len()];
        self.for_rows(&mut out, d, |r, rows| {
            let (xs, rs) = (
                &x.data[r * d..][..rows.len()],
                &residual.data[r * d..][..rows.len()],
            );
            kernels::add_layer_norm(rows, xs, rs, &gamma.data, &beta.data, eps);
        });
        Ok(CpuTensor::new(out, x.shape.clone()))
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (_, d) = shapes::norm("rms_norm", &x.shape, &[("weight", &weight.shape)])?;
        let mut out = x.data.clone();
        self.for_rows(&mut out, d, |_, rows| kernels::rms_norm(rows, &weight.data, eps));
        Ok(CpuTensor::new(out, x.shape.clone()))
    }

    fn gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(self.unary(x, kernels::gelu_erf))
    }

    fn gelu_tanh(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(self.unary(x, kernels::gelu_tanh))
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        self.binary("silu_mul", gate, up, kernels::silu_mul)
    }

    fn softmax_rows(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let (_, d) = shapes::rows("softmax_rows", &x.shape)?;
        let mut out = x.data.clone();
        self.for_rows(&mut out, d, |_, rows| kernels::softmax(rows, d));
        Ok(CpuTensor::new(out, x.shape.clone()))
    }

    fn embedding(&self, ids: &[u32], table: &CpuTensor) -> Result<CpuTensor> {
        let (_, d) = shapes::embedding(ids, &table.shape)?;
        let mut out = vec![0.0; ids.len() * d];
        if d > 0 {
            self.for_rows(&mut out, d, |first, rows| {
                for (row, &id) in rows.chunks_exact_mut(d).zip(&ids[first..]) {
                    let id = id as usize;
                    row.copy_from_slice(&table.data[id * d..(id + 1) * d]);
                }
            });
        }
        Ok(CpuTensor::new(out, vec![ids.len(), d]))
    }

    fn rope(&self, x: &CpuTensor, positions: &[usize], theta: f32) -> Result<CpuTensor> {
        let (_, h, d) = shapes::rope(&x.shape, positions)?;
        let half = d / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| (theta as f64).powf(-2.0 * i as f64 / d as f64))
            .collect();
        let mut out = vec![0.0; x.data.len()];
        if h == 0 || d == 0 {
            return Ok(CpuTensor::new(out, x.shape.clone()));
        }
        self.for_rows(&mut out, h * d, |first, tokens| {
            for (t, token) in (first..).zip(tokens.chunks_exact_mut(h * d)) {
                // Angles in f64: positions times frequencies lose precision in f32 at long contexts.
                let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                    .iter()
                    .map(|f| {
                        let (s, c) = (positions[t] as f64 * f).sin_cos();
                        (c as f32, s as f32)
                    })
                    .unzip();
                let src = &x.data[t * h * d..][..h * d];
                for (o, xs) in token.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                    let (lo, hi) = o.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (xs[i], xs[i + half]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = b * cos[i] + a * sin[i];
                    }
                }
            }
        });
        Ok(CpuTensor::new(out, x.shape.clone()))
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        mask: &AttentionMask<'_>,
    ) -> Result<CpuTensor> {
        let dims = shapes::attention(&q.shape, &k.shape, &v.shape, mask)?;
        let AttnDims {
            batch,
            s_q,
            s_k,
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        let mut out = vec![0.0; q.data.len()];
        if out.is_empty() {
            return Ok(CpuTensor::new(out, q.shape.clone()));
        }
        let shared = SharedOut(out.as_mut_ptr());
        let mut jobs = Vec::with_capacity(batch * heads);
        for b in 0..batch {
            for h in 0..heads {
                let q_off = (b * s_q * heads + h) * d;
                let kv_off = (b * s_k * kv_heads + h / dims.group()) * d;
                jobs.push(HeadJob {
                    q: q.data.as_ptr().wrapping_add(q_off),
                    q_rs: heads * d,
                    k: k.data.as_ptr().wrapping_add(kv_off),
                    v: v.data.as_ptr().wrapping_add(kv_off),
                    kv_rs: kv_heads * d,
                    out: shared.offset(q_off),
                    out_rs: heads * d,
                    s_q,
                    s_k,
                    d,
                    mask: HeadMask {
                        causal_offset: mask.causal_offset,
                        window: None,
                        key_valid: mask.key_valid.map(|m| &m[b * s_k..(b + 1) * s_k]),
                    },
                });
            }
        }
        self.run_heads(&jobs);
        Ok(CpuTensor::new(out, q.shape.clone()))
    }

    fn prepare_paged(&self, plan: &PagedPlan) -> Result<HostPaged> {
        HostPaged::new(plan)
    }

    fn pool_to_host(
        &self,
        hidden: &CpuTensor,
        valid: &[bool],
        pooling: super::Pooling,
        normalize: bool,
    ) -> Result<Vec<f32>> {
        super::pooling::pool_tensor(hidden, valid, pooling, normalize)
    }

    fn write_paged(&self, pool: &mut CpuTensor, new: &CpuTensor, paged: &HostPaged) -> Result<()> {
        paged.plan.check_write(&pool.shape, &new.shape)?;
        let w = new.shape[1] * new.shape[2];
        for (row, &slot) in new.data.chunks_exact(w).zip(&paged.slots) {
            pool.data[slot as usize * w..][..w].copy_from_slice(row);
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &CpuTensor,
        keys: &CpuTensor,
        values: &CpuTensor,
        paged: &HostPaged,
    ) -> Result<CpuTensor> {
        let plan = &paged.plan;
        let (heads, kv_heads, d) = plan.check_attention(&q.shape, &keys.shape, &values.shape)?;
        let w = kv_heads * d;
        // Each sequence's visible keys are copied block by block into one contiguous run, so
        // that the score and value products are plain strided matrix products.
        let mut spans = Vec::with_capacity(plan.seqs.len());
        let (mut k_run, mut v_run) = (Vec::new(), Vec::new());
        for (n, seq) in plan.seqs.iter().enumerate() {
            let first = plan.first_key(seq.k_len - seq.q_len);
            spans.push((k_run.len(), first));
            let mut pos = first;
            while pos < seq.k_len {
                let take = (plan.block_size - pos % plan.block_size).min(seq.k_len - pos);
                let rows = plan.slot(n, pos) * w..(plan.slot(n, pos) + take) * w;
                k_run.extend_from_slice(&keys.data[rows.clone()]);
                v_run.extend_from_slice(&values.data[rows]);
                pos += take;
            }
        }
        let mut out = vec![0.0; q.data.len()];
        let shared = SharedOut(out.as_mut_ptr());
        let mut jobs = Vec::with_capacity(plan.seqs.len() * heads);
        for (n, seq) in plan.seqs.iter().enumerate() {
            let (run_start, first) = spans[n];
            let q_off = paged.q_starts[n] * heads * d;
            for h in 0..heads {
                let kv_off = run_start + h / (heads / kv_heads) * d;
                jobs.push(HeadJob {
                    q: q.data.as_ptr().wrapping_add(q_off + h * d),
                    q_rs: heads * d,
                    k: k_run.as_ptr().wrapping_add(kv_off),
                    v: v_run.as_ptr().wrapping_add(kv_off),
                    kv_rs: w,
                    out: shared.offset(q_off + h * d),
                    out_rs: heads * d,
                    s_q: seq.q_len,
                    s_k: seq.k_len - first,
                    d,
                    mask: HeadMask {
                        causal_offset: Some(seq.k_len - seq.q_len - first),
                        window: plan.window,
                        key_valid: None,
                    },
                });
            }
        }
        self.run_heads(&jobs);
        Ok(CpuTensor::new(out, q.shape.clone()))
    }
}
