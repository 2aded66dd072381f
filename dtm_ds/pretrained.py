"""Students on disk, in one place: a pretraining run folder (its latest complete checkpoint) or an export
(a safetensors state dict that timm's ``Beit`` loads, plus ``<file>.json`` with the model config).

``encoder_config`` reads the architecture, ``load_student`` the weights, ``export`` writes an export.
A run's ``config.json`` records the width of the teacher's targets (``model.target_dim``), so the
student's head is rebuilt from the record, not guessed from weight shapes.
"""

import json
from pathlib import Path

import torch

from dtm_ds.checkpoint import checkpoint_dir, latest_tag, weights_only
from dtm_ds.config import ModelConfig, load_config, model_config

__all__ = ["encoder_config", "export", "load_student", "target_dim"]


def _is_run(path: str | Path) -> bool:
    """A run folder (else an export); an error naming the path when it is neither."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a dtm_ds run directory (no config.json)")
        return True
    if not path.is_file() or not Path(f"{path}.json").is_file():
        raise FileNotFoundError(f"{path}: expected a dtm_ds run directory or an export with {path}.json")
    return False


def encoder_config(path: str | Path) -> ModelConfig:
    """The student architecture of a run folder or an export."""
    if _is_run(path):
        return load_config(Path(path) / "config.json").model
    return model_config(json.loads(Path(f"{path}.json").read_text())["model"], f"{path}.json")


def target_dim(run_dir: str | Path) -> int:
    """The width of the teacher's targets a run's student predicts (``model.target_dim`` of its config.json)."""
    dim = load_config(Path(run_dir) / "config.json").model.target_dim
    if dim is None:
        raise ValueError(f"{Path(run_dir) / 'config.json'} records no model.target_dim: it is not a started run")
    return dim


def _student_state(output_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
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
    state = _student_state(run_dir, tag)
    student = DTMStudent(config.model, target_dim(run_dir))
    student.load_state_dict(state)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in student.encoder_state_dict().items()}, out)
    Path(f"{out}.json").write_text(json.dumps({"model": config.to_dict()["model"]}, indent=2))
    return out


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
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
    if _is_run(path):
        state = _student_state(path)
        student = DTMStudent(encoder_config(path), target_dim(path))
        student.load_state_dict(state)
        return student
    student = DTMStudent(encoder_config(path), 1)
    missing, unexpected = student.load_state_dict(_read_weights(path), strict=False)
    if unexpected or set(missing) - {"mask_token", "lm_head.weight", "lm_head.bias"}:
        raise ValueError(
            f"{path} does not fit the student of {path}.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return student
