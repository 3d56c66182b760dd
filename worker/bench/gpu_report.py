#!/usr/bin/env python3
"""Turns the JSON lines of the GPU benchmark's two sides into the table issue 5 asks for.

    python3 worker/bench/gpu_report.py ATOMIC.jsonl TORCH.jsonl

First, accuracy: each model's outputs in each precision against PyTorch's fp32 (the worker's
`accuracy` lines: error figures, their bounds, greedy tokens, pass or fail).

Ratios set the worker against PyTorch at the same precision (fp32, fp16, bf16): the worker
stores tensors in that precision and accumulates in fp32; fp32 products run without TF32 on
both sides. The one exception is the matrix products' "of bf16 peak" column.
- encoders: the worker's sentences/s over PyTorch eager's, per model and precision (goal >= 1.5x
  at fp16/bf16);
- decode: each side's tokens/s per precision and batch, and its fraction of the bandwidth
  roofline, batch x copy bandwidth / that side's own weight bytes per step at that precision,
  or the step's products at PyTorch's measured peak of that precision where those take longer
  (goal >= 80%); the bandwidth is the largest device-to-device copy either side measured; at
  batch 1 also the worker with its matrix-vector kernel off ("gemv off": cuBLAS and separate
  norm, SwiGLU and add kernels), which says whether the kernel earns its place, and at every
  batch the worker with the per-head decode attention instead of the grouped-heads kernel
  ("per-head attention"), and at batch 1 the worker with its buffer cache off ("buffer reuse
  off": every op's output from the driver's pool); "driver allocs" counts the device
  allocations of a timed run (its prefill included: 0 after it means the decode steps allocated
  nothing);
- matrix products: the worker's TFLOP/s in each precision over the peak PyTorch measured in the
  same precision (and over the bf16 peak, "the peak" of the issue);
- where the time goes: each op's time per call x calls per pass, against the measured pass, per
  precision.

Reads only what is there: a missing figure prints as "-", so a partial run still reports.
Standard library only.
"""

import json
import sys

# The storage precisions both sides measure, in the order the tables list them.
DTYPES = ("fp32", "fp16", "bf16")
ENCODERS = ("bert-base", "minilm")
DECODER = "llama-1b"
DECODE_BATCHES = (1, 32)


def load(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except OSError as e:
        print(f"gpu_report: cannot read {path}: {e}", file=sys.stderr)
    return rows


# The worker's decode runs with every kernel of its own on (the others turn one off to compare).
BEST = {"gemv": True, "grouped_decode": True, "buffer_cache": True}


def find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def num(x, fmt="{:.1f}"):
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)  # e.g. "NaN", which JSON cannot hold as a number
    return fmt.format(x)


def ratio(a, b):
    return None if a is None or not b else a / b


def pct(a, b):
    r = ratio(a, b)
    return None if r is None else 100 * r


def get(row, key):
    return None if row is None else row.get(key)


def table(headers, rows):
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(headers))
    print("  " + "-+-".join("-" * w for w in widths))
    for r in cells:
        print(line(r))


def by_dtype(rows_by_dtype, key, fmt):
    """One figure per precision, e.g. "fp32 2900, fp16 2910, bf16 -"."""
    return ", ".join(f"{d} {num(get(r, key), fmt)}" for d, r in rows_by_dtype.items())


def roofline(src, dtype, batch, bw, peaks=None):
    """Tokens/s of a decode step that only reads its weights once at bw GB/s, from that side's own
    weight bytes per step at dtype (None when either is unknown); when the products of the
    batch at the measured same-precision peak take longer than that read (fp32 at batch 32),
    that compute time bounds it instead."""
    row = find(src, bench="model", dtype=dtype)
    wbytes = get(row, "weight_bytes_per_step")
    if not (bw and wbytes):
        return None
    roof = batch * bw * 1e9 / wbytes
    peak, params = (peaks or {}).get(dtype), get(row, "params_read_per_step")
    if peak and params:
        roof = min(roof, peak * 1e12 / (2 * params))
    return roof


def one_minus(x):
    return 1 - x if isinstance(x, (int, float)) and not isinstance(x, bool) else x


def greedy_cells(row, model):
    """Decided greedy steps matched / compared, and tokens agreed before the first divergence."""
    if model != DECODER:
        return "n/a", "n/a"
    compared, matched = get(row, "greedy_compared"), get(row, "greedy_matched")
    agreed, total = get(row, "greedy_agreed"), get(row, "greedy_tokens")
    decided = "-" if compared is None or matched is None else f"{matched}/{compared}"
    prefix = "-" if agreed is None or total is None else f"{agreed}/{total}"
    return decided, prefix


