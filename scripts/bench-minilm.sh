#!/usr/bin/env bash
# MiniLM embedding throughput, batch 32 x 128 tokens: the worker (CPU backend) and PyTorch on
# the same cores in the same run, and their ratio. PyTorch comes from a local virtual
# environment (created on first use; several GB, kept out of CI).
#   bash scripts/bench-minilm.sh [THREADS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
seconds="${2:-15}"
bash scripts/fetch-models.sh >/dev/null
if [ ! -x .venv-ref/bin/python ]; then
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install --quiet torch transformers
fi
cargo build --release -q -p atomic-worker --example minilm_bench
ours=$(./target/release/examples/minilm_bench "$threads" "$seconds")
# Current numpy/PyTorch builds are slowed by these (see the environment notes); unset for PyTorch only.
theirs=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv-ref/bin/python worker/bench/minilm_torch.py "$threads" "$seconds" 2>/dev/null)
echo "$ours"
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import re, sys
rate = lambda line: float(re.search(r"([0-9.]+) sentences/s", line).group(1))
ours, theirs = rate(sys.argv[1]), rate(sys.argv[2])
print(f"ratio atomic-worker / pytorch: {ours / theirs:.2f}x")
PY
