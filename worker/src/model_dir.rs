//! A model folder on disk, opened as one unit: `config.json`, `tokenizer.json` (with
//! `tokenizer_config.json`), the sentence-transformers pooling files and the safetensors weights.
//!
//! Opening checks what can be checked before any request arrives, so that a bad deployment fails
//! at start-up with a message naming the file: required files exist, the configuration is valid,
//! and every tensor the configuration implies is present with the right shape.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{ModelConfig, PoolingConfig, read_optional};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{Error, Result};

/// A loaded model folder.
#[derive(Debug)]
pub struct ModelDir {
    /// The folder.
    pub path: PathBuf,
    /// The model configuration from `config.json`.
    pub config: ModelConfig,
    /// The tokenizer, unpadded and truncated to [`ModelDir::max_length`].
    pub tokenizer: Tokenizer,
    /// The sentence-embedding pooling (mean when the folder has no pooling files).
    pub pooling: PoolingConfig,
    /// The memory-mapped weights.
    pub weights: Weights,
    /// The prefix in front of the backbone's tensor names (`""` or `"bert."` for BERT,
    /// `""` or `"transformer."` for GPT-2, `"model."` for the Llama family).
    pub tensor_prefix: String,
    /// sentence-transformers' `max_seq_length` from `sentence_bert_config.json`, if present.
    pub sentence_max_seq_length: Option<usize>,
}

impl ModelDir {
    /// Opens and validates the model folder at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
            });
        }
        let config = ModelConfig::load(&path.join("config.json"))?;
        let sentence_max_seq_length = sentence_max_seq_length(&path.join("sentence_bert_config.json"))?;

        // Inputs may not exceed the learned positions, nor what sentence-transformers truncates
        // to: embeddings must match the reference pipeline, which never sees longer inputs.
        let limit = match sentence_max_seq_length {
            Some(n) => n.min(config.max_positions()),
            None => config.max_positions(),
        };
        let tokenizer = Tokenizer::load(
            &path.join("tokenizer.json"),
            Some(&path.join("tokenizer_config.json")),
            Some(limit),
        )?;
        let pooling = PoolingConfig::load_dir(path)?;
        let weights = open_weights(path)?;
        let tensor_prefix = tensor_prefix(&config, &weights)?;
        let expected = match &config {
            ModelConfig::Bert(c) => c.expected_tensors(&tensor_prefix),
            ModelConfig::Gpt2(c) => c.expected_tensors(&tensor_prefix),
            ModelConfig::Llama(c) => c.expected_tensors(&tensor_prefix),
        };
        check_tensors(&expected, &weights)?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            tokenizer,
            pooling,
            weights,
            tensor_prefix,
            sentence_max_seq_length,
        })
    }

    /// The longest input in tokens (special tokens included) the tokenizer lets through.
    pub fn max_length(&self) -> Option<usize> {
        self.tokenizer.max_length()
    }
}

/// `model.safetensors`, else the shard index `model.safetensors.index.json`.
fn open_weights(dir: &Path) -> Result<Weights> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Weights::open(&single);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        return Weights::open(&index);
    }
    Err(Error::MissingFile { path: single })
}

fn sentence_max_seq_length(path: &Path) -> Result<Option<usize>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })?;
    match value.get("max_seq_length") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(Error::ConfigField {
                path: path.to_path_buf(),
                field: "max_seq_length".to_string(),
                message: format!("expected a positive integer, got {v}"),
            }),
        },
    }
}

/// Finds which of the usual prefixes the checkpoint's backbone tensors carry, by probing for the
/// token embedding. Checkpoints saved from a model with a head prefix the backbone (`bert.`,
/// `transformer.`); bare backbones do not.
fn tensor_prefix(config: &ModelConfig, weights: &Weights) -> Result<String> {
    let (probe, candidates): (&str, &[&str]) = match config {
        ModelConfig::Bert(_) => ("embeddings.word_embeddings.weight", &["", "bert."]),
        ModelConfig::Gpt2(_) => ("wte.weight", &["", "transformer."]),
        ModelConfig::Llama(_) => ("embed_tokens.weight", &["model.", ""]),
    };
    candidates
        .iter()
        .find(|prefix| weights.has(&format!("{prefix}{probe}")))
        .map(|prefix| prefix.to_string())
        .ok_or_else(|| Error::MissingTensor {
            path: weights.path().to_path_buf(),
            name: format!("{}{probe}", candidates[0]),
        })
}