def accuracy(ours):
    print("\n== Accuracy against PyTorch fp32 (whole models, fixed token ids; bounds per precision) ==")
    print("  error: max |worker - torch| / max |torch| over every real token's hidden state (BERT) or each")
    print("  prompt's last-position logits (Llama); 1 - cos: the worst token or prompt. Greedy: steps whose")
    print("  top-two gap the bounds decide, matched/compared, and tokens agreed before the first divergence.")
    rows, notes = [], []
    for model in (*ENCODERS, DECODER):
        for dtype in DTYPES:
            r = find(ours, bench="accuracy", model=model, dtype=dtype)
            decided, prefix = greedy_cells(r, model)
            verdict = get(r, "pass")
            rows.append([
                model, dtype, num(get(r, "max_abs_rel"), "{:.2e}"), num(get(r, "bound_max_abs_rel"), "{:.2e}"),
                num(one_minus(get(r, "min_cosine")), "{:.1e}"), num(one_minus(get(r, "bound_min_cosine")), "{:.1e}"),
                decided, prefix, "-" if verdict is None else ("pass" if verdict is True else "FAIL"),
            ])
            if get(r, "error"):
                notes.append(f"  {model} {dtype}: {r['error']}")
    table(["model", "dtype", "error", "bound", "1 - cos", "bound", "greedy decided", "greedy agreed", "result"], rows)
    for note in notes:
        print(note)
    devices = sorted({str(r["reference_device"]) for r in ours if r.get("bench") == "accuracy" and r.get("reference_device")})
    if devices:
        print(f"  references computed by PyTorch on: {', '.join(devices)}")


def limits(ours, theirs):
    """Prints the copy bandwidths and PyTorch's matmul peaks; returns (roofline bandwidth, peaks)."""
    print("\n== Limits measured in this run ==")
    copy_a = {d: find(ours, bench="copy", dtype=d) for d in DTYPES}
    copy_t = find(theirs, bench="copy")
    bws = [b for b in [get(c, "d2d_gbs") for c in copy_a.values()] + [get(copy_t, "d2d_gbs")] if b]
    bw = max(bws) if bws else None
    print(f"  device copy bandwidth (bytes read + written, 1 GiB): worker {by_dtype(copy_a, 'd2d_gbs', '{:.0f}')} GB/s; "
          f"PyTorch {num(get(copy_t, 'd2d_gbs'), '{:.0f}')} GB/s; roofline uses {num(bw, '{:.0f}')} GB/s")
    print(f"  host-to-device upload (pageable): worker {by_dtype(copy_a, 'h2d_gbs', '{:.1f}')} GB/s "
          f"(fp16/bf16 include rounding on the host); PyTorch fp32 {num(get(copy_t, 'h2d_gbs'))} GB/s")
    peaks = {d: get(find(theirs, bench="matmul", dtype=d), "tflops") for d in ("bf16", "fp16", "tf32", "fp32")}
    print("  PyTorch 8192^3 matmul peaks: " + ", ".join(f"{d} {num(v)} TFLOP/s" for d, v in peaks.items()))
    return bw, peaks


def encoders(ours, theirs):
    print("\n== Encoders: batch 32 x 128, sentences/s, worker vs PyTorch eager at the same precision "
          "(goal: worker >= 1.5x at fp16/bf16) ==")
    print("  worker: the serving path (pooling on the GPU, the pooled rows to the host, as PyTorch's side "
          "does), on which the goal is judged; forward: the pass alone, hidden states left on the GPU; "
          "forward, bias pass: the pass with cuBLASLt's bias epilogue off (each bias a pass of its own)")
    rows = []
    for model in ENCODERS:
        for dtype in DTYPES:
            a = get(find(ours, bench="encoder", model=model, dtype=dtype, path="embed"), "sentences_per_s")
            on = find(ours, bench="encoder", model=model, dtype=dtype, path="forward", bias_epilogue=True)
            off = find(ours, bench="encoder", model=model, dtype=dtype, path="forward", bias_epilogue=False)
            fwd = on or off  # off alone: cuBLASLt did not open, the worker adds biases in a pass
            f = get(fwd, "sentences_per_s")
            nb = get(off, "sentences_per_s") if on else None
            t = get(find(theirs, bench="encoder", model=model, dtype=dtype), "sentences_per_s")
            r = ratio(a, t)
            if dtype == "fp32":
                goal = "n/a"
            else:
                goal = "-" if r is None else ("met" if r >= 1.5 else "not met")
            planned = f"{num(get(fwd, 'epilogue_shapes_planned'), '{:d}')}/{num(get(fwd, 'epilogue_shapes_refused'), '{:d}')}"
            rows.append([model, dtype, num(a), num(f), num(nb), planned, num(t), num(r, "{:.2f}x"),
                         num(ratio(f, t), "{:.2f}x"), goal])
    table(["model", "dtype", "worker", "forward", "forward, bias pass", "epilogue shapes planned/refused (backend so far)", "torch",
           "worker / torch", "forward / torch", "1.5x goal"], rows)


