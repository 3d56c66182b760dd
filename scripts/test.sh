#!/usr/bin/env bash
# The test command: fetches the small real models the worker tests use (once; skipped when
# present), then runs every test of the workspace. Tests that need what this machine lacks
# (a cluster, a GPU) print why they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh >/dev/null
cargo test --workspace "$@"
