//! Naive, obviously-correct implementations of every operation, computed in `f64` with plain
//! loops straight from the definitions. Slow; the ground truth that tests hold other backends to.

use super::cpu::CpuTensor;
use super::paged::HostPaged;
use super::{AttentionMask, Backend, PagedPlan, Result, shapes};

/// The reference backend. Its tensors are host tensors, like the CPU backend's.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceBackend;

fn tensor(data: Vec<f64>, shape: &[usize]) -> CpuTensor {
    CpuTensor::new(data.into_iter().map(|v| v as f32).collect(), shape.to_vec())
}

fn wide(t: &CpuTensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

/// `erf` by its Maclaurin series, exact to ~1e-12 in `f64` for |z| < 4.5; beyond that
/// `1 - |erf(z)| < 3e-10`.
pub fn erf(z: f64) -> f64 {
    if z.abs() >= 4.5 {
        return z.signum();
    }
    let mut sum: f64 = 0.0;
    let mut term = z; // (-1)^n z^(2n+1) / n!
    let mut n = 0.0;
    while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -z * z / n;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn map(x: &CpuTensor, f: impl Fn(f64) -> f64) -> CpuTensor {
    tensor(wide(x).into_iter().map(f).collect(), x.shape())
}

impl Backend for ReferenceBackend {
    type Tensor = CpuTensor;
    type Paged = HostPaged;

    fn name(&self) -> &str {
        "reference"
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<CpuTensor> {
        shapes::host("from_host", data.len(), shape)?;
        Ok(CpuTensor::new(data.to_vec(), shape.to_vec()))
    }

    fn to_host(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data().to_vec())
    }

    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor> {
        Ok(CpuTensor::new(vec![0.0; shapes::numel(shape)], shape.to_vec()))
    }

    fn shape<'t>(&self, t: &'t CpuTensor) -> &'t [usize] {
        t.shape()
    }

    fn reshape(&self, t: CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        shapes::reshape(t.shape(), shape)?;
        Ok(CpuTensor::new(t.into_data(), shape.to_vec()))
    }

    fn split_last(&self, x: &CpuTensor, widths: &[usize]) -> Result<Vec<CpuTensor>> {
        let (rows, d) = shapes::split_last(x.shape(), widths)?;
        let mut start = 0;
        let mut out = Vec::new();
        for &w in widths {
            let mut data = Vec::new();
            for r in 0..rows {
                for c in start..start + w {
                    data.push(x.data()[r * d + c]);
                }
            }
            let mut shape = x.shape().to_vec();
            if let Some(last) = shape.last_mut() {
                *last = w;
            }
            out.push(CpuTensor::new(data, shape));
            start += w;
        }
        Ok(out)
    }

    fn linear(&self, x: &CpuTensor, weight: &CpuTensor, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
        let (n, k, m) = shapes::linear(x.shape(), weight.shape(), bias.map(CpuTensor::shape))?;
        let (xs, ws) = (wide(x), wide(weight));
        let mut out = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                let mut acc = bias.map_or(0.0, |b| b.data()[j] as f64);
                for p in 0..k {
                    acc += xs[i * k + p] * ws[j * k + p];
                }
                out[i * m + j] = acc;
            }
        }
        let mut shape = x.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = m;
        }
        Ok(tensor(out, &shape))
    }

    fn matmul(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        let shapes::MatmulDims {
            batch,
            n,
            k,
            m,
            out_shape: shape,
        } = shapes::matmul(a.shape(), b.shape())?;
        let (av, bv) = (wide(a), wide(b));
        let mut out = vec![0.0; batch * n * m];
        for z in 0..batch {
            for i in 0..n {
                for j in 0..m {
                    let mut acc = 0.0;
                    for p in 0..k {
                        acc += av[z * n * k + i * k + p] * bv[z * k * m + p * m + j];
                    }
                    out[z * n * m + i * m + j] = acc;
                }
            }
        }
        Ok(tensor(out, &shape))
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        shapes::same("add", a.shape(), b.shape())?;
        let data = a
            .data()
            .iter()
            .zip(b.data())
            .map(|(&x, &y)| x as f64 + y as f64)
            .collect();
        Ok(tensor(data, a.shape()))
    }

    fn layer_norm(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (rows, d) = shapes::norm(
            "layer_norm",
            x.shape(),
            &[("gamma", gamma.shape()), ("beta", beta.shape())],
        )?;
        let (xs, g, b) = (wide(x), wide(gamma), wide(beta));
        let mut out = vec![0.0; rows * d];
        for r in 0..rows {
            let row = &xs[r * d..(r + 1) * d];
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for c in 0..d {
                out[r * d + c] = (row[c] - mean) * inv * g[c] + b[c];
            }
        }
        Ok(tensor(out, x.shape()))
    }

    fn add_layer_norm(
        &self,
        x: &CpuTensor,
        residual: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        shapes::same("add_layer_norm", x.shape(), residual.shape())?;
        // The sum is rounded to f32 first, as every backend stores it.
        let sum = self.add(x, residual)?;
        self.layer_norm(&sum, gamma, beta, eps)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let (rows, d) = shapes::norm("rms_norm", x.shape(), &[("weight", weight.shape())])?;
        let (xs, w) = (wide(x), wide(weight));
        let mut out = vec![0.0; rows * d];
        for r in 0..rows {
            let row = &xs[r * d..(r + 1) * d];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for c in 0..d {
                out[r * d + c] = row[c] * inv * w[c];
            }
        }
        Ok(tensor(out, x.shape()))
    }

    fn gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(map(x, |v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))))
    }

    fn gelu_tanh(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        Ok(map(x, |v| {
            0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
        }))
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        shapes::same("silu_mul", gate.shape(), up.shape())?;
        let data = (gate.data().iter().zip(up.data()))
            .map(|(&g, &u)| {
                let g = g as f64;
                g / (1.0 + (-g).exp()) * u as f64
            })
            .collect();
        Ok(tensor(data, gate.shape()))
    }

    fn softmax_rows(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let (rows, d) = shapes::rows("softmax_rows", x.shape())?;
        let xs = wide(x);
        let mut out = vec![0.0; rows * d];
        for r in 0..rows {
            let row = &xs[r * d..(r + 1) * d];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                continue;
            }
            let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
            for c in 0..d {
                out[r * d + c] = (row[c] - max).exp() / sum;
            }
        }
        Ok(tensor(out, x.shape()))
    }

    fn embedding(&self, ids: &[u32], table: &CpuTensor) -> Result<CpuTensor> {
        let (_, d) = shapes::embedding(ids, table.shape())?;
        let mut data = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            for c in 0..d {
                data.push(table.data()[id as usize * d + c]);
            }
        }
        Ok(CpuTensor::new(data, vec![ids.len(), d]))
    }

    fn rope(&self, x: &CpuTensor, positions: &[usize], theta: f32) -> Result<CpuTensor> {
        let (_, h, d) = shapes::rope(x.shape(), positions)?;
        let xs = wide(x);
        let half = d / 2;
        let mut out = vec![0.0; xs.len()];
        for (tok, &pos) in positions.iter().enumerate() {
            for head in 0..h {
                let base = (tok * h + head) * d;
                for i in 0..half {
                    let freq = (theta as f64).powf(-2.0 * i as f64 / d as f64);
                    let angle = pos as f64 * freq;
                    let (a, b) = (xs[base + i], xs[base + i + half]);
                    out[base + i] = a * angle.cos() - b * angle.sin();
                    out[base + i + half] = b * angle.cos() + a * angle.sin();
                }
            }
        }
        Ok(tensor(out, x.shape()))
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        mask: &AttentionMask<'_>,
    ) -> Result<CpuTensor> {
        let dims = shapes::attention(q.shape(), k.shape(), v.shape(), mask)?;
        let shapes::AttnDims {
            batch,
            s_q,
            s_k,
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        let (qs, ks, vs) = (wide(q), wide(k), wide(v));
        let scale = 1.0 / (d as f64).sqrt();
        let q_at = |b: usize, s: usize, h: usize, c: usize| qs[((b * s_q + s) * heads + h) * d + c];
        let k_at = |b: usize, s: usize, h: usize, c: usize| ks[((b * s_k + s) * kv_heads + h) * d + c];
        let v_at = |b: usize, s: usize, h: usize, c: usize| vs[((b * s_k + s) * kv_heads + h) * d + c];
        let mut out = vec![0.0; qs.len()];
        for b in 0..batch {
            for h in 0..heads {
                let kvh = h / dims.group();
                for i in 0..s_q {
                    let allowed = |j: usize| {
                        mask.key_valid.is_none_or(|m| m[b * s_k + j])
                            && mask.causal_offset.is_none_or(|off| j <= off + i)
                    };
                    let scores: Vec<Option<f64>> = (0..s_k)
                        .map(|j| {
                            allowed(j).then(|| {
                                (0..d).map(|c| q_at(b, i, h, c) * k_at(b, j, kvh, c)).sum::<f64>() * scale
                            })
                        })
                        .collect();
                    let Some(max) = scores.iter().flatten().cloned().reduce(f64::max) else {
                        continue; // every key masked: the output row stays zero
                    };
                    let weights: Vec<f64> = scores
                        .iter()
                        .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                        .collect();
                    let total: f64 = weights.iter().sum();
                    for c in 0..d {
                        let acc: f64 = (0..s_k).map(|j| weights[j] * v_at(b, j, kvh, c)).sum();
                        out[((b * s_q + i) * heads + h) * d + c] = acc / total;
                    }
                }
            }
        }
        Ok(tensor(out, q.shape()))
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
        paged.plan.check_write(pool.shape(), new.shape())?;
        let w = new.shape()[1] * new.shape()[2];
        let values = new.data().to_vec();
        let rows = pool.data_mut();
        for (t, &slot) in paged.slots.iter().enumerate() {
            for c in 0..w {
                rows[slot as usize * w + c] = values[t * w + c];
            }
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
        let (heads, kv_heads, d) = plan.check_attention(q.shape(), keys.shape(), values.shape())?;
        let (qs, ks, vs) = (wide(q), wide(keys), wide(values));
        let scale = 1.0 / (d as f64).sqrt();
        let group = heads / kv_heads;
        let mut out = vec![0.0; qs.len()];
        for (n, seq) in plan.seqs.iter().enumerate() {
            for i in 0..seq.q_len {
                let row = paged.q_starts[n] + i;
                let pos = seq.k_len - seq.q_len + i;
                let visible: Vec<usize> = (plan.first_key(pos)..=pos).collect();
                for h in 0..heads {
                    let kvh = h / group;
                    let at =
                        |pool: &[f64], p: usize, c: usize| pool[(plan.slot(n, p) * kv_heads + kvh) * d + c];
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&p| {
                            (0..d)
                                .map(|c| qs[(row * heads + h) * d + c] * at(&ks, p, c))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for c in 0..d {
                        let acc: f64 = visible
                            .iter()
                            .zip(&weights)
                            .map(|(&p, w)| w * at(&vs, p, c))
                            .sum();
                        out[(row * heads + h) * d + c] = acc / total;
                    }
                }
            }
        }
        Ok(tensor(out, q.shape()))
    }
}
