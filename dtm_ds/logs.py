"""Run logs on rank 0: metrics.jsonl, TensorBoard scalars/images and a progress bar."""

import json
import os
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm


class RunLog:
    """``step()`` after every optimizer step; lines go out every ``every`` steps with the img/s since the last."""

    def __init__(self, output_dir: str, active: bool, total_steps: int, start_step: int, every: int = 1):
        self.active, self.every = active, every
        self.last_time, self.last_step = time.perf_counter(), start_step
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tb"))
        self.metrics = open(Path(output_dir) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", dynamic_ncols=True)

    def step(self, step: int, values: dict[str, float], global_batch: int) -> None:
        if not self.active:
            return
        self.bar.update(step - self.bar.n)
        now = time.perf_counter()
        values = dict(values)
        values["img_per_s"] = global_batch * (step - self.last_step) / max(now - self.last_time, 1e-9)
        values["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        values |= process_usage()
        if torch.cuda.is_available():
            values["gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_time, self.last_step = now, step
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['img_per_s']:.0f}")
        self.metrics.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in values.items()}}) + "\n")
        self.metrics.flush()
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def image(self, step: int, image: torch.Tensor) -> None:
        if self.active:
            self.writer.add_image("dtm/groups", image, step)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.metrics.close()
            self.writer.close()


def process_usage() -> dict[str, float]:
    """Current resident memory (GiB) and open file descriptors of this process (Linux /proc; else empty)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return {"rss_gib": rss_kib / 2**20, "open_fds": float(len(os.listdir("/proc/self/fd")))}
    except (OSError, StopIteration):
        return {}
