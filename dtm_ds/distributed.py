"""Distributed set-up in one place: environment defaults for plain runs, DeepSpeed init, rank getters."""

import datetime
import faulthandler
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dtm_ds import devices
from dtm_ds.devices import ROOT

__all__ = [
    "Watchdog",
    "agree",
    "lock_run_folder",
    "backend",
    "barrier",
    "check_world",
    "close",
    "comm_device",
    "gather_rows",
    "gather_sharded",
    "init",
    "init_plain",
    "lost_peer",
    "mean_tensor",
    "on_rank0",
    "planned_world",
    "rank",
    "shard",
    "sum_tensor",
    "world",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(local_rank: int | None = None, timeout_s: float = 600) -> torch.device:
    """Initialise torch.distributed through DeepSpeed and return this rank's device: the accelerator that
    ``devices.accelerator()`` decides (exported to DeepSpeed, so its engine agrees), NCCL on CUDA, gloo
    on CPU.

    A plain ``python dtm_ds/train.py`` run has no launcher environment: it becomes rank 0 of 1.
    A collective that waits ``timeout_s`` for a rank that hangs raises instead of blocking forever (a rank
    that dies is noticed at once: its connections close).
    """
    _from_slurm()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", str(local_rank or 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accel = os.environ["DS_ACCELERATOR"] = devices.accelerator()
    if accel == "cpu":
        _announce_op_build()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != accel:  # DeepSpeed decided before us (imported and used earlier)
        raise RuntimeError(f"DeepSpeed runs on {get_accelerator().device_name()!r} but this run on {accel!r}")
    backend = "nccl" if accel == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    if accel == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def planned_world(env: dict | None = None) -> int:
    """The world size the launcher asked for (torchrun's and DeepSpeed's WORLD_SIZE, SLURM's or MPI's task
    count), readable before ``init``: user input is checked against it before any distributed set-up."""
    env = os.environ if env is None else env
    keys = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    return int(next((env[k] for k in keys if env.get(k, "").isdigit()), 1))


def check_world(planned: int) -> None:
    """After ``init``: the world the inputs were checked for is the world that runs."""
    if world() != planned:
        raise RuntimeError(f"the launcher planned {planned} ranks (checked against the inputs), {world()} started")


def init_plain() -> None:
    """A process group for a library that launches itself (mmengine's ``launcher=pytorch``) where it
    cannot: on CPU (its own launcher assumes CUDA devices). On CUDA the library initialises NCCL itself."""
    if devices.accelerator() == "cpu" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")


def _announce_op_build() -> None:
    """DeepSpeed JIT-builds its CPU communication op on first use. Keep the build in one cache (the
    Makefile's: <repo>/.cache/torch_extensions) whatever the entry point, and say so when it must be
    built, rather than sitting silent for a minute."""
    folder = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    if not any(folder.glob("deepspeed_shm_comm/*.so")) and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"building DeepSpeed's CPU communication op in {folder} (about a minute, once)", file=sys.stderr,
              flush=True)  # fmt: skip


def _from_slurm(env: dict | None = None) -> dict:
    """Map an ``srun`` task's SLURM variables to torch's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) when
    no launcher set them; MASTER_ADDR is the first host of the job (``scontrol show hostnames``)."""
    env = os.environ if env is None else env
    if "SLURM_PROCID" not in env or "RANK" in env:
        return env
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        if any(c in nodes for c in "[,"):  # a compressed host list: let SLURM expand it
            import subprocess

            nodes = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True).stdout.split()[0]  # fmt: skip
        env["MASTER_ADDR"] = nodes
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    return env


def close() -> None:
    """Tear the process group down before the interpreter exits (left to the interpreter, gloo's worker
    threads can abort the process at exit: "terminate called without an active exception")."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def backend() -> str:
    """The process group's backend ('nccl', 'gloo'), or 'none' before ``init``."""
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def comm_device(group_backend: str | None = None) -> torch.device:
    """Where the process group's collectives take their tensors: this rank's GPU for NCCL, the host for
    gloo (and when there is no group)."""
    nccl = (group_backend or backend()) == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def agree(flag: torch.Tensor, local: bool) -> tuple[bool, bool]:
    """``(any rank's flag, any rank's local)``: one all-reduce of two numbers and one transfer to the host,
    identical on every rank. ``flag`` is a bool scalar on the compute device; ``local`` a host bool (filled
    on the device by a kernel, not copied: a host-to-device copy would wait for the device)."""
    comm = comm_device()
    both = torch.stack([flag.float().reshape(()).to(comm), torch.full((), float(local), device=comm)])
    if world() > 1:
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    first, second = both.tolist()
    return first > 0, second > 0


