#!/usr/bin/env bash
# Everything to run on a GPU machine, as one command of under ten minutes: the GPU tests
# (scripts/gpu-checks.sh), the worker binary served twice on the GPU and once on the CPU
# (worker/bench/serve_smoke.py: start-up, kernel cache, tiny-bert's embeddings and tiny-llama's
# greedy completions in fp32 with decode graphs on, against the CPU's), then the
# benchmark (scripts/bench-gpu.sh), each under its own time limit so that a hang in one still
# leaves the others' results. Logs, the benchmark's JSON
# lines and its report go to the folder $OUT names when it is set, else to
# target/gpu-session. Build the bundle first, on a machine with Rust: bash scripts/gpu-bundle.sh
#   bash scripts/gpu-session.sh [SECONDS_PER_FIGURE=2]
# Environment: CHECKS_LIMIT, SERVE_LIMIT (each smoke's) and BENCH_LIMIT (seconds, default 180, 45
# and 280: with each stage's 10 s of grace, under the ten minutes); PRECISIONS for the
# benchmark (default bf16,fp16,fp32: the precisions of the goals first).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-target/gpu-session}"
mkdir -p "$out"
seconds="${1:-2}"
start=$(date +%s)
# Progress lines reach the logs as they are printed (a timeout keeps them); nothing tries the
# network; the worker's log is plain text (its cache lines are matched).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_COLOR=1
chmod +x target/gpu-bundle/atomic-worker target/gpu-bundle/gpu_bench target/gpu-bundle/tests/* 2>/dev/null
if [ -f target/gpu-bundle/REVISION ]; then
    echo "gpu-session: bundle built from $(cat target/gpu-bundle/REVISION)"
fi
python3 -c 'import torch; print("gpu-session: torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -1
bash scripts/cuda-libs.sh >/dev/null
# -k: a process that ignores the TERM of its time limit is killed 10 s later, so the next
# stage still runs.
timeout -k 10 "${CHECKS_LIMIT:-180}" bash scripts/gpu-checks.sh >"$out/checks.log" 2>&1
checks=$?
echo "gpu-session: GPU tests exited $checks after $(($(date +%s) - start)) s (log: checks.log)"
grep -E "^== |^test result|FAILED|panicked|^gpu-checks:" "$out/checks.log" | head -40
echo "gpu-session: $(grep -c SKIPPED "$out/checks.log") tests skipped (see checks.log for why)"
lib_dirs="$(bash scripts/cuda-libs.sh)"
serve=0
for smoke in "tiny-bert bf16 0" "tiny-llama fp32 4"; do
    read -r model precision graphs <<<"$smoke"
    ATOMIC_WORKER_CUDA_GRAPH_MAX_BATCH="$graphs" \
        LD_LIBRARY_PATH="$lib_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout -k 10 "${SERVE_LIMIT:-45}" \
        python3 worker/bench/serve_smoke.py target/gpu-bundle/atomic-worker "worker/fixtures/$model" \
        --precision "$precision" >"$out/serve-$model.log" 2>&1
    status=$?
    [ "$status" -ne 0 ] && serve=$status
    echo "gpu-session: serve smoke ($model, $precision) exited $status after $(($(date +%s) - start)) s (log: serve-$model.log)"
    tail -8 "$out/serve-$model.log"
done
# The benchmark splits its time limit itself (BENCH_DEADLINE): PyTorch's figures, which every
# ratio needs, keep their share even when the worker's runs are cut short.
bench_limit="${BENCH_LIMIT:-280}"
PRECISIONS="${PRECISIONS:-bf16,fp16,fp32}" ATOMIC_BENCH_OUT="$out" \
    ATOMIC_GPU_BENCH="${ATOMIC_GPU_BENCH:-target/gpu-bundle/gpu_bench}" \
    BENCH_DEADLINE=$(($(date +%s) + bench_limit - 15)) \
    timeout -k 10 "$bench_limit" bash scripts/bench-gpu.sh "$seconds" >"$out/bench.log" 2>&1
bench=$?
echo "gpu-session: benchmark exited $bench after $(($(date +%s) - start)) s in all (log: bench.log)"
# A benchmark stopped at its limit never wrote its report: make one from what it measured.
if [ ! -s "$out/report.txt" ] && [ -s "$out/atomic.jsonl" ]; then
    python3 worker/bench/gpu_report.py "$out/atomic.jsonl" "$out/torch.jsonl" >"$out/report.txt"
fi
[ -f "$out/report.txt" ] && cat "$out/report.txt"
[ "$checks" -eq 0 ] && [ "$serve" -eq 0 ] && [ "$bench" -eq 0 ]
