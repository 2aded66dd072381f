"""Run logs on rank 0: metrics.jsonl, TensorBoard scalars/images and a progress bar; FLOPs for MFU.

Values are written as they are: JSON floats (shortest round-trip repr, never fixed decimals), so a
warm-up lr of 3.0218e-06 reads back as 3.0218e-06. Lists (per parameter group, per rank) go to
metrics.jsonl whole and to TensorBoard as their min and max.
"""

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

__all__ = [
    "Clock",
    "MEMORY_FIELDS",
    "PEAK_BF16",
    "RunLog",
    "count_step_flops",
    "device_peak_flops",
    "memory_gib",
    "peak_bf16",
    "step_flops",
    "step_values",
]

PEAK_BF16 = (
    (r"H100 PCIe", 756e12), (r"H100 NVL", 835e12), (r"H200 NVL", 835e12), (r"GH200", 989e12),
    (r"H100", 989e12), (r"H200", 989e12), (r"A100", 312e12), (r"L40S", 362e12), (r"L40\b", 181e12),
    (r"L4\b", 121e12), (r"A10\b", 125e12),
)  # fmt: skip
"""Dense (not sparse) bf16 tensor-core peak FLOP/s by device name (``torch.cuda.get_device_name``: "NVIDIA H100
80GB HBM3" is the SXM part), from NVIDIA's data sheets; the first pattern found in the name wins. MFU is
logged for these devices only; any other reports it as unknown."""


def peak_bf16(name: str) -> float | None:
    """The dense bf16 peak of the device called ``name``, or None when ``PEAK_BF16`` does not know it."""
    return next((peak for pattern, peak in PEAK_BF16 if re.search(pattern, name)), None)


class RunLog:
    """``step()`` at logging steps; each line carries the img/s and tokens/s since the previous one. On a
    terminal a progress bar; otherwise (a batch system's log file: ``plain``, by default when stderr is not a
    terminal) one plain line per logging step on stdout: step/total, loss, lr, img/s and the time left.
    ``monitor``: DeepSpeed's (``engine.monitor``): every scalar that goes to TensorBoard also goes to the
    monitors the DeepSpeed JSON enables (``wandb``, ``csv_monitor``, ``comet``, on rank 0)."""

    def __init__(self, output_dir: str, active: bool, total_steps: int, start_step: int, task: str,
                 plain: bool | None = None, monitor=None):  # fmt: skip
        self.active = active
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.peak = device_peak_flops()
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tb"))
        self.metrics = open(Path(output_dir) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.task, self.total, self.started = task, total_steps, (time.perf_counter(), start_step)
        terminal = sys.stderr.isatty() if plain is None else not plain
        self.bar = tqdm(total=total_steps, initial=start_step, desc=task, dynamic_ncols=True) if terminal else None

    def step(self, step: int, values: dict, global_batch: int, flops_per_image: float | None = None,
             tokens_per_image: int = 0, world: int = 1, excluded_s: float = 0.0) -> None:  # fmt: skip
        """Write ``values`` for optimizer step ``step`` plus throughput (total and per rank), MFU where the
        device's peak is known, and this process's memory and open files. ``excluded_s``: seconds since the
        previous line that were not training (an online k-NN), left out of the throughput."""
        now = time.perf_counter()
        img_s = global_batch * (step - self.last_step) / max(now - self.last_time - excluded_s, 1e-9)
        self.last_time, self.last_step = now, step
        if not self.active:
            return
        values = dict(values) | {"img_per_s": img_s, "img_per_s_per_rank": img_s / world}
        if tokens_per_image:
            tokens = img_s * tokens_per_image
            values |= {"tokens_per_s": tokens, "tokens_per_s_per_rank": tokens / world}
        if flops_per_image and self.peak:
            values["mfu"] = flops_per_image * img_s / (world * self.peak)
        values |= _process_usage()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{values['loss']:.4g}", img_s=f"{img_s:.0f}")
        else:
            print(self._line(step, values, img_s), flush=True)
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        for key, value in values.items():
            if isinstance(value, list):
                self.scalar(f"train/{key}_max", max(value), step)
                self.scalar(f"train/{key}_min", min(value), step)
            else:
                self.scalar(f"train/{key}", value, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        """One scalar to TensorBoard and to DeepSpeed's monitors (rank 0)."""
        if not self.active:
            return
        self.writer.add_scalar(name, value, step, new_style=True)
        if self.monitor is not None:
            self.monitor.write_events([(name, value, step)])

    def _line(self, step: int, values: dict, img_s: float) -> str:
        start, first = self.started
        rate = (step - first) / max(time.perf_counter() - start, 1e-9)  # steps/s over this process's run
        left = (self.total - step) / rate if rate > 0 else float("nan")
        eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}" if left == left else "?"
        lr = values.get("lr")
        return (f"{self.task} step {step}/{self.total} ({100 * step / max(self.total, 1):.1f} %) loss "
                f"{values['loss']:.4g}" + (f" lr {lr:.3g}" if lr is not None else "") + f" img/s {img_s:.0f} "
                f"ETA {eta}" + (f" knn top-1 {values['knn_top1']:.2f} %" if "knn_top1" in values else ""))  # fmt: skip

    def image(self, step: int, image: torch.Tensor) -> None:
        if self.active:
            self.writer.add_image("dtm/groups", image, step)

    def close(self) -> None:
        if self.active:
            if self.bar is not None:
                self.bar.close()
            self.metrics.close()
            self.writer.close()


class Clock:
    """Wall time per phase of a window: ``with clock("time_teacher"): ...`` charges to its phase the time since
    the previous block ended (so the blocks tile the window), after synchronising the device (``sync=False``:
    host-side work). Off (``device`` None): the blocks only run their code."""

    def __init__(self, device: torch.device | None):
        self.device, self.times, self.last = device, {}, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str, sync: bool = True):
        yield
        if self.device is None:
            return
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self.last
        self.last = now


