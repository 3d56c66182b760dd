"""How the worker binary fails on a GPU it cannot use, run on the emulated GPU (whose memory and
compute capability the variables ATOMIC_EMULATED_GPU_MEMORY_MIB and
ATOMIC_EMULATED_GPU_COMPUTE_CAPABILITY set; scripts/emulated-gpu.sh puts its libraries on the
library path). Each case starts `atomic-worker serve` and checks what an operator or a client
sees:

- a GPU older than the kernels need: `--device cuda:0` exits naming its compute capability and
  the minimum; `--device auto` warns and serves on the CPU;
- a device that does not exist (`cuda:1`) exits naming it;
- a GPU too small for the start-up (cuBLAS's workspace) exits naming out-of-memory;
- a key/value pool larger than the GPU exits naming `--kv-cache-mib`;
- a GPU too small for the largest batch warns at start-up, then runs a batch that does not fit
  in smaller pieces (counted in /metrics) and answers it whole, and the next one normally, and
  stays ready (a sequence too large alone answers 503 `out_of_memory`: the worker's tests);
- a launch that fails while serving as a trapping kernel's does (ATOMIC_EMULATED_GPU_FAULT_FILE:
  the driver's sticky CUDA_ERROR_LAUNCH_FAILED, after which the context is unusable) fails its
  request with the driver's error, then /ready and /health answer 503 naming it, so Kubernetes
  restarts the pod, and new requests are refused at once; the worker does not crash.

    python3 worker/bench/device_failures.py WORKER_BINARY

Standard library only; exits non-zero on the first failed check.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

PORT = 18190
# Sequences (of the tiny BERT's 64 positions) in the batch that does not fit a 36 MiB GPU.
LARGE_BATCH = 64


def fail(message):
    raise SystemExit(f"device_failures: {message}")


def call(path, body=None):
    """(status, parsed JSON or text) of a request to the worker on PORT."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class Worker:
    """`atomic-worker serve` on a fixture with the emulated GPU's variables set."""

    def __init__(self, binary, fixture, args, gpu, log_dir):
        try:
            call("/ready")
            fail(f"something already answers on port {PORT}; stop it first")
        except OSError:
            pass  # free, as it should be
        self.log_path = os.path.join(log_dir, "worker.log")
        env = {**os.environ, "NO_COLOR": "1", **gpu}
        command = [binary, "serve", "--model-dir", f"worker/fixtures/{fixture}", "--model-name", "m",
                   "--port", str(PORT), "--host", "127.0.0.1",
                   "--kernel-cache-dir", os.path.join(log_dir, "kernels"), *args]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def exit_status(self, within=90):
        """The exit status once it exits (failing if it is still up after `within` s)."""
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.stop()
            fail(f"the worker was expected to exit; it is still running. Log:\n{self.log()[-3000:]}")

    def wait_ready(self, within=90):
        deadline = time.time() + within
        while time.time() < deadline:
            if self.proc.poll() is not None:
                fail(f"the worker exited with {self.proc.returncode}; log:\n{self.log()[-3000:]}")
            try:
                if call("/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        fail(f"not ready after {within} s; log:\n{self.log()[-3000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def expect_exit(binary, name, fixture, args, gpu, phrases):
    with tempfile.TemporaryDirectory() as tmp:
        worker = Worker(binary, fixture, args, gpu, tmp)
        status = worker.exit_status()
        log = worker.log()
    missing = [p for p in phrases if p not in log]
    if status == 0 or missing:
        fail(f"{name}: expected a failed exit naming {missing or phrases}; exit {status}, log:\n{log[-3000:]}")
    last = [line for line in log.splitlines() if line.strip()][-1]
    print(f"device_failures: {name}: exit {status}: {last}")


def kernel_fault(binary, fixture, path, request):
    """A launch failing as a trapping kernel's does while `fixture` serves `request` on `path`:
    that request answers 500 naming the driver's error; then /ready and /health answer 503 naming
    it, new requests are refused with 503 at once (within 5 s), and the worker stays up for
    Kubernetes to restart it."""
    name = f"a kernel fault while {fixture} serves"
    with tempfile.TemporaryDirectory() as tmp:
        fault = os.path.join(tmp, "fault")
        # A small largest batch: the start-up pass over it is not what this checks, and at the
        # default 16384 tokens it takes the emulator about as long as wait_ready waits.
        worker = Worker(binary, fixture, ["--device", "cuda:0", "--max-batch-tokens", "1024"],
                        {"ATOMIC_EMULATED_GPU_FAULT_FILE": fault}, tmp)
        worker.wait_ready()
        try:
            before = call(path, request)[0]
            open(fault, "w").close()
            failed = call(path, request)
            probes = {probe: call(probe) for probe in ["/ready", "/health"]}
            started = time.monotonic()
            refused = call(path, request)
            refused_in = time.monotonic() - started
            alive = worker.proc.poll() is None
        except OSError as e:  # the worker crashed or hung on the fault
            worker.stop()
            fail(f"{name}: {e!r}; log:\n{worker.log()[-3000:]}")
        finally:
            worker.stop()
        log = worker.log()
    if before != 200:
        fail(f"{name}: the request before the fault answered {before}")
    status, body = failed
    if status != 500 or "launch failure" not in str(body):
        fail(f"{name}: the request that met the fault answered {status} {str(body)[:500]}; expected 500 "
             f"naming the driver's launch failure. Log:\n{log[-3000:]}")
    for probe, (code, text) in probes.items():
        if code != 503 or "compute device failed" not in str(text) or "launch failure" not in str(text):
            fail(f"{name}: {probe} answered {code} {str(text)[:300]} after the fault")
    if refused[0] != 503 or "must restart" not in str(refused[1]) or refused_in > 5:
        fail(f"{name}: a request after the fault answered {refused[0]} in {refused_in:.1f} s: "
             f"{str(refused[1])[:300]}")
    if not alive or "the worker needs a restart" not in log:
        fail(f"{name}: still running: {alive}; log:\n{log[-3000:]}")
    print(f"device_failures: {name}: the request answered 500, the next 503; /ready and /health 503: "
          f"{str(probes['/ready'][1])[:200]}")


def main():
    if len(sys.argv) != 2:
        fail("usage: device_failures.py WORKER_BINARY")
    binary = sys.argv[1]
    old_gpu = {"ATOMIC_EMULATED_GPU_COMPUTE_CAPABILITY": "6.1"}
    expect_exit(binary, "a GPU older than 7.0", "tiny-bert", ["--device", "cuda:0"], old_gpu,
                ["--device cuda:0", "compute capability 6.1", "at least 7.0"])
    expect_exit(binary, "a device that does not exist", "tiny-bert", ["--device", "cuda:1"], {},
                ["--device cuda:1", "device 1 requested"])
    expect_exit(binary, "a GPU too small to start", "tiny-bert", ["--device", "cuda:0"],
                {"ATOMIC_EMULATED_GPU_MEMORY_MIB": "20"}, ["--device cuda:0", "out of GPU memory"])
    expect_exit(binary, "a key/value pool larger than the GPU", "tiny-llama",
                ["--device", "cuda:0", "--kv-cache-mib", "100"], {"ATOMIC_EMULATED_GPU_MEMORY_MIB": "64"},
                ["--kv-cache-mib", "out of GPU memory"])

    with tempfile.TemporaryDirectory() as tmp:
        worker = Worker(binary, "tiny-bert", ["--device", "auto"], old_gpu, tmp)
        worker.wait_ready()
        try:
            status, _ = call("/v1/embeddings", {"model": "m", "input": ["hello"]})
        finally:
            worker.stop()
        log = worker.log()
        for phrase in ["no usable GPU", "compute capability 6.1", "running on the CPU"]:
            if phrase not in log:
                fail(f"--device auto on a GPU older than 7.0: no {phrase!r} in the log:\n{log[-3000:]}")
        if status != 200:
            fail(f"--device auto on a GPU older than 7.0: embeddings answered {status}")
        print("device_failures: --device auto on a GPU older than 7.0: warned and served on the CPU")

    with tempfile.TemporaryDirectory() as tmp:
        worker = Worker(binary, "tiny-bert", ["--device", "cuda:0"], {"ATOMIC_EMULATED_GPU_MEMORY_MIB": "36"}, tmp)
        worker.wait_ready()
        try:
            started = time.monotonic()
            large = call("/v1/embeddings", {"model": "m", "input": [" ".join(["invoice"] * 400)] * LARGE_BATCH})
            seconds = time.monotonic() - started
            small = call("/v1/embeddings", {"model": "m", "input": ["hello"]})
            ready = call("/ready")[0]
            metrics = call("/metrics")[1]
        finally:
            worker.stop()
        log = worker.log()
        if "lower --max-batch-tokens" not in log:
            fail(f"a GPU too small for the largest batch: no start-up warning in the log:\n{log[-3000:]}")
        status, body = large
        if status != 200 or len(body.get("data", [])) != LARGE_BATCH:
            fail(f"a batch that does not fit answered {status} {str(body)[:500]}; expected {LARGE_BATCH} "
                 "embeddings, run in smaller pieces")
        splits = [line for line in str(metrics).splitlines()
                  if line.startswith('atomic_worker_out_of_memory_splits_total{pass="encode"}')]
        if not splits or float(splits[0].split()[-1]) < 1:
            fail(f"a batch that does not fit: no encode split in /metrics: {splits}")
        if small[0] != 200 or ready != 200:
            fail(f"after a batch ran out of memory: a small request answered {small[0]}, /ready {ready}")
        print(f"device_failures: a batch that does not fit: {LARGE_BATCH} embeddings in {seconds:.1f} s, "
              f"{splits[0].split()[-1]} splits; the next request answered 200 and /ready 200")

    kernel_fault(binary, "tiny-bert", "/v1/embeddings", {"model": "m", "input": ["my kettle broke"]})
    kernel_fault(binary, "tiny-llama", "/v1/completions",
                 {"model": "m", "prompt": "my kettle", "max_tokens": 4, "temperature": 0})
    print("device_failures: passed")


if __name__ == "__main__":
    main()
