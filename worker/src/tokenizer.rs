//! The model's tokenizer: wraps a `tokenizers::Tokenizer` loaded from `tokenizer.json`, with the
//! extra facts `tokenizer_config.json` adds (maximum length, special tokens, chat template).
//!
//! Padding stored in `tokenizer.json` is switched off: the batching scheduler pads itself, with
//! an attention mask, and a file that pads every input to a fixed length (all-MiniLM-L6-v2 pads
//! to 128) would otherwise change mean-pooled embeddings and waste compute. Truncation is set to
//! the model's real limit, replacing whatever length the file was exported with.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::{PostProcessor, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::config::{Fields, json_object, read_optional};
use crate::{Error, Result};

/// A loaded tokenizer, ready to encode text for one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    max_length: Option<usize>,
    config: TokenizerConfig,
    /// Whether tokens are byte-level BPE (GPT-2, Qwen2, Llama 3): each character of a token
    /// stands for one byte.
    byte_level: bool,
}

/// The byte a character of a byte-level BPE token stands for (GPT-2's table): the printable
/// bytes `!`..`~`, `¡`..`¬` and `®`..`ÿ` are their own character; the other 68 bytes, in order,
/// were moved to U+0100 onwards. `None` for a character outside the table.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    let moved = (0u32..256)
        .filter(|&b| !printable(b))
        .nth((code - 256) as usize)?;
    u8::try_from(moved).ok()
}

/// What `tokenizer_config.json` says beyond `tokenizer.json` (all optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    /// The longest input the tokenizer was configured for, when it states a real limit.
    pub model_max_length: Option<usize>,
    /// Beginning-of-sequence token text.
    pub bos_token: Option<String>,
    /// End-of-sequence token text.
    pub eos_token: Option<String>,
    /// Unknown-token text.
    pub unk_token: Option<String>,
    /// Separator token text (BERT's `[SEP]`).
    pub sep_token: Option<String>,
    /// Padding token text.
    pub pad_token: Option<String>,
    /// Classification token text (BERT's `[CLS]`).
    pub cls_token: Option<String>,
    /// Mask token text.
    pub mask_token: Option<String>,
    /// The Jinja chat template, stored unrendered (the default one when the file lists several).
    pub chat_template: Option<String>,
}

