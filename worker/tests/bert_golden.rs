//! BERT against PyTorch: the tiny random models in `fixtures/` (hidden states, both heads) and the
//! real all-MiniLM-L6-v2 against sentence-transformers' embeddings. References come from
//! `fixtures/generate.py`; the tolerances are stated per test. Each check is written once over
//! the backend and runs on the CPU, and with the `cuda` feature on the GPU too (fp32 on both, so
//! the same tolerances hold).

use std::path::Path;

use atomic_worker::ModelDir;
use atomic_worker::backend::{Backend, CpuBackend};
use atomic_worker::config::{ModelConfig, PoolingConfig, PoolingMode};
use atomic_worker::models::bert::{Batch, Bert};
use serde_json::Value;

mod common;
use common::{fixture, floats, max_abs_diff, minilm, reference};

fn load<B: Backend>(folder: &Path, backend: &B) -> (ModelDir, Bert<B>) {
    let dir = ModelDir::open(folder).unwrap();
    let ModelConfig::Bert(config) = &dir.config else {
        panic!("not BERT")
    };
    let model = Bert::load(backend, config, &dir.weights, &dir.tensor_prefix).unwrap();
    (dir, model)
}

fn cpu() -> CpuBackend {
    CpuBackend::new(2).unwrap()
}

