//! Corrupted model files give errors, never panics: random truncations and byte flips of real
//! config.json, tokenizer.json and tokenizer_config.json files (from the fixtures), and of whole
//! model folders opened through `ModelDir`. Safetensors corruption is covered in `weights.rs`.

use std::path::{Path, PathBuf};

use atomic_worker::ModelDir;
use atomic_worker::config::ModelConfig;
use atomic_worker::tokenizer::{Tokenizer, TokenizerConfig};
use proptest::prelude::*;

mod common;
use common::fixture;

/// The first `keep` (a fraction, 1.0 or more keeps all) of `bytes`, with bytes flipped.
fn corrupt(bytes: &[u8], keep: f64, flips: &[(usize, u8)]) -> Vec<u8> {
    let cut = ((bytes.len() as f64) * keep) as usize;
    let mut out = bytes[..cut.min(bytes.len())].to_vec();
    for (at, x) in flips {
        if !out.is_empty() {
            let i = at % out.len();
            out[i] ^= x | 1;
        }
    }
    out
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("atomic-corrupt-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn corrupted_configs_are_errors_not_panics(
        model in prop::sample::select(vec!["tiny-bert-seqcls", "tiny-gpt2", "tiny-llama", "tiny-qwen2"]),
        keep in 0.0f64..1.3,
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        let path = fixture(model).join("config.json");
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&corrupt(&bytes, keep, &flips)).into_owned();
        let _ = ModelConfig::parse(&path, &text);
        let _ = TokenizerConfig::parse(&path, &text);
    }

    #[test]
    fn corrupted_tokenizers_are_errors_not_panics(
        model in prop::sample::select(vec!["tiny-bert", "tiny-llama"]),
        keep in 0.0f64..1.3,
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        let bytes = std::fs::read(fixture(model).join("tokenizer.json")).unwrap();
        let dir = scratch(model);
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, corrupt(&bytes, keep, &flips)).unwrap();
        if let Ok(tokenizer) = Tokenizer::load(&path, None, Some(64)) {
            // A tokenizer that still loads must still encode without panicking.
            let _ = tokenizer.encode("My kettle (order A-1234) broke. 产品质量很差");
        }
    }
}

fn open_error(dir: &Path, what: &str) -> String {
    match ModelDir::open(dir) {
        Ok(_) => panic!("{what}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_folder_with_a_corrupted_file_names_that_file() {
    let dir = scratch("folder");
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture("tiny-bert").join(file), dir.join(file)).unwrap();
    }
    std::fs::write(
        dir.join("config.json"),
        b"{\"architectures\": [\"BertModel\"], \"hidden_size\": ",
    )
    .unwrap();
    let err = open_error(&dir, "a truncated config.json is an error");
    assert!(err.contains("config.json"), "{err}");

    std::fs::copy(fixture("tiny-bert").join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{\"model\": 42}").unwrap();
    let err = open_error(&dir, "a broken tokenizer.json is an error");
    assert!(err.contains("tokenizer.json"), "{err}");

    std::fs::copy(
        fixture("tiny-bert").join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let weights = std::fs::read(fixture("tiny-bert").join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let err = open_error(&dir, "truncated weights are an error");
    assert!(err.contains("model.safetensors"), "{err}");
}
