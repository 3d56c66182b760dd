"""The worker binary end to end on a device, as a pod runs it: `atomic-worker serve` on a model
folder, started twice over one kernel cache folder, then once on the CPU, each answering
embeddings requests (an encoder) or greedy completions (a decoder). Checks, and prints as it
goes:

- each start reaches /ready and answers;
- the second start reads every kernel from the cache (its log says `from_cache=N compiled=0`)
  and answers exactly as the first did;
- the device's answers agree with the CPU's: embeddings by cosine (>= 0.999 per text in half
  precision, 0.99999 in fp32); completions token for token in fp32 (in half precision a tiny
  random model's near-equal logits may pick another token, so the shared prefix is printed,
  not checked);
- /metrics holds the start-up phases (`atomic_worker_startup_seconds`) and, on the device, its
  buffer cache's counts (`atomic_worker_gpu_buffer_requests_total`, some reused) and, for a
  decoder served with `ATOMIC_WORKER_CUDA_GRAPH_MAX_BATCH` set, decode steps replayed from CUDA
  graphs (`atomic_worker_decode_graph_steps_total{outcome="replayed"}`).

    python3 worker/bench/serve_smoke.py WORKER_BINARY MODEL_DIR [--device cuda:0] [--precision bf16]

With `--device cpu` it checks the mechanics on a machine without a GPU (the cache lines are
then skipped: the CPU compiles no kernels). Standard library only; exits non-zero on the first
failed check.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

TEXTS = ["the invoice was charged twice", "where is my parcel?", "thank you, that solved it"]
# Tokens each greedy completion generates.
COMPLETION_TOKENS = 8


def is_decoder(model):
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.get("architectures", []))


def request(port, path, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def start(binary, model, device, precision, cache, port, log_path):
    try:
        request(port, "/ready", timeout=2)
        answered = True
    except urllib.error.HTTPError:
        answered = True  # an error status is an answer too
    except OSError:
        answered = False  # free, as it should be
    if answered:
        raise SystemExit(f"serve_smoke: something already answers on port {port}; stop it or pass --port")
    log = open(log_path, "w")
    args = [binary, "serve", "--model-dir", model, "--model-name", "m", "--device", device, "--precision", precision,
            "--port", str(port), "--host", "127.0.0.1", "--kernel-cache-dir", cache]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_smoke: the worker exited with {proc.returncode}; log:\n"
                             + open(log_path).read()[-4000:])
        try:
            if request(port, "/ready", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"serve_smoke: not ready after 120 s; log:\n" + open(log_path).read()[-4000:])


def ask(port, decoder):
    """The embeddings of TEXTS, or a greedy completion of each."""
    if not decoder:
        body = request(port, "/v1/embeddings", {"model": "m", "input": TEXTS})[1]
        return [d["embedding"] for d in json.loads(body)["data"]]
    texts = []
    for prompt in TEXTS:
        body = json.loads(request(port, "/v1/completions", {
            "model": "m", "prompt": prompt, "max_tokens": COMPLETION_TOKENS, "temperature": 0},
            timeout=60)[1])
        generated = body["usage"]["completion_tokens"]
        if body["choices"][0]["finish_reason"] == "length" and generated != COMPLETION_TOKENS:
            raise SystemExit(f"serve_smoke: asked for {COMPLETION_TOKENS} tokens, got {generated}")
        texts.append(body["choices"][0]["text"])
    return texts


def ask_and_stop(proc, port, decoder):
    try:
        answers = ask(port, decoder)
        metrics = request(port, "/metrics")[1]
    except urllib.error.HTTPError as e:
        raise SystemExit(f"serve_smoke: {e.url} answered {e.code}: {e.read().decode(errors='replace')}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    phases = dict(re.findall(r'atomic_worker_startup_seconds\{phase="(\w+)"\} (\S+)', metrics))
    buffers = {k: float(v) for k, v in re.findall(
        r'atomic_worker_gpu_buffer_requests_total\{outcome="(\w+)"\} (\S+)', metrics)}
    graphs = {k: float(v) for k, v in re.findall(
        r'atomic_worker_decode_graph_steps_total\{outcome="(\w+)"\} (\S+)', metrics)}
    return answers, phases, buffers, graphs


def shared_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--port", type=int, default=18180)
    args = ap.parse_args()
    gpu = args.device != "cpu"
    decoder = is_decoder(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/kernels"
        runs = []
        for i, device in enumerate([args.device, args.device, "cpu"]):
            log_path = f"{tmp}/worker-{i}.log"
            started = time.time()
            proc = start(args.binary, args.model, device, args.precision, cache, args.port + i, log_path)
            ready = time.time() - started
            answers, phases, buffers, graphs = ask_and_stop(proc, args.port + i, decoder)
            # Colour codes, should a build still write them, would split `key=value`.
            log = re.sub(r"\x1b\[[0-9;]*m", "", open(log_path).read())
            built = re.search(r"built the GPU kernels.*", log)
            print(f"serve_smoke: start {i + 1} ({device}): ready in {ready:.2f} s; phases {phases}"
                  + (f"; {built.group(0)}" if built else ""))
            if "ready" not in phases:
                raise SystemExit("serve_smoke: /metrics has no atomic_worker_startup_seconds{phase=\"ready\"}")
            if device != "cpu":
                print(f"serve_smoke: start {i + 1}: device buffers {buffers}")
                if buffers.get("reused", 0) <= 0:
                    raise SystemExit("serve_smoke: /metrics shows no reused device buffer "
                                     "(atomic_worker_gpu_buffer_requests_total{outcome=\"reused\"})")
                if decoder and int(os.environ.get("ATOMIC_WORKER_CUDA_GRAPH_MAX_BATCH", "0") or 0) > 0:
                    print(f"serve_smoke: start {i + 1}: decode graph steps {graphs}")
                    if graphs.get("replayed", 0) <= 0:
                        raise SystemExit("serve_smoke: decode graphs are on but /metrics shows no step replayed")
            runs.append((answers, log))
        (first, log1), (second, log2), (cpu, _) = runs
        if gpu:
            if not re.search(r"from_cache=0 compiled=\d+", log1):
                raise SystemExit("serve_smoke: the first start did not compile its kernels")
            if not re.search(r"from_cache=\d+ compiled=0", log2):
                raise SystemExit("serve_smoke: the second start did not read every kernel from the cache")
        if first != second:
            raise SystemExit("serve_smoke: the second start answers differently from the first")
        if decoder:
            for prompt, a, b in zip(TEXTS, first, cpu):
                agreement = "the same" if a == b else f"the first {shared_prefix(a, b)} characters shared"
                print(f"serve_smoke: {prompt!r}: {args.device} {a!r}, cpu {b!r} ({agreement})")
            if args.precision == "fp32" and first != cpu:
                raise SystemExit(f"serve_smoke: {args.device}'s greedy completions differ from the CPU's in fp32")
            print("serve_smoke: passed")
            return
        worst = min(cosine(a, b) for a, b in zip(first, cpu))
        print(f"serve_smoke: {args.device} against the CPU: worst cosine {worst:.6f} over {len(TEXTS)} texts")
        bound = 0.999 if gpu and args.precision != "fp32" else 0.99999
        if worst < bound:
            raise SystemExit(f"serve_smoke: cosine {worst} below {bound}")
    print("serve_smoke: passed")


if __name__ == "__main__":
    main()