/// Runs a check on the CPU and, in `cuda` builds, on the GPU (or says why it skips).
macro_rules! on_every_backend {
    ($cpu_test:ident, $gpu_test:ident, $check:ident) => {
        #[test]
        fn $cpu_test() {
            $check(&cpu());
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $gpu_test() {
            if let Some(gpu) = common::gpu(stringify!($gpu_test)) {
                $check(&gpu);
            }
        }
    };
}

on_every_backend!(
    tiny_bert_hidden_states_match_pytorch_batched_and_alone,
    gpu_tiny_bert_hidden_states_match_pytorch_batched_and_alone,
    tiny_bert_hidden_states
);
on_every_backend!(
    tiny_bert_sequence_classification_logits_match_pytorch,
    gpu_tiny_bert_sequence_classification_logits_match_pytorch,
    tiny_bert_sequence_logits
);
on_every_backend!(
    tiny_bert_token_classification_logits_match_pytorch,
    gpu_tiny_bert_token_classification_logits_match_pytorch,
    tiny_bert_token_logits
);
on_every_backend!(
    a_sequence_longer_than_the_positions_is_an_error_not_a_panic,
    gpu_a_sequence_longer_than_the_positions_is_an_error_not_a_panic,
    too_long_is_an_error
);
on_every_backend!(
    minilm_embeddings_match_sentence_transformers,
    gpu_minilm_embeddings_match_sentence_transformers,
    minilm_embeddings
);

on_every_backend!(
    tiny_bert_pools_every_mode_over_pytorch_states,
    gpu_tiny_bert_pools_every_mode_over_pytorch_states,
    tiny_bert_pooling
);

fn texts(r: &Value) -> Vec<String> {
    r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

fn batch_of(dir: &ModelDir, texts: &[String]) -> (Batch, Vec<Vec<u32>>) {
    let encodings: Vec<_> = texts.iter().map(|t| dir.tokenizer.encode(t).unwrap()).collect();
    let ids = encodings.iter().map(|e| e.ids.clone()).collect();
    (Batch::new(&encodings), ids)
}

fn tiny_bert_hidden_states<B: Backend>(backend: &B) {
    let folder = fixture("tiny-bert");
    let r = reference(&folder);
    let (dir, model) = load(&folder, backend);
    let texts = texts(&r);
    let (batch, ids) = batch_of(&dir, &texts);
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    assert_eq!(
        ids, want_ids,
        "tokenizer parity with the Python tokenizers library"
    );

    let h = model.config().hidden_size;
    let hidden = model.hidden_states(backend, &batch).unwrap();
    for (b, want) in r["last_hidden_state"].as_array().unwrap().iter().enumerate() {
        let n = batch.len_of(b);
        let got = &hidden[b * batch.seq * h..(b * batch.seq + n) * h];
        // f32 against PyTorch f32: differences come from summation order only.
        let diff = max_abs_diff(got, &floats(want));
        assert!(diff < 1e-4, "sequence {b}: max |diff| {diff}");

        // The same sequence alone gives the same rows as inside the padded batch.
        let (single, _) = batch_of(&dir, &texts[b..=b]);
        let alone = model.hidden_states(backend, &single).unwrap();
        let diff = max_abs_diff(&alone, got);
        assert!(diff < 1e-5, "sequence {b}: batched vs alone {diff}");
    }
}

/// Every pooling mode of `Bert::embed`, normalised or not, against the same pooling written
/// out here over PyTorch's hidden states of each sequence's real tokens.
fn tiny_bert_pooling<B: Backend>(backend: &B) {
    let folder = fixture("tiny-bert");
    let r = reference(&folder);
    let (dir, model) = load(&folder, backend);
    let (batch, _) = batch_of(&dir, &texts(&r));
    let h = model.config().hidden_size;
    let states: Vec<Vec<f32>> = r["last_hidden_state"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let modes = [
        PoolingMode::Cls,
        PoolingMode::Mean,
        PoolingMode::Max,
        PoolingMode::MeanSqrtLen,
        PoolingMode::LastToken,
    ];
    for mode in modes {
        for normalize in [false, true] {
            let got = model
                .embed(backend, &batch, &PoolingConfig { mode, normalize })
                .unwrap();
            assert_eq!(got.len(), batch.batch);
            for (b, rows) in states.iter().enumerate() {
                let n = rows.len() / h;
                let column = |c: usize| (0..n).map(move |t| rows[t * h + c]);
                let mut want: Vec<f32> = (0..h)
                    .map(|c| match mode {
                        PoolingMode::Cls => rows[c],
                        PoolingMode::LastToken => rows[(n - 1) * h + c],
                        PoolingMode::Max => column(c).fold(f32::NEG_INFINITY, f32::max),
                        PoolingMode::Mean => column(c).sum::<f32>() / n as f32,
                        PoolingMode::MeanSqrtLen => column(c).sum::<f32>() / (n as f32).sqrt(),
                    })
                    .collect();
                if normalize {
                    let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
                    want.iter_mut().for_each(|v| *v /= norm);
                }
                let diff = max_abs_diff(&got[b], &want);
                assert!(
                    diff < 1e-4,
                    "{mode:?} normalize {normalize}, sequence {b} of {n} tokens: max |diff| {diff}"
                );
            }
        }
    }
}

fn tiny_bert_sequence_logits<B: Backend>(backend: &B) {
    let folder = fixture("tiny-bert-seqcls");
    let r = reference(&folder);
    let (dir, model) = load(&folder, backend);
    let (batch, _) = batch_of(&dir, &texts(&r));
    let logits = model.sequence_logits(backend, &batch).unwrap();
    let got: Vec<f32> = logits.into_iter().flatten().collect();
    let diff = max_abs_diff(&got, &floats(&r["logits"]));
    assert!(diff < 1e-4, "max |diff| {diff}");
    assert_eq!(
        model.config().id2label,
        ["product-quality", "service-attitude", "billing"]
    );
}

fn tiny_bert_token_logits<B: Backend>(backend: &B) {
    let folder = fixture("tiny-bert-tokcls");
    let r = reference(&folder);
    let (dir, model) = load(&folder, backend);
    let (batch, _) = batch_of(&dir, &texts(&r));
    let logits = model.token_logits(backend, &batch).unwrap();
    for (b, want) in r["logits"].as_array().unwrap().iter().enumerate() {
        let got: Vec<f32> = logits[b].iter().flatten().copied().collect();
        let diff = max_abs_diff(&got, &floats(want));
        assert!(diff < 1e-4, "sequence {b}: max |diff| {diff}");
    }
}

fn too_long_is_an_error<B: Backend>(backend: &B) {
    let (dir, model) = load(&fixture("tiny-bert"), backend);
    let mut e = dir.tokenizer.encode("refund").unwrap();
    e.ids = vec![5; 65];
    e.type_ids = vec![0; 65];
    let err = model.hidden_states(backend, &Batch::new(&[e])).unwrap_err();
    assert!(err.to_string().contains("64 positions"), "{err}");
}

/// The lowest cosine between all-MiniLM-L6-v2's embeddings on `backend` and
/// sentence-transformers' over the reference sentences, and the sentence it is for.
fn minilm_lowest_cosine<B: Backend>(folder: &Path, backend: &B) -> (f32, String) {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm-reference.json")).unwrap()).unwrap();
    let (dir, model) = load(folder, backend);
    assert_eq!(
        dir.max_length(),
        Some(r["max_seq_length"].as_u64().unwrap() as usize)
    );
    let sentences: Vec<String> = r["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let (batch, _) = batch_of(&dir, &sentences);
    assert_eq!(
        batch.seq, 256,
        "the over-long sentence is truncated to the model's limit"
    );
    let embeddings = model.embed(backend, &batch, &dir.pooling).unwrap();
    let mut lowest = (f32::MAX, String::new());
    for (i, want) in r["embeddings"].as_array().unwrap().iter().enumerate() {
        let want = floats(want);
        let got = &embeddings[i];
        let cosine: f32 = got.iter().zip(&want).map(|(a, b)| a * b).sum::<f32>()
            / (got.iter().map(|a| a * a).sum::<f32>().sqrt()
                * want.iter().map(|b| b * b).sum::<f32>().sqrt());
        if cosine < lowest.0 {
            lowest = (cosine, sentences[i].clone());
        }
    }
    lowest
}

fn minilm_embeddings<B: Backend>(backend: &B) {
    let Some(folder) = minilm("minilm_embeddings_match_sentence_transformers") else {
        return;
    };
    let (lowest, sentence) = minilm_lowest_cosine(&folder, backend);
    assert!(lowest > 0.9999, "sentence {sentence:?}: cosine {lowest}");
    println!(
        "all-MiniLM-L6-v2 on {}: lowest cosine to sentence-transformers: {lowest}",
        backend.name()
    );
}

/// Half precision on the GPU: the tiny BERT's hidden states against PyTorch fp32 within a few
/// roundings' worth relative to their largest value, and MiniLM's embeddings against
/// sentence-transformers by cosine (fp16: 2^-11 per stored value, bf16: 2^-8).
#[cfg(feature = "cuda")]
#[test]
fn gpu_half_precision_bert_tracks_pytorch() {
    use atomic_worker::backend::Precision;
    for (p, bound, min_cosine) in [(Precision::F16, 5e-3, 0.9999), (Precision::Bf16, 4e-2, 0.999)] {
        let Some(gpu) = common::gpu_in("gpu_half_precision_bert_tracks_pytorch", p) else {
            return;
        };
        let folder = fixture("tiny-bert");
        let r = reference(&folder);
        let (dir, model) = load(&folder, &gpu);
        let (batch, _) = batch_of(&dir, &texts(&r));
        let h = model.config().hidden_size;
        let hidden = model.hidden_states(&gpu, &batch).unwrap();
        for (b, want) in r["last_hidden_state"].as_array().unwrap().iter().enumerate() {
            let n = batch.len_of(b);
            let got = &hidden[b * batch.seq * h..(b * batch.seq + n) * h];
            let err = common::max_rel_diff(got, &floats(want));
            assert!(err < bound, "tiny-bert ({p}) sequence {b}: relative error {err}");
        }
        if let Some(folder) = minilm("gpu_half_precision_bert_tracks_pytorch") {
            let (lowest, sentence) = minilm_lowest_cosine(&folder, &gpu);
            eprintln!("all-MiniLM-L6-v2 ({p}): lowest cosine {lowest}");
            assert!(
                lowest > min_cosine,
                "all-MiniLM-L6-v2 ({p}): sentence {sentence:?}: cosine {lowest}"
            );
        }
    }
}

/// An encoder batch run a second time takes every buffer from the backend's buffer cache and
/// gives the same hidden states bit for bit: a reused buffer's old contents never leak into a
/// result. The first run is the warm-up the worker does at load. The third run, with a
/// different padding mask of the same length, overwrites the upload cache's buffer and asks
/// the driver for nothing either.
#[cfg(feature = "cuda")]
#[test]
fn gpu_a_repeated_encoder_batch_reuses_every_buffer() {
    use atomic_worker::backend::Precision;
    for p in [Precision::F32, Precision::Bf16] {
        let Some(gpu) = common::gpu_in("gpu_a_repeated_encoder_batch_reuses_every_buffer", p) else {
            return;
        };
        let folder = fixture("tiny-bert");
        let r = reference(&folder);
        let (dir, model) = load(&folder, &gpu);
        let (batch, _) = batch_of(&dir, &texts(&r));
        let first = model.hidden_states(&gpu, &batch).unwrap();
        let before = gpu.buffer_stats();
        let second = model.hidden_states(&gpu, &batch).unwrap();
        let after = gpu.buffer_stats();
        assert_eq!(
            after.missed, before.missed,
            "tiny-bert ({p}): the second pass asked the driver for memory"
        );
        assert!(
            after.reused > before.reused,
            "tiny-bert ({p}): the second pass reused nothing"
        );
        assert_eq!(
            first, second,
            "tiny-bert ({p}): hidden states of the repeated batch"
        );
        // The same shape with its sequences in the other order: another padding mask.
        let mut reversed = texts(&r);
        reversed.reverse();
        let (other_batch, _) = batch_of(&dir, &reversed);
        let other = model.hidden_states(&gpu, &other_batch).unwrap();
        assert_eq!(
            gpu.buffer_stats().missed,
            after.missed,
            "tiny-bert ({p}): a batch of the same shape with another mask asked the driver for memory"
        );
        // Each sequence's states are the first batch's, moved: a stale mask would change the
        // padded sequences'.
        let per_sequence = first.len() / batch.batch;
        let moved: Vec<f32> = first.chunks(per_sequence).rev().flatten().copied().collect();
        let tolerance = if p == Precision::F32 { 1e-4 } else { 2e-2 };
        let worst = moved
            .iter()
            .zip(&other)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= tolerance,
            "tiny-bert ({p}): the batch in reverse order differs by {worst} from the first, reversed"
        );
    }
}