/// Checks that every expected tensor is present with its shape: a checkpoint that does not match
/// its configuration is refused at start-up rather than on the first request.
fn check_tensors(expected: &[(String, Vec<usize>)], weights: &Weights) -> Result<()> {
    for (name, shape) in expected {
        let found = weights.shape(name).ok_or_else(|| Error::MissingTensor {
            path: weights.path().to_path_buf(),
            name: name.clone(),
        })?;
        if found != shape.as_slice() {
            return Err(Error::TensorShape {
                path: weights.path().to_path_buf(),
                name: name.clone(),
                expected: shape.clone(),
                found: found.to_vec(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BertConfig, BertHead, PoolingMode};
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("atomic-worker-modeldir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const CONFIG: &str = r#"{"architectures": ["BertModel"], "vocab_size": 6, "hidden_size": 4,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
        "max_position_embeddings": 16, "type_vocab_size": 2}"#;

    const TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3},
                  "unk_token": "[UNK]"}}"#;

    /// Writes a complete tiny BERT folder whose tensors carry `prefix`, leaving out `skip`.
    fn tiny_bert(name: &str, prefix: &str, skip: Option<&str>) -> PathBuf {
        let dir = temp_dir(name);
        std::fs::write(dir.join("config.json"), CONFIG).unwrap();
        std::fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
        let ModelConfig::Bert(bert) = ModelConfig::parse(Path::new("config.json"), CONFIG).unwrap() else {
            panic!("not bert")
        };
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = bert
            .expected_tensors(prefix)
            .into_iter()
            .filter(|(n, _)| Some(n.as_str()) != skip)
            .map(|(n, shape)| {
                let bytes = vec![0u8; shape.iter().product::<usize>() * 4];
                (n, shape, bytes)
            })
            .collect();
        let views = tensors.iter().map(|(n, shape, bytes)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        });
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        dir
    }

    #[test]
    fn opens_a_tiny_bert_with_either_prefix() {
        for prefix in ["", "bert."] {
            let dir = tiny_bert(&format!("ok{prefix}"), prefix, None);
            let m = ModelDir::open(&dir).unwrap();
            assert_eq!(m.tensor_prefix, prefix);
            assert!(matches!(
                m.config,
                ModelConfig::Bert(BertConfig {
                    head: BertHead::None,
                    ..
                })
            ));
            assert_eq!(m.pooling.mode, PoolingMode::Mean);
            assert_eq!(m.max_length(), Some(16));
            assert_eq!(m.sentence_max_seq_length, None);
            assert!(!m.tokenizer.pads());
        }
    }

    #[test]
    fn sentence_max_seq_length_limits_the_tokenizer() {
        let dir = tiny_bert("st", "", None);
        std::fs::write(
            dir.join("sentence_bert_config.json"),
            r#"{"max_seq_length": 8, "do_lower_case": false}"#,
        )
        .unwrap();
        let m = ModelDir::open(&dir).unwrap();
        assert_eq!(m.sentence_max_seq_length, Some(8));
        assert_eq!(m.max_length(), Some(8));
        std::fs::write(
            dir.join("sentence_bert_config.json"),
            r#"{"max_seq_length": "x"}"#,
        )
        .unwrap();
        let err = ModelDir::open(&dir).unwrap_err();
        assert!(err.to_string().contains("sentence_bert_config.json"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let err = ModelDir::open(Path::new("/nonexistent/model")).unwrap_err();
        assert_eq!(err.to_string(), "/nonexistent/model: file not found");
        for file in ["config.json", "tokenizer.json", "model.safetensors"] {
            let dir = tiny_bert(&format!("missing-{file}"), "", None);
            std::fs::remove_file(dir.join(file)).unwrap();
            let err = ModelDir::open(&dir).unwrap_err();
            assert!(
                matches!(&err, Error::MissingFile { path } if path == &dir.join(file)),
                "{err:?}"
            );
        }
    }

    #[test]
    fn missing_or_misshapen_tensor_is_named() {
        let dir = tiny_bert("skip", "", Some("encoder.layer.0.output.dense.weight"));
        let err = ModelDir::open(&dir).unwrap_err();
        assert!(
            matches!(&err, Error::MissingTensor { name, .. } if name == "encoder.layer.0.output.dense.weight"),
            "{err:?}"
        );
        assert!(err.to_string().contains("model.safetensors"), "{err}");

        let dir = tiny_bert("shape", "", None);
        std::fs::write(
            dir.join("config.json"),
            CONFIG.replace(r#""intermediate_size": 8"#, r#""intermediate_size": 6"#),
        )
        .unwrap();
        let err = ModelDir::open(&dir).unwrap_err();
        assert!(matches!(&err, Error::TensorShape { .. }), "{err:?}");

        let dir = tiny_bert("noembed", "", Some("embeddings.word_embeddings.weight"));
        let err = ModelDir::open(&dir).unwrap_err();
        assert!(
            matches!(&err, Error::MissingTensor { name, .. } if name == "embeddings.word_embeddings.weight"),
            "{err:?}"
        );
    }
}
