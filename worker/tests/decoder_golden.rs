//! GPT-2, Llama, Qwen2 and Mistral (sliding window) decoders against PyTorch: the tiny random models in `fixtures/`
//! (tokenizer ids, logits of every prompt position, last-token logits, 12 greedy tokens from
//! `generate`). References come from `fixtures/generate.py`. The check is written once over the
//! backend and runs on the CPU, and with the `cuda` feature on the GPU too (fp32 on both, so the
//! same tolerances hold).

use atomic_worker::ModelDir;
use atomic_worker::backend::{Backend, CpuBackend};
use atomic_worker::config::ModelConfig;
use atomic_worker::models::decoder::CausalLm;
use atomic_worker::models::gpt2::Gpt2;
use atomic_worker::models::kv_cache::{KvCache, KvPool};
use atomic_worker::models::llama::Llama;
use atomic_worker::sampling::{FinishReason, SamplingParams, argmax, generate};
use serde_json::Value;

mod common;
use common::{fixture, floats, max_abs_diff, reference};

const GREEDY_TOKENS: usize = 12;

type Model<B> = Box<dyn CausalLm<B>>;

fn load<B: Backend + 'static>(name: &str, backend: &B) -> (ModelDir, Model<B>, Value) {
    let folder = fixture(name);
    let dir = ModelDir::open(&folder).unwrap();
    let model: Model<B> = match &dir.config {
        ModelConfig::Gpt2(c) => Box::new(Gpt2::load(backend, c, &dir.weights, &dir.tensor_prefix).unwrap()),
        ModelConfig::Llama(c) => Box::new(Llama::load(backend, c, &dir.weights, &dir.tensor_prefix).unwrap()),
        ModelConfig::Bert(_) => panic!("not a decoder"),
    };
    (dir, model, reference(&folder))
}

fn greedy<B: Backend>(model: &Model<B>, backend: &B, pool: &mut KvPool<B>, prompt: &[u32]) -> Vec<u32> {
    let mut cache = pool.new_cache();
    let mut logits = model.prefill(backend, pool, &mut cache, prompt).unwrap();
    let mut out = Vec::new();
    for _ in 0..GREEDY_TOKENS {
        let id = argmax(&logits);
        out.push(id);
        logits = model.decode_step(backend, pool, &mut cache, id).unwrap();
    }
    out
}

