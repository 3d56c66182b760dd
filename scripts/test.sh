#!/usr/bin/env bash
# The test command: fetches the small real models the worker tests use (once; skipped when
# present), runs every test of the workspace, then the worker's CUDA backend tests with the
# `cuda` feature: every kernel is compiled to PTX through NVRTC (fetched once, no GPU needed),
# and the GPU tests run where a GPU is present; then the GPU benchmark's own unit tests (its
# accuracy bounds and comparisons, which need no GPU); then the GPU tests again on the emulated
# GPU (scripts/emulated-gpu.sh: the whole CUDA backend on the CPU, no GPU needed). Tests that
# need what this machine lacks (a cluster, a GPU) print why they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh >/dev/null
cargo test --workspace "$@"
nvrtc_lib="$(bash scripts/fetch-nvrtc.sh)"
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test -p atomic-worker --features cuda --lib "$@" -- backend::cuda backend::device
cargo test -p atomic-worker --features cuda --example gpu_bench "$@"
bash scripts/emulated-gpu.sh "$@"
