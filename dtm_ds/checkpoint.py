"""Checkpoints: DeepSpeed engine states plus our client state, rotation, export and loading the student."""

import gc
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from dtm_ds.config import Config, load_config

CHECKPOINTS = "checkpoints"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


COMPLETE = "complete.json"


class CheckpointError(RuntimeError):
    pass


def _sizes(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}


def is_complete(tag_dir: Path) -> bool:
    """True when ``tag_dir`` has its completion record and every file it lists has the recorded size."""
    try:
        record = json.loads((tag_dir / COMPLETE).read_text())
        return all((tag_dir / name).stat().st_size == size for name, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, unreadable or malformed
        return False


def _usable(tag_dir: Path) -> bool:
    """Complete, or written before completion records existed: then DeepSpeed's ``latest`` (written only
    after a whole save) names it and it has no record at all."""
    if is_complete(tag_dir):
        return True
    latest = tag_dir.parent / "latest"
    return not (tag_dir / COMPLETE).exists() and latest.is_file() and latest.read_text().strip() == tag_dir.name


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(output_dir: str | Path, prefix: str = "") -> str | None:
    """The newest complete checkpoint (``<prefix>*``, by name). Newer folders that a kill or a full disk
    cut off mid-write are passed over with a warning; they are never resumed from."""
    folder = checkpoint_dir(output_dir)
    tags = sorted((p for p in folder.glob(f"{prefix}*") if p.is_dir() and p.name != "best"), reverse=True)
    skipped = []
    for tag_dir in tags:
        if _usable(tag_dir):
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
    """Collective: every rank calls it. Files are written, then (after a barrier) rank 0 writes the
    completion record and ``latest`` atomically, then removes all but the newest ``keep_last`` complete
    checkpoints and any older incomplete ones. A failed write (full disk) removes the partial folder and
    raises ``CheckpointError``; earlier checkpoints are untouched. ``tag`` fixes the name (``best``)."""
    import torch.distributed as dist

    folder = checkpoint_dir(output_dir)
    tag = tag or f"{prefix}{step:08d}"
    tag_dir = folder / tag
    rank0 = engine.global_rank == 0
    if rank0:
        tag_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / COMPLETE).unlink(missing_ok=True)  # rewriting a tag: it is incomplete until the end
    if dist.is_initialized():
        dist.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        failure = f"{type(e).__name__}: {str(e).strip()[:200]}"
    if failure is not None:  # outside the handler: the failed writer's open file goes with its frames
        gc.collect()
        if rank0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        previous = latest_tag(output_dir, prefix)
        free = shutil.disk_usage(folder).free / 2**20
        raise CheckpointError(
            f"writing checkpoint {tag_dir} failed ({failure}); {free:.1f} MiB are free on its disk after "
            f"removing the partial folder. The last complete checkpoint, {previous or 'none'}, is intact: "
            "free space and re-run the same command to resume."
        )
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        usable = {p.name for p in folder.glob(f"{prefix}*") if p.is_dir() and _usable(p)}  # before `latest` moves
        for p in tag_dir.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _write_atomic(tag_dir / COMPLETE, json.dumps({"step": step, "files": _sizes(tag_dir)}))
        if tag != "best":
            _write_atomic(folder / "latest", tag)  # DeepSpeed's pointer, for its own tools (zero_to_fp32)
            tags = sorted(p for p in folder.glob(f"{prefix}*") if p.is_dir() and p.name <= tag)
            complete = [p for p in tags if p.name in usable or p.name == tag]
            for old in [p for p in tags if p not in complete] + complete[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    return tag


def student_state(output_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 student state dict from a run's checkpoint (any ZeRO stage), on CPU."""
    folder = checkpoint_dir(output_dir)
    tag = tag or latest_tag(output_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {folder}")
    if any((folder / tag).glob("*optim_states.pt")) and _zero_stage(folder / tag) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag)
    states = torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _zero_stage(tag_dir: Path) -> int:
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def export(run_dir: str, out: str, tag: str | None = None) -> str:
    """Write the student encoder as a plain state dict that timm's ``Beit`` loads, and its model config
    as ``<out>.json``."""
    from dtm_ds.student import DTMStudent

    config = load_config(Path(run_dir) / "config.json")
    state = student_state(run_dir, tag)
    student = DTMStudent(config.model, state["lm_head.weight"].shape[0])
    student.load_state_dict(state)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(student.encoder_state_dict(), out)
    Path(f"{out}.json").write_text(json.dumps({"model": config.to_dict()["model"]}, indent=2))
    return out


def load_student(path: str | Path):
    """A dtm_ds student from a run directory (latest checkpoint) or an exported file (+ ``.json``)."""
    from dtm_ds.config import ModelConfig
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
    model = ModelConfig(**json.loads(Path(f"{path}.json").read_text())["model"])
    student = DTMStudent(model, 1)
    missing, unexpected = student.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
    if unexpected or set(missing) - {"mask_token", "lm_head.weight", "lm_head.bias"}:
        raise ValueError(
            f"{path} does not fit the student of {path}.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return student
