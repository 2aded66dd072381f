"""``make demo``: a real, small, end-to-end DTM run on a CPU-only machine (about 2 minutes on 2 cores).

Fashion-MNIST (Debian package) -> .beton -> ``tiny`` student with the ``pixels`` teacher through the
DeepSpeed engine -> checkpoint -> weighted k-NN on the test set for three feature sets: the pretrained
encoder, the same encoder at random init, and the raw (normalised) pixels -> a summary. Re-running
resumes (a finished run only re-evaluates).
"""

import json
import subprocess
import sys
from pathlib import Path

import fire

from dtm_ds.files import ROOT

__all__ = ["main"]


def _run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def main(out: str = "outputs/demo", per_class: int = 1500, epochs: int = 2, knn_per_class: int = 1000) -> dict:
    out = Path(out).resolve()
    beton, run = out / "fashion_mnist_train.beton", out / "run"
    out.mkdir(parents=True, exist_ok=True)
    if not beton.exists():
        _run(
            sys.executable,
            "-m",
            "data_prep.write_ffcv",
            "fashion_mnist",
            "--out",
            str(beton),
            "--per_class",
            str(per_class),
            "--write_mode",
            "raw",
        )
    _run(
        sys.executable,
        "dtm_ds/train.py",
        "--ds_config",
        "ds_configs/cpu.json",
        "--model",
        "tiny",
        "--output_dir",
        str(run),
        f"--data.path={beton}",
        "--data.backend=ffcv",
        "--data.workers=2",
        f"--optim.epochs={epochs}",
        "--optim.warmup_epochs=0.2",
        "--run.knn_every=100",  # the online k-NN: representation quality while the run goes
        "--run.knn_train=fashion_mnist",
        "--run.knn_val=fashion_mnist",
        "--run.knn_per_class=100",
        "--run.knn_crop_ratio=1.0",
    )
    png = str(out / "dtm_groups.png")
    _run(sys.executable, "-m", "dtm_ds", "visualize", str(run), "--out", png)
    results = {}
    for name, flag in (("pretrained", "--norandom_init"), ("random_init", "--random_init"), ("pixels", "--pixels")):
        knn = subprocess.run(
            [
                sys.executable,
                "eval/knn.py",
                "--encoder",
                str(run),
                "--train_per_class",
                str(knn_per_class),
                "--crop_ratio",
                "1.0",
                flag,
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        results[name] = json.loads(knn.stdout.strip().splitlines()[-1])["top1"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "final_loss": metrics[-1]["loss"],
        "steps": metrics[-1]["step"],
        "knn_top1_pretrained": results["pretrained"],
        "knn_top1_random_init": results["random_init"],
        "knn_top1_raw_pixels": results["pixels"],
        "online_knn_top1_by_step": {m["step"]: m["knn_top1"] for m in metrics if "knn_top1" in m},
        "img_per_s_median": sorted(m["img_per_s"] for m in metrics)[len(metrics) // 2],
        "tensorboard": str(run / "tb"),
        "checkpoint": str(run / "checkpoints"),
        "groups_png": png,
    }
    print("\n=== dtm_ds demo ===")
    for key, value in summary.items():
        print(f"{key:>22}: {value}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda summary: None)
