//! Throughput of the CPU backend's hot operations at MiniLM sizes (batch 32 x 128 tokens,
//! hidden 384, FFN 1536, 12 heads of 32).
//!
//! `cargo run -p atomic-worker --release --example ops_bench [threads]` (0 or nothing: all cores).

use std::time::{Duration, Instant};

use atomic_worker::backend::{AttentionMask, Backend, CpuBackend};

/// Runs `f` until a second has passed (after one warm-up call) and returns the best time.
fn best_of(mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut best = Duration::MAX;
    while start.elapsed() < Duration::from_secs(1) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
    }
    best
}

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0);
    let b = CpuBackend::new(threads)?;
    println!("cpu backend, {} threads", b.threads());

    let (n, k, m) = (4096, 384, 1536);
    let x = b.from_host(&data(n * k), &[n, k])?;
    let w = b.from_host(&data(m * k), &[m, k])?;
    let bias = b.from_host(&data(m), &[m])?;
    let t = best_of(|| drop(b.linear(&x, &w, Some(&bias)).unwrap()));
    let flops = 2.0 * (n * k * m) as f64;
    println!(
        "linear [{n} x {k}] x [{k} x {m}] + bias: {:8.2} ms {:7.1} GFLOP/s",
        ms(t),
        flops / t.as_secs_f64() / 1e9
    );

    let (batch, seq, heads, d) = (32, 128, 12, 32);
    let q = b.from_host(&data(batch * seq * heads * d), &[batch, seq, heads, d])?;
    let kv = b.from_host(&data(batch * seq * heads * d), &[batch, seq, heads, d])?;
    let valid = vec![true; batch * seq];
    for (what, mask) in [
        ("no mask", AttentionMask::none()),
        ("padding mask", AttentionMask::padding(&valid)),
    ] {
        let t = best_of(|| drop(b.attention(&q, &kv, &kv, &mask).unwrap()));
        let flops = 4.0 * (batch * heads * seq * seq * d) as f64;
        println!(
            "attention {batch} x {heads} heads x {seq} x {d}, {what}: {:8.2} ms {:7.1} GFLOP/s",
            ms(t),
            flops / t.as_secs_f64() / 1e9
        );
    }

    // Memory-bound row operations: bytes read + written per second.
    let h = b.from_host(&data(n * m), &[n, m])?;
    let gamma = b.from_host(&data(k), &[k])?;
    let bytes = |elems: usize, passes: usize| (elems * passes * 4) as f64;
    let t = best_of(|| drop(b.gelu(&h).unwrap()));
    println!(
        "gelu [{n} x {m}]: {:8.2} ms {:7.1} GB/s",
        ms(t),
        bytes(n * m, 2) / t.as_secs_f64() / 1e9
    );
    let t = best_of(|| drop(b.add_layer_norm(&x, &x, &gamma, &gamma, 1e-12).unwrap()));
    println!(
        "add_layer_norm [{n} x {k}]: {:8.2} ms {:7.1} GB/s",
        ms(t),
        bytes(n * k, 3) / t.as_secs_f64() / 1e9
    );
    Ok(())
}

fn ms(t: Duration) -> f64 {
    t.as_secs_f64() * 1e3
}
