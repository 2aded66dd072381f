"""DeepSpeed checkpoints of a run: staged saves published whole, rotation, the latest complete one, elastic
conversion. ``Checkpointer`` is what the entrypoints use; pretrained students on disk (load, export) are
dtm_ds/pretrained.py."""

import contextlib
import gc
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dtm_ds.files import write_atomic

__all__ = [
    "CHECKPOINTS", "COMPLETE", "STAGING", "UNIVERSAL", "CheckpointError", "Checkpointer", "Resume",
    "checkpoint_dir", "damage", "is_complete", "latest_tag", "weights_only",
]  # fmt: skip

CHECKPOINTS = "checkpoints"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


COMPLETE = "complete.json"
STAGING = ".partial-"
"""Prefix of the folder a save writes into before it is complete (never resumed from)."""


class CheckpointError(RuntimeError):
    pass


@contextlib.contextmanager
def weights_only():
    """Every ``torch.load`` inside (DeepSpeed's own, which pass ``weights_only=False``, included) unpickles
    tensors and plain data only, plus the few DeepSpeed classes its checkpoints hold (data, no code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(*args, **kwargs):
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return original(*args, **(kwargs | {"weights_only": True}))

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _sizes(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def damage(tag_dir: Path) -> str | None:
    """None when every file of a complete checkpoint matches the SHA-256 its record holds; else what is wrong
    (the first file that does not), in words. Reads every byte: run once, before a resume."""
    record = json.loads((tag_dir / COMPLETE).read_text())
    sums = record.get("sha256")
    if not isinstance(sums, dict) or set(sums) != set(record["files"]):
        return f"its {COMPLETE} holds no checksum for every file (written by an older dtm_ds?)"
    for name, want in sums.items():
        if _sha256(tag_dir / name) != want:
            return f"{name} does not match its recorded SHA-256 (bytes changed on disk)"
    return None


def is_complete(tag_dir: Path) -> bool:
    """True when ``tag_dir`` has its completion record and every file it lists has the recorded size."""
    try:
        record = json.loads((tag_dir / COMPLETE).read_text())
        return all((tag_dir / name).stat().st_size == size for name, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, unreadable or malformed
        return False


def _checkpoint_step(output_dir: str | Path, tag: str) -> int:
    """The step a complete checkpoint recorded."""
    return int(json.loads((checkpoint_dir(output_dir) / tag / COMPLETE).read_text())["step"])


def latest_tag(output_dir: str | Path, prefix: str = "", verify: bool = False) -> str | None:
    """The newest complete checkpoint (``<prefix>*``, by name). Newer folders that a kill or a full disk
    cut off mid-write are passed over with a warning; they are never resumed from.

    ``verify`` (a resume): a complete checkpoint whose bytes no longer match its checksums is passed over too,
    with a warning naming the file; and when checkpoints exist but none is intact, ``CheckpointError``: a run
    never silently restarts from zero over its own damaged checkpoints."""
    folder = checkpoint_dir(output_dir)
    tags = sorted((p for p in folder.glob(f"{prefix}*") if p.is_dir() and p.name != "best"), reverse=True)
    skipped, damaged = [], []
    for tag_dir in tags:
        if not is_complete(tag_dir):
            skipped.append(tag_dir.name)
        elif verify and (why := damage(tag_dir)):
            warnings.warn(f"checkpoint {tag_dir} is damaged: {why}; not resuming from it", stacklevel=2)
            damaged.append(tag_dir.name)
        else:
            if skipped:
                warnings.warn(
                    f"checkpoint(s) {skipped} in {folder} are incomplete (cut off mid-write); "
                    f"falling back to {tag_dir.name}",
                    stacklevel=2,
                )
            return tag_dir.name
    if verify and tags:
        raise CheckpointError(
            f"no intact checkpoint in {folder} (damaged: {damaged}, incomplete: {skipped}); refusing to restart "
            "from step 0 over them. Restore one from a backup, or move the folder away to start afresh"
        )
    if skipped:
        warnings.warn(f"no complete checkpoint in {folder}; incomplete: {skipped}; starting from scratch", stacklevel=2)
    return None


def save(
    engine,
    output_dir: str | Path,
    step: int,
    client_state: dict,
    keep_last: int,
    prefix: str = "step",
    tag: str | None = None,
) -> str:
    """Collective: every rank calls it. Files go to a staging folder ``.partial-<tag>``; after a barrier
    rank 0 syncs them, writes the completion record, renames the folder to ``<tag>`` and moves
    ``latest``, then removes all but the newest ``keep_last`` complete checkpoints. So a complete
    checkpoint is never touched before its successor is complete, and a kill at any moment leaves at
    worst a staging folder, which nothing resumes from and the next save removes. A failed write (a full
    disk) on any rank is agreed by every rank: the staging folder is removed and every rank raises
    ``CheckpointError``, the failing one naming its error. ``tag`` fixes the name (``best``)."""
    from dtm_ds import distributed

    folder = checkpoint_dir(output_dir)
    tag = tag or f"{prefix}{step:08d}"
    staging = folder / f"{STAGING}{tag}"
    rank0 = engine.global_rank == 0
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{STAGING}*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
    distributed.barrier()
    failures, write = [], engine.checkpoint_engine.save

    def write_or_note(state_dict, path):  # a failed file is noted, not raised: DeepSpeed's save goes on
        try:  # through its own collectives, so no rank is left waiting in one of them
            return write(state_dict, path)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
            failures.append(f"{type(e).__name__}: {str(e).strip()[:200]}")

    engine.checkpoint_engine.save = write_or_note
    try:
        engine.save_checkpoint(str(folder), tag=staging.name, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:  # a write outside the checkpoint engine
        failures.append(f"{type(e).__name__}: {str(e).strip()[:200]}")
    finally:
        engine.checkpoint_engine.save = write
    failure = failures[0] if failures else None
    _, failed_anywhere = distributed.agree(torch.zeros((), dtype=torch.bool, device=distributed.comm_device()),
                                           failure is not None)  # fmt: skip
    if failed_anywhere:  # every rank stops here, each saying what it saw (not "lost contact")
        gc.collect()  # outside the handler: the failed writer's open file goes with its frames
        distributed.barrier()
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        previous = latest_tag(output_dir, prefix)
        free = shutil.disk_usage(folder).free / 2**20
        what = f"failed ({failure})" if failure else "failed on another rank (its own error line says why)"
        raise CheckpointError(
            f"writing checkpoint {folder / tag} {what}; {free:.1f} MiB are free on its disk after "
            f"removing the partial folder. The last complete checkpoint, {previous or 'none'}, is intact: "
            "free space and re-run the same command to resume."
        )
    distributed.barrier()
    if rank0:
        _publish(staging, folder / tag, step)
        if tag != "best":
            write_atomic(folder / "latest", tag)  # DeepSpeed's pointer, for its own tools (zero_to_fp32)
            tags = sorted(p for p in folder.glob(f"{prefix}*") if p.is_dir() and p.name <= tag)
            complete = [p for p in tags if is_complete(p)]
            for old in [p for p in tags if p not in complete] + complete[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    return tag


def _publish(staging: Path, tag_dir: Path, step: int) -> None:
    """Record a fully written staging folder as complete (each file's size and SHA-256) and rename it to
    ``tag_dir``. An existing ``tag_dir`` (``best``) is moved aside first and removed only after the new one is
    in place."""
    sums = {}
    for p in sorted(staging.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            sums[str(p.relative_to(staging))] = _sha256(p)  # verified before a resume (``damage``)
    write_atomic(staging / COMPLETE, json.dumps({"step": step, "files": _sizes(staging), "sha256": sums}))
    old = tag_dir.with_name(f"{STAGING}old-{tag_dir.name}")
    if tag_dir.exists():
        os.rename(tag_dir, old)
    os.rename(staging, tag_dir)
    _fsync_dir(tag_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


UNIVERSAL = ".universal-"


def _zero_ranks(output_dir: str | Path, tag: str) -> int:
    """The number of ranks a ZeRO checkpoint partitioned its optimizer state over (0 at stage 0)."""
    return len(list((checkpoint_dir(output_dir) / tag).glob("*zero_pp_rank_*_optim_states.pt")))


def _to_universal(output_dir: str | Path, tag: str) -> str:
    """Rank 0: convert ZeRO checkpoint ``tag`` into DeepSpeed's universal format (optimizer state per
    parameter, not per rank) in ``.universal-<tag>``, which an engine with ``checkpoint.load_universal``
    loads on any number of ranks. Returns the converted tag; raises ``CheckpointError`` when DeepSpeed
    cannot convert it."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    folder = checkpoint_dir(output_dir)
    out = folder / f"{UNIVERSAL}{tag}"
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(folder / tag),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), weights_only():  # quiet: it prints per file
            ds_to_universal.main(args)
    except Exception as err:  # DeepSpeed raises assorted errors for layouts it cannot convert
        shutil.rmtree(out, ignore_errors=True)
        raise CheckpointError(
            f"DeepSpeed cannot convert {folder / tag} to a universal checkpoint ({type(err).__name__}: {err}); "
            "resume it on the number of ranks and the accumulation it was saved with"
        ) from err
    (folder / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we pass tags
    return out.name


def load(engine, output_dir: str | Path, tag: str) -> dict:
    """Load checkpoint ``tag`` into ``engine`` (weights-only unpickling) and return its client state. A
    universal conversion (``resume_tag``) is removed once every rank has loaded it."""
    from dtm_ds import distributed

    folder = checkpoint_dir(output_dir)
    with weights_only():
        _, client = engine.load_checkpoint(str(folder), tag, load_lr_scheduler_states=False)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {folder / tag}")
    if tag.startswith(UNIVERSAL):
        distributed.barrier()
        distributed.on_rank0(lambda: shutil.rmtree(folder / tag, ignore_errors=True))
    return client


@dataclass(frozen=True)
class Resume:
    """Where a run starts: the checkpoint to load (None: from scratch), the step it recorded, and whether it
    loads through DeepSpeed's universal format (saved partitioned over another number of ranks)."""

    tag: str | None = None
    step: int = 0
    universal: bool = False

    def engine_config(self, ds_config: dict) -> dict:
        """The DeepSpeed config to build the engine with (a new dict): the universal load switched on when
        this resume goes through the universal format."""
        if not self.universal:
            return ds_config
        return ds_config | {"checkpoint": ds_config.get("checkpoint", {}) | {"load_universal": True}}


class Checkpointer:
    """The checkpoints of one run folder: ``plan`` decides where to resume (before the engine exists: the
    elastic decision changes its config), ``load`` restores the engine and returns the saved state,
    ``save`` writes one (a collective). Tags are ``<prefix><step:08d>`` unless a save names its own."""

    def __init__(self, output_dir: str | Path, prefix: str, keep_last: int):
        self.output_dir, self.prefix, self.keep_last = Path(output_dir), prefix, keep_last
        self.folder = checkpoint_dir(output_dir)

    def latest(self) -> tuple[str | None, int]:
        """The newest complete checkpoint of this prefix and its step (None, 0 when there is none)."""
        tag = latest_tag(self.output_dir, self.prefix)
        return tag, _checkpoint_step(self.output_dir, tag) if tag else 0

    def plan(self, ds_config: dict, world: int, max_steps: int | None = None) -> Resume:
        """Where to start on ``world`` ranks. A run already at ``max_steps`` is returned as is (nothing is
        converted). A ZeRO-1/2 checkpoint partitioned over another number of ranks is converted to
        DeepSpeed's universal format on rank 0 (a collective); ZeRO-3 is refused (its universal state does
        not restore exactly); stage 0 keeps the state whole and loads on any world as is."""
        from dtm_ds import distributed

        tag = distributed.on_rank0(lambda: latest_tag(self.output_dir, self.prefix, verify=True))  # read once
        step = _checkpoint_step(self.output_dir, tag) if tag else 0
        saved_on = _zero_ranks(self.output_dir, tag) if tag else 0
        if saved_on in (0, world) or (max_steps is not None and step >= max_steps):
            return Resume(tag, step)
        if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            raise CheckpointError(
                f"{tag} was saved by {saved_on} ranks with ZeRO-3; DeepSpeed's universal checkpoint does not "
                "restore ZeRO-3's optimizer state exactly on another number of ranks (per-step losses drift, "
                f"2e-5 after one step on the tiny preset). Resume on {saved_on} ranks, or use ZeRO-1/2 for runs "
                "that change size"
            )
        return Resume(distributed.on_rank0(lambda: _to_universal(self.output_dir, tag)), step, universal=True)

    def load(self, engine, resume: Resume) -> dict:
        """Load ``resume``'s checkpoint into ``engine`` (weights-only unpickling); its client state."""
        return load(engine, self.output_dir, resume.tag)

    def save(self, engine, step: int, client_state: dict, tag: str | None = None, keep_last: int | None = None) -> str:
        return save(engine, self.output_dir, step, client_state, keep_last or self.keep_last, self.prefix, tag)
