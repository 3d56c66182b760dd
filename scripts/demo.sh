#!/usr/bin/env bash
# Builds Atomic and runs what works without a cluster today:
#  1. a local task pipeline (examples/local) through the real engine and dispatcher, against a
#     small ticket/mail API served on localhost;
#  2. the engine + dispatcher benchmark (10,000 tasks with dependencies, no-op worker).
# The model-backed example (examples/complaints) needs the inference worker.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p atomic-operator --bins --examples

port=18731
python3 - "$port" <<'PY' &
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
                          "complaint": "My kettle stopped working after two days."})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.answer(202, {"queued": True, "to": body["to"],
                          "idempotencyKey": self.headers.get("Idempotency-Key")})

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Api).serve_forever()
PY
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
  sleep 0.1
done

echo "== local pipeline (examples/local) =="
./target/release/atomic run examples/local --out target/atomic-out
echo
echo "== engine + dispatcher benchmark =="
./target/release/examples/engine_bench