def lock_run_folder(folder: str | Path):
    """Rank 0 takes the run folder's lock (``files.FolderLock``) and every rank learns whether it could: a second
    launch on a folder in use (a requeue while the old job still runs) raises ``FolderInUse`` on every rank
    before anything is written, naming the holder. Returns the lock (keep it: it is held while it lives)."""
    from dtm_ds.files import FolderInUse, FolderLock

    lock = FolderLock(folder)
    holder = on_rank0(lock.acquire)  # every rank learns who holds it, to say so itself
    if holder is not None:
        raise FolderInUse(f"{folder} is in use by {holder}; two launches on one run folder would overwrite each "
                          "other's checkpoints. Wait for that job to end (its lock goes with it) or use another "
                          "output folder")  # fmt: skip
    return lock


def barrier() -> None:
    if world() > 1:
        torch.distributed.barrier()


def on_rank0(fn: Callable):
    """Run ``fn`` on rank 0, then share its (picklable) result with every rank. An error on rank 0 is
    raised on every rank, so none is left waiting."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised on every rank below
            error = err
    if world() > 1:
        box = [(result, error)]
        torch.distributed.broadcast_object_list(box, src=0, device=comm_device())
        result, error = box[0]
    if error is not None:
        raise error
    return result


def gather_rows(row: torch.Tensor) -> torch.Tensor:
    """[world, K]: every rank's 1-D ``row`` (a collective), on the host."""
    if world() == 1:
        return row.reshape(1, -1).cpu()
    comm = comm_device()
    rows = [torch.empty_like(row, device=comm) for _ in range(world())]
    torch.distributed.all_gather(rows, row.to(comm))
    return torch.stack(rows).cpu()


def shard(total: int) -> range:
    """This rank's items of ``total`` when each is handled exactly once: rank r takes r, r + world, ... (any
    total, divisible by the world or not)."""
    return range(rank(), total, world())


def gather_sharded(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's rows of ``shard(total)`` (``local``: [len(shard), ...]) gathered, in item order: [total, ...]
    on every rank, on ``local``'s device (a collective). Shards one row short are padded for the gather."""
    if world() == 1:
        return local
    per = -(-total // world())
    comm = comm_device()
    padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=comm)
    padded[: len(local)] = local.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world())]
    torch.distributed.all_gather(parts, padded)
    # item i = j * world + r is row j of rank r: [world, per] -> [per, world] -> item order
    return torch.stack(parts, 1).flatten(0, 1)[:total].to(local.device)


def sum_tensor(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over the ranks (a collective), in float64 on the host, wherever ``value`` is."""
    value = value.detach().to(comm_device(), torch.float64, copy=True)
    if world() > 1:
        torch.distributed.all_reduce(value)
    return value.cpu()


def mean_tensor(value: torch.Tensor) -> torch.Tensor:
    """Average of a tensor over the ranks (a collective), in float64 on the host, wherever ``value`` is."""
    return sum_tensor(value) / world()


class Watchdog:
    """Ends this rank when no training step finishes for ``timeout_s``: a peer that hangs can block a
    collective that no backend times out (DeepSpeed's shared-memory all-reduce on CPU waits forever).
    ``beat()`` after every step, ``pause()`` around checkpoint writes; it starts at the first beat. With
    ``enabled`` False (one rank: no peer to wait for) it does nothing."""

    def __init__(self, timeout_s: float, message: Callable[[], str], enabled: bool = True):
        self.timeout_s, self.message, self.last = timeout_s, message, None
        self.done = threading.Event()
        if enabled:
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


def lost_peer(error: BaseException) -> bool:
    """``error`` says another rank died or hung (torch's DistError, or a backend's RuntimeError)."""
    if world() == 1:
        return False
    markers = ("gloo", "NCCL", "Connection", "timed out")
    return isinstance(error, torch.distributed.DistError) or any(m in str(error) for m in markers)
