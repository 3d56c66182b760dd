//! BERT-family encoders (BertModel, BertForSequenceClassification, BertForTokenClassification),
//! written once against [`Backend`]. Mirrors Hugging Face's `modeling_bert.py`: post-norm
//! residual blocks, learned absolute positions, token types, GELU feed-forward.
//!
//! A batch is padded to its longest sequence; padded key positions are masked out of attention
//! and out of pooling, so a sequence gives the same output alone or in any batch.

use crate::backend::{self, AttentionMask, Backend};
use crate::config::{Activation, BertConfig, BertHead};
use crate::config::{PoolingConfig, PoolingMode};
use crate::tokenizer::Encoding;
use crate::weights::Weights;
use crate::{Error, Result};

/// Token ids of several sequences, padded to the longest.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Sequences in the batch.
    pub batch: usize,
    /// Padded length.
    pub seq: usize,
    /// `[batch * seq]` token ids (padding is id 0).
    pub ids: Vec<u32>,
    /// `[batch * seq]` token type ids.
    pub type_ids: Vec<u32>,
    /// `[batch * seq]`: true for real tokens, false for padding.
    pub valid: Vec<bool>,
}

impl Batch {
    /// Pads encodings into one batch. An empty slice gives an empty batch.
    pub fn new(encodings: &[Encoding]) -> Self {
        let seq = encodings.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut batch = Batch {
            batch: encodings.len(),
            seq,
            ids: Vec::with_capacity(encodings.len() * seq),
            type_ids: Vec::with_capacity(encodings.len() * seq),
            valid: Vec::with_capacity(encodings.len() * seq),
        };
        for e in encodings {
            let pad = seq - e.ids.len();
            batch
                .ids
                .extend(e.ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
            batch
                .type_ids
                .extend(e.type_ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
            batch
                .valid
                .extend(std::iter::repeat_n(true, e.ids.len()).chain(std::iter::repeat_n(false, pad)));
        }
        batch
    }

    /// Number of real tokens of sequence `b`.
    pub fn len_of(&self, b: usize) -> usize {
        self.valid[b * self.seq..(b + 1) * self.seq]
            .iter()
            .filter(|v| **v)
            .count()
    }
}

struct Layer<T> {
    /// Query, key and value projections fused into one `[3 * hidden, hidden]` product.
    qkv_weight: T,
    qkv_bias: T,
    attn_out_weight: T,
    attn_out_bias: T,
    attn_norm_weight: T,
    attn_norm_bias: T,
    intermediate_weight: T,
    intermediate_bias: T,
    output_weight: T,
    output_bias: T,
    output_norm_weight: T,
    output_norm_bias: T,
}

/// Classification head weights, kept on the host: they are tiny and run once per sequence.
enum Head {
    None,
    /// Pooler (dense + tanh on the first token) then classifier.
    Sequence {
        pooler_weight: Vec<f32>,
        pooler_bias: Vec<f32>,
        classifier_weight: Vec<f32>,
        classifier_bias: Vec<f32>,
    },
    /// Classifier on every token.
    Token {
        classifier_weight: Vec<f32>,
        classifier_bias: Vec<f32>,
    },
}

/// A loaded BERT encoder.
pub struct Bert<B: Backend> {
    config: BertConfig,
    word_embeddings: B::Tensor,
    position_embeddings: B::Tensor,
    token_type_embeddings: B::Tensor,
    embedding_norm_weight: B::Tensor,
    embedding_norm_bias: B::Tensor,
    layers: Vec<Layer<B::Tensor>>,
    head: Head,
}

impl<B: Backend> Bert<B> {
    /// Loads the weights named as in Hugging Face checkpoints, with `prefix` (`""` or `"bert."`)
    /// in front of the backbone's names.
    pub fn load(backend: &B, config: &BertConfig, weights: &Weights, prefix: &str) -> Result<Self> {
        let h = config.hidden_size;
        let i = config.intermediate_size;
        let host = |name: &str, shape: &[usize]| weights.get(&format!("{prefix}{name}"), shape);
        let tensor = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            Ok(backend.from_host(&host(name, shape)?, shape)?)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            let mut qkv_weight = Vec::with_capacity(3 * h * h);
            let mut qkv_bias = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv_weight.extend(host(&format!("{p}attention.self.{part}.weight"), &[h, h])?);
                qkv_bias.extend(host(&format!("{p}attention.self.{part}.bias"), &[h])?);
            }
            layers.push(Layer {
                qkv_weight: backend.from_host(&qkv_weight, &[3 * h, h])?,
                qkv_bias: backend.from_host(&qkv_bias, &[3 * h])?,
                attn_out_weight: tensor(&format!("{p}attention.output.dense.weight"), &[h, h])?,
                attn_out_bias: tensor(&format!("{p}attention.output.dense.bias"), &[h])?,
                attn_norm_weight: tensor(&format!("{p}attention.output.LayerNorm.weight"), &[h])?,
                attn_norm_bias: tensor(&format!("{p}attention.output.LayerNorm.bias"), &[h])?,
                intermediate_weight: tensor(&format!("{p}intermediate.dense.weight"), &[i, h])?,
                intermediate_bias: tensor(&format!("{p}intermediate.dense.bias"), &[i])?,
                output_weight: tensor(&format!("{p}output.dense.weight"), &[h, i])?,
                output_bias: tensor(&format!("{p}output.dense.bias"), &[h])?,
                output_norm_weight: tensor(&format!("{p}output.LayerNorm.weight"), &[h])?,
                output_norm_bias: tensor(&format!("{p}output.LayerNorm.bias"), &[h])?,
            });
        }
        let labels = config.id2label.len();
        let head = match config.head {
            BertHead::None => Head::None,
            BertHead::SequenceClassification { .. } => Head::Sequence {
                pooler_weight: host("pooler.dense.weight", &[h, h])?,
                pooler_bias: host("pooler.dense.bias", &[h])?,
                classifier_weight: weights.get("classifier.weight", &[labels, h])?,
                classifier_bias: weights.get("classifier.bias", &[labels])?,
            },
            BertHead::TokenClassification { .. } => Head::Token {
                classifier_weight: weights.get("classifier.weight", &[labels, h])?,
                classifier_bias: weights.get("classifier.bias", &[labels])?,
            },
        };
        Ok(Bert {
            config: config.clone(),
            word_embeddings: tensor("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position_embeddings: tensor(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type_embeddings: tensor(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            embedding_norm_weight: tensor("embeddings.LayerNorm.weight", &[h])?,
            embedding_norm_bias: tensor("embeddings.LayerNorm.bias", &[h])?,
            layers,
            head,
        })
    }

    /// The configuration the model was loaded with.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Last hidden states `[batch, seq, hidden]` (host, row-major; padded rows are garbage).
    pub fn hidden_states(&self, backend: &B, batch: &Batch) -> Result<Vec<f32>> {
        let out = self.encode(backend, batch)?;
        Ok(backend.to_host(&out)?)
    }

    /// The last hidden states `[batch, seq, hidden]`, left on the backend (benchmarks time
    /// the forward pass alone with it; [`Bert::hidden_states`] copies them to the host).
    pub fn encode(&self, backend: &B, batch: &Batch) -> Result<B::Tensor> {
        let c = &self.config;
        let heads = c.num_attention_heads;
        if batch.seq > c.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence of {} tokens is longer than the model's {} positions",
                batch.seq, c.max_position_embeddings
            )));
        }
        let positions: Vec<u32> = (0..batch.batch)
            .flat_map(|_| 0..u32::try_from(batch.seq).unwrap_or(u32::MAX))
            .collect();
        let words = backend.embedding(&batch.ids, &self.word_embeddings)?;
        let pos = backend.position_embedding(&positions, &self.position_embeddings)?;
        let types = backend.embedding(&batch.type_ids, &self.token_type_embeddings)?;
        let summed = backend.add(&backend.add(&words, &pos)?, &types)?;
        let eps = c.layer_norm_eps as f32;
        let mut x = backend.layer_norm(
            &summed,
            &self.embedding_norm_weight,
            &self.embedding_norm_bias,
            eps,
        )?;
        let act = match c.hidden_act {
            Activation::Gelu => backend::Activation::Gelu,
            Activation::GeluTanh => backend::Activation::GeluTanh,
            other => {
                return Err(Error::Input(format!(
                    "BERT activation {other:?} is not supported"
                )));
            }
        };
        let mask = AttentionMask::padding(&batch.valid);
        for layer in &self.layers {
            let qkv = backend.linear(&x, &layer.qkv_weight, Some(&layer.qkv_bias))?;
            let context = backend.attention_qkv(&qkv, (batch.batch, heads), &mask)?;
            x = backend.linear_add_layer_norm(
                &context,
                &layer.attn_out_weight,
                Some(&layer.attn_out_bias),
                &x,
                (&layer.attn_norm_weight, &layer.attn_norm_bias),
                eps,
            )?;
            let inner = backend.linear_act(
                &x,
                &layer.intermediate_weight,
                Some(&layer.intermediate_bias),
                act,
            )?;
            x = backend.linear_add_layer_norm(
                &inner,
                &layer.output_weight,
                Some(&layer.output_bias),
                &x,
                (&layer.output_norm_weight, &layer.output_norm_bias),
                eps,
            )?;
        }
        Ok(x)
    }

    /// Sentence embeddings, pooled as `pooling` says over each sequence's real tokens and
    /// L2-normalised when it asks for that. The pooling runs on the backend, so from a GPU
    /// only the pooled rows come back.
    pub fn embed(&self, backend: &B, batch: &Batch, pooling: &PoolingConfig) -> Result<Vec<Vec<f32>>> {
        let h = self.config.hidden_size;
        let mode = match pooling.mode {
            PoolingMode::Cls => backend::Pooling::Cls,
            PoolingMode::Mean => backend::Pooling::Mean,
            PoolingMode::Max => backend::Pooling::Max,
            PoolingMode::MeanSqrtLen => backend::Pooling::MeanSqrtLen,
            PoolingMode::LastToken => backend::Pooling::LastToken,
        };
        let hidden = self.encode(backend, batch)?;
        let hidden = backend.reshape(hidden, &[batch.batch, batch.seq, h])?;
        let rows = backend.pool_to_host(&hidden, &batch.valid, mode, pooling.normalize)?;
        if h == 0 {
            return Ok(vec![Vec::new(); batch.batch]);
        }
        Ok(rows.chunks_exact(h).map(<[f32]>::to_vec).collect())
    }

    /// Sequence classification logits `[batch][labels]`.
    pub fn sequence_logits(&self, backend: &B, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        let Head::Sequence {
            pooler_weight,
            pooler_bias,
            classifier_weight,
            classifier_bias,
        } = &self.head
        else {
            return Err(Error::Input(
                "the model has no sequence classification head".to_owned(),
            ));
        };
        let h = self.config.hidden_size;
        let hidden = self.hidden_states(backend, batch)?;
        Ok((0..batch.batch)
            .map(|b| {
                let first = &hidden[b * batch.seq * h..b * batch.seq * h + h];
                let pooled: Vec<f32> = dense(first, pooler_weight, pooler_bias)
                    .iter()
                    .map(|v| v.tanh())
                    .collect();
                dense(&pooled, classifier_weight, classifier_bias)
            })
            .collect())
    }

    /// Token classification logits `[batch][real tokens][labels]`.
    pub fn token_logits(&self, backend: &B, batch: &Batch) -> Result<Vec<Vec<Vec<f32>>>> {
        let Head::Token {
            classifier_weight,
            classifier_bias,
        } = &self.head
        else {
            return Err(Error::Input(
                "the model has no token classification head".to_owned(),
            ));
        };
        let h = self.config.hidden_size;
        let hidden = self.hidden_states(backend, batch)?;
        Ok((0..batch.batch)
            .map(|b| {
                (0..batch.len_of(b))
                    .map(|t| {
                        let row = &hidden[(b * batch.seq + t) * h..(b * batch.seq + t + 1) * h];
                        dense(row, classifier_weight, classifier_bias)
                    })
                    .collect()
            })
            .collect())
    }
}

/// `weight [out, in] · x + bias` on the host.
fn dense(x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
    bias.iter()
        .enumerate()
        .map(|(o, b)| {
            b + weight[o * x.len()..(o + 1) * x.len()]
                .iter()
                .zip(x)
                .map(|(w, v)| w * v)
                .sum::<f32>()
        })
        .collect()
}