fn check<B: Backend + 'static>(name: &str, backend: &B) {
    let (dir, model, r) = load(name, backend);
    let prompts: Vec<String> = serde_json::from_value(r["prompts"].clone()).unwrap();
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let want_greedy: Vec<Vec<u32>> = serde_json::from_value(r["greedy_ids"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| dir.tokenizer.encode(p).unwrap().ids)
        .collect();
    assert_eq!(ids, want_ids, "{name}: tokenizer parity");

    // Every position of the first prompt, in one causal pass.
    let all = model.forward_all(backend, &ids[0]).unwrap();
    let diff = max_abs_diff(&all, &floats(&r["logits"]));
    eprintln!("{name}: forward_all max |diff| {diff:e}");
    assert!(diff < 1e-4, "{name}: forward_all max |diff| {diff}");

    // One pool for the rest, with room for a few whole contexts.
    let pool = &mut model.new_pool(backend, 4 * model.max_positions()).unwrap();
    for (b, prompt) in ids.iter().enumerate() {
        let mut cache = pool.new_cache();
        let last = model.prefill(backend, pool, &mut cache, prompt).unwrap();
        assert_eq!(cache.len(), prompt.len());
        let diff = max_abs_diff(&last, &floats(&r["last_logits"][b]));
        eprintln!("{name}: prompt {b} prefill max |diff| {diff:e}");
        assert!(diff < 1e-4, "{name}: prompt {b} last logits max |diff| {diff}");
        assert_eq!(
            greedy(&model, backend, pool, prompt),
            want_greedy[b],
            "{name}: prompt {b} greedy"
        );
    }

    // Both prompts decoded together (different lengths) give what each gives alone.
    let mut caches: Vec<KvCache> = ids.iter().map(|_| pool.new_cache()).collect();
    let mut next: Vec<u32> = ids
        .iter()
        .zip(&mut caches)
        .map(|(p, c)| argmax(&model.prefill(backend, pool, c, p).unwrap()))
        .collect();
    let mut batched = vec![Vec::new(); ids.len()];
    for _ in 0..GREEDY_TOKENS {
        for (out, &id) in batched.iter_mut().zip(&next) {
            out.push(id);
        }
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let logits = model.decode_batch(backend, pool, &mut refs, &next).unwrap();
        next = logits.iter().map(|l| argmax(l)).collect();
    }
    assert_eq!(batched, want_greedy, "{name}: batched decode");
    drop(caches);

    // One step mixing a prompt's prefill with another sequence's decode token (a sequence
    // joining a running batch) matches each alone.
    let mut running = pool.new_cache();
    let first = argmax(&model.prefill(backend, pool, &mut running, &ids[0]).unwrap());
    let mut joining = pool.new_cache();
    let mut refs = vec![&mut running, &mut joining];
    let logits = model
        .step(backend, pool, &mut refs, &[&[first], &ids[1]])
        .unwrap();
    assert_eq!(
        argmax(&logits[0]),
        want_greedy[0][1],
        "{name}: mixed step, running sequence"
    );
    let diff = max_abs_diff(&logits[1], &floats(&r["last_logits"][1]));
    assert!(
        diff < 1e-4,
        "{name}: mixed step, joining prompt max |diff| {diff}"
    );
    drop((running, joining));

    // Greedy selection on the backend picks what the host picks from the same step's logits.
    let mut a = pool.new_cache();
    let mut b = pool.new_cache();
    let ids_greedy = model
        .step_greedy(backend, pool, &mut [&mut a, &mut b], &[&ids[0], &ids[1]])
        .unwrap();
    assert_eq!(
        ids_greedy,
        vec![want_greedy[0][0], want_greedy[1][0]],
        "{name}: step_greedy"
    );
    drop((a, b));
    assert_eq!(
        pool.free_positions(),
        pool.capacity_positions(),
        "{name}: every block returned"
    );

    // generate() with greedy params reproduces the reference continuation.
    let mut params = SamplingParams::greedy(GREEDY_TOKENS);
    let g = generate(backend, model.as_ref(), &dir.tokenizer, &ids[0], &params).unwrap();
    if want_greedy[0].iter().any(|id| model.eos_token_ids().contains(id)) {
        assert_eq!(g.finish_reason, FinishReason::Stop);
    } else {
        assert_eq!(g.ids, want_greedy[0], "{name}: generate");
        assert_eq!(g.finish_reason, FinishReason::Length);
        assert_eq!(g.text, dir.tokenizer.decode(&g.ids, true).unwrap());
        // Sampling is reproducible from its seed.
        params.temperature = 0.8;
        params.seed = 17;
        let a = generate(backend, model.as_ref(), &dir.tokenizer, &ids[0], &params).unwrap();
        let b = generate(backend, model.as_ref(), &dir.tokenizer, &ids[0], &params).unwrap();
        assert_eq!(a, b);
    }

    // A prompt longer than the positions is an error, not a panic, and leaves the cache usable.
    let too_long = vec![ids[0][0]; model.max_positions() + 1];
    let mut cache = pool.new_cache();
    assert!(model.prefill(backend, pool, &mut cache, &too_long).is_err());
    assert!(model.forward_all(backend, &too_long).is_err());
    assert!(cache.is_empty());
    // Filling the context exactly works; one more token is an error.
    let full = vec![ids[0][0]; model.max_positions()];
    model.prefill(backend, pool, &mut cache, &full).unwrap();
    assert!(model.decode_step(backend, pool, &mut cache, ids[0][0]).is_err());
    drop(cache);

    // A full pool refuses the step that does not fit with an error that says so, and the
    // sequences already in it carry on unharmed.
    let small = &mut model.new_pool(backend, ids[0].len() + 1).unwrap();
    let room = small.capacity_positions();
    let mut first = small.new_cache();
    let mut logits = model.prefill(backend, small, &mut first, &ids[0]).unwrap();
    let mut other = small.new_cache();
    let crowd = vec![ids[1][0]; room - ids[0].len().next_multiple_of(16) + 1];
    let err = model.prefill(backend, small, &mut other, &crowd).unwrap_err();
    assert!(
        err.to_string().contains("key/value cache is full"),
        "{name}: {err}"
    );
    assert!(other.is_empty());
    let mut out = Vec::new();
    while first.len() < room.min(ids[0].len() + GREEDY_TOKENS) {
        let id = argmax(&logits);
        out.push(id);
        logits = model.decode_step(backend, small, &mut first, id).unwrap();
    }
    assert_eq!(
        out,
        want_greedy[0][..out.len()],
        "{name}: decode after a refused step"
    );
}

