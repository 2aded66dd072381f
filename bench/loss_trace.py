"""The per-step losses of one fixed tiny run (2 ranks, accumulation 2, 8 steps), on the torchvision and the
FFCV backend, and of a 2-epoch fine-tuning of the first one on Fashion-MNIST (2 ranks, accumulation 2, with its
evaluation rows): a refactor of the loops must leave them bit-identical.

    python -m bench.loss_trace [--out trace.json] [--against before.json]

Prints ``{backend: {step: loss}}`` as JSON (and writes it to ``--out``); with ``--against``, exits 1 unless
every loss equals that file's bit for bit.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from data_prep.synthetic import write_class_folder

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def trace(work: Path) -> dict[str, dict[str, float]]:
    """{backend: {step: loss}} of the fixed run, written under ``work``."""
    from data_prep.write_ffcv import convert

    write_class_folder(work / "imgs", {"a": 20, "b": 20}, size=(40, 40))
    convert(str(work / "imgs"), str(work / "train.beton"), workers=1)
    ds = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 3.0,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    (work / "ds.json").write_text(json.dumps(ds))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    found = {}
    for backend, source in (("torchvision", work / "imgs"), ("ffcv", work / "train.beton")):
        out = work / backend
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29655",
               str(ROOT / "dtm_ds" / "train.py"), "--ds_config", str(work / "ds.json"), "--model", "tiny",
               "--output_dir", str(out), "--max_steps", str(STEPS), f"--data.path={source}",
               f"--data.backend={backend}", "--data.workers=1", "--run.log_every=1", "--run.vis_every=0",
               "--run.save_every=4", "--optim.warmup_epochs=0.1", "--optim.epochs=100"]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {backend} run failed:\n{done.stderr[-3000:]}")
        found[backend] = _losses(out)
    ft = work / "finetune"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29656",
           str(ROOT / "eval" / "finetune.py"), "--encoder", str(work / "torchvision"), "--dataset", "fmnist",
           "--data", "fashion_mnist", "--ds_config", str(work / "ds.json"), "--output_dir", str(ft), "--workers", "0",
           "--recipe.batch_size=16", "--train_per_class=4", "--eval_per_class=3", "--recipe.epochs=2",
           "--log_every=1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the fine-tuning run failed:\n{done.stderr[-3000:]}")
    found["finetune"] = _losses(ft)
    found["finetune_eval"] = {str(r["epoch"]): [r["top1"], r["train_loss"]] for r in _rows(ft / "eval.jsonl")}
    return found


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _losses(out: Path) -> dict[str, float]:
    return {str(r["step"]): r["loss"] for r in _rows(out / "metrics.jsonl")}


def main(out: str | None = None, against: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as work:
        found = trace(Path(work))
    print(json.dumps(found, indent=1))
    if out:
        Path(out).write_text(json.dumps(found, indent=1))
    if against:
        before = json.loads(Path(against).read_text())
        if before != found:
            sys.exit(f"the losses changed: before {before}, now {found}")
        print(f"bit-identical to {against}: {sum(map(len, found.values()))} losses")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
