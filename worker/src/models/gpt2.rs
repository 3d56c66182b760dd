//! GPT-2 (`GPT2LMHeadModel`), written against [`Backend`]. Mirrors Hugging Face's
//! `modeling_gpt2.py`: pre-norm blocks, learned absolute positions, a fused QKV projection, a
//! GELU feed-forward and an output projection tied to the token embeddings.

use crate::backend::{self, Backend};
use crate::config::{Activation, Gpt2Config};
use crate::models::decoder::{CacheLayout, CausalLm};
use crate::models::kv_cache::Step;
use crate::weights::Weights;
use crate::{Error, Result};

struct Layer<T> {
    ln_1_weight: T,
    ln_1_bias: T,
    /// `[3 * n_embd, n_embd]`: the checkpoint's `Conv1D` `[in, out]`, transposed at load.
    qkv_weight: T,
    qkv_bias: T,
    attn_proj_weight: T,
    attn_proj_bias: T,
    ln_2_weight: T,
    ln_2_bias: T,
    fc_weight: T,
    fc_bias: T,
    mlp_proj_weight: T,
    mlp_proj_bias: T,
}

/// A loaded GPT-2 language model.
pub struct Gpt2<B: Backend> {
    config: Gpt2Config,
    wte: B::Tensor,
    wpe: B::Tensor,
    ln_f_weight: B::Tensor,
    ln_f_bias: B::Tensor,
    layers: Vec<Layer<B::Tensor>>,
}

/// `[rows, cols]` row-major into `[cols, rows]`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

impl<B: Backend> Gpt2<B> {
    /// Loads the weights named as in Hugging Face checkpoints, with `prefix` (`""` or
    /// `"transformer."`) in front of every name.
    pub fn load(backend: &B, config: &Gpt2Config, weights: &Weights, prefix: &str) -> Result<Self> {
        if !matches!(
            config.activation_function,
            Activation::Gelu | Activation::GeluTanh
        ) {
            return Err(Error::Input(format!(
                "GPT-2 activation {:?} is not supported",
                config.activation_function
            )));
        }
        let (e, inner) = (config.n_embd, config.n_inner);
        let tensor = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            let data = weights.get(&format!("{prefix}{name}"), shape)?;
            Ok(backend.from_host(&data, shape)?)
        };
        // Conv1D weights are `[in, out]`; `linear` wants `[out, in]`.
        let conv = |name: &str, inp: usize, out: usize| -> Result<B::Tensor> {
            let data = weights.get(&format!("{prefix}{name}"), &[inp, out])?;
            Ok(backend.from_host(&transpose(&data, inp, out), &[out, inp])?)
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let p = format!("h.{l}.");
            layers.push(Layer {
                ln_1_weight: tensor(&format!("{p}ln_1.weight"), &[e])?,
                ln_1_bias: tensor(&format!("{p}ln_1.bias"), &[e])?,
                qkv_weight: conv(&format!("{p}attn.c_attn.weight"), e, 3 * e)?,
                qkv_bias: tensor(&format!("{p}attn.c_attn.bias"), &[3 * e])?,
                attn_proj_weight: conv(&format!("{p}attn.c_proj.weight"), e, e)?,
                attn_proj_bias: tensor(&format!("{p}attn.c_proj.bias"), &[e])?,
                ln_2_weight: tensor(&format!("{p}ln_2.weight"), &[e])?,
                ln_2_bias: tensor(&format!("{p}ln_2.bias"), &[e])?,
                fc_weight: conv(&format!("{p}mlp.c_fc.weight"), e, inner)?,
                fc_bias: tensor(&format!("{p}mlp.c_fc.bias"), &[inner])?,
                mlp_proj_weight: conv(&format!("{p}mlp.c_proj.weight"), inner, e)?,
                mlp_proj_bias: tensor(&format!("{p}mlp.c_proj.bias"), &[e])?,
            });
        }
        Ok(Self {
            config: config.clone(),
            wte: tensor("wte.weight", &[config.vocab_size, e])?,
            wpe: tensor("wpe.weight", &[config.n_positions, e])?,
            ln_f_weight: tensor("ln_f.weight", &[e])?,
            ln_f_bias: tensor("ln_f.bias", &[e])?,
            layers,
        })
    }

    /// The configuration the model was loaded with.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    fn head_dim(&self) -> usize {
        self.config.n_embd / self.config.n_head
    }
}

impl<B: Backend> CausalLm<B> for Gpt2<B> {
    fn cache_layout(&self) -> CacheLayout {
        let c = &self.config;
        CacheLayout {
            layers: c.n_layer,
            kv_heads: c.n_head,
            head_dim: self.head_dim(),
            window: None,
        }
    }

    fn max_positions(&self) -> usize {
        self.config.n_positions
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.config.eos_token_ids
    }

    fn run(&self, backend: &B, step: &mut Step<'_, '_, '_, B>, all: bool) -> Result<B::Tensor> {
        let c = &self.config;
        let (e, heads, d) = (c.n_embd, c.n_head, self.head_dim());
        let eps = c.layer_norm_epsilon as f32;
        let tokens = step.tokens();
        let positions: Vec<u32> = step
            .positions
            .iter()
            .map(|&p| u32::try_from(p).unwrap_or(u32::MAX))
            .collect();
        let mut x = backend.add(
            &backend.embedding(&step.ids, &self.wte)?,
            &backend.position_embedding(&positions, &self.wpe)?,
        )?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = backend.layer_norm(&x, &layer.ln_1_weight, &layer.ln_1_bias, eps)?;
            let qkv = backend.linear(&h, &layer.qkv_weight, Some(&layer.qkv_bias))?;
            let mut parts = backend.split_last(&qkv, &[e, e, e])?.into_iter();
            let (Some(q), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(Error::Input(
                    "split of the fused QKV projection failed".to_owned(),
                ));
            };
            let q = backend.reshape(q, &[tokens, heads, d])?;
            let k = backend.reshape(k, &[tokens, heads, d])?;
            let v = backend.reshape(v, &[tokens, heads, d])?;
            let context = step.attend(backend, l, &q, &k, &v)?;
            x = backend.linear_add(&context, &layer.attn_proj_weight, Some(&layer.attn_proj_bias), x)?;
            let h = backend.layer_norm(&x, &layer.ln_2_weight, &layer.ln_2_bias, eps)?;
            let act = match c.activation_function {
                Activation::Gelu => backend::Activation::Gelu,
                _ => backend::Activation::GeluTanh,
            };
            let inner = backend.linear_act(&h, &layer.fc_weight, Some(&layer.fc_bias), act)?;
            x = backend.linear_add(&inner, &layer.mlp_proj_weight, Some(&layer.mlp_proj_bias), x)?;
        }
        let x = if all { x } else { step.last_rows(backend, x)? };
        let x = backend.layer_norm(&x, &self.ln_f_weight, &self.ln_f_bias, eps)?;
        let logits = backend.linear(&x, &self.wte, None)?;
        Ok(logits)
    }
}
