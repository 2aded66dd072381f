"""Students on disk, in one place: a pretraining run folder (its latest complete checkpoint) or an export: a
folder in timm's own format (``config.json`` + ``model.safetensors``) that
``timm.create_model("local-dir:<folder>", pretrained=True)`` loads with no other argument, with the
preprocessing the encoder was trained with (ImageNet mean/std, its input size) and the pooling the probes use
(the mean of the final-normalised patch tokens); its ``config.json`` also holds the dtm_ds model config.

``encoder_config`` reads the architecture, ``load_student`` the weights, ``export`` writes an export.
A run's ``config.json`` records the width of the teacher's targets (``model.target_dim``), so the
student's head is rebuilt from the record, not guessed from weight shapes.
"""

import dataclasses
import json
from pathlib import Path

import torch

from dtm_ds.checkpoint import checkpoint_dir, latest_tag, weights_only
from dtm_ds.config import ModelConfig, load_config, model_config

__all__ = [
    "MMSEG_FILE", "TIMM_ARCHITECTURE", "encoder_config", "export", "fold_shared_table", "load_student",
    "mmseg_beit_state", "save_timm_folder", "target_dim", "timm_args",
]  # fmt: skip


def _is_run(path: str | Path) -> bool:
    """A run folder (else an export folder); an error naming the path when it is neither."""
    path = Path(path)
    record = path / "config.json"
    if not path.is_dir() or not record.is_file():
        raise FileNotFoundError(f"{path}: expected a dtm_ds run directory or an export folder (with config.json)")
    return "dtm_ds" not in json.loads(record.read_text())  # an export's config.json is timm's, with a dtm_ds part


def encoder_config(path: str | Path) -> ModelConfig:
    """The student architecture of a run folder or an export."""
    if _is_run(path):
        return load_config(Path(path) / "config.json").model
    record = Path(path) / "config.json"
    return model_config(json.loads(record.read_text())["dtm_ds"]["model"], str(record))


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


TIMM_ARCHITECTURE = "beit_base_patch16_224"
"""The timm factory an export names; its architecture comes from the export's ``model_args`` (any size)."""


def timm_args(model: ModelConfig) -> dict:
    """timm ``Beit`` arguments that build the student's encoder, pooled as the probes pool (``global_pool='avg'``
    with the final norm on every token and no ``fc_norm``: the mean of the normalised patch tokens)."""
    return dict(img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim, depth=model.depth,
                num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, init_values=model.layer_scale,
                use_abs_pos_emb=False, use_rel_pos_bias=model.rel_pos_bias in ("both", "block"),
                use_shared_rel_pos_bias=model.rel_pos_bias in ("both", "shared"), use_fc_norm=False,
                num_classes=0, global_pool="avg")  # fmt: skip


MMSEG_FILE = "mmseg_beit.pth"
"""A folded export's weights under mmseg's ``BEiT`` backbone names (``init_cfg=dict(type="Pretrained", ...)``)."""

_MMSEG_NAMES = (("patch_embed.proj.", "patch_embed.projection."), ("blocks.", "layers."), (".norm1.", ".ln1."),
                (".norm2.", ".ln2."), (".mlp.fc1.", ".ffn.layers.0.0."), (".mlp.fc2.", ".ffn.layers.1."))  # fmt: skip


def fold_shared_table(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """``state`` (timm ``Beit`` names) with the shared relative position table folded into every block's: each
    block's table becomes its own plus the shared one (both were added to the same attention logits, through
    the same index, so the sum gives the same attention), or a copy of the shared one where blocks had none.
    As the reference fine-tunes (``--init_both_rpb``); a state without a shared table is returned as it is."""
    state = dict(state)
    shared = state.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None:
        for i in range(depth):
            key = f"blocks.{i}.attn.relative_position_bias_table"
            state[key] = state[key] + shared if key in state else shared.clone()
    return state


def mmseg_beit_state(folded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A folded encoder state (timm names) under the names of mmseg's stock ``BEiT`` backbone (``final_norm=False``,
    as its segmentation configs: the final norm is dropped); its relative position index buffers are mmseg's own."""
    state = {}
    for key, value in folded.items():
        if key.startswith("norm.") or key.endswith("relative_position_index"):
            continue
        for ours, theirs in _MMSEG_NAMES:
            key = key.replace(ours, theirs)
        state[key] = value
    return state


def export(run_dir: str, out: str, tag: str | None = None, fold: bool = False) -> str:
    """Write the student encoder of ``run_dir`` (its latest complete checkpoint, or ``tag``) as a timm model folder
    ``out``: ``model.safetensors`` (no pickle) and ``config.json`` (timm's architecture, ``model_args`` and
    ``pretrained_cfg`` with ImageNet mean/std, the input size and bicubic resizing; plus a ``dtm_ds`` part:
    the model config, the run and the checkpoint). Loads anywhere as
    ``timm.create_model("local-dir:<out>", pretrained=True)``; readable by the group.

    Args:
        run_dir: a pretraining run folder.
        out: the folder to write (config.json, model.safetensors).
        tag: a checkpoint of the run (default: its latest complete one).
        fold: fold the shared relative position table into every block's (as fine-tuning does): the same
            features, one table per block (timm's ``use_rel_pos_bias``, the BEiT fine-tuning layout), and
            also ``mmseg_beit.pth``, the same weights under the names of mmseg's stock ``BEiT`` backbone.
    """
    from dtm_ds.student import DTMStudent

    config = load_config(Path(run_dir) / "config.json")
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(run_dir)}")
    student = DTMStudent(config.model, target_dim(run_dir))
    student.load_state_dict(_student_state(run_dir, tag))
    model, state = config.model, student.encoder_state_dict()
    if fold:
        model = dataclasses.replace(model, rel_pos_bias="block")
        state = fold_shared_table(state, model.depth)
    ours = {"model": dataclasses.asdict(model), "run": str(Path(run_dir).resolve()), "checkpoint": tag,
            "folded": fold}  # fmt: skip
    save_timm_folder(state, timm_args(model), out, model.img_size, ours)
    if fold:
        torch.save({"state_dict": mmseg_beit_state(state), "meta": {"dtm_ds": ours}}, Path(out) / MMSEG_FILE)
        (Path(out) / MMSEG_FILE).chmod(0o644)
    return str(out)


def save_timm_folder(state: dict[str, torch.Tensor], args: dict, out: str | Path, img_size: int, ours: dict) -> str:
    """``state`` loaded strictly into timm's ``Beit`` built from ``args`` (every key, nothing else) and saved with
    timm's ``save_for_hf`` as a model folder (safetensors, fp32) with ImageNet mean/std, ``img_size`` px input
    and bicubic resizing, ``ours`` as the config's ``dtm_ds`` part; mode 0644 (a shared model folder)."""
    import timm
    from timm.models import save_for_hf

    from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD

    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **args)
    model.load_state_dict(state)
    data = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, img_size, img_size),
            "interpolation": "bicubic", "crop_pct": 0.875}  # fmt: skip
    card = {"pretrained_cfg": {"tag": "dtm_ds", "license": "apache-2.0"}, "dtm_ds": ours}
    save_for_hf(model, str(out), model_config=card, safe_serialization=True, data_config=data)
    for file in Path(out).iterdir():
        file.chmod(0o644)
    return str(out)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """An export's ``model.safetensors`` (no pickle)."""
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


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
            f"{path} does not fit the student of its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return student