def device_peak_flops() -> float | None:
    """This device's dense bf16 peak FLOP/s when known (``PEAK_BF16``), else None (CPU included)."""
    return peak_bf16(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def step_flops(teacher, model, target_dim: int, device: torch.device) -> float | None:
    """FLOPs of one image through a training step where the device's peak is known (for MFU), else None."""
    return count_step_flops(teacher, model, target_dim, device) if device_peak_flops() else None


def count_step_flops(teacher, model, target_dim: int, device: torch.device) -> float:
    """FLOPs of one image through a training step: teacher forward, student forward and backward, counted
    by ``torch.utils.flop_counter`` (the student on the meta device: no memory, no gradient hooks; DTM's
    scatter means count as nothing). ``nn.MultiheadAttention``'s inference fast path (CLIP's towers) is one
    fused op the counter cannot see, so it is off while counting."""
    from torch.utils.flop_counter import FlopCounterMode

    from dtm_ds.student import DTMStudent

    with torch.device("meta"):
        student = DTMStudent(model, target_dim)
        fake = torch.zeros(1, 3, model.img_size, model.img_size)
        mask = torch.zeros(1, model.grid**2, dtype=torch.bool)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            teacher(torch.zeros(1, 3, model.img_size, model.img_size, device=device))
            student(fake, mask).float().pow(2).mean().backward()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return float(counter.get_total_flops())


def _process_usage() -> dict[str, float]:
    """Current resident memory (GiB) and open file descriptors of this process (Linux /proc; else empty)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return {"rss_gib": rss_kib / 2**20, "open_fds": float(len(os.listdir("/proc/self/fd")))}
    except (OSError, StopIteration):
        return {}


MEMORY_FIELDS = ("peak_device_mem_gib_per_rank", "peak_rss_gib_per_rank")


def memory_gib() -> torch.Tensor:
    """[peak device memory, peak resident memory] of this process in GiB (device: 0 on CPU), in the order
    of ``MEMORY_FIELDS``."""
    import resource

    device = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return torch.tensor([device, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64)


def step_values(engine, optimizer, levels: torch.Tensor, lrs: list[float], local_norm) -> dict:
    """The values of a logging step: the loss and per-level losses (means over ranks of ``levels`` [L],
    each rank's window mean), the lrs that acted and the weight decays per group, the gradient norms, the
    loss scale (fp16), per-rank peak memory. One gather; call it at logging steps only."""
    from dtm_ds import distributed
    from dtm_ds.engine import grad_norms

    n = len(levels)
    rows = distributed.gather_rows(torch.cat([levels.double().cpu(), memory_gib()]))  # (world, n + m)
    means = rows[:, :n].mean(0)
    values = {"loss": means.mean().item(), **{f"loss_level{i}": v for i, v in enumerate(means.tolist())}}
    wds = [g["weight_decay"] for g in optimizer.param_groups]
    values |= {"lr": max(lrs), "lr_groups": lrs, "weight_decay_groups": wds} | grad_norms(engine, local_norm)
    if engine.fp16_enabled():
        values["loss_scale"] = float(engine.optimizer.cur_scale)
    return values | {name: rows[:, n + i].tolist() for i, name in enumerate(MEMORY_FIELDS)}
