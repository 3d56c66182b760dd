//! The Llama family (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`), written
//! against [`Backend`]. Mirrors Hugging Face's `modeling_llama.py`: pre-norm blocks with RMS
//! norm, rotary position embeddings ("rotate_half"), grouped-query attention, a SwiGLU
//! feed-forward; Qwen2 adds biases to q, k and v, Mistral a sliding attention window.

use crate::backend::Backend;
use crate::config::{Activation, LlamaConfig, LlamaFamily};
use crate::models::decoder::{CacheLayout, CausalLm};
use crate::models::kv_cache::Step;
use crate::weights::Weights;
use crate::{Error, Result};

struct Layer<T> {
    input_norm: T,
    /// q, k and v projections fused: `[(heads + 2 * kv_heads) * head_dim, hidden]`.
    qkv_weight: T,
    qkv_bias: Option<T>,
    o_weight: T,
    o_bias: Option<T>,
    post_norm: T,
    /// Gate and up projections fused: `[2 * intermediate, hidden]`.
    gate_up_weight: T,
    down_weight: T,
}

/// A loaded Llama-family language model.
pub struct Llama<B: Backend> {
    config: LlamaConfig,
    embed: B::Tensor,
    norm: B::Tensor,
    /// `None` when the output projection is tied to the embeddings.
    lm_head: Option<B::Tensor>,
    layers: Vec<Layer<B::Tensor>>,
}

impl<B: Backend> Llama<B> {
    /// Loads the weights named as in Hugging Face checkpoints: backbone names behind `prefix`
    /// (`"model."`), `lm_head.weight` without it (absent when the embeddings are tied).
    pub fn load(backend: &B, config: &LlamaConfig, weights: &Weights, prefix: &str) -> Result<Self> {
        if config.hidden_act != Activation::Silu {
            return Err(Error::Input(format!(
                "Llama activation {:?} is not supported",
                config.hidden_act
            )));
        }
        let h = config.hidden_size;
        let q = config.num_attention_heads * config.head_dim;
        let kv = config.num_key_value_heads * config.head_dim;
        let inter = config.intermediate_size;
        let host = |name: &str, shape: &[usize]| weights.get(&format!("{prefix}{name}"), shape);
        let tensor = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            Ok(backend.from_host(&host(name, shape)?, shape)?)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("layers.{l}.");
            let mut qkv_weight = host(&format!("{p}self_attn.q_proj.weight"), &[q, h])?;
            qkv_weight.extend(host(&format!("{p}self_attn.k_proj.weight"), &[kv, h])?);
            qkv_weight.extend(host(&format!("{p}self_attn.v_proj.weight"), &[kv, h])?);
            let qkv_bias = if config.attention_bias {
                let mut bias = host(&format!("{p}self_attn.q_proj.bias"), &[q])?;
                bias.extend(host(&format!("{p}self_attn.k_proj.bias"), &[kv])?);
                bias.extend(host(&format!("{p}self_attn.v_proj.bias"), &[kv])?);
                Some(backend.from_host(&bias, &[q + 2 * kv])?)
            } else {
                None
            };
            // Llama's `attention_bias` covers the output projection too; Qwen2's does not.
            let o_bias = if config.attention_bias && config.family != LlamaFamily::Qwen2 {
                Some(tensor(&format!("{p}self_attn.o_proj.bias"), &[h])?)
            } else {
                None
            };
            let mut gate_up = host(&format!("{p}mlp.gate_proj.weight"), &[inter, h])?;
            gate_up.extend(host(&format!("{p}mlp.up_proj.weight"), &[inter, h])?);
            layers.push(Layer {
                input_norm: tensor(&format!("{p}input_layernorm.weight"), &[h])?,
                qkv_weight: backend.from_host(&qkv_weight, &[q + 2 * kv, h])?,
                qkv_bias,
                o_weight: tensor(&format!("{p}self_attn.o_proj.weight"), &[h, q])?,
                o_bias,
                post_norm: tensor(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                gate_up_weight: backend.from_host(&gate_up, &[2 * inter, h])?,
                down_weight: tensor(&format!("{p}mlp.down_proj.weight"), &[h, inter])?,
            });
        }
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            let shape = [config.vocab_size, h];
            Some(backend.from_host(&weights.get("lm_head.weight", &shape)?, &shape)?)
        };
        Ok(Self {
            config: config.clone(),
            embed: tensor("embed_tokens.weight", &[config.vocab_size, h])?,
            norm: tensor("norm.weight", &[h])?,
            lm_head,
            layers,
        })
    }

    /// The configuration the model was loaded with.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
}

impl<B: Backend> CausalLm<B> for Llama<B> {
    fn cache_layout(&self) -> CacheLayout {
        let c = &self.config;
        CacheLayout {
            layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            window: c.sliding_window,
        }
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.config.eos_token_ids
    }

    fn run(&self, backend: &B, step: &mut Step<'_, '_, '_, B>, all: bool) -> Result<B::Tensor> {
        let c = &self.config;
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let eps = c.rms_norm_eps as f32;
        let theta = c.rope_theta as f32;
        // Each block's norm is folded into the projection that reads it and each residual add
        // into the projection that produces it, so the residual stream `x` is the only
        // activation carried from block to block.
        let mut x = backend.embedding(&step.ids, &self.embed)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = backend.rms_norm_linear(
                &x,
                &layer.input_norm,
                eps,
                &layer.qkv_weight,
                layer.qkv_bias.as_ref(),
            )?;
            let context = step.attend_qkv(backend, l, &qkv, (heads, kv_heads), theta)?;
            x = backend.linear_add(&context, &layer.o_weight, layer.o_bias.as_ref(), x)?;
            let gated = backend.rms_norm_swiglu(&x, &layer.post_norm, eps, &layer.gate_up_weight)?;
            x = backend.linear_add(&gated, &layer.down_weight, None, x)?;
        }
        // Rows are independent, so selecting the last ones before the final norm equals
        // normalising them all and selecting after.
        let x = if all { x } else { step.last_rows(backend, x)? };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = backend.rms_norm_linear(&x, &self.norm, eps, head, None)?;
        Ok(logits)
    }
}
