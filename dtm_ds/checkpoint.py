"""Checkpoints: DeepSpeed engine states plus our client state, rotation, export and loading the student."""

import json
import shutil
from pathlib import Path

import torch

from dtm_ds.config import Config, load_config

CHECKPOINTS = "checkpoints"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def latest_tag(output_dir: str | Path) -> str | None:
    """Tag named by DeepSpeed's ``latest`` file (written only after a checkpoint is complete)."""
    latest = checkpoint_dir(output_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (checkpoint_dir(output_dir) / tag).is_dir() else None


def save(engine, output_dir: str | Path, step: int, client_state: dict, keep_last: int, prefix: str = "step") -> None:
    """Collective: every rank calls it. Rank 0 then removes all but the newest ``keep_last`` checkpoints."""
    folder = checkpoint_dir(output_dir)
    engine.save_checkpoint(str(folder), tag=f"{prefix}{step:08d}", client_state=client_state)
    if engine.global_rank == 0:
        tags = sorted(p for p in folder.glob(f"{prefix}*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


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
