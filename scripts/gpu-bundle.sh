#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything a GPU session runs, stripped into one folder to
# carry to the GPU machine (which has CUDA and PyTorch but no Rust toolchain):
#   target/gpu-bundle/tests/  the worker's CUDA unit tests and whole-model golden tests
#   target/gpu-bundle/gpu_bench  the benchmark binary of scripts/bench-gpu.sh
# Then, on the GPU machine, from the repository root:
#   bash scripts/gpu-checks.sh                       # every GPU test
#   ATOMIC_GPU_BENCH=target/gpu-bundle/gpu_bench bash scripts/bench-gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out/tests"
target_dir="${CARGO_TARGET_DIR:-target}"
# The test executables' paths come from cargo's JSON messages.
# (cargo's progress and errors go to stderr, shown.)
cargo test --release -p atomic-worker --features cuda --lib --test bert_golden --test decoder_golden \
    --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
        print(msg["target"]["name"], msg["executable"])
' | while read -r name exe; do
    strip -o "$out/tests/$name" "$exe"
done
cargo build --release -q -p atomic-worker --features cuda --example gpu_bench --bin atomic-worker
strip -o "$out/gpu_bench" "$target_dir/release/examples/gpu_bench"
strip -o "$out/atomic-worker" "$target_dir/release/atomic-worker"
built=$(ls "$out/tests" | wc -l)
if [ "$built" -ne 3 ]; then
    echo "gpu-bundle: expected 3 test binaries (atomic_worker, bert_golden, decoder_golden), got $built" >&2
    exit 1
fi
# What the session prints first, so that a stale bundle is seen before device time is spent.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- worker || echo ' with uncommitted changes')" >"$out/REVISION"
du -sh "$out"
