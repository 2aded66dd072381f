"""Checkpoints: DeepSpeed engine states plus our client state, rotation, export and loading the student."""

import contextlib
import gc
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from dtm_ds.config import Config, load_config, model_config

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


def is_complete(tag_dir: Path) -> bool:
    """True when ``tag_dir`` has its completion record and every file it lists has the recorded size."""
    try:
        record = json.loads((tag_dir / COMPLETE).read_text())
        return all((tag_dir / name).stat().st_size == size for name, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, unreadable or malformed
        return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_step(output_dir: str | Path, tag: str) -> int:
    """The step a complete checkpoint recorded."""
    return int(json.loads((checkpoint_dir(output_dir) / tag / COMPLETE).read_text())["step"])


def latest_tag(output_dir: str | Path, prefix: str = "") -> str | None:
    """The newest complete checkpoint (``<prefix>*``, by name). Newer folders that a kill or a full disk
    cut off mid-write are passed over with a warning; they are never resumed from."""
    folder = checkpoint_dir(output_dir)
    tags = sorted((p for p in folder.glob(f"{prefix}*") if p.is_dir() and p.name != "best"), reverse=True)
    skipped = []
    for tag_dir in tags:
        if is_complete(tag_dir):
            if skipped:
                warnings.warn(
                    f"checkpoint(s) {skipped} in {folder} are incomplete (cut off mid-write); "
                    f"falling back to {tag_dir.name}",
                    stacklevel=2,
                )
            return tag_dir.name
        skipped.append(tag_dir.name)
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
    worst a staging folder, which nothing resumes from and the next save removes. A failed write (full
    disk) removes the staging folder and raises ``CheckpointError``. ``tag`` fixes the name (``best``)."""
    import torch.distributed as dist

    folder = checkpoint_dir(output_dir)
    tag = tag or f"{prefix}{step:08d}"
    staging = folder / f"{STAGING}{tag}"
    rank0 = engine.global_rank == 0
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{STAGING}*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(folder), tag=staging.name, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        failure = f"{type(e).__name__}: {str(e).strip()[:200]}"
    if failure is not None:  # outside the handler: the failed writer's open file goes with its frames
        gc.collect()
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)
        previous = latest_tag(output_dir, prefix)
        free = shutil.disk_usage(folder).free / 2**20
        raise CheckpointError(
            f"writing checkpoint {folder / tag} failed ({failure}); {free:.1f} MiB are free on its disk after "
            f"removing the partial folder. The last complete checkpoint, {previous or 'none'}, is intact: "
            "free space and re-run the same command to resume."
        )
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        _publish(staging, folder / tag, step)
        if tag != "best":
            _write_atomic(folder / "latest", tag)  # DeepSpeed's pointer, for its own tools (zero_to_fp32)
            tags = sorted(p for p in folder.glob(f"{prefix}*") if p.is_dir() and p.name <= tag)
            complete = [p for p in tags if is_complete(p)]
            for old in [p for p in tags if p not in complete] + complete[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    return tag


def _publish(staging: Path, tag_dir: Path, step: int) -> None:
    """Record a fully written staging folder as complete and rename it to ``tag_dir``. An existing
    ``tag_dir`` (``best``) is moved aside first and removed only after the new one is in place."""
    for p in staging.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _write_atomic(staging / COMPLETE, json.dumps({"step": step, "files": _sizes(staging)}))
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


def zero_ranks(output_dir: str | Path, tag: str) -> int:
    """The number of ranks a ZeRO checkpoint partitioned its optimizer state over (0 at stage 0)."""
    return len(list((checkpoint_dir(output_dir) / tag).glob("*zero_pp_rank_*_optim_states.pt")))


def to_universal(output_dir: str | Path, tag: str) -> str:
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


def student_state(output_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 student state dict from a run's checkpoint (any ZeRO stage), on CPU."""
    folder = checkpoint_dir(output_dir)
    tag = tag or latest_tag(output_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {folder}")
    states = torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    if int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only():
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag)
    return {k: v.float() for k, v in states["module"].items()}


def export(run_dir: str, out: str, tag: str | None = None) -> str:
    """Write the student encoder as a safetensors state dict that timm's ``Beit`` loads (no pickle: safe
    to share and to load anywhere), and its model config as ``<out>.json``."""
    from safetensors.torch import save_file

    from dtm_ds.student import DTMStudent

    config = load_config(Path(run_dir) / "config.json")
    state = student_state(run_dir, tag)
    student = DTMStudent(config.model, state["lm_head.weight"].shape[0])
    student.load_state_dict(state)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in student.encoder_state_dict().items()}, out)
    Path(f"{out}.json").write_text(json.dumps({"model": config.to_dict()["model"]}, indent=2))
    return out


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file (exports), or a torch file loaded with ``weights_only=True``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError:  # not safetensors: an export of an earlier version, or a torch file
        return torch.load(path, map_location="cpu", weights_only=True)


def load_student(path: str | Path):
    """A dtm_ds student from a run directory (latest checkpoint) or an exported file (+ ``.json``)."""
    from dtm_ds.student import DTMStudent

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a dtm_ds run directory (no config.json)")
        config: Config = load_config(path / "config.json")
        state = student_state(path)
        student = DTMStudent(config.model, state["lm_head.weight"].shape[0])
        student.load_state_dict(state)
        return student
    if not path.is_file() or not Path(f"{path}.json").is_file():
        raise FileNotFoundError(f"{path}: expected a run directory or an exported state dict with {path}.json")
    model = model_config(json.loads(Path(f"{path}.json").read_text())["model"])
    student = DTMStudent(model, 1)
    missing, unexpected = student.load_state_dict(read_weights(path), strict=False)
    if unexpected or set(missing) - {"mask_token", "lm_head.weight", "lm_head.bias"}:
        raise ValueError(
            f"{path} does not fit the student of {path}.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return student
