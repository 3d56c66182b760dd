#!/usr/bin/env python3
"""Turns the JSON lines of the GPU benchmark's two sides into the table issue 5 asks for.

    python3 worker/bench/gpu_report.py ATOMIC.jsonl TORCH.jsonl

Ratios (each labelled with the precisions it compares; the worker runs fp32 only):
- encoders: the worker's sentences/s over PyTorch eager's, per PyTorch precision (goal >= 1.5x
  against fp16/bf16);
- decode: tokens/s over the bandwidth roofline, batch x copy bandwidth / weight bytes per step
  (goal >= 80%); the bandwidth is the larger of the two sides' device-to-device copies;
- matrix products: TFLOP/s over the bf16 peak PyTorch measured (and over the fp32 peak, the
  honest ceiling for fp32 sgemm);
- where the time goes: each op's time per call x calls per pass, against the measured pass.

Reads only what is there: a missing figure prints as "-", so a partial run still reports.
Standard library only.
"""

import json
import sys


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


def find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def num(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


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


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} ATOMIC.jsonl TORCH.jsonl")
    ours, theirs = load(sys.argv[1]), load(sys.argv[2])
    rows = ours + theirs

    dev_a, dev_t = find(ours, bench="device"), find(theirs, bench="device")
    print(f"GPU: {get(dev_a, 'name') or get(dev_t, 'name') or 'unknown'}"
          f"  (PyTorch {get(dev_t, 'torch') or '-'}, CUDA {get(dev_t, 'cuda') or '-'})")
    print("The worker runs fp32 only (cuBLAS sgemm, no TF32). Rows marked 'fp32 vs fp16' or 'fp32 vs bf16' set")
    print("the worker's fp32 against PyTorch in half precision: not like for like; 'fp32 vs fp32' is.")

    # Limits.
    print("\n== Limits measured in this run ==")
    copy_a, copy_t = find(ours, bench="copy"), find(theirs, bench="copy")
    bws = [b for b in (get(copy_a, "d2d_gbs"), get(copy_t, "d2d_gbs")) if b]
    bw = max(bws) if bws else None
    print(f"  device copy bandwidth (bytes read + written, 1 GiB): worker {num(get(copy_a, 'd2d_gbs'), '{:.0f}')} GB/s, "
          f"PyTorch {num(get(copy_t, 'd2d_gbs'), '{:.0f}')} GB/s; roofline uses {num(bw, '{:.0f}')} GB/s")
    print(f"  host-to-device upload (pageable): worker {num(get(copy_a, 'h2d_gbs'))} GB/s, "
          f"PyTorch {num(get(copy_t, 'h2d_gbs'))} GB/s")
    peaks = {d: get(find(theirs, bench="matmul", dtype=d), "tflops") for d in ("bf16", "fp16", "tf32", "fp32")}
    print("  PyTorch 8192^3 matmul peaks: " + ", ".join(f"{d} {num(v)} TFLOP/s" for d, v in peaks.items()))

    # Encoders.
    print("\n== Encoders: batch 32 x 128, sentences/s (goal: worker >= 1.5x PyTorch eager fp16/bf16) ==")
    enc_rows = []
    for model in ("bert-base", "minilm"):
        a = get(find(ours, bench="encoder", model=model), "sentences_per_s")
        t = {d: get(find(theirs, bench="encoder", model=model, dtype=d), "sentences_per_s") for d in ("fp32", "fp16", "bf16")}
        enc_rows.append([
            model, num(a), num(t["fp32"]), num(t["fp16"]), num(t["bf16"]),
            num(ratio(a, t["fp32"]), "{:.2f}x"), num(ratio(a, t["fp16"]), "{:.2f}x"), num(ratio(a, t["bf16"]), "{:.2f}x"),
        ])
    table(["model", "worker fp32", "torch fp32", "torch fp16", "torch bf16",
           "fp32 vs fp32", "fp32 vs fp16", "fp32 vs bf16"], enc_rows)

    # Decode.
    print("\n== Decode: llama-1b, greedy, 16-token prompt, tokens/s (goal: >= 80% of the bandwidth roofline) ==")
    model_a = find(ours, bench="model")
    params = get(model_a, "params") or get(find(theirs, bench="model"), "params")
    if params:
        print(f"  {params / 1e9:.3f}B parameters; roofline = batch x bandwidth / weight bytes per step "
              "(weights only, KV cache reads left out)")
    dec_rows = []
    for batch in (1, 32):
        for impl, src, dtype in (("worker", ours, "fp32"), ("torch", theirs, "fp32"), ("torch", theirs, "bf16")):
            d = find(src, bench="decode", batch=batch, dtype=dtype)
            m = find(src, bench="model", dtype=dtype)
            wbytes = get(m, "weight_bytes_per_step")
            roof = batch * bw * 1e9 / wbytes if bw and wbytes else None
            tps = get(d, "tokens_per_s")
            frac = ratio(tps, roof)
            dec_rows.append([
                batch, f"{impl} {dtype}", num(tps), num(get(d, "ms_per_step"), "{:.2f}"),
                num(get(d, "prefill_ms"), "{:.1f}"), num(roof, "{:.0f}"),
                num(pct(tps, roof), "{:.1f}%"),
                "-" if frac is None else ("met" if frac >= 0.8 else "not met"),
            ])
    table(["batch", "impl", "tokens/s", "ms/step", "prefill ms", "roofline tok/s", "of roofline", "80% goal"], dec_rows)
    a1 = get(find(ours, bench="decode", batch=1), "tokens_per_s")
    t1 = get(find(theirs, bench="decode", batch=1, dtype="fp32"), "tokens_per_s")
    if a1 and t1:
        print(f"  worker fp32 vs PyTorch fp32 at batch 1: {a1 / t1:.2f}x")

    # Matrix products.
    print("\n== Matrix products: worker fp32 TFLOP/s against the measured peaks ==")
    mm = find(ours, bench="matmul")
    mm_rows = []
    if mm:
        tf = mm["tflops"]
        mm_rows.append(["sgemm 8192^3", num(tf), num(pct(tf, peaks["bf16"]), "{:.1f}%"), num(pct(tf, peaks["fp32"]), "{:.1f}%")])
    for r in ours:
        if r.get("bench") == "op" and r["op"].startswith("linear") and r.get("flops"):
            tf = r["flops"] / r["us"] / 1e6
            label = f"{r['section']} {r['model']} b{r['batch']} {r['op']}"
            mm_rows.append([label, num(tf, "{:.2f}"), num(pct(tf, peaks["bf16"]), "{:.1f}%"), num(pct(tf, peaks["fp32"]), "{:.1f}%")])
    table(["product", "TFLOP/s", "of bf16 peak (fp32 vs bf16)", "of fp32 peak (fp32 vs fp32)"], mm_rows)

    # Where the time goes.
    print("\n== Where the worker's time goes (each op timed alone, x calls per pass) ==")
    groups = {}
    for r in ours:
        if r.get("bench") == "op":
            groups.setdefault((r["section"], r["model"], r["batch"]), []).append(r)
    for (section, model, batch), ops in groups.items():
        if section == "encoder":
            measured = get(find(ours, bench="encoder", model=model), "ms_per_batch")
            what = f"{model} forward pass, batch {batch} x 128"
        else:
            measured = get(find(ours, bench="decode", batch=batch), "ms_per_step")
            what = f"{model} decode step, batch {batch}"
        total_ms = sum(o["us"] * o["calls"] for o in ops) / 1e3
        note = ""
        if measured and measured >= total_ms:
            note = f"; the other {measured - total_ms:.2f} ms are host work (cache copies, pooling, sampling) and gaps"
        elif measured:
            note = "; more than the pass, since ops timed alone do not overlap as they do in it"
        print(f"\n  {what}: measured {num(measured, '{:.2f}')} ms; ops add up to {total_ms:.2f} ms{note}")
        op_rows = []
        for o in sorted(ops, key=lambda o: -o["us"] * o["calls"]):
            ms = o["us"] * o["calls"] / 1e3
            op_rows.append([
                o["op"], o["shape"], num(o["us"], "{:.1f}"), o["calls"], num(ms, "{:.3f}"),
                num(pct(ms, measured), "{:.1f}%"),
                num(o["flops"] / o["us"] / 1e6 if o.get("flops") else None, "{:.2f}"),
                num(o["bytes"] / o["us"] / 1e3 if o.get("bytes") else None, "{:.0f}"),
            ])
        table(["op", "shape", "us/call", "calls", "ms/pass", "of measured", "TFLOP/s", "GB/s"], op_rows)

    errors = [r for r in rows if r.get("bench") == "error"]
    if errors:
        print("\n== Sections that failed ==")
        for e in errors:
            print(f"  {e.get('impl')} {e.get('section')}: {e.get('message')}")


if __name__ == "__main__":
    main()
