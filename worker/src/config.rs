//! Typed model configurations: reads a Hugging Face `config.json` into a [`ModelConfig`] for one of
//! the architectures the worker runs (BERT encoders, GPT-2, the Llama family), and a
//! sentence-transformers pooling setup into a [`PoolingConfig`].
//!
//! Fields are read one by one from the JSON object rather than through a derived `Deserialize`,
//! so that every error names the field at fault (serde's own messages only give a line and
//! column). Values the runtime cannot honour (a relative position embedding, RoPE scaling, an
//! unknown activation) are rejected here, at load time, instead of producing wrong numbers later.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The configuration of a model the worker can run, chosen by `architectures` (or, when that is
/// absent, `model_type`) in `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// A BERT-family encoder.
    Bert(BertConfig),
    /// A GPT-2 decoder.
    Gpt2(Gpt2Config),
    /// A Llama-family decoder (Llama, Qwen2, Mistral).
    Llama(LlamaConfig),
}

/// Activation functions named by `hidden_act` / `activation_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the exact error function (`gelu`).
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `relu`.
    Relu,
    /// SiLU, also called swish (`silu`, `swish`).
    Silu,
}

/// What sits on top of a BERT encoder, implied by the architecture name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertHead {
    /// `BertModel`: no head; the hidden states are pooled into embeddings.
    None,
    /// `BertForSequenceClassification`: pooler plus a linear classifier over `num_labels`.
    SequenceClassification {
        /// Number of classes.
        num_labels: usize,
    },
    /// `BertForTokenClassification`: a linear classifier per token over `num_labels`.
    TokenClassification {
        /// Number of classes.
        num_labels: usize,
    },
}

/// Configuration of a BERT-family encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub hidden_act: Activation,
    /// Number of learned positions, hence the longest input.
    pub max_position_embeddings: usize,
    /// Number of token type (segment) ids.
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// Class names indexed by class id (from `id2label`); empty when the file has none and the
    /// architecture has no head.
    pub id2label: Vec<String>,
    /// The head the architecture implies.
    pub head: BertHead,
}

/// Configuration of a GPT-2 decoder. The output projection is always tied to `wte`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub n_embd: usize,
    /// Number of decoder layers.
    pub n_layer: usize,
    /// Number of attention heads.
    pub n_head: usize,
    /// Width of the feed-forward layer (`n_inner`, default `4 * n_embd`).
    pub n_inner: usize,
    /// Number of learned positions, hence the longest context.
    pub n_positions: usize,
    /// Layer-norm epsilon.
    pub layer_norm_epsilon: f64,
    /// Feed-forward activation.
    pub activation_function: Activation,
    /// Token ids that end generation (`eos_token_id`, possibly several).
    pub eos_token_ids: Vec<u32>,
}

/// Which member of the Llama family a [`LlamaConfig`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFamily {
    /// `LlamaForCausalLM` / `llama`.
    Llama,
    /// `Qwen2ForCausalLM` / `qwen2` (biases on q, k and v).
    Qwen2,
    /// `MistralForCausalLM` / `mistral`.
    Mistral,
}

/// Configuration of a Llama-family decoder (RMS norm, rotary embeddings, gated feed-forward).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which family the file declared.
    pub family: LlamaFamily,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the gated feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    pub num_key_value_heads: usize,
    /// Width of one head: `head_dim` when given, else `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// RMS-norm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding base.
    pub rope_theta: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the token embeddings.
    pub tie_word_embeddings: bool,
    /// Feed-forward activation (the gate's).
    pub hidden_act: Activation,
    /// Whether q, k and v projections carry biases (always for Qwen2).
    pub attention_bias: bool,
    /// Sliding attention window, when the model uses one.
    pub sliding_window: Option<usize>,
    /// Token ids that end generation (`eos_token_id`, possibly several).
    pub eos_token_ids: Vec<u32>,
}

/// Parses `text` (the contents of `path`) as a JSON object, with errors naming the file.
pub(crate) fn json_object(path: &Path, text: &str) -> Result<serde_json::Map<String, Value>> {
    let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(Error::Config {
            path: path.to_path_buf(),
            message: "expected a JSON object".to_string(),
        }),
    }
}

impl ModelConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &text)
    }

    /// Parses and validates the text of a `config.json`; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let object = json_object(path, text)?;
        let fields = Fields {
            path,
            object: &object,
        };
        match architecture(&fields)? {
            Architecture::Bert(head) => BertConfig::from_fields(&fields, head).map(Self::Bert),
            Architecture::Gpt2 => Gpt2Config::from_fields(&fields).map(Self::Gpt2),
            Architecture::Llama(family) => LlamaConfig::from_fields(&fields, family).map(Self::Llama),
        }
    }

    /// The longest input (in tokens) the model's positions allow.
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Bert(c) => c.max_position_embeddings,
            Self::Gpt2(c) => c.n_positions,
            Self::Llama(c) => c.max_position_embeddings,
        }
    }

    /// The number of token ids the model's embeddings cover.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bert(c) => c.vocab_size,
            Self::Gpt2(c) => c.vocab_size,
            Self::Llama(c) => c.vocab_size,
        }
    }
}

/// The architecture decided from `architectures` / `model_type`, before its fields are read.
enum Architecture {
    Bert(BertHeadKind),
    Gpt2,
    Llama(LlamaFamily),
}

/// The head kind, before `num_labels` is known.
#[derive(Clone, Copy)]
enum BertHeadKind {
    None,
    Sequence,
    Token,
}

