#!/usr/bin/env bash
# The GPU benchmark of issue 5 in one command, for a machine with an NVIDIA GPU, PyTorch and
# transformers: generates the random models and PyTorch's fp32 outputs on them (fixed token ids),
# runs the worker's CUDA backend (in fp32, fp16 and bf16, one after another) and PyTorch on the
# same GPU, and prints first the accuracy of whole models against PyTorch fp32 (BERT-base,
# MiniLM and the 1.1B Llama: error figures, greedy tokens, pass or fail against bounds per
# precision), then the ratios, each at one precision on both sides (encoders vs PyTorch eager,
# decode vs PyTorch and the bandwidth roofline, matrix products vs PyTorch's measured peak) and
# where the worker's time goes.
#
#   bash scripts/bench-gpu.sh [SECONDS=3]
#
# Environment:
#   ATOMIC_GPU_BENCH   a prebuilt `gpu_bench` binary (built elsewhere with
#                      `cargo build --release -p atomic-worker --features cuda --example gpu_bench`);
#                      without it, cargo builds one here
#   ATOMIC_GPU_MODELS  where the models go (default target/gpu-models; about 5 GB, reused)
#   ATOMIC_BENCH_OUT   where the raw JSON lines and the report go (default target/gpu-bench)
#   PYTHON             the Python that holds torch and transformers (default python3)
#   MAX_STEPS          decode steps per timed run (default 256)
#   PRECISIONS         the worker's precisions, in order (default fp32,fp16,bf16)
#   BENCH_DEADLINE     a time (seconds since the epoch) by which both sides must be done: the
#                      worker's run is then cut TORCH_RESERVE seconds (default 90) before it,
#                      so that PyTorch's figures, which every ratio needs, still come
#
# Expected to take about 6 minutes on an H100 with the default 3 s per figure (an estimate, not
# yet measured on a GPU): the worker measures three precisions and loads the 1.1B model twice for
# each (accuracy, then decode); writing the models and references the first time adds to that.
# Exits non-zero when either side failed a section, a model is outside its accuracy bounds
# included; the report still prints whatever was measured.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-3}"
py="${PYTHON:-python3}"
models="${ATOMIC_GPU_MODELS:-target/gpu-models}"
out="${ATOMIC_BENCH_OUT:-target/gpu-bench}"
max_steps="${MAX_STEPS:-256}"
precisions="${PRECISIONS:-fp32,fp16,bf16}"
mkdir -p "$out"
# Some images (NGC's) set this, which makes every fp32 product of PyTorch run in TF32 whatever
# its precision setting says: fp32 figures and references would then not be fp32.
unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE

# The CUDA 13 libraries live in the pip nvidia-* packages of the Python that holds PyTorch.
lib_dirs="$(PYTHON="$py" bash scripts/cuda-libs.sh)"
if [ -n "$lib_dirs" ]; then
    export LD_LIBRARY_PATH="$lib_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "bench-gpu: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >&2
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >&2 || true
fi

"$py" worker/bench/gpu_models.py "$models" || { echo "bench-gpu: generating the models failed" >&2; exit 1; }
# Not fatal: a model without a reference fails only the accuracy section, the speed still counts.
status=0
"$py" worker/bench/gpu_reference.py "$models" || {
    echo "bench-gpu: computing PyTorch's references failed; the accuracy section fails where one is missing" >&2
    status=1
}

bin="${ATOMIC_GPU_BENCH:-}"
if [ -z "$bin" ]; then
    if ! command -v cargo >/dev/null; then
        echo "bench-gpu: no ATOMIC_GPU_BENCH binary given and no cargo to build one" >&2
        exit 1
    fi
    cargo build --release -q -p atomic-worker --features cuda --example gpu_bench || exit 1
    bin="${CARGO_TARGET_DIR:-target}/release/examples/gpu_bench"
fi

"$bin" "$models" --check >/dev/null || { echo "bench-gpu: the model folders do not open" >&2; exit 1; }
# `limit SECONDS`: what is left before BENCH_DEADLINE less SECONDS, as a `timeout` prefix (none
# without a deadline).
limit() {
    if [ -n "${BENCH_DEADLINE:-}" ]; then
        local left=$((BENCH_DEADLINE - $(date +%s) - $1))
        echo "timeout -k 5 $((left > 10 ? left : 10))"
    fi
}
echo "bench-gpu: worker (CUDA backend, $precisions)" >&2
$(limit "${TORCH_RESERVE:-90}") "$bin" "$models" --seconds "$seconds" --max-steps "$max_steps" \
    --precisions "$precisions" | tee "$out/atomic.jsonl" || status=1
echo "bench-gpu: PyTorch eager" >&2
$(limit 0) "$py" worker/bench/gpu_torch.py "$models" --seconds "$seconds" --max-steps "$max_steps" |
    tee "$out/torch.jsonl" || status=1
echo
"$py" worker/bench/gpu_report.py "$out/atomic.jsonl" "$out/torch.jsonl" | tee "$out/report.txt"
exit "$status"
