//! Loading the real all-MiniLM-L6-v2 folder (fetched by `scripts/fetch-models.sh`). Each test
//! skips with a message on stderr when the model is absent, so the suite passes without it.

use std::io::Write;

use atomic_worker::ModelDir;
use atomic_worker::config::{BertHead, ModelConfig, PoolingMode};

mod common;
use common::minilm;

fn open(test: &str) -> Option<ModelDir> {
    let path = minilm(test)?;
    Some(ModelDir::open(&path).unwrap())
}

#[test]
fn opens_with_the_expected_config_and_tensors() {
    let Some(model) = open("opens_with_the_expected_config_and_tensors") else {
        return;
    };
    let ModelConfig::Bert(bert) = &model.config else {
        panic!("expected a BERT config, got {:?}", model.config)
    };
    assert_eq!(bert.hidden_size, 384);
    assert_eq!(bert.num_hidden_layers, 6);
    assert_eq!(bert.num_attention_heads, 12);
    assert_eq!(bert.intermediate_size, 1536);
    assert_eq!(bert.vocab_size, 30522);
    assert_eq!(bert.head, BertHead::None);
    assert_eq!(model.pooling.mode, PoolingMode::Mean);
    assert!(model.pooling.normalize);
    assert!(!model.tokenizer.pads(), "the file's padding must be disabled");

    let prefix = model.tensor_prefix.as_str();
    assert!(prefix.is_empty() || prefix == "bert.", "prefix {prefix:?}");
    let w = &model.weights;
    let expected = bert.expected_tensors(prefix);
    for (name, shape) in &expected {
        assert_eq!(w.shape(name), Some(shape.as_slice()), "{name}");
    }
    let word = format!("{prefix}embeddings.word_embeddings.weight");
    assert_eq!(w.shape(&word), Some(&[30522, 384][..]));
    let query = format!("{prefix}encoder.layer.0.attention.self.query.weight");
    assert_eq!(w.shape(&query), Some(&[384, 384][..]));
    let gamma = w
        .get(&format!("{prefix}embeddings.LayerNorm.weight"), &[384])
        .unwrap();
    assert!(gamma.iter().all(|v| v.is_finite()));

    let mut dtypes: Vec<String> = w
        .names()
        .iter()
        .map(|n| format!("{:?}", w.dtype(n).unwrap()))
        .collect();
    dtypes.sort();
    dtypes.dedup();
    let extra: Vec<&str> = w
        .names()
        .into_iter()
        .filter(|n| !expected.iter().any(|(e, _)| e == n))
        .collect();
    let _ = writeln!(
        std::io::stderr(),
        "all-MiniLM-L6-v2: {} tensors, prefix {prefix:?}, dtypes {dtypes:?}, not used by BertModel: {extra:?}; \
         max_position_embeddings {}, tokenizer_config model_max_length {:?}, sentence max_seq_length {:?}, \
         tokenizer max_length {:?}",
        w.names().len(),
        bert.max_position_embeddings,
        model.tokenizer.config().model_max_length,
        model.sentence_max_seq_length,
        model.max_length(),
    );
}

#[test]
fn hello_world_ids() {
    let Some(model) = open("hello_world_ids") else {
        return;
    };
    let t = &model.tokenizer;
    let e = t.encode("Hello world").unwrap();
    assert_eq!(e.ids, vec![101, 7592, 2088, 102]);
    assert_eq!(e.type_ids, vec![0; 4]);
    assert_eq!(e.special_tokens_mask, vec![true, false, false, true]);
    assert_eq!(e.offsets, vec![(0, 0), (0, 5), (6, 11), (0, 0)]);
    assert_eq!(t.token_to_id("[CLS]"), Some(101));
    assert_eq!(t.token_to_id("[SEP]"), Some(102));
    assert_eq!(t.decode(&e.ids, true).unwrap(), "hello world");
    assert_eq!(t.decode(&e.ids, false).unwrap(), "[CLS] hello world [SEP]");

    // Unpadded batch: each input keeps its own length.
    let batch = t.encode_batch(&["Hello world", "Hi"]).unwrap();
    assert_eq!(batch[0], e);
    assert_eq!(batch[1].ids.len(), 3);
}

#[test]
fn long_input_is_truncated_to_the_model_limit() {
    let Some(model) = open("long_input_is_truncated_to_the_model_limit") else {
        return;
    };
    let text = vec!["word"; 1000].join(" ");
    let e = model.tokenizer.encode(&text).unwrap();
    let limit = model.max_length().unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "all-MiniLM-L6-v2: 1,000 words encode to {} tokens (limit {limit})",
        e.ids.len()
    );
    // sentence_bert_config.json says 256, below config.json's 512 positions and
    // tokenizer_config.json's 512.
    assert_eq!(limit, 256);
    assert_eq!(e.ids.len(), 256);
    assert_eq!(e.ids.first(), Some(&101));
    assert_eq!(e.ids.last(), Some(&102));
}

#[test]
fn offsets_map_back_to_the_input() {
    let Some(model) = open("offsets_map_back_to_the_input") else {
        return;
    };
    let cases: [(&str, &[&str]); 3] = [
        (
            "Hello, Wörld! unaffable",
            &["Hello", ",", "Wörld", "!", "una", "ffa", "ble"],
        ),
        // BERT splits CJK characters one per token; each is three bytes in UTF-8.
        ("我爱北京天安门", &["我", "爱", "北", "京", "天", "安", "门"]),
        ("Rust 和 中文 mixed", &["Rust", "和", "中", "文", "mixed"]),
    ];
    for (text, expected) in cases {
        let e = model.tokenizer.encode(text).unwrap();
        let mut pieces = Vec::new();
        for (i, &(start, end)) in e.offsets.iter().enumerate() {
            if e.special_tokens_mask[i] {
                continue;
            }
            let piece = text.get(start..end).unwrap_or_else(|| {
                panic!("{text:?}: token {i} has offsets {start}..{end} off char boundaries")
            });
            pieces.push(piece);
        }
        let _ = writeln!(std::io::stderr(), "{text:?} -> {pieces:?}");
        assert_eq!(pieces, expected, "{text:?}");
    }
}
