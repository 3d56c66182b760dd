#!/usr/bin/env bash
# Fetches NVRTC (the CUDA run-time compiler, a plain shared library that needs no GPU or driver)
# from its PyPI wheel and unpacks it under target/nvrtc/ (ignored by git), so that the worker's
# CUDA kernels can be compiled to PTX on machines without CUDA. Idempotent: an unpacked copy is
# reused.
#
# Prints the folder holding libnvrtc.so.* on stdout; progress goes to stderr. Use it as
#   export LD_LIBRARY_PATH="$(scripts/fetch-nvrtc.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
#
# The version is the CUDA major the worker's `cuda` feature is built for (cudarc loads
# libnvrtc.so.<major>); 13.0 matches the GPU machines' driver. The worker loads machine code
# (CUBIN) on GPUs this NVRTC knows, which any driver of the major takes, but falls back to PTX for
# newer GPUs, and the driver's PTX JIT rejects PTX from a newer NVRTC. Override with NVRTC_REQUIREMENT (e.g. "nvidia-cuda-nvrtc-cu12==12.8.*").
set -euo pipefail
cd "$(dirname "$0")/.."

requirement="${NVRTC_REQUIREMENT:-nvidia-cuda-nvrtc==13.0.88}"
dir="target/nvrtc"

find_lib_dir() {
    local lib
    lib="$(find "$dir/unpacked" -name 'libnvrtc.so*' -print -quit 2>/dev/null || true)"
    [ -n "$lib" ] && (cd "$(dirname "$lib")" && pwd)
}

if [ -f "$dir/requirement" ] && [ "$(cat "$dir/requirement")" = "$requirement" ] && find_lib_dir >/dev/null; then
    echo "fetch-nvrtc: $requirement already unpacked in $dir" >&2
else
    rm -rf "$dir"
    mkdir -p "$dir/download"
    echo "fetch-nvrtc: downloading $requirement" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dir/download" "$requirement" >&2
    # Unpack into a scratch folder first: an interrupted unzip never looks like a finished one.
    python3 -m zipfile -e "$dir"/download/*.whl "$dir/scratch"
    mv "$dir/scratch" "$dir/unpacked"
    rm -rf "$dir/download"
    echo "$requirement" >"$dir/requirement"
fi

lib_dir="$(find_lib_dir)" || { echo "fetch-nvrtc: no libnvrtc.so* in $requirement" >&2; exit 1; }
# cudarc looks for libnvrtc.so or libnvrtc.so.<major>; wheels ship the latter, sometimes with a
# longer suffix only, so make sure the short name exists.
if [ ! -e "$lib_dir/libnvrtc.so.13" ] && [ ! -e "$lib_dir/libnvrtc.so.12" ]; then
    real="$(ls "$lib_dir"/libnvrtc.so.* | head -n1)"
    major="$(basename "$real" | sed -E 's/libnvrtc\.so\.([0-9]+).*/\1/')"
    ln -s "$(basename "$real")" "$lib_dir/libnvrtc.so.$major"
fi
echo "$lib_dir"
