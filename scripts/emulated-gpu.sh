#!/usr/bin/env bash
# Runs the worker's GPU tests on the emulated GPU: builds the stand-ins for libcuda, libnvrtc,
# libcublas and libcublasLt (worker/src/backend/cuda/emulated_gpu/, one g++-built library under
# those four names) into target/emulated-gpu/ and runs the GPU tests with them first on the
# library path, so that the whole CUDA backend (host code, cuBLAS descriptors, buffer cache,
# graph capture and every kernel's own source) runs end to end without a GPU. Kernels are built by
# the stand-in NVRTC with g++ and cached in target/emulated-gpu/modules/.
#
#   bash scripts/emulated-gpu.sh            # the GPU tests (the backend's and the whole-model
#                                           # ones), then the worker binary served on the "GPU"
#   bash scripts/emulated-gpu.sh --build    # only build the library; prints its folder
#
# Extra arguments go to cargo test (before its `--`). Without g++ it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v g++ >/dev/null; then
    echo "SKIPPED emulated GPU: g++ not found" >&2
    exit 0
fi
src="worker/src/backend/cuda/emulated_gpu"
out="target/emulated-gpu"
mkdir -p "$out/modules"
root="$(pwd)"
lib="$out/libatomic_emulated_gpu.so"
# Rebuilt when a source (or the kernels' emulator) is newer than the library.
if [ ! -f "$lib" ] || [ -n "$(find "$src" worker/src/backend/cuda/emulator.h -newer "$lib" -print -quit)" ]; then
    g++ -std=c++20 -O2 -shared -fPIC -pthread -Wall -Wextra -Werror \
        -DEMULATOR_H="\"$root/worker/src/backend/cuda/emulator.h\"" \
        -DMODULE_DIR="\"$root/$out/modules\"" \
        -o "$lib.partial" "$src"/driver.cpp "$src"/nvrtc.cpp "$src"/cublas.cpp "$src"/parallel.cpp -ldl
    mv "$lib.partial" "$lib"
fi
# The names cudarc loads (CUDA 13).
for name in libcuda.so libnvrtc.so libcublas.so libcublasLt.so; do
    ln -sf libatomic_emulated_gpu.so "$out/$name"
done
if [ "${1:-}" = "--build" ]; then
    echo "$root/$out"
    exit 0
fi

export LD_LIBRARY_PATH="$root/$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The emulated GPU's own checks first (a use of freed memory, a second free, an overrun fail;
# correct use passes): the tests below rely on them to catch what a GPU would hide.
g++ -std=c++20 -O1 -Wall -Wextra -Werror -o "$out/selftest" "$src/selftest.cpp" -L"$out" -latomic_emulated_gpu
"$out/selftest"
# With ATOMIC_EMULATED_GPU set, a GPU test whose GPU does not open fails instead of skipping.
export ATOMIC_EMULATED_GPU=1
cargo test -p atomic-worker --features cuda --lib "$@" -- backend::cuda::tests::gpu_ \
    backend::cuda::tests::a_second_start_reads_every_kernel_from_the_cache
# The tiny models cover the whole-model code; the real MiniLM's passes take minutes here. 16
# multiprocessors instead of 132: decode attention then splits a tiny model's few keys 3 ways
# rather than 16, which is most of the emulation's time; the op tests above cover every split
# count at the H100's 132.
ATOMIC_EMULATED_GPU_SM_COUNT=16 ATOMIC_SKIP_MINILM=1 cargo test -p atomic-worker --features cuda --test bert_golden --test decoder_golden "$@" -- gpu_
# The worker binary on the emulated GPU, as a pod runs it: start-up (kernel build and cache,
# self-test, warm-up), then embeddings and greedy completions against the CPU's. A small
# batch budget keeps the warm-up pass short here.
cargo build -q -p atomic-worker --features cuda --bin atomic-worker
worker="${CARGO_TARGET_DIR:-target}/debug/atomic-worker"
# tiny-llama with decode graphs on (`--cuda-graph-max-batch 4`): its prompts run plainly, its
# steps replay from graphs (the plain steps are the golden tests' and the benchmark's).
for smoke in "tiny-bert bf16 0" "tiny-llama fp32 4"; do
    read -r model precision graphs <<<"$smoke"
    ATOMIC_WORKER_MAX_BATCH_TOKENS=128 ATOMIC_WORKER_CUDA_GRAPH_MAX_BATCH="$graphs" \
        python3 worker/bench/serve_smoke.py "$worker" "worker/fixtures/$model" --precision "$precision"
done
# How it fails on a GPU it cannot use (too old, absent, too small), which only the emulated GPU
# can be made to be.
python3 worker/bench/device_failures.py "$worker"
# The GPU benchmark's own code, every timed section at tiny sizes (--smoke) with the tiny
# fixtures in the models' places, then its report: so that a GPU session's benchmark does not
# stop on the benchmark. The accuracy section is left out: its references come from PyTorch on
# the GPU machine (worker/bench/gpu_reference.py).
cargo build -q -p atomic-worker --features cuda --example gpu_bench
models="$out/bench-models"
mkdir -p "$models"
ln -sfn "$root/worker/fixtures/tiny-bert" "$models/bert-base"
ln -sfn "$root/worker/fixtures/tiny-bert" "$models/minilm"
ln -sfn "$root/worker/fixtures/tiny-llama" "$models/llama-1b"
ATOMIC_EMULATED_GPU_SM_COUNT=16 "${CARGO_TARGET_DIR:-target}/debug/examples/gpu_bench" "$models" --smoke --seconds 0.01 --max-steps 4 \
    --only copy,matmul,encoders,decode --precisions bf16 >"$out/bench-smoke.jsonl"
: >"$out/bench-smoke-torch.jsonl"
python3 worker/bench/gpu_report.py "$out/bench-smoke.jsonl" "$out/bench-smoke-torch.jsonl" >"$out/bench-smoke-report.txt"
echo "emulated GPU: the benchmark ran every timed section ($(wc -l <"$out/bench-smoke.jsonl") result lines; report in $out/bench-smoke-report.txt)"