fn architecture(fields: &Fields<'_>) -> Result<Architecture> {
    let unsupported = |name: &str| Error::UnsupportedArchitecture {
        path: fields.path.to_path_buf(),
        name: name.to_string(),
    };
    // `architectures` names the exact class (and so the head); it wins over `model_type`, which
    // only names the family. An unknown class is refused even when the family is known, because
    // its weights are laid out for a head this worker does not build.
    let names = match fields.object.get("architectures") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| fields.error("architectures", "expected a list of strings"))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(_) => return Err(fields.error("architectures", "expected a list of strings")),
    };
    if let Some(first) = names.first() {
        return match first.as_str() {
            "BertModel" => Ok(Architecture::Bert(BertHeadKind::None)),
            "BertForSequenceClassification" => Ok(Architecture::Bert(BertHeadKind::Sequence)),
            "BertForTokenClassification" => Ok(Architecture::Bert(BertHeadKind::Token)),
            "GPT2LMHeadModel" => Ok(Architecture::Gpt2),
            "LlamaForCausalLM" => Ok(Architecture::Llama(LlamaFamily::Llama)),
            "Qwen2ForCausalLM" => Ok(Architecture::Llama(LlamaFamily::Qwen2)),
            "MistralForCausalLM" => Ok(Architecture::Llama(LlamaFamily::Mistral)),
            other => Err(unsupported(other)),
        };
    }
    match fields.opt_str("model_type")? {
        Some("bert") => Ok(Architecture::Bert(BertHeadKind::None)),
        Some("gpt2") => Ok(Architecture::Gpt2),
        Some("llama") => Ok(Architecture::Llama(LlamaFamily::Llama)),
        Some("qwen2") => Ok(Architecture::Llama(LlamaFamily::Qwen2)),
        Some("mistral") => Ok(Architecture::Llama(LlamaFamily::Mistral)),
        Some(other) => Err(unsupported(other)),
        None => Err(fields.error(
            "architectures",
            "neither `architectures` nor `model_type` is given",
        )),
    }
}

