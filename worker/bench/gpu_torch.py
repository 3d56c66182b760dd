#!/usr/bin/env python3
"""PyTorch's side of the GPU benchmark: the same workloads as `worker/examples/gpu_bench.rs`, on
the same GPU, in PyTorch eager (transformers' models with SDPA attention).

    python3 worker/bench/gpu_torch.py MODELS_DIR [--seconds 3] [--max-steps 256]
        [--only copy,matmul,encoders,decode]

MODELS_DIR is what `worker/bench/gpu_models.py` wrote. Prints one JSON object per line, with the
same keys as the Rust side and "impl": "torch":

- copy: device-to-device copy bandwidth of 1 GiB (bytes read + written, as the Rust side counts
  them) and host-to-device upload bandwidth from pageable memory;
- matmul: 8192^3 products in bf16, fp16, tf32 and fp32 (the peaks that the worker's matrix
  products are set against; bf16 is "the peak" of the issue);
- encoder: sentences/s of BERT-base and MiniLM at batch 32 x 128 in fp32, fp16 and bf16 (mean
  pooling and normalisation on the GPU, embeddings copied to the host, as the worker returns them);
- decode: greedy tokens/s of the Llama model at batch 1 and 32 in bf16, fp16 and fp32 through a manual
  loop over `past_key_values` (the KV cache on the GPU), a 16-token prompt prefilled first.

fp32 matrix products run without TF32 (PyTorch's default "highest" precision), as the worker's
cuBLAS sgemm does, so the fp32 rows compare like with like.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import BertModel, LlamaForCausalLM

ENCODERS = ["bert-base", "minilm"]
DECODER = "llama-1b"
ENC_BATCH, ENC_SEQ = 32, 128
PROMPT = 16
DECODE_BATCHES = [1, 32]
COPY_BYTES = 1 << 30
MATMUL_N = 8192
# In the order the sections run them: the goals' precisions first, so that a run cut short by its
# time limit loses fp32 rather than bf16.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# "cuda"; "cpu" only to smoke-test this script on a machine without a GPU (tiny models, no figures).
DEVICE = "cuda"


def emit(**fields):
    print(json.dumps({"impl": "torch", **fields}), flush=True)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def cuda_time_ms(fn, iters):
    """Mean milliseconds per call of fn over iters back-to-back calls, by CUDA events."""
    if DEVICE != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth():
    n = COPY_BYTES // 4 if DEVICE == "cuda" else 1 << 20
    x = torch.zeros(n, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ms = cuda_time_ms(lambda: y.copy_(x), 20)
    host = torch.zeros(n)
    sync()
    t = time.perf_counter()
    host.to(DEVICE)
    sync()
    h2d = time.perf_counter() - t
    emit(bench="copy", bytes=4 * n, d2d_gbs=8 * n / ms / 1e6, h2d_gbs=4 * n / h2d / 1e9)
    del x, y, host
    empty_cache()


def matmul_peaks():
    n = MATMUL_N if DEVICE == "cuda" else 256
    for name, dtype, precision in [
        ("bf16", torch.bfloat16, "highest"),
        ("fp16", torch.float16, "highest"),
        ("tf32", torch.float32, "high"),
        ("fp32", torch.float32, "highest"),
    ]:
        try:
            torch.set_float32_matmul_precision(precision)
            a = torch.randn(n, n, device=DEVICE, dtype=dtype)
            b = torch.randn(n, n, device=DEVICE, dtype=dtype)
            for _ in range(3):
                a @ b
            # About a second of products, as the worker times its own: a GPU held at its power
            # limit clocks down, and a peak from a burst of milliseconds would not show it.
            once = cuda_time_ms(lambda: a @ b, 2)
            iters = max(2, min(2000, int(1000 / max(once, 1e-3))))
            ms = cuda_time_ms(lambda: a @ b, iters)
            emit(bench="matmul", dtype=name, n=n, us=ms * 1e3, tflops=2 * n**3 / ms / 1e9)
            del a, b
        finally:
            # TF32 stays off for every later section, whatever failed here.
            torch.set_float32_matmul_precision("highest")
    empty_cache()


def encoder(models, name, seconds):
    folder = models / name
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (ENC_BATCH, ENC_SEQ), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    ids = ids.to(DEVICE)
    mask = torch.ones_like(ids)
    for dname, dtype in DTYPES.items():
        model = BertModel.from_pretrained(str(folder), add_pooling_layer=False, attn_implementation="sdpa")
        model = model.to(DEVICE, dtype).eval()

        def embed():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1)
            return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()

        for _ in range(3):
            embed()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            embed()
            runs += 1
        elapsed = time.perf_counter() - start
        emit(
            bench="encoder", model=name, dtype=dname, batch=ENC_BATCH, seq=ENC_SEQ, runs=runs,
            ms_per_batch=elapsed * 1e3 / runs, sentences_per_s=runs * ENC_BATCH / elapsed,
        )
        del model
        empty_cache()


def encoders(models, seconds):
    # Each model on its own: one that fails must not cost the other's figures.
    errors = []
    for name in ENCODERS:
        try:
            encoder(models, name, seconds)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {type(e).__name__}: {e}")
            empty_cache()
    if errors:
        raise RuntimeError("; ".join(errors))


def decode(models, seconds, max_steps):
    folder = models / DECODER
    for dname in DTYPES:
        model = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa")
        model = model.to(DEVICE, DTYPES[dname]).eval()
        params = sum(p.numel() for p in model.parameters())
        # A step reads every weight except the embedding table (one row per token).
        read = params - model.get_input_embeddings().weight.numel()
        if model.config.tie_word_embeddings:
            read = params
        size = torch.tensor([], dtype=DTYPES[dname]).element_size()
        emit(
            bench="model", model=DECODER, params=params, params_read_per_step=read, dtype=dname,
            bytes_per_param=size, weight_bytes_per_step=read * size,
        )
        vocab = model.config.vocab_size
        for batch in DECODE_BATCHES:
            rows = [[(s * 7919 + i * 104729) % (vocab - 3) + 3 for i in range(PROMPT)] for s in range(batch)]
            prompt = torch.tensor(rows, device=DEVICE)

            def run(steps, limit):
                t = time.perf_counter()
                out = model(input_ids=prompt, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                sync()
                prefill = time.perf_counter() - t
                done, t = 0, time.perf_counter()
                # One synchronisation per step, as a serving loop that checks for end-of-sequence
                # has, and as the worker (logits to the host) has.
                while done < steps and time.perf_counter() - t < limit:
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    nxt = out.logits[:, -1:].argmax(-1)
                    sync()
                    done += 1
                return done, time.perf_counter() - t, prefill

            run(4, float("inf"))
            steps, elapsed, prefill = run(max_steps, seconds)
            steps = max(steps, 1)
            emit(
                bench="decode", model=DECODER, dtype=dname, batch=batch, prompt=PROMPT, steps=steps,
                mean_context=PROMPT + steps // 2, prefill_ms=prefill * 1e3, ms_per_step=elapsed * 1e3 / steps,
                tokens_per_s=batch * steps / elapsed,
            )
        del model
        empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", type=Path)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=256)
    parser.add_argument("--only", default="", help="comma-separated: copy,matmul,encoders,decode")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test only")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_torch: PyTorch sees no CUDA device")
    torch.set_grad_enabled(False)
    emit(
        bench="device", name=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test)", torch=torch.__version__,
        cuda=torch.version.cuda, float32_matmul_precision=torch.get_float32_matmul_precision(),
        allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        tf32_override=os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"),
    )
    only = {s for s in args.only.split(",") if s}
    sections = [
        ("copy", copy_bandwidth),
        ("matmul", matmul_peaks),
        ("encoders", lambda: encoders(args.models, args.seconds)),
        ("decode", lambda: decode(args.models, args.seconds, args.max_steps)),
    ]
    failed = []
    for name, run in sections:
        if only and name not in only:
            continue
        print(f"gpu_torch: {name}", file=sys.stderr, flush=True)
        try:
            run()
        except Exception as e:  # noqa: BLE001 - one failed section must not cost the others
            emit(bench="error", section=name, message=f"{type(e).__name__}: {e}")
            print(f"gpu_torch: {name} failed: {e}", file=sys.stderr)
            failed.append(name)
            empty_cache()
    if failed:
        sys.exit(f"gpu_torch: sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