/// Runs the check of one fixture on the CPU and, in `cuda` builds, on the GPU (or says why it
/// skips).
macro_rules! on_every_backend {
    ($cpu_test:ident, $gpu_test:ident, $fixture:literal) => {
        #[test]
        fn $cpu_test() {
            check($fixture, &CpuBackend::new(1).unwrap());
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $gpu_test() {
            if let Some(gpu) = common::gpu(stringify!($gpu_test)) {
                check($fixture, &gpu);
            }
        }
    };
}

on_every_backend!(
    tiny_gpt2_matches_pytorch,
    gpu_tiny_gpt2_matches_pytorch,
    "tiny-gpt2"
);
on_every_backend!(
    tiny_llama_matches_pytorch,
    gpu_tiny_llama_matches_pytorch,
    "tiny-llama"
);
on_every_backend!(
    tiny_qwen2_matches_pytorch,
    gpu_tiny_qwen2_matches_pytorch,
    "tiny-qwen2"
);
// Mistral with a sliding window of 4 positions, shorter than both prompts and the continuation.
on_every_backend!(
    tiny_mistral_matches_pytorch,
    gpu_tiny_mistral_matches_pytorch,
    "tiny-mistral"
);

/// Half precision on the GPU against PyTorch's fp32 references: weights, activations and the
/// key/value pool stored in fp16/bf16, arithmetic in fp32. The logits of every prompt position
/// and of a paged prefill must stay within a few roundings' worth of the reference, relative to
/// its largest logit (two-layer models: each layer's stored activations add about one rounding,
/// 2^-11 for fp16 and 2^-8 for bf16).
#[cfg(feature = "cuda")]
#[test]
fn gpu_half_precision_decoders_track_pytorch() {
    use atomic_worker::backend::Precision;
    for (p, bound) in [(Precision::F16, 5e-3), (Precision::Bf16, 4e-2)] {
        let Some(gpu) = common::gpu_in("gpu_half_precision_decoders_track_pytorch", p) else {
            return;
        };
        for name in ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-mistral"] {
            let (_dir, model, r) = load(name, &gpu);
            let ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
            let all = model.forward_all(&gpu, &ids[0]).unwrap();
            let err = common::max_rel_diff(&all, &floats(&r["logits"]));
            eprintln!("{name} ({p}): forward_all relative error {err:e}");
            assert!(err < bound, "{name} ({p}): forward_all relative error {err}");
            let pool = &mut model.new_pool(&gpu, 2 * model.max_positions()).unwrap();
            for (b, prompt) in ids.iter().enumerate() {
                let mut cache = pool.new_cache();
                let last = model.prefill(&gpu, pool, &mut cache, prompt).unwrap();
                let err = common::max_rel_diff(&last, &floats(&r["last_logits"][b]));
                assert!(
                    err < bound,
                    "{name} ({p}): prompt {b} prefill relative error {err}"
                );
            }
        }
    }
}

/// Decode steps replayed from CUDA graphs choose the tokens plain steps choose: the same
/// kernels in the same order, so in every precision the tokens must be identical. Three
/// sequences decode together (greedy and cut draws mixed), then one leaves (a second batch
/// size, a second graph), over enough steps that later steps replay.
#[cfg(feature = "cuda")]
#[test]
fn gpu_decode_graphs_replay_the_plain_steps() {
    use atomic_worker::backend::Precision;
    use atomic_worker::sampling::TokenDraw;
    const STEPS: usize = 10;
    for p in [Precision::F32, Precision::Bf16] {
        let test = "gpu_decode_graphs_replay_the_plain_steps";
        let Some(plain) = common::gpu_in(test, p) else {
            return;
        };
        let Some(graphed) = common::gpu_in(test, p) else {
            return;
        };
        graphed.enable_decode_graphs(8);
        for name in ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-mistral"] {
            let run = |gpu: &atomic_worker::backend::CudaBackend| {
                let (_dir, model, r) = load(name, gpu);
                let ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
                let prompts = [&ids[0], &ids[1], &ids[0]];
                let pool = &mut model.new_pool(gpu, 3 * model.max_positions()).unwrap();
                let mut caches: Vec<KvCache> = (0..3).map(|_| pool.new_cache()).collect();
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let prompt_refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
                let mut next = model.step_greedy(gpu, pool, &mut refs, &prompt_refs).unwrap();
                let mut chosen = vec![next.clone()];
                let room = model.max_positions() - ids[0].len().max(ids[1].len());
                for step in 0..STEPS.min(room) {
                    let batch = if step < STEPS / 2 { 3 } else { 2 };
                    next.truncate(batch);
                    let draws: Vec<TokenDraw> = (0..batch)
                        .map(|s| match (s + step) % 3 {
                            0 => TokenDraw::GREEDY,
                            1 => TokenDraw::uncut(0.9, (step as f64 * 0.37 + s as f64 * 0.11) % 1.0),
                            _ => TokenDraw {
                                temperature: 1.1,
                                top_k: 20,
                                top_p: 0.9,
                                uniform: (step as f64 * 0.61 + 0.05) % 1.0,
                            },
                        })
                        .collect();
                    let mut refs: Vec<&mut KvCache> = caches.iter_mut().take(batch).collect();
                    let tokens: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
                    next = model.step_sample(gpu, pool, &mut refs, &tokens, &draws).unwrap();
                    chosen.push(next.clone());
                }
                let lens: Vec<usize> = caches.iter().map(KvCache::len).collect();
                (chosen, lens)
            };
            let want = run(&plain);
            let got = run(&graphed);
            assert_eq!(got, want, "{name} ({p}): graphed steps against plain ones");
        }
        assert_eq!(
            graphed.decode_graph_batches(),
            vec![2, 3],
            "{p}: a graph for each batch size decoded"
        );
    }
}

