"""Helpers of the test suite: DeepSpeed JSONs, training and fine-tuning commands, their environment, the losses
a run logged, torchrun launches and their workers."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ds_json(path: Path, micro: int, stage: int = 0, accum: int = 1, **extra) -> str:
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": micro,
                "gradient_accumulation_steps": accum,
                "gradient_clipping": 3.0,
                "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            }
            | extra
        )
    )
    return str(path)


def train_cmd(data: Path, out: Path, ds: str, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "dtm_ds/train.py",
        "--ds_config",
        ds,
        "--model",
        "tiny",
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        f"--data.path={data}",
        "--data.workers=0",
        "--run.log_every=1",
        "--run.save_every=4",
        "--run.vis_every=0",
        "--optim.warmup_epochs=0.1",
        *extra,
    ]


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a replayed step keeps its last value


def run_env(faults: dict | None = None):
    """The environment of a training subprocess; ``faults`` goes to DTM_FAULTS (dtm_ds/faults.py)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # the device: dtm_ds/devices.py decides
    return env | {"DTM_FAULTS": json.dumps(faults)} if faults else env


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and step_losses(out) and max(step_losses(out)) >= step:
            return
        time.sleep(0.1)
    if proc.poll() is not None and proc.stderr is not None:  # it ended: say why
        raise AssertionError(f"{out} did not reach step {step}: exit {proc.returncode}\n{proc.stderr.read()[-3000:]}")
    raise AssertionError(f"{out} did not reach step {step}")


def torchrun_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]


def worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of a torchrun launcher's workers."""
    ranks = {}
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next(int(v.split(b"=")[1]) for v in env if v.startswith(b"RANK="))
        ranks[rank] = int(child)
    return ranks


def finetune_cmd(encoder, ds: str, out, *extra: str) -> list[str]:
    """eval/finetune.py on Fashion-MNIST (Debian package) with micro batch 8 and no loader workers."""
    return [sys.executable, "eval/finetune.py", "--encoder", str(encoder), "--dataset", "fmnist", "--data",
            "fashion_mnist", "--ds_config", ds, "--output_dir", str(out), "--workers", "0",
            "--recipe.batch_size=8", *extra]  # fmt: skip