/// One encoded input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// Token ids, special tokens included.
    pub ids: Vec<u32>,
    /// Token type (segment) ids, one per token.
    pub type_ids: Vec<u32>,
    /// For each token, the byte range of the input it came from (`(0, 0)` for special tokens).
    pub offsets: Vec<(usize, usize)>,
    /// For each token, whether it is a special token added by the post-processor.
    pub special_tokens_mask: Vec<bool>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`, plus `tokenizer_config.json` when given, and limits inputs to the
    /// smallest of the limits known: `model_limit` (from the model, e.g. its position count) and
    /// the config's `model_max_length`. With no limit known, the file's own truncation is kept.
    pub fn load(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        model_limit: Option<usize>,
    ) -> Result<Self> {
        let config = match tokenizer_config {
            Some(path) => TokenizerConfig::load(path)?,
            None => TokenizerConfig::default(),
        };
        let error = |message: String| Error::Tokenizer {
            path: tokenizer_json.to_path_buf(),
            message,
        };
        // Read the bytes ourselves so that a missing file is reported as such, not as a parse
        // failure inside the tokenizers crate.
        let bytes = std::fs::read(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(error("file is empty".to_string()));
        }
        // Syntax first, with serde_json's precise message; then the tokenizers crate, whose
        // deserialisers panic on some malformed inputs (a truncated decoder section, for one):
        // a bad file must fail the load, not the process.
        let json = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| error(format!("not valid JSON: {e}")))?;
        let byte_level = json
            .get("decoder")
            .is_some_and(|d| d.to_string().contains("\"ByteLevel\""));
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|_| error("the tokenizers library could not read this file".to_string()))?;
        let mut inner = parsed.map_err(|e| error(format!("not a valid tokenizer.json: {e}")))?;
        inner.with_padding(None);

        let max_length = [model_limit, config.model_max_length].into_iter().flatten().min();
        if let Some(max_length) = max_length {
            // The tokenizers crate subtracts the special tokens from the limit without checking,
            // so a limit that leaves no room for text must be refused here.
            let special = inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
            if max_length <= special {
                return Err(error(format!(
                    "a limit of {max_length} tokens leaves no room next to {special} special tokens"
                )));
            }
            inner
                .with_truncation(Some(TruncationParams {
                    max_length,
                    strategy: TruncationStrategy::LongestFirst,
                    stride: 0,
                    direction: TruncationDirection::Right,
                }))
                .map_err(|e| error(format!("cannot truncate to {max_length} tokens: {e}")))?;
        }
        let max_length = inner.get_truncation().map(|t| t.max_length);
        Ok(Self {
            inner,
            path: tokenizer_json.to_path_buf(),
            max_length,
            config,
            byte_level,
        })
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The length (in tokens, special tokens included) inputs are truncated to, if any.
    pub fn max_length(&self) -> Option<usize> {
        self.max_length
    }

    /// Whether the tokenizer pads its output (never, after [`Tokenizer::load`]).
    pub fn pads(&self) -> bool {
        self.inner.get_padding().is_some()
    }

    /// The extra settings from `tokenizer_config.json`.
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// The number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes one text, adding the model's special tokens and truncating to the maximum length.
    pub fn encode(&self, text: &str) -> Result<Encoding> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| self.error(format!("encoding failed: {e}")))?;
        Ok(convert(&encoding))
    }

    /// Encodes one text for generation: the ids (with the model's special tokens when
    /// `add_special_tokens`) and whether the text was longer than the maximum length (the ids
    /// are then cut there).
    pub fn encode_ids(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, bool)> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(format!("encoding failed: {e}")))?;
        Ok((
            encoding.get_ids().to_vec(),
            !encoding.get_overflowing().is_empty(),
        ))
    }

    /// Encodes several texts (in parallel where the tokenizers crate does so), unpadded.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Encoding>> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| self.error(format!("encoding failed: {e}")))?;
        Ok(encodings.iter().map(convert).collect())
    }

    /// Turns ids back into text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("decoding failed: {e}")))
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token text of an id, if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes token `id` stands for (what OpenAI's log-probabilities report as `bytes`):
    /// a token that is part of a UTF-8 character has bytes even though it has no text of its own.
    /// Byte-level tokens map back character by character, byte-fallback tokens (`<0xE2>`) are
    /// their byte, SentencePiece's `▁` is a space; anything else is its text's UTF-8.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.inner.id_to_token(id)?;
        if let Some(byte) = token
            .strip_prefix("<0x")
            .and_then(|t| t.strip_suffix('>'))
            .filter(|hex| hex.len() == 2)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            return Some(vec![byte]);
        }
        if self.byte_level
            && let Some(bytes) = token.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>()
        {
            return Some(bytes);
        }
        Some(token.replace('\u{2581}', " ").into_bytes())
    }

    fn error(&self, message: String) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message,
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("max_length", &self.max_length)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn convert(encoding: &tokenizers::Encoding) -> Encoding {
    Encoding {
        ids: encoding.get_ids().to_vec(),
        type_ids: encoding.get_type_ids().to_vec(),
        offsets: encoding.get_offsets().to_vec(),
        special_tokens_mask: encoding
            .get_special_tokens_mask()
            .iter()
            .map(|&m| m != 0)
            .collect(),
    }
}

/// transformers writes `int(1e30)` as `model_max_length` to mean "no limit"; anything this large
/// is not a real limit.
const NO_LIMIT: u64 = 1 << 40;

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; an absent file gives the default (nothing known).
    pub fn load(path: &Path) -> Result<Self> {
        match read_optional(path)? {
            Some(text) => Self::parse(path, &text),
            None => Ok(Self::default()),
        }
    }

    /// Parses the text of a `tokenizer_config.json`; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let object = json_object(path, text)?;
        let fields = Fields {
            path,
            object: &object,
        };
        let model_max_length = match object.get("model_max_length") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_f64() {
                Some(n) if n >= NO_LIMIT as f64 => None,
                _ => fields.opt_size("model_max_length")?,
            },
        };
        // Special tokens are either plain strings or AddedToken objects with a `content` field.
        let token = |field: &str| -> Result<Option<String>> {
            match object.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(fields.error(field, "token object has no string `content`")),
                },
                Some(other) => Err(fields.error(field, &format!("expected a token, got {other}"))),
            }
        };
        // The template is a string, or a list of named templates of which "default" is used.
        let chat_template = match object.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => items
                .iter()
                .find(|item| item.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|item| item.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            Some(_) => {
                return Err(fields.error("chat_template", "expected a string or a list"));
            }
        };
        Ok(Self {
            model_max_length,
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            unk_token: token("unk_token")?,
            sep_token: token("sep_token")?,
            pad_token: token("pad_token")?,
            cls_token: token("cls_token")?,
            mask_token: token("mask_token")?,
            chat_template,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("atomic-worker-tokenizer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tiny word-level tokenizer with padding switched on in the file, like MiniLM's.
    const TINY: &str = r#"{
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3},
                  "unk_token": "[UNK]"}
    }"#;

    #[test]
    fn padding_is_disabled_and_truncation_follows_the_limit() {
        let dir = temp_dir("tiny");
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, TINY).unwrap();
        let t = Tokenizer::load(&path, None, Some(4)).unwrap();
        assert!(!t.pads());
        assert_eq!(t.max_length(), Some(4));
        let e = t.encode("hello world").unwrap();
        assert_eq!(e.ids, vec![2, 3]);
        assert_eq!(e.offsets, vec![(0, 5), (6, 11)]);
        let e = t.encode("hello hello world world world").unwrap();
        assert_eq!(e.ids.len(), 4);
        assert_eq!(t.token_to_id("world"), Some(3));
        assert_eq!(t.decode(&[2, 3], true).unwrap(), "hello world");

        // Without any limit the file's own truncation stays.
        let t = Tokenizer::load(&path, None, None).unwrap();
        assert_eq!(t.max_length(), Some(3));
        let batch = t.encode_batch(&["hello", "world hello"]).unwrap();
        assert_eq!(batch[0].ids, vec![2]);
        assert_eq!(batch[1].ids, vec![3, 2]);
    }

    #[test]
    fn config_limit_wins_when_smaller() {
        let dir = temp_dir("cfg");
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, TINY).unwrap();
        let config = dir.join("tokenizer_config.json");
        std::fs::write(
            &config,
            r#"{"model_max_length": 2, "eos_token": {"content": "</s>", "lstrip": false},
                "pad_token": "[PAD]", "chat_template": "{{ messages }}"}"#,
        )
        .unwrap();
        let t = Tokenizer::load(&path, Some(&config), Some(512)).unwrap();
        assert_eq!(t.max_length(), Some(2));
        assert_eq!(t.config().eos_token.as_deref(), Some("</s>"));
        assert_eq!(t.config().pad_token.as_deref(), Some("[PAD]"));
        assert_eq!(t.config().chat_template.as_deref(), Some("{{ messages }}"));
        // An absent tokenizer_config.json is fine.
        let t = Tokenizer::load(&path, Some(&dir.join("absent.json")), Some(5)).unwrap();
        assert_eq!(t.max_length(), Some(5));
    }

    #[test]
    fn tokenizer_config_forms() {
        let path = Path::new("/m/tokenizer_config.json");
        let c =
            TokenizerConfig::parse(path, r#"{"model_max_length": 1000000000000000019884624838656}"#).unwrap();
        assert_eq!(c.model_max_length, None);
        let c = TokenizerConfig::parse(
            path,
            r#"{"chat_template": [{"name": "tool_use", "template": "t"},
                                  {"name": "default", "template": "d"}]}"#,
        )
        .unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("d"));
        let err = TokenizerConfig::parse(path, r#"{"eos_token": 5}"#).unwrap_err();
        assert!(matches!(&err, Error::ConfigField { field, .. } if field == "eos_token"));
        let err = TokenizerConfig::parse(path, r#"{"model_max_length": -3}"#).unwrap_err();
        assert!(matches!(&err, Error::ConfigField { field, .. } if field == "model_max_length"));
        let err = TokenizerConfig::parse(path, "nope").unwrap_err();
        assert!(err.to_string().starts_with("/m/tokenizer_config.json"), "{err}");
    }

    #[test]
    fn malformed_and_empty_and_missing_files() {
        let dir = temp_dir("bad");
        let path = dir.join("tokenizer.json");

        std::fs::write(&path, "{ \"model\": ").unwrap();
        let err = Tokenizer::load(&path, None, None).unwrap_err();
        assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");

        std::fs::write(&path, r#"{"model": {"type": "Nonsense"}}"#).unwrap();
        let err = Tokenizer::load(&path, None, None).unwrap_err();
        assert!(err.to_string().contains("not a valid tokenizer.json"), "{err}");

        std::fs::write(&path, "").unwrap();
        let err = Tokenizer::load(&path, None, None).unwrap_err();
        assert_eq!(err.to_string(), format!("{}: file is empty", path.display()));

        let absent = dir.join("absent.json");
        let err = Tokenizer::load(&absent, None, None).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err:?}");
    }

    #[test]
    fn byte_level_characters_map_back_to_their_bytes() {
        // GPT-2's table: printable bytes are themselves, the rest start at U+0100 in byte order.
        assert_eq!(byte_level_byte('A'), Some(b'A'));
        assert_eq!(byte_level_byte('\u{0100}'), Some(0)); // the first moved byte
        assert_eq!(byte_level_byte('\u{0120}'), Some(b' ')); // "Ġ", the space
        assert_eq!(byte_level_byte('\u{010A}'), Some(b'\n')); // "Ċ", the newline
        assert_eq!(byte_level_byte('\u{0143}'), Some(0xAD)); // the last moved byte
        assert_eq!(byte_level_byte('\u{0144}'), None);
        assert_eq!(byte_level_byte('\u{00AD}'), None, "0xAD is moved, not itself");
        // Every byte has exactly one character.
        let mapped: std::collections::BTreeSet<u8> = (0u32..0x144)
            .filter_map(char::from_u32)
            .filter_map(byte_level_byte)
            .collect();
        assert_eq!(mapped.len(), 256);
    }

    #[test]
    fn token_bytes_of_a_byte_level_tokenizer_spell_the_text() {
        // The committed tiny GPT-2 tokenizer: the tokens' bytes concatenate to the UTF-8 of the
        // decoded text, also for characters split across tokens.
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-gpt2");
        let t = Tokenizer::load(&folder.join("tokenizer.json"), None, None).unwrap();
        let text = " kettle 〓 café\nrefund";
        let ids = t.encode(text).unwrap().ids;
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| t.token_bytes(id).unwrap()).collect();
        assert_eq!(bytes, t.decode(&ids, false).unwrap().into_bytes());
        assert_eq!(t.token_bytes(u32::MAX), None);
    }

    #[test]
    fn token_bytes_of_byte_fallback_and_sentencepiece_tokens() {
        let dir = temp_dir("fallback");
        let file = dir.join("tokenizer.json");
        let json = TINY
            .replace(r#""hello": 2, "world": 3"#, r#""<0xE2>": 2, "\u2581world": 3"#)
            .replace(
                r#""padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},"#,
                r#""padding": null,"#,
            );
        std::fs::write(&file, json).unwrap();
        let t = Tokenizer::load(&file, None, None).unwrap();
        assert_eq!(t.token_bytes(2), Some(vec![0xE2]));
        assert_eq!(t.token_bytes(3), Some(b" world".to_vec()));
        assert_eq!(t.token_bytes(1), Some(b"[UNK]".to_vec()));
    }
}