/// Decode steps take their buffers from the backend's buffer cache: once a step of a batch
/// size has run, the steps after it ask the driver for no memory (their tensors and their
/// uploads of ids, positions and block tables all reuse buffers), and the tokens are those of
/// a backend that reuses nothing (a reused buffer holds another tensor's old values, which no
/// kernel may read).
#[cfg(feature = "cuda")]
#[test]
fn gpu_decode_steps_reuse_their_buffers() {
    use atomic_worker::backend::{CudaBackend, Precision};
    const STEPS: usize = 8;
    let test = "gpu_decode_steps_reuse_their_buffers";
    for p in [Precision::F32, Precision::Bf16] {
        let (Some(reusing), Some(plain)) = (common::gpu_in(test, p), common::gpu_in(test, p)) else {
            return;
        };
        plain.set_buffer_cache_limit(0);
        for name in ["tiny-llama", "tiny-gpt2"] {
            // The tokens, and the driver allocations of the steps after the first.
            let run = |gpu: &CudaBackend| {
                let (_dir, model, r) = load(name, gpu);
                let ids: Vec<Vec<u32>> = serde_json::from_value(r["input_ids"].clone()).unwrap();
                let pool = &mut model.new_pool(gpu, 2 * model.max_positions()).unwrap();
                let mut cache = pool.new_cache();
                let mut logits = model.prefill(gpu, pool, &mut cache, &ids[0]).unwrap();
                let steps = STEPS.min(model.max_positions() - ids[0].len());
                let mut tokens = Vec::new();
                let mut missed_before = 0;
                for step in 0..steps {
                    if step == 1 {
                        missed_before = gpu.buffer_stats().missed;
                    }
                    let id = argmax(&logits);
                    tokens.push(id);
                    logits = model.decode_step(gpu, pool, &mut cache, id).unwrap();
                }
                (tokens, gpu.buffer_stats().missed - missed_before)
            };
            let (got, steady_misses) = run(&reusing);
            let (want, plain_misses) = run(&plain);
            assert_eq!(
                got, want,
                "{name} ({p}): tokens with reused buffers against fresh ones"
            );
            assert_eq!(
                steady_misses, 0,
                "{name} ({p}): decode steps after the first asked the driver for memory"
            );
            assert!(
                plain_misses > 0,
                "{name} ({p}): a backend that keeps nothing reuses nothing"
            );
        }
        assert!(reusing.buffer_stats().reused > 0, "{p}: no buffer was reused");
        assert_eq!(
            plain.buffer_stats().reused,
            0,
            "{p}: limit 0 still reused a buffer"
        );
    }
}

/// Decode throughput of the tiny models (single sequence and a batch of 8), printed; run with
/// `cargo test --release -p atomic-worker --test decoder_golden -- --ignored --nocapture`.
#[test]
#[ignore = "timing, not a check"]
fn tiny_decode_throughput() {
    for name in ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-mistral"] {
        let backend = CpuBackend::new(1).unwrap();
        let (_dir, model, r) = load(name, &backend);
        let prompt: Vec<u32> = serde_json::from_value(r["input_ids"][0].clone()).unwrap();
        let steps = model.max_positions() - prompt.len();
        for batch in [1usize, 8] {
            let rounds = 20;
            let mut decode = std::time::Duration::ZERO;
            let pool = &mut model.new_pool(&backend, batch * model.max_positions()).unwrap();
            for _ in 0..rounds {
                let mut caches: Vec<KvCache> = (0..batch).map(|_| pool.new_cache()).collect();
                let mut next: Vec<u32> = caches
                    .iter_mut()
                    .map(|c| argmax(&model.prefill(&backend, pool, c, &prompt).unwrap()))
                    .collect();
                let start = std::time::Instant::now();
                for _ in 0..steps {
                    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                    let logits = model.decode_batch(&backend, pool, &mut refs, &next).unwrap();
                    next = logits.iter().map(|l| argmax(l)).collect();
                }
                decode += start.elapsed();
            }
            let secs = decode.as_secs_f64();
            let tokens = (rounds * batch * steps) as f64;
            eprintln!(
                "{name}: batch {batch}: {steps} decode steps x {rounds} rounds: {:.0} decode tokens/s",
                tokens / secs
            );
        }
    }
}