def decode(ours, theirs, bw, peaks):
    print("\n== Decode: llama-1b, greedy, 16-token prompt, tokens/s (goal: >= 80% of the bandwidth roofline) ==")
    params = get(find(ours, bench="model"), "params") or get(find(theirs, bench="model"), "params")
    if params:
        print(f"  {params / 1e9:.3f}B parameters; roofline = batch x bandwidth / weight bytes per step at each "
              "side's precision (weights only, KV cache reads left out), or the step's products at PyTorch's "
              "measured peak of that precision where those take longer (fp32 at large batches)")
    rows = []
    for batch in DECODE_BATCHES:
        for dtype in DTYPES:
            for impl, src, match in (("worker", ours, {"graphs": False, **BEST}),
                                     ("worker+graphs", ours, {"graphs": True, **BEST}),
                                     ("worker, gemv off", ours, {"graphs": False, "gemv": False}),
                                     ("worker+graphs, gemv off", ours, {"graphs": True, "gemv": False}),
                                     ("worker, per-head attention", ours,
                                      {"graphs": False, "gemv": True, "grouped_decode": False}),
                                     ("worker, buffer reuse off", ours,
                                      {"graphs": False, **BEST, "buffer_cache": False}),
                                     ("torch", theirs, {})):
                d = find(src, bench="decode", batch=batch, dtype=dtype, **match)
                if d is None and match and match != {"graphs": False, **BEST}:
                    continue  # no run with graphs or with a kernel off
                label = f"{impl} {dtype}"
                if match.get("graphs") and d is not None and d.get("graphs_recorded") is False:
                    label += " (no graph recorded: plain steps)"
                roof = roofline(src, dtype, batch, bw, peaks)
                tps = get(d, "tokens_per_s")
                frac = ratio(tps, roof)
                rows.append([
                    batch, label, num(tps), num(get(d, "ms_per_step"), "{:.2f}"),
                    num(get(d, "prefill_ms"), "{:.1f}"), num(roof, "{:.0f}"),
                    num(pct(tps, roof), "{:.1f}%"),
                    "-" if frac is None else ("met" if frac >= 0.8 else "not met"),
                    num(get(d, "driver_allocations"), "{:d}"),
                ])
    table(["batch", "impl", "tokens/s", "ms/step", "prefill ms", "roofline tok/s", "of roofline", "80% goal",
           "driver allocs"], rows)
    print("\n  worker / PyTorch tokens/s at the same precision:")
    ratio_rows = []
    for batch in DECODE_BATCHES:
        cells = []
        for dtype in DTYPES:
            t = get(find(theirs, bench="decode", batch=batch, dtype=dtype), "tokens_per_s")
            for graphs in (False, True):
                a = get(find(ours, bench="decode", batch=batch, dtype=dtype, graphs=graphs, **BEST),
                        "tokens_per_s")
                cells.append(num(ratio(a, t), "{:.2f}x"))
        ratio_rows.append([batch, *cells])
    table(["batch", *(f"{d}{' graphs' if g else ''}" for d in DTYPES for g in (False, True))], ratio_rows)


def matmuls(ours, peaks):
    print("\n== Matrix products: worker TFLOP/s against PyTorch's measured peak in the same precision ==")
    rows = []

    def row(label, dtype, tf, fmt):
        rows.append([label, dtype, num(tf, fmt), num(pct(tf, peaks.get(dtype)), "{:.1f}%"),
                     num(pct(tf, peaks["bf16"]), "{:.1f}%")])

    for dtype in DTYPES:
        mm = find(ours, bench="matmul", dtype=dtype)
        if mm and mm.get("tflops") is not None:
            row("gemm 8192^3", dtype, mm["tflops"], "{:.1f}")
    for dtype in DTYPES:
        for r in ours:
            if (r.get("bench") == "op" and r.get("dtype") == dtype and r.get("op", "").startswith("linear")
                    and r.get("flops") and r.get("us")):
                label = f"{r['section']} {r['model']} b{r['batch']} {r['op']}"
                row(label, dtype, r["flops"] / r["us"] / 1e6, "{:.2f}")
    table(["product", "dtype", "TFLOP/s", "of same-dtype peak", "of bf16 peak"], rows)


