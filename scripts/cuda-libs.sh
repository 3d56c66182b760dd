#!/usr/bin/env bash
# Prints, colon-separated, the folders holding the CUDA 13 libraries (libcublas, libcublasLt,
# libnvrtc) of the pip nvidia-* packages of a Python (default python3; set PYTHON), for
# LD_LIBRARY_PATH: on the GPU machines they are not on the default library path. Newer wheels put
# them all in nvidia/cu13/lib, older ones in nvidia/<package>/lib. Warns on stderr about any
# library found in neither those folders nor the linker cache. The driver's libcuda.so.1 is on the
# default path.
#   export LD_LIBRARY_PATH="$(bash scripts/cuda-libs.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set -uo pipefail
py="${PYTHON:-python3}"
dirs="$("$py" - <<'PY'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = []
for root in list(nvidia.__path__):
    for pattern in ("cu13/lib", "*/lib"):
        for d in sorted(glob.glob(os.path.join(root, pattern))):
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PY
)"
for lib in libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
    found=""
    IFS=: read -ra search <<<"$dirs"
    for d in "${search[@]}"; do
        [ -n "$d" ] && [ -e "$d/$lib" ] && found="$d" && break
    done
    if [ -z "$found" ] && ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
        echo "cuda-libs: warning: $lib not found in the nvidia-* packages or the linker cache" >&2
    fi
done
echo "$dirs"
