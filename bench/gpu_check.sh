#!/usr/bin/env bash
# One prepared call for a lent GPU machine (bench/gpu_check.py lists its seven parts; each prints PASS or FAIL
# with its figures, and the exit status is 1 unless all pass).
#   bash bench/device_wheels.sh                # here, once: the wheelhouse .whl/ (deepspeed, open_clip, ffcv, fire)
#   bash bench/gpu_check.sh                    # there, through the device tool with carry [".whl"]: ~5-9 min on one H200
#   bash bench/gpu_check.sh --dry_run          # here: the CPU rehearsal of every part (builds .whl/ when absent)
# WHEELHOUSE=<folder> names another wheelhouse.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
[ "${1:-}" = "--dry_run" ] && DRY=--dry_run
WHEELHOUSE=${WHEELHOUSE:-.whl}
export WHEELHOUSE PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [ -n "$DRY" ]; then
  PY=.venv/bin/python
  [ -x "$PY" ] || { echo "error: the dry run uses .venv (make setup)"; exit 2; }
  [ -n "$(ls "$WHEELHOUSE"/*.whl 2>/dev/null)" ] || [ "$WHEELHOUSE" != .whl ] || bash bench/device_wheels.sh "$WHEELHOUSE"
else
  PY=python3
  SITE=/tmp/dtm_site  # the carried wheels, beside the machine's own packages (torch, timm, numpy, numba, ...)
  if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELHOUSE"/*.whl || echo "FAIL wheels: pip could not install $WHEELHOUSE"
  else
    echo "FAIL wheels: no $WHEELHOUSE here (carry it: bash bench/device_wheels.sh, then carry [\".whl\"])"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
fi
exec "$PY" -m bench.gpu_check $DRY