def time_split(ours):
    print("\n== Where the worker's time goes (each op timed alone, x calls per pass) ==")
    groups = {}
    for r in ours:
        if r.get("bench") == "op":
            groups.setdefault((r.get("dtype"), r["section"], r["model"], r["batch"]), []).append(r)
    for (dtype, section, model, batch), ops in groups.items():
        if section == "encoder":
            measured = get(find(ours, bench="encoder", model=model, dtype=dtype), "ms_per_batch")
            what = f"{model} {dtype} forward pass, batch {batch} x 128"
        else:
            measured = get(find(ours, bench="decode", batch=batch, dtype=dtype, graphs=False, **BEST),
                           "ms_per_step")
            what = f"{model} {dtype} decode step, batch {batch}"
        total_ms = sum(o["us"] * o["calls"] for o in ops) / 1e3
        note = ""
        if measured and measured >= total_ms:
            note = f"; the other {measured - total_ms:.2f} ms are host work (tokens, sampling, bookkeeping) and gaps between launches"
        elif measured:
            note = "; more than the pass, since ops timed alone do not overlap as they do in it"
        print(f"\n  {what}: measured {num(measured, '{:.2f}')} ms; ops add up to {total_ms:.2f} ms{note}")
        op_rows = []
        for o in sorted(ops, key=lambda o: -o["us"] * o["calls"]):
            ms = o["us"] * o["calls"] / 1e3
            op_rows.append([
                o["op"], o["shape"], num(o["us"], "{:.1f}"), o["calls"], num(ms, "{:.3f}"),
                num(pct(ms, measured), "{:.1f}%"),
                num(o["flops"] / o["us"] / 1e6 if o.get("flops") and o.get("us") else None, "{:.2f}"),
                num(o["bytes"] / o["us"] / 1e3 if o.get("bytes") and o.get("us") else None, "{:.0f}"),
            ])
        table(["op", "shape", "us/call", "calls", "ms/pass", "of measured", "TFLOP/s", "GB/s"], op_rows)


def kernel_builds(ours):
    rows = [r for r in ours if r.get("bench") == "kernels"]
    if rows:
        print("\n== Kernel build at start-up (NVRTC, no cache; one thread a file) ==")
        for r in rows:
            print(f"  {r.get('dtype')}: {r.get('files')} files, {r.get('target')}, NVRTC {r.get('nvrtc')}, "
                  f"{num(r.get('ms'), '{:.0f}')} ms")


def selftest(ours):
    rows = [r for r in ours if r.get("bench") == "selftest"]
    if rows:
        print("\n== Start-up self-test (every op against the f64 reference, as `serve` runs it) ==")
        for r in rows:
            verdict = "passed" if r.get("ok") else f"FAILED: {r.get('message')}"
            print(f"  {r.get('dtype')}: {verdict} ({num(r.get('ms'), '{:.0f}')} ms)")


def failures(rows):
    errors = [r for r in rows if r.get("bench") == "error"]
    if errors:
        print("\n== Sections that failed ==")
        for e in errors:
            where = " ".join(str(x) for x in (e.get("impl"), e.get("dtype"), e.get("section")) if x)
            print(f"  {where}: {e.get('message')}")


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} ATOMIC.jsonl TORCH.jsonl")
    ours, theirs = load(sys.argv[1]), load(sys.argv[2])

    dev_a, dev_t = find(ours, bench="device"), find(theirs, bench="device")
    print(f"GPU: {get(dev_a, 'name') or get(dev_t, 'name') or 'unknown'}"
          f"  (PyTorch {get(dev_t, 'torch') or '-'}, CUDA {get(dev_t, 'cuda') or '-'})")
    print("Ratios set the worker against PyTorch at the same precision (all but 'of bf16 peak'). "
          "'-': a figure this run did not produce.")

    kernel_builds(ours)
    selftest(ours)
    accuracy(ours)
    bw, peaks = limits(ours, theirs)
    encoders(ours, theirs)
    decode(ours, theirs, bw, peaks)
    matmuls(ours, peaks)
    time_split(ours)
    failures(ours + theirs)


if __name__ == "__main__":
    main()
