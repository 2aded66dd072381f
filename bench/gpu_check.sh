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
"$PY" -m bench.gpu_check "$@"
# The tests marked gpu (graph replay vs eager over 20 schedules; a CLIP-architecture teacher in bf16
# through SDPA): pytest when present, else each test function called directly.
if [ "${1:-}" != "--dry_run" ]; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
  else
    "$PY" -c "import tests.test_gpu as t; [getattr(t, n)() or print(n, 'passed') for n in dir(t) if n.startswith('test_')]"
  fi
fi
# The pretraining loop itself on the GPU (when DeepSpeed is installed): tiny preset, ZeRO-2 + bf16,
# accumulation 2, 12 steps on a generated image folder; then the metrics row of the last step (MFU,
# per-rank peak memory, lr as used) and a re-run that must write nothing.
if "$PY" -c "import deepspeed" 2>/dev/null && [ "${1:-}" != "--dry_run" ]; then
  TMP=$(mktemp -d)
  "$PY" - "$TMP" <<'PYEOF'
import json, sys
from pathlib import Path
from data_prep.synthetic import write_class_folder
tmp = Path(sys.argv[1])
write_class_folder(tmp / "imgs", {"a": 32, "b": 32}, size=(40, 40))
(tmp / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
    "gradient_clipping": 3.0, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}))
PYEOF
  RUN=("$PY" dtm_ds/train.py --ds_config "$TMP/ds.json" --model tiny --output_dir "$TMP/run" --max_steps 12
       --data.path="$TMP/imgs" --data.workers=2 --run.log_every=4 --run.save_every=6 --optim.epochs=10)
  "${RUN[@]}" 2>&1 | tail -n 2
  tail -n 1 "$TMP/run/metrics.jsonl"
  "${RUN[@]}" 2>&1 | grep -E "nothing to do|resumed" || echo "re-run: unexpected output"
fi
