"""Distributed set-up in one place: environment defaults for plain runs, DeepSpeed init, rank getters."""

import datetime
import faulthandler
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(local_rank: int | None = None, timeout_s: float = 600) -> torch.device:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU) and return this rank's device.

    A plain ``python dtm_ds/train.py`` run has no launcher environment: it becomes rank 0 of 1.
    A collective that waits ``timeout_s`` for a rank that hangs raises instead of blocking forever (a rank
    that dies is noticed at once: its connections close).
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", str(local_rank or 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(
        dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def any_nonfinite(value: torch.Tensor) -> bool:
    """True on every rank when ``value`` is not finite on any rank (one scalar to the host)."""
    flag = (~torch.isfinite(value.detach())).float().reshape(1)
    if world() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def mean_tensor(value: torch.Tensor) -> torch.Tensor:
    """Average of a tensor over the ranks (a collective), on the host."""
    value = value.detach().double().clone()
    if world() > 1:
        torch.distributed.all_reduce(value)
        value /= world()
    return value.cpu()


class Watchdog:
    """Ends this rank when no training step finishes for ``timeout_s``: a peer that hangs can block a
    collective that no backend times out (DeepSpeed's shared-memory all-reduce on CPU waits forever).
    ``beat()`` after every step, ``pause()`` around checkpoint writes; it starts at the first beat."""

    def __init__(self, timeout_s: float, message: Callable[[], str]):
        self.timeout_s, self.message, self.last = timeout_s, message, None
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="dtm-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def pause(self) -> None:
        self.last = None

    def close(self) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(min(5.0, self.timeout_s / 4)):
            last = self.last
            if last is not None and time.monotonic() - last > self.timeout_s:
                sys.stderr.write(
                    f"rank {rank()}: no training step finished in {self.timeout_s:g} s. {self.message()}\n"
                )
                faulthandler.dump_traceback(sys.stderr)  # where this rank was stuck
                sys.stderr.flush()
                os._exit(1)
