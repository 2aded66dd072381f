#!/usr/bin/env bash
# One prepared call for a lent GPU machine (nothing can be fetched there; torch, timm and triton are
# present): checks graph-replayed DTM partitions against eager ones, times the DTM step eager vs CUDA
# graph, and times a ViT-B/16 DTM training step with a CLIP-B/16-architecture teacher in bf16.
#   bash bench/gpu_check.sh              # on the GPU machine (a few minutes)
#   bash bench/gpu_check.sh --dry_run    # CPU rehearsal with tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("timm", "triton", "deepspeed", "open_clip", "ffcv", "fire"):
    print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
PYEOF
"$PY" bench/gpu_check.py "$@"
