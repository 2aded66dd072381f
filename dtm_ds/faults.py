"""Fault injection for the test suite, driven by the ``DTM_FAULTS`` environment variable (JSON).

Nothing here is in the user's config; with the variable unset every function is a cheap no-op.

    DTM_FAULTS='{"nan_micro": [2, 3]}'                 # micro-steps (0-based, this rank) whose loss is NaN
    DTM_FAULTS='{"nan_micro": [2], "rank": 1}'         # ... on rank 1 only
    DTM_FAULTS='{"kill_in_save": 8}'                   # SIGKILL halfway through writing checkpoint 8's first file
    DTM_FAULTS='{"kill_in_save": 8, "fraction": 0.2}'  # ... after 20% of its bytes
    DTM_FAULTS='{"kill_in_save": 8, "file": 1}'        # ... of its second file
    DTM_FAULTS='{"full_in_save": 8, "rank": 1}'        # rank 1's disk is full when it writes checkpoint 8
    DTM_FAULTS='{"sigterm_micro": 3}'                  # this process sends itself SIGTERM at micro-step 3
    DTM_FAULTS='{"sigterm_knn": 2}'                    # ... in the middle of step 2's online k-NN
    DTM_FAULTS='{"dump_micro": 0, "dump_to": "x.pt"}'  # save micro-step 0's batch, targets, outputs, schedule
"""

import errno
import io
import json
import os
import signal
from functools import cache

import torch

__all__ = ["arm_checkpoint_kill", "dump", "knn_signal", "nan_loss", "stop_signal"]


@cache
def _faults() -> dict:
    return json.loads(os.environ.get("DTM_FAULTS") or "{}")


def nan_loss(micro: int) -> bool:
    """True when the test asked for a NaN loss at this micro-step (on this rank, when it names one)."""
    faults = _faults()
    if micro not in faults.get("nan_micro", ()):  # unset: one dict lookup on the hot path
        return False
    return faults.get("rank") in (None, int(os.environ.get("RANK", "0")))


def stop_signal(micro: int) -> None:
    """SIGTERM to this process at micro-step ``micro`` (0-based, this rank) when the test asked for it: a stop
    at a known step, however fast the device runs."""
    if _faults().get("sigterm_micro") == micro:
        os.kill(os.getpid(), signal.SIGTERM)


def knn_signal(step: int) -> None:
    """SIGTERM to this process in the middle of the online k-NN of step ``step`` when the test asked for it."""
    if _faults().get("sigterm_knn") == step:
        os.kill(os.getpid(), signal.SIGTERM)


def dump(micro: int, **tensors: torch.Tensor | None) -> None:
    """Save ``tensors`` (detached, on the host; None values left out) at micro-step ``micro`` when the test
    asked for it: what a training step computed, for a test to recompute its loss independently."""
    faults = _faults()
    if faults.get("dump_micro") == micro:
        torch.save({k: v.detach().cpu() for k, v in tensors.items() if v is not None}, faults["dump_to"])


def arm_checkpoint_kill(engine, index: int) -> None:
    """Before the save of checkpoint ``index`` (a step or an epoch): when asked, the engine's n-th file of
    that save gets a fraction of its bytes, then this process is killed; or (``full_in_save``) every write of
    that save fails as on a full disk."""
    faults = _faults()
    if faults.get("full_in_save") == index and faults.get("rank") in (None, int(os.environ.get("RANK", "0"))):

        def full(state_dict, path: str) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        engine.checkpoint_engine.save = full
    if faults.get("kill_in_save") != index:
        return
    fraction, target, written = faults.get("fraction", 0.5), faults.get("file", 0), []
    save = engine.checkpoint_engine.save

    def cut(state_dict, path: str) -> None:
        if len(written) < target:
            written.append(path)
            return save(state_dict, path)
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: int(buffer.tell() * fraction)])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    engine.checkpoint_engine.save = cut
