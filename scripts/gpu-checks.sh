#!/usr/bin/env bash
# Runs the worker's GPU tests on a GPU machine from the binaries scripts/gpu-bundle.sh built
# elsewhere: the CUDA backend's op tests (every kernel against the f64 reference) and the
# whole-model golden tests (tiny BERT and heads, GPT-2, Llama, Qwen2 against PyTorch's outputs).
# Every test binary runs even when one fails; the exit status says whether all passed.
#   bash scripts/gpu-checks.sh [BUNDLE=target/gpu-bundle]
set -uo pipefail
cd "$(dirname "$0")/.."
bundle="${1:-target/gpu-bundle}"
lib_dirs="$(bash scripts/cuda-libs.sh)"
export LD_LIBRARY_PATH="$lib_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The test binaries were built elsewhere: tell them where the fixtures are here.
export ATOMIC_FIXTURES="$PWD/worker/fixtures"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
status=0
log="$(mktemp)"
for test in "$bundle"/tests/*; do
    name="$(basename "$test")"
    echo "== $name"
    if [ "$name" = atomic_worker ]; then
        # The emulated kernel tests need no GPU and run in CI; they would only spend device time.
        # The kernel-table test reads the source folder at the path it was built at, which is
        # not this machine's (CI runs it).
        "$test" --test-threads=1 backend::cuda backend::device --skip emulated \
            --skip every_cu_file_is_in_the_kernel_table 2>&1 | tee -a "$log" || status=1
    else
        "$test" --test-threads=1 2>&1 | tee -a "$log" || status=1
    fi
done
# A GPU test that found no GPU (libraries missing from the path, say) skips and passes: here
# that is a failure of the session, not of the test.
if grep -q "SKIPPED.*no CUDA device\|SKIPPED.*libnvrtc not found\|SKIPPED.*cuBLASLt did not open" "$log"; then
    echo "gpu-checks: GPU tests skipped for want of a usable GPU or library:" >&2
    grep -m 3 "SKIPPED.*no CUDA device\|SKIPPED.*libnvrtc not found\|SKIPPED.*cuBLASLt did not open" "$log" >&2
    status=1
fi
rm -f "$log"
exit "$status"