impl BertConfig {
    fn from_fields(fields: &Fields<'_>, head: BertHeadKind) -> Result<Self> {
        let hidden_size = fields.size("hidden_size")?;
        let num_attention_heads = fields.size("num_attention_heads")?;
        fields.divides(
            "num_attention_heads",
            num_attention_heads,
            "hidden_size",
            hidden_size,
        )?;
        // Only absolute learned positions are implemented; relative variants change attention.
        if let Some(kind) = fields.opt_str("position_embedding_type")?
            && kind != "absolute"
        {
            return Err(fields.error(
                "position_embedding_type",
                &format!("`{kind}` is not supported (only `absolute`)"),
            ));
        }
        let id2label = fields.id2label()?;
        let head = match head {
            BertHeadKind::None => BertHead::None,
            BertHeadKind::Sequence => BertHead::SequenceClassification {
                num_labels: fields.num_labels(&id2label)?,
            },
            BertHeadKind::Token => BertHead::TokenClassification {
                num_labels: fields.num_labels(&id2label)?,
            },
        };
        // A head without names still needs one per class; transformers names them LABEL_i.
        let id2label = match head {
            BertHead::SequenceClassification { num_labels }
            | BertHead::TokenClassification { num_labels }
                if id2label.is_empty() =>
            {
                (0..num_labels).map(|i| format!("LABEL_{i}")).collect()
            }
            _ => id2label,
        };
        Ok(Self {
            vocab_size: fields.size("vocab_size")?,
            hidden_size,
            num_hidden_layers: fields.layers("num_hidden_layers")?,
            num_attention_heads,
            intermediate_size: fields.size("intermediate_size")?,
            hidden_act: fields.activation("hidden_act", "gelu")?,
            max_position_embeddings: fields.size("max_position_embeddings")?,
            type_vocab_size: fields.opt_size("type_vocab_size")?.unwrap_or(2),
            layer_norm_eps: fields.epsilon("layer_norm_eps", 1e-12)?,
            id2label,
            head,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The tensors a checkpoint of this configuration must hold, with their shapes, each name
    /// prefixed by `prefix` (`""` for a bare `BertModel` export, `"bert."` when saved from a
    /// model with a head). Head tensors (`classifier.*`) are never prefixed.
    pub fn expected_tensors(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>| out.push((name, shape));
        push(
            format!("{prefix}embeddings.word_embeddings.weight"),
            vec![self.vocab_size, h],
        );
        push(
            format!("{prefix}embeddings.position_embeddings.weight"),
            vec![self.max_position_embeddings, h],
        );
        push(
            format!("{prefix}embeddings.token_type_embeddings.weight"),
            vec![self.type_vocab_size, h],
        );
        push(format!("{prefix}embeddings.LayerNorm.weight"), vec![h]);
        push(format!("{prefix}embeddings.LayerNorm.bias"), vec![h]);
        for i in 0..self.num_hidden_layers {
            let l = format!("{prefix}encoder.layer.{i}.");
            for part in ["query", "key", "value"] {
                push(format!("{l}attention.self.{part}.weight"), vec![h, h]);
                push(format!("{l}attention.self.{part}.bias"), vec![h]);
            }
            push(format!("{l}attention.output.dense.weight"), vec![h, h]);
            push(format!("{l}attention.output.dense.bias"), vec![h]);
            push(format!("{l}attention.output.LayerNorm.weight"), vec![h]);
            push(format!("{l}attention.output.LayerNorm.bias"), vec![h]);
            push(
                format!("{l}intermediate.dense.weight"),
                vec![self.intermediate_size, h],
            );
            push(
                format!("{l}intermediate.dense.bias"),
                vec![self.intermediate_size],
            );
            push(format!("{l}output.dense.weight"), vec![h, self.intermediate_size]);
            push(format!("{l}output.dense.bias"), vec![h]);
            push(format!("{l}output.LayerNorm.weight"), vec![h]);
            push(format!("{l}output.LayerNorm.bias"), vec![h]);
        }
        match self.head {
            // Embedding models may or may not ship the pooler; nothing downstream needs it.
            BertHead::None => {}
            BertHead::SequenceClassification { num_labels } => {
                push(format!("{prefix}pooler.dense.weight"), vec![h, h]);
                push(format!("{prefix}pooler.dense.bias"), vec![h]);
                push("classifier.weight".to_string(), vec![num_labels, h]);
                push("classifier.bias".to_string(), vec![num_labels]);
            }
            BertHead::TokenClassification { num_labels } => {
                push("classifier.weight".to_string(), vec![num_labels, h]);
                push("classifier.bias".to_string(), vec![num_labels]);
            }
        }
        out
    }
}

impl Gpt2Config {
    fn from_fields(fields: &Fields<'_>) -> Result<Self> {
        let n_embd = fields.size("n_embd")?;
        let n_head = fields.size("n_head")?;
        fields.divides("n_head", n_head, "n_embd", n_embd)?;
        let n_inner = match fields.opt_size("n_inner")? {
            Some(n) => n,
            None => n_embd
                .checked_mul(4)
                .ok_or_else(|| fields.error("n_embd", "too large (4 * n_embd overflows)"))?,
        };
        Ok(Self {
            vocab_size: fields.size("vocab_size")?,
            n_embd,
            n_layer: fields.layers("n_layer")?,
            n_head,
            n_inner,
            n_positions: fields.size("n_positions")?,
            layer_norm_epsilon: fields.epsilon("layer_norm_epsilon", 1e-5)?,
            activation_function: fields.activation("activation_function", "gelu_new")?,
            eos_token_ids: fields.token_ids("eos_token_id")?,
        })
    }

    /// The tensors a checkpoint of this configuration must hold, with their shapes, each name
    /// prefixed by `prefix` (`""` for `GPT2Model`, `"transformer."` for `GPT2LMHeadModel`).
    /// GPT-2 stores linear weights as `[in, out]` (its `Conv1D`), unlike BERT and Llama.
    pub fn expected_tensors(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        // Saturating: an absurd config must fail the shape check, not overflow.
        let (e, inner) = (self.n_embd, self.n_inner);
        let mut out = vec![
            (format!("{prefix}wte.weight"), vec![self.vocab_size, e]),
            (format!("{prefix}wpe.weight"), vec![self.n_positions, e]),
            (format!("{prefix}ln_f.weight"), vec![e]),
            (format!("{prefix}ln_f.bias"), vec![e]),
        ];
        for i in 0..self.n_layer {
            let l = format!("{prefix}h.{i}.");
            out.extend([
                (format!("{l}ln_1.weight"), vec![e]),
                (format!("{l}ln_1.bias"), vec![e]),
                (format!("{l}attn.c_attn.weight"), vec![e, e.saturating_mul(3)]),
                (format!("{l}attn.c_attn.bias"), vec![e.saturating_mul(3)]),
                (format!("{l}attn.c_proj.weight"), vec![e, e]),
                (format!("{l}attn.c_proj.bias"), vec![e]),
                (format!("{l}ln_2.weight"), vec![e]),
                (format!("{l}ln_2.bias"), vec![e]),
                (format!("{l}mlp.c_fc.weight"), vec![e, inner]),
                (format!("{l}mlp.c_fc.bias"), vec![inner]),
                (format!("{l}mlp.c_proj.weight"), vec![inner, e]),
                (format!("{l}mlp.c_proj.bias"), vec![e]),
            ]);
        }
        out
    }
}

impl LlamaConfig {
    fn from_fields(fields: &Fields<'_>, family: LlamaFamily) -> Result<Self> {
        let hidden_size = fields.size("hidden_size")?;
        let num_attention_heads = fields.size("num_attention_heads")?;
        let num_key_value_heads = fields
            .opt_size("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        fields.divides(
            "num_key_value_heads",
            num_key_value_heads,
            "num_attention_heads",
            num_attention_heads,
        )?;
        // An explicit head_dim (newer Mistral exports) decouples head width from hidden size;
        // without it the heads must split the hidden state evenly.
        let head_dim = match fields.opt_size("head_dim")? {
            Some(d) => d,
            None => {
                fields.divides(
                    "num_attention_heads",
                    num_attention_heads,
                    "hidden_size",
                    hidden_size,
                )?;
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(fields.error(
                "head_dim",
                &format!("rotary embeddings need an even head width, got {head_dim}"),
            ));
        }
        match fields.object.get("rope_scaling") {
            None | Some(Value::Null) => {}
            Some(_) => {
                return Err(fields.error("rope_scaling", "RoPE scaling is not supported"));
            }
        }
        // transformers 5 writes `rope_parameters: {rope_type, rope_theta}` instead of a top-level
        // `rope_theta`; any type other than "default" is a scaling scheme, which is not supported.
        let mut rope_theta = fields.opt_f64("rope_theta")?;
        match fields.object.get("rope_parameters") {
            None | Some(Value::Null) => {}
            Some(Value::Object(params)) => {
                match params.get("rope_type") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(t)) if t == "default" => {}
                    Some(other) => {
                        return Err(fields.error(
                            "rope_parameters",
                            &format!("RoPE type {other} is not supported (only \"default\")"),
                        ));
                    }
                }
                if rope_theta.is_none() {
                    rope_theta = match params.get("rope_theta") {
                        None | Some(Value::Null) => None,
                        Some(v) => Some(v.as_f64().ok_or_else(|| {
                            fields.error(
                                "rope_parameters",
                                &format!("rope_theta: expected a number, got {v}"),
                            )
                        })?),
                    };
                }
            }
            Some(other) => {
                return Err(fields.error("rope_parameters", &format!("expected an object, got {other}")));
            }
        }
        let rope_theta = rope_theta.unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(fields.error("rope_theta", "must be a positive number"));
        }
        let attention_bias = match fields.opt_bool("attention_bias")? {
            Some(bias) => bias,
            None => family == LlamaFamily::Qwen2,
        };
        // Qwen2 configs carry a window size but switch it off with `use_sliding_window: false`.
        let sliding_window = if fields.opt_bool("use_sliding_window")? == Some(false) {
            None
        } else {
            fields.opt_size("sliding_window")?
        };
        Ok(Self {
            family,
            vocab_size: fields.size("vocab_size")?,
            hidden_size,
            intermediate_size: fields.size("intermediate_size")?,
            num_hidden_layers: fields.layers("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: fields.epsilon("rms_norm_eps", 1e-6)?,
            rope_theta,
            max_position_embeddings: fields.size("max_position_embeddings")?,
            tie_word_embeddings: fields.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            hidden_act: fields.activation("hidden_act", "silu")?,
            attention_bias,
            sliding_window,
            eos_token_ids: fields.token_ids("eos_token_id")?,
        })
    }

    /// The tensors a checkpoint of this configuration must hold, with their shapes; backbone
    /// names are prefixed by `prefix` (`"model."` in transformers exports), `lm_head.weight`
    /// never is, and is only expected when the embeddings are not tied.
    pub fn expected_tensors(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads.saturating_mul(self.head_dim);
        let kv = self.num_key_value_heads.saturating_mul(self.head_dim);
        let inter = self.intermediate_size;
        let mut out = vec![
            (format!("{prefix}embed_tokens.weight"), vec![self.vocab_size, h]),
            (format!("{prefix}norm.weight"), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        for i in 0..self.num_hidden_layers {
            let l = format!("{prefix}layers.{i}.");
            out.extend([
                (format!("{l}input_layernorm.weight"), vec![h]),
                (format!("{l}self_attn.q_proj.weight"), vec![q, h]),
                (format!("{l}self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{l}self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{l}self_attn.o_proj.weight"), vec![h, q]),
                (format!("{l}post_attention_layernorm.weight"), vec![h]),
                (format!("{l}mlp.gate_proj.weight"), vec![inter, h]),
                (format!("{l}mlp.up_proj.weight"), vec![inter, h]),
                (format!("{l}mlp.down_proj.weight"), vec![h, inter]),
            ]);
            if self.attention_bias {
                out.extend([
                    (format!("{l}self_attn.q_proj.bias"), vec![q]),
                    (format!("{l}self_attn.k_proj.bias"), vec![kv]),
                    (format!("{l}self_attn.v_proj.bias"), vec![kv]),
                ]);
                // Llama's `attention_bias` also covers the output projection; Qwen2's does not.
                if self.family != LlamaFamily::Qwen2 {
                    out.push((format!("{l}self_attn.o_proj.bias"), vec![h]));
                }
            }
        }
        out
    }
}

/// How token states are pooled into one sentence embedding (sentence-transformers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token's state (`pooling_mode_cls_token`).
    Cls,
    /// Mean over non-padding tokens (`pooling_mode_mean_tokens`).
    Mean,
    /// Element-wise maximum over non-padding tokens (`pooling_mode_max_tokens`).
    Max,
    /// Sum divided by the square root of the length (`pooling_mode_mean_sqrt_len_tokens`).
    MeanSqrtLen,
    /// The last non-padding token's state (`pooling_mode_lasttoken`).
    LastToken,
}

/// The sentence-transformers pooling stage of an embedding model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolingConfig {
    /// The pooling to apply.
    pub mode: PoolingMode,
    /// Whether `modules.json` ends the pipeline with a `Normalize` module (unit-length output).
    pub normalize: bool,
}

impl Default for PoolingConfig {
    /// Mean pooling without normalisation: what sentence-transformers does for a plain
    /// transformer folder without pooling files.
    fn default() -> Self {
        Self {
            mode: PoolingMode::Mean,
            normalize: false,
        }
    }
}

impl PoolingConfig {
    /// Reads the pooling setup of the model folder `dir`: the `Pooling` module's folder is taken
    /// from `modules.json` when present (else `1_Pooling`), and its `config.json` gives the mode.
    /// Absent files give the default (mean pooling).
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let mut pooling_folder = PathBuf::from("1_Pooling");
        let mut normalize = false;
        let modules_path = dir.join("modules.json");
        if let Some(text) = read_optional(&modules_path)? {
            let modules: Vec<Module> = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: modules_path.clone(),
                message: format!("expected a list of modules: {e}"),
            })?;
            for module in modules {
                if module.kind.ends_with(".Pooling") {
                    pooling_folder = PathBuf::from(module.path);
                } else if module.kind.ends_with(".Normalize") {
                    normalize = true;
                }
            }
        }
        let pooling_path = dir.join(pooling_folder).join("config.json");
        let mode = match read_optional(&pooling_path)? {
            Some(text) => Self::parse_mode(&pooling_path, &text)?,
            None => PoolingMode::Mean,
        };
        Ok(Self { mode, normalize })
    }

    /// Parses a sentence-transformers `1_Pooling/config.json`; exactly one mode must be set.
    pub fn parse_mode(path: &Path, text: &str) -> Result<PoolingMode> {
        let object = json_object(path, text)?;
        let fields = Fields {
            path,
            object: &object,
        };
        if fields.opt_bool("pooling_mode_weightedmean_tokens")? == Some(true) {
            return Err(fields.error(
                "pooling_mode_weightedmean_tokens",
                "weighted-mean pooling is not supported",
            ));
        }
        let modes = [
            ("pooling_mode_cls_token", PoolingMode::Cls),
            ("pooling_mode_mean_tokens", PoolingMode::Mean),
            ("pooling_mode_max_tokens", PoolingMode::Max),
            ("pooling_mode_mean_sqrt_len_tokens", PoolingMode::MeanSqrtLen),
            ("pooling_mode_lasttoken", PoolingMode::LastToken),
        ];
        let mut chosen = Vec::new();
        for (field, mode) in modes {
            if fields.opt_bool(field)? == Some(true) {
                chosen.push((field, mode));
            }
        }
        match chosen.as_slice() {
            [(_, mode)] => Ok(*mode),
            [] => Err(Error::Config {
                path: path.to_path_buf(),
                message: "no pooling_mode_* field is true".to_string(),
            }),
            // sentence-transformers would concatenate the poolings; no model here needs that.
            [(first, _), (second, _), ..] => Err(Error::Config {
                path: path.to_path_buf(),
                message: format!(
                    "several pooling modes are set ({first}, {second}); combining them is not supported"
                ),
            }),
        }
    }
}

