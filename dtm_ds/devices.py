"""The one place that decides where this process computes, and how batches get there.

* ``accelerator()``: ``DS_ACCELERATOR`` when set, else CUDA when present, else CPU. ``distributed.init``
  exports the decision to DeepSpeed, so the engine, the teacher, the batches and every collective follow it;
* ``default_ds_config()``: the DeepSpeed JSON a run uses when none is named (GPU: ZeRO-2 bf16; CPU: fp32);
* ``to_device()``: a host batch to the device through pinned memory, without waiting for the device;
* ``cap_workers()``: loader workers capped by the cores this process may use, shared by the ranks of a node;
  ``quiet_worker`` is every DataLoader's ``worker_init_fn``: the stop signals are the main process's.
"""

import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from dtm_ds.files import ROOT

__all__ = [
    "ACCELERATORS",
    "DS_CONFIGS",
    "accelerator",
    "cap_workers",
    "default_ds_config",
    "local_ranks",
    "quiet_worker",
    "resolve_ds_config",
    "to_device",
    "usable_cores",
]

ACCELERATORS = ("cuda", "cpu")
DS_CONFIGS = {"cuda": "ds_configs/zero2_bf16.json", "cpu": "ds_configs/cpu.json"}
"""The DeepSpeed JSON of a run that names none, per accelerator (relative to the repository root)."""


def accelerator(env: Mapping[str, str] | None = None, cuda: bool | None = None) -> str:
    """'cuda' or 'cpu': ``DS_ACCELERATOR`` when set (an error when it asks for CUDA on a machine without it,
    or for an accelerator dtm_ds does not run on), else 'cuda' when a CUDA device is present, else 'cpu'."""
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available() if cuda is None else cuda
    asked = env.get("DS_ACCELERATOR", "").strip().lower()
    if not asked:
        return "cuda" if cuda else "cpu"
    if asked not in ACCELERATORS:
        valid = " or ".join(ACCELERATORS)
        raise ValueError(f"DS_ACCELERATOR={asked!r}: dtm_ds runs on {valid}; unset it to let dtm_ds pick")
    if asked == "cuda" and not cuda:
        raise RuntimeError("DS_ACCELERATOR=cuda, but torch sees no CUDA device here; unset it to run on the CPU")
    return asked


def default_ds_config(accel: str | None = None) -> str:
    """The DeepSpeed JSON for ``accel`` (default: this machine's), as a path that exists from any folder."""
    return str(ROOT / DS_CONFIGS[accel or accelerator()])


def resolve_ds_config(path: str | None) -> tuple[str, str]:
    """``(path, how it was chosen)``: the named JSON, else the one for this machine's accelerator. A relative path
    that is not there from the working directory is looked for in the repository (``ds_configs/...`` works from
    any folder)."""
    if path:
        if not Path(path).exists() and not Path(path).is_absolute() and (ROOT / path).exists():
            return str(ROOT / path), "given, found in the repository"
        return path, "given"
    accel = accelerator()
    return default_ds_config(accel), f"default for {accel}"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. On CUDA the copy goes through pinned memory and does not block the host
    (a copy from pageable memory waits for the device); already-pinned tensors are not copied twice."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    host = tensor if tensor.is_pinned() else tensor.pin_memory()
    return host.to(device, non_blocking=True)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which a batch system sets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def local_ranks(env: Mapping[str, str] | None = None) -> int:
    """Processes of this job on this node (torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE; else 1)."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return max(1, int(env[key]))
    return 1


def cap_workers(requested: int, what: str, cores: int | None = None, ranks: int | None = None) -> int:
    """``requested`` loader workers, capped at this rank's share of the cores (cores // ranks on the node,
    at least 1; 0 stays 0: load in the main process). Says so in one line when it caps."""
    cores = usable_cores() if cores is None else cores
    ranks = local_ranks() if ranks is None else ranks
    share = max(1, cores // ranks)
    if requested <= share:
        return requested
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node, not one per rank
        print(f"{what}: {requested} workers capped at {share} ({cores} cores / {ranks} ranks on this node)",
              file=sys.stderr, flush=True)  # fmt: skip
    return share


def quiet_worker(_worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGTERM and SIGINT are ignored. A job-wide SIGTERM (``scancel``,
    ``systemctl stop``, ``kill -- -PGID``) and a terminal's Ctrl-C reach the workers too; torch's own handler
    would end a worker, and its loader would raise in the main process before the run could save. The main
    process owns the stop: it agrees on a window, saves and shuts the workers down (a worker whose parent is
    gone exits by itself)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