/// One entry of sentence-transformers' `modules.json`.
#[derive(serde::Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// Reads `path`, giving `None` when it does not exist (optional files).
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Typed access to the fields of a JSON object, with errors naming the file and field.
pub(crate) struct Fields<'a> {
    pub(crate) path: &'a Path,
    pub(crate) object: &'a Map<String, Value>,
}

impl Fields<'_> {
    pub(crate) fn error(&self, field: &str, message: &str) -> Error {
        Error::ConfigField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    /// The field's value, treating JSON `null` like absence (exports write both).
    fn get(&self, field: &str) -> Option<&Value> {
        self.object.get(field).filter(|v| !v.is_null())
    }

    /// A required positive integer.
    fn size(&self, field: &str) -> Result<usize> {
        self.opt_size(field)?.ok_or_else(|| self.error(field, "missing"))
    }

    /// A layer count: positive and plausible. Tensor lists are built per layer, so an absurd
    /// count must be refused before anything is allocated for it.
    fn layers(&self, field: &str) -> Result<usize> {
        const MAX_LAYERS: usize = 1024;
        let n = self.size(field)?;
        if n > MAX_LAYERS {
            return Err(self.error(
                field,
                &format!("{n} layers is implausible (at most {MAX_LAYERS})"),
            ));
        }
        Ok(n)
    }

    /// An optional positive integer.
    pub(crate) fn opt_size(&self, field: &str) -> Result<Option<usize>> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        let n = value
            .as_u64()
            .ok_or_else(|| self.error(field, &format!("expected a positive integer, got {value}")))?;
        let n = usize::try_from(n).map_err(|_| self.error(field, "too large"))?;
        if n == 0 {
            return Err(self.error(field, "must be positive, got 0"));
        }
        Ok(Some(n))
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        value
            .as_f64()
            .map(Some)
            .ok_or_else(|| self.error(field, &format!("expected a number, got {value}")))
    }

    /// A normalisation epsilon: positive and finite, `default` when absent.
    fn epsilon(&self, field: &str, default: f64) -> Result<f64> {
        let eps = self.opt_f64(field)?.unwrap_or(default);
        if eps.is_finite() && eps > 0.0 {
            Ok(eps)
        } else {
            Err(self.error(field, &format!("must be a small positive number, got {eps}")))
        }
    }

    pub(crate) fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        value
            .as_bool()
            .map(Some)
            .ok_or_else(|| self.error(field, &format!("expected true or false, got {value}")))
    }

    pub(crate) fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        value
            .as_str()
            .map(Some)
            .ok_or_else(|| self.error(field, &format!("expected a string, got {value}")))
    }

    fn activation(&self, field: &str, default: &str) -> Result<Activation> {
        match self.opt_str(field)?.unwrap_or(default) {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(self.error(field, &format!("unsupported activation `{other}`"))),
        }
    }

    /// Checks that `part` (named `part_field`) divides `whole` (named `whole_field`).
    fn divides(&self, part_field: &str, part: usize, whole_field: &str, whole: usize) -> Result<()> {
        if whole.is_multiple_of(part) {
            Ok(())
        } else {
            Err(self.error(
                part_field,
                &format!("{part} does not divide {whole_field} ({whole})"),
            ))
        }
    }

    /// A token id or list of token ids (`eos_token_id` may be either); empty when absent.
    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let to_id = |value: &Value| {
            value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.error(field, &format!("expected a token id, got {value}")))
        };
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(to_id).collect(),
            Some(value) => Ok(vec![to_id(value)?]),
        }
    }

    /// `id2label` as a list indexed by class id. JSON object keys are strings, so the keys are
    /// parsed as integers and must cover `0..n` exactly (a gap would leave a class unnamed).
    fn id2label(&self) -> Result<Vec<String>> {
        let Some(value) = self.get("id2label") else {
            return Ok(Vec::new());
        };
        let Value::Object(map) = value else {
            return Err(self.error("id2label", "expected an object of \"id\": \"label\""));
        };
        let mut labels: Vec<Option<String>> = vec![None; map.len()];
        for (key, label) in map {
            let id: usize = key
                .trim()
                .parse()
                .map_err(|_| self.error("id2label", &format!("key `{key}` is not an integer class id")))?;
            let label = label
                .as_str()
                .ok_or_else(|| self.error("id2label", &format!("label of class {id} is not a string")))?;
            let slot = labels.get_mut(id).ok_or_else(|| {
                self.error(
                    "id2label",
                    &format!("class id {id} is out of range for {} labels", map.len()),
                )
            })?;
            if slot.is_some() {
                return Err(self.error("id2label", &format!("class id {id} appears twice")));
            }
            *slot = Some(label.to_string());
        }
        // Every slot is filled: n distinct ids in 0..n cover the range.
        Ok(labels.into_iter().flatten().collect())
    }

    /// The number of classes of a head: `num_labels` when given (and consistent with
    /// `id2label`), else the size of `id2label`, else 2 (the transformers default).
    fn num_labels(&self, id2label: &[String]) -> Result<usize> {
        match self.opt_size("num_labels")? {
            Some(n) if !id2label.is_empty() && n != id2label.len() => Err(self.error(
                "num_labels",
                &format!("{n} disagrees with id2label's {} labels", id2label.len()),
            )),
            Some(n) => Ok(n),
            None if !id2label.is_empty() => Ok(id2label.len()),
            None => Ok(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::parse(Path::new("/models/m/config.json"), text)
    }

    const BERT: &str = r#"{
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
        "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
        "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "position_embedding_type": "absolute", "pad_token_id": 0
    }"#;

    /// BERT's JSON with `patch` applied on top (fields set, or removed when `null`).
    fn bert_with(patch: &str) -> String {
        let mut base: Map<String, Value> = serde_json::from_str(BERT).unwrap();
        let patch: Map<String, Value> = serde_json::from_str(patch).unwrap();
        for (k, v) in patch {
            if v.is_null() {
                base.remove(&k);
            } else {
                base.insert(k, v);
            }
        }
        serde_json::to_string(&base).unwrap()
    }

    fn field_error(result: Result<ModelConfig>) -> (String, String) {
        match result {
            Err(e @ Error::ConfigField { .. }) => {
                let text = e.to_string();
                let Error::ConfigField { field, path, .. } = e else {
                    unreachable!()
                };
                assert_eq!(path, Path::new("/models/m/config.json"));
                assert!(text.contains("/models/m/config.json"), "{text}");
                (field, text)
            }
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn bert_model() {
        let ModelConfig::Bert(c) = parse(BERT).unwrap() else {
            panic!("not bert")
        };
        assert_eq!(c.hidden_size, 384);
        assert_eq!(c.num_hidden_layers, 6);
        assert_eq!(c.num_attention_heads, 12);
        assert_eq!(c.head_dim(), 32);
        assert_eq!(c.intermediate_size, 1536);
        assert_eq!(c.hidden_act, Activation::Gelu);
        assert_eq!(c.max_position_embeddings, 512);
        assert_eq!(c.type_vocab_size, 2);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.head, BertHead::None);
        assert!(c.id2label.is_empty());
        let tensors = c.expected_tensors("");
        assert_eq!(tensors.len(), 5 + 6 * 16);
        assert!(tensors.contains(&("encoder.layer.5.output.dense.weight".to_string(), vec![384, 1536])));
    }

    #[test]
    fn bert_from_model_type_only() {
        let config = parse(&bert_with(r#"{"architectures": null}"#)).unwrap();
        assert!(matches!(
            config,
            ModelConfig::Bert(BertConfig {
                head: BertHead::None,
                ..
            })
        ));
    }

    #[test]
    fn bert_defaults() {
        let text = bert_with(r#"{"hidden_act": null, "type_vocab_size": null, "layer_norm_eps": null}"#);
        let ModelConfig::Bert(c) = parse(&text).unwrap() else {
            panic!("not bert")
        };
        assert_eq!(c.hidden_act, Activation::Gelu);
        assert_eq!(c.type_vocab_size, 2);
        assert_eq!(c.layer_norm_eps, 1e-12);
    }

    #[test]
    fn bert_sequence_classification_labels() {
        let text = bert_with(
            r#"{"architectures": ["BertForSequenceClassification"],
                "id2label": {"1": "positive", "0": "negative"}}"#,
        );
        let ModelConfig::Bert(c) = parse(&text).unwrap() else {
            panic!("not bert")
        };
        assert_eq!(c.head, BertHead::SequenceClassification { num_labels: 2 });
        assert_eq!(c.id2label, vec!["negative", "positive"]);
        let tensors = c.expected_tensors("bert.");
        assert!(tensors.contains(&("classifier.weight".to_string(), vec![2, 384])));
        assert!(tensors.contains(&("bert.pooler.dense.weight".to_string(), vec![384, 384])));
        assert!(tensors.contains(&(
            "bert.embeddings.word_embeddings.weight".to_string(),
            vec![30522, 384]
        )));
    }

    #[test]
    fn bert_token_classification_without_names() {
        let text = bert_with(r#"{"architectures": ["BertForTokenClassification"], "num_labels": 3}"#);
        let ModelConfig::Bert(c) = parse(&text).unwrap() else {
            panic!("not bert")
        };
        assert_eq!(c.head, BertHead::TokenClassification { num_labels: 3 });
        assert_eq!(c.id2label, vec!["LABEL_0", "LABEL_1", "LABEL_2"]);
    }

    #[test]
    fn gpt2() {
        let text = r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": null,
            "n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
            "eos_token_id": 50256}"#;
        let ModelConfig::Gpt2(c) = parse(text).unwrap() else {
            panic!("not gpt2")
        };
        assert_eq!(c.n_inner, 3072);
        assert_eq!(c.activation_function, Activation::GeluTanh);
        assert_eq!(c.eos_token_ids, vec![50256]);
        assert_eq!(c.layer_norm_epsilon, 1e-5);
        let tensors = c.expected_tensors("transformer.");
        assert_eq!(tensors.len(), 4 + 12 * 12);
        assert!(tensors.contains(&("transformer.h.11.mlp.c_fc.weight".to_string(), vec![768, 3072])));
        assert_eq!(ModelConfig::Gpt2(c).max_positions(), 1024);
    }

    const LLAMA: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "hidden_act": "silu", "rope_scaling": null,
        "eos_token_id": 2}"#;

    #[test]
    fn llama() {
        let ModelConfig::Llama(c) = parse(LLAMA).unwrap() else {
            panic!("not llama")
        };
        assert_eq!(c.family, LlamaFamily::Llama);
        assert_eq!(c.num_key_value_heads, 3);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope_theta, 100_000.0);
        assert!(c.tie_word_embeddings);
        assert!(!c.attention_bias);
        assert_eq!(c.hidden_act, Activation::Silu);
        assert_eq!(c.sliding_window, None);
        let tensors = c.expected_tensors("model.");
        // Tied embeddings: no lm_head.
        assert_eq!(tensors.len(), 2 + 30 * 9);
        assert!(tensors.contains(&(
            "model.layers.29.self_attn.k_proj.weight".to_string(),
            vec![192, 576]
        )));
    }

    #[test]
    fn llama_defaults() {
        let text = r#"{"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "max_position_embeddings": 4096}"#;
        let ModelConfig::Llama(c) = parse(text).unwrap() else {
            panic!("not llama")
        };
        assert_eq!(c.num_key_value_heads, 32);
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.hidden_act, Activation::Silu);
        assert!(c.eos_token_ids.is_empty());
    }

    #[test]
    fn rope_parameters_of_transformers_5() {
        let base = r#"{"model_type": "qwen2", "vocab_size": 400, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 64, "#;
        let text =
            format!(r#"{base} "rope_parameters": {{"rope_theta": 1000000.0, "rope_type": "default"}}}}"#);
        let ModelConfig::Llama(c) = parse(&text).unwrap() else {
            panic!("not llama")
        };
        assert_eq!(c.rope_theta, 1_000_000.0);
        let text =
            format!(r#"{base} "rope_parameters": {{"rope_theta": 1e6, "rope_type": "yarn", "factor": 4}}}}"#);
        assert!(parse(&text).is_err());
    }

    #[test]
    fn qwen2_has_attention_bias() {
        let text = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": true, "sliding_window": 32768, "use_sliding_window": false,
            "eos_token_id": [151645, 151643]}"#;
        let ModelConfig::Llama(c) = parse(text).unwrap() else {
            panic!("not llama")
        };
        assert_eq!(c.family, LlamaFamily::Qwen2);
        assert!(c.attention_bias);
        assert_eq!(c.sliding_window, None);
        assert_eq!(c.eos_token_ids, vec![151645, 151643]);
        let tensors = c.expected_tensors("model.");
        assert_eq!(tensors.len(), 2 + 24 * 12);
        assert!(tensors.contains(&("model.layers.0.self_attn.k_proj.bias".to_string(), vec![128])));
        assert!(!tensors.iter().any(|(n, _)| n.ends_with("o_proj.bias")));
    }

    #[test]
    fn mistral_sliding_window_and_explicit_bias() {
        let text = r#"{"architectures": ["MistralForCausalLM"], "vocab_size": 32000,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096,
            "max_position_embeddings": 32768, "attention_bias": false}"#;
        let ModelConfig::Llama(c) = parse(text).unwrap() else {
            panic!("not llama")
        };
        assert_eq!(c.family, LlamaFamily::Mistral);
        assert_eq!(c.sliding_window, Some(4096));
        assert!(!c.attention_bias);
    }

    #[test]
    fn not_json() {
        let err = parse("{ not json").unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("/models/m/config.json: not valid JSON")
        );
        let err = parse("[1, 2]").unwrap_err();
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
    }

    #[test]
    fn unsupported_architecture() {
        let err = parse(&bert_with(r#"{"architectures": ["BertForMaskedLM"]}"#)).unwrap_err();
        assert!(
            matches!(&err, Error::UnsupportedArchitecture { name, .. } if name == "BertForMaskedLM"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "/models/m/config.json: unsupported architecture `BertForMaskedLM`"
        );
        let err = parse(r#"{"model_type": "t5"}"#).unwrap_err();
        assert!(matches!(&err, Error::UnsupportedArchitecture { name, .. } if name == "t5"));
    }

    #[test]
    fn no_architecture_at_all() {
        let (field, _) = field_error(parse(r#"{"hidden_size": 8}"#));
        assert_eq!(field, "architectures");
        let (field, _) = field_error(parse(r#"{"architectures": "BertModel"}"#));
        assert_eq!(field, "architectures");
        let (field, _) = field_error(parse(r#"{"model_type": 3}"#));
        assert_eq!(field, "model_type");
    }

    #[test]
    fn missing_required_fields_are_named() {
        for name in [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ] {
            let (field, text) = field_error(parse(&bert_with(&format!(r#"{{"{name}": null}}"#))));
            assert_eq!(field, name);
            assert!(text.ends_with("missing"), "{text}");
        }
    }

    #[test]
    fn sizes_must_be_positive_integers() {
        for (patch, name) in [
            (r#"{"hidden_size": 0}"#, "hidden_size"),
            (r#"{"num_hidden_layers": -1}"#, "num_hidden_layers"),
            (r#"{"vocab_size": 3.5}"#, "vocab_size"),
            (r#"{"intermediate_size": "big"}"#, "intermediate_size"),
            (r#"{"type_vocab_size": 0}"#, "type_vocab_size"),
            (r#"{"num_hidden_layers": 1000000000000}"#, "num_hidden_layers"),
        ] {
            let (field, _) = field_error(parse(&bert_with(patch)));
            assert_eq!(field, name, "{patch}");
        }
    }

    #[test]
    fn heads_must_divide_hidden() {
        let (field, text) = field_error(parse(&bert_with(r#"{"num_attention_heads": 7}"#)));
        assert_eq!(field, "num_attention_heads");
        assert!(text.contains("7 does not divide hidden_size (384)"), "{text}");
        let gpt2 = r#"{"model_type": "gpt2", "vocab_size": 10, "n_embd": 10, "n_layer": 1,
            "n_head": 3, "n_positions": 8}"#;
        assert_eq!(field_error(parse(gpt2)).0, "n_head");
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let text = LLAMA.replace(r#""num_key_value_heads": 3"#, r#""num_key_value_heads": 4"#);
        let (field, text) = field_error(parse(&text));
        assert_eq!(field, "num_key_value_heads");
        assert!(text.contains("does not divide num_attention_heads (9)"), "{text}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (bert_with(r#"{"hidden_act": "mish"}"#), "hidden_act"),
            (bert_with(r#"{"layer_norm_eps": 0}"#), "layer_norm_eps"),
            (bert_with(r#"{"layer_norm_eps": "small"}"#), "layer_norm_eps"),
            (
                bert_with(r#"{"position_embedding_type": "relative_key"}"#),
                "position_embedding_type",
            ),
            (bert_with(r#"{"id2label": ["a"]}"#), "id2label"),
            (bert_with(r#"{"id2label": {"zero": "a"}}"#), "id2label"),
            (bert_with(r#"{"id2label": {"0": "a", "2": "b"}}"#), "id2label"),
            (bert_with(r#"{"id2label": {"0": 5}}"#), "id2label"),
            (
                bert_with(
                    r#"{"architectures": ["BertForSequenceClassification"], "num_labels": 3,
                        "id2label": {"0": "a", "1": "b"}}"#,
                ),
                "num_labels",
            ),
            (
                LLAMA.replace(r#""rope_theta": 100000.0"#, r#""rope_theta": -1"#),
                "rope_theta",
            ),
            (
                LLAMA.replace(
                    r#""rope_scaling": null"#,
                    r#""rope_scaling": {"type": "linear", "factor": 2}"#,
                ),
                "rope_scaling",
            ),
            (
                LLAMA.replace(r#""tie_word_embeddings": true"#, r#""tie_word_embeddings": 1"#),
                "tie_word_embeddings",
            ),
            (
                LLAMA.replace(r#""eos_token_id": 2"#, r#""eos_token_id": "</s>""#),
                "eos_token_id",
            ),
            (
                LLAMA.replace(r#""hidden_size": 576"#, r#""head_dim": 63, "hidden_size": 576"#),
                "head_dim",
            ),
        ];
        for (text, name) in cases {
            let (field, _) = field_error(parse(&text));
            assert_eq!(field, name, "{text}");
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("atomic-worker-config-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn pooling_defaults_to_mean_without_files() {
        let dir = temp_dir("pool-none");
        assert_eq!(
            PoolingConfig::load_dir(&dir).unwrap(),
            PoolingConfig {
                mode: PoolingMode::Mean,
                normalize: false
            }
        );
    }

    #[test]
    fn pooling_from_modules_and_config() {
        let dir = temp_dir("pool-st");
        std::fs::write(
            dir.join("modules.json"),
            r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]"#,
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("pool")).unwrap();
        std::fs::write(
            dir.join("pool/config.json"),
            r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true,
                "pooling_mode_mean_tokens": false}"#,
        )
        .unwrap();
        assert_eq!(
            PoolingConfig::load_dir(&dir).unwrap(),
            PoolingConfig {
                mode: PoolingMode::Cls,
                normalize: true
            }
        );
    }

    #[test]
    fn pooling_errors_name_the_file() {
        let path = Path::new("/m/1_Pooling/config.json");
        let err = PoolingConfig::parse_mode(path, "{}").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/m/1_Pooling/config.json: no pooling_mode")
        );
        let err = PoolingConfig::parse_mode(
            path,
            r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("several pooling modes"), "{err}");
        let err = PoolingConfig::parse_mode(path, r#"{"pooling_mode_mean_tokens": "yes"}"#).unwrap_err();
        assert!(matches!(&err, Error::ConfigField { field, .. } if field == "pooling_mode_mean_tokens"));
        let err =
            PoolingConfig::parse_mode(path, r#"{"pooling_mode_weightedmean_tokens": true}"#).unwrap_err();
        assert!(err.to_string().contains("weighted-mean"), "{err}");
        assert!(PoolingConfig::parse_mode(path, "nope").is_err());

        let dir = temp_dir("pool-bad-modules");
        std::fs::write(dir.join("modules.json"), r#"{"not": "a list"}"#).unwrap();
        let err = PoolingConfig::load_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("modules.json"), "{err}");
    }

    #[test]
    fn missing_config_file_is_named() {
        let err = ModelConfig::load(Path::new("/nonexistent/dir/config.json")).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }));
        assert_eq!(err.to_string(), "/nonexistent/dir/config.json: file not found");
    }
}
