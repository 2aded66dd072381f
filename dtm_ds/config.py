"""Typed pretraining configuration: defaults, presets (small deltas), command-line overrides.

The DeepSpeed JSON in ds_configs/ holds engine settings (micro batch, accumulation, precision, ZeRO,
clipping); this config holds everything else. The global batch is derived from the JSON and the
world size; stating it here too is allowed only if it agrees.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm_ds.morph import LOSSES
from dtm_ds.options import parse_options

__all__ = [
    "Config",
    "DTMConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PRESETS",
    "RunConfig",
    "SECTIONS",
    "TeacherConfig",
    "build_config",
    "load_config",
    "model_config",
]


@dataclass
class ModelConfig:
    img_size: int = 224
    """Input resolution of the student (square)."""
    patch_size: int = 16
    """Patch side in pixels (16 for S/B/L; 14 for H)."""
    embed_dim: int = 768
    """Token width."""
    depth: int = 12
    """Transformer blocks."""
    num_heads: int = 12
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """MLP hidden width / token width."""
    drop_path: float = 0.1
    """Stochastic depth rate of the last block (linear in depth); 0.1: run_pretrain_dtm.py's default."""
    layer_scale: float = 0.1
    """Layer-scale init (BEiT): 0.1 for S/B, 1e-5 for L/H."""
    grad_checkpointing: bool = False
    """Activation checkpointing of every block."""
    rel_pos_bias: str = "both"
    """Relative-position bias tables: 'both' (one shared table plus one per block, added together: the
    reference's rel_pos_bias and shared_rel_pos_bias, run_pretrain_dtm.py), 'shared' or 'block'."""
    init: str = "reference"
    """'reference': truncated normal std 0.02 cut at +-std on linear and patch-embedding weights, the CLS
    and mask tokens (models/modeling_dtm.py); 'timm': timm's BEiT init (cut at +-2)."""
    target_dim: int | None = None
    """Width of the teacher's targets, which the student's head predicts. None: the teacher's, filled in when
    the run starts and recorded in config.json (loading and exporting the run read it there)."""

    def __post_init__(self):
        if self.rel_pos_bias not in ("both", "shared", "block"):
            raise ValueError(f"model.rel_pos_bias must be 'both', 'shared' or 'block', got {self.rel_pos_bias!r}")
        if self.init not in ("reference", "timm"):
            raise ValueError(f"model.init must be 'reference' or 'timm', got {self.init!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"model.img_size {self.img_size} is not divisible by model.patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"model.embed_dim {self.embed_dim} is not divisible by model.num_heads {self.num_heads}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


@dataclass
class TeacherConfig:
    name: str = "clip:ViT-B-16"
    """'clip:<open_clip model>', 'timm:<model>', 'checkpoint:<dtm_ds run dir or export folder>', or 'pixels'."""
    weights: str | None = None
    """Local weights file for clip/timm teachers (OpenAI TorchScript archive or state dict). Never downloaded."""
    dtype: str = "auto"
    """Compute precision, as autocast: 'auto' (fp16 on GPU, the paper's setting; fp32 on CPU), 'fp16' (GPU
    only), 'bf16' or 'fp32' (no autocast)."""
    weights_dtype: str = "stored"
    """The teacher's weights: 'stored' (as the file holds them: fp16 for OpenAI's archives, as the reference
    runs CLIP; fp32 on CPU), 'fp32', or 'compute' (cast to ``dtype``: the least memory)."""
    input_norm: str = "student"
    """'student': the teacher sees the student's ImageNet-normalised input, as the reference feeds CLIP;
    'own': re-normalised to the teacher's own statistics (CLIP's mean and std)."""
    activation: str = "auto"
    """CLIP MLP activation for a state-dict teacher: 'auto' (the named model's; an error when the weights look
    like OpenAI's, which need QuickGELU, and the model uses GELU), 'quick_gelu' or 'gelu'. OpenAI's
    TorchScript archives carry their own (QuickGELU)."""
    target: str = "projected"
    """CLIP targets: 'projected' (ln_post tokens times the visual projection, 512-d for ViT-B/16) or
    'pre_projection' (the ln_post tokens, 768-d: the reference's --no_clip_proj)."""

    def __post_init__(self):
        kind = self.name.split(":", 1)[0]
        if kind not in ("clip", "timm", "checkpoint", "pixels") or (kind != "pixels" and ":" not in self.name):
            raise ValueError(
                f"teacher.name must be 'clip:<model>', 'timm:<model>', 'checkpoint:<path>' or 'pixels', "
                f"got {self.name!r}"
            )
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"teacher.dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.weights_dtype not in ("stored", "fp32", "compute"):
            raise ValueError(f"teacher.weights_dtype must be stored, fp32 or compute, got {self.weights_dtype!r}")
        if self.input_norm not in ("own", "student"):
            raise ValueError(f"teacher.input_norm must be 'own' or 'student', got {self.input_norm!r}")
        if self.activation not in ("auto", "quick_gelu", "gelu"):
            raise ValueError(f"teacher.activation must be auto, quick_gelu or gelu, got {self.activation!r}")
        if self.target not in ("projected", "pre_projection"):
            raise ValueError(f"teacher.target must be 'projected' or 'pre_projection', got {self.target!r}")
        if self.target == "pre_projection" and kind != "clip":
            raise ValueError(f"teacher.target=pre_projection applies to clip teachers, not {self.name!r}")


@dataclass
class DTMConfig:
    n_max: list[int] = field(default_factory=lambda: [196, 196])
    """Most tokens merged per level (one entry per level; L = len(n_max))."""
    k_max: list[int] = field(default_factory=lambda: [14, 14])
    """Most merging iterations per level."""
    loss: str = "smooth_l1"
    """Per-token loss between morphed predictions and targets: smooth_l1, l1, l2 or negcosine."""
    beta: float = 2.0
    """Smooth-L1 threshold (the reference: 2.0)."""
    protect_first: bool = True
    """The first token never merges away (the reference's behaviour)."""
    shared_schedule: bool = False
    """One (n, k) draw per optimizer step for the whole global batch; False: one per micro-batch (the
    reference draws one per rank and step)."""
    normalize_target: bool = False
    """Standardise every morphed target token over its channels (the reference's --normalize_target, off
    in its recipe)."""
    loss_weight: float = 1.0
    """Weight of the DTM loss in the loss that is backpropagated (the reference's --w_dtm, 1.0); logged
    losses are unweighted."""
    tokenwise: bool = False
    """The baseline without morphing: the loss between the raw student and teacher tokens (one level;
    n_max and k_max unused), for ablations and the benchmark's DTM-off run."""

    def __post_init__(self):
        if len(self.n_max) != len(self.k_max) or not self.n_max:
            raise ValueError(f"dtm.n_max {self.n_max} and dtm.k_max {self.k_max} need one entry per level")
        if self.loss not in LOSSES:
            raise ValueError(f"dtm.loss must be one of {LOSSES}, got {self.loss!r}")


@dataclass
class DataConfig:
    path: str = "data/imagenet_train.beton"
    """FFCV .beton (backend ffcv) or any data_prep source: image folder, list file, fashion_mnist (torchvision)."""
    backend: str = "ffcv"
    """'ffcv' (a .beton) or 'torchvision' (any data_prep source through a DataLoader)."""
    workers: int = 8
    """Decoding threads (FFCV) or DataLoader workers (torchvision) per rank."""
    min_crop_scale: float = 0.2
    """RandomResizedCrop area scale range is [min_crop_scale, 1]."""
    jitter: float = 0.4
    """Colour jitter strength (brightness, contrast, saturation)."""
    num_masked: int = 75
    """Masked patches per image (75 of 196 for 224 px / patch 16)."""
    min_mask_block: int = 16
    """Smallest block of BEiT's block-wise masking, in patches."""

    def __post_init__(self):
        if self.backend not in ("ffcv", "torchvision"):
            raise ValueError(f"data backend must be 'ffcv' or 'torchvision', got {self.backend!r}")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")


@dataclass
class OptimConfig:
    lr: float = 1.5e-3
    """Base lr at a global batch of 2048, scaled by sqrt(global batch / 2048)."""
    min_lr: float = 1e-5
    """Floor of the cosine schedule."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """AdamW weight decay (none on biases, norms and the CLS token; see decay_tables)."""
    epochs: int = 300
    """Length of the schedule in epochs (the run stops here unless run.max_steps is smaller)."""
    warmup_epochs: float = 10
    """Linear warm-up, in epochs (rounded to optimizer steps)."""
    batch_size: int | None = None
    """Global batch; derived from the DeepSpeed JSON and the world size when None, checked when set."""
    decay_tables: bool = True
    """Weight decay also on the relative-position tables and the mask token, as the reference (it exempts
    only 1-D tensors, biases and the CLS token: utils/optim_factory.py); False: none on them (timm)."""

    def peak_lr(self, global_batch: int) -> float:
        """The reference's rule (run_pretrain_dtm.py): lr x sqrt(global batch / 2048)."""
        return self.lr * (global_batch / 2048) ** 0.5


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    """The run folder: config.json, engine.json, checkpoints/, metrics.jsonl, tb/."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule still spans optim.epochs)."""
    seed: int = 0
    """Seed of the initial student, the data order and every random draw."""
    save_every: int = 1000
    """Optimizer steps between checkpoints (one is also written at the end and on a stop signal)."""
    keep_last: int = 3
    """Complete checkpoints kept."""
    log_every: int = 20
    """Optimizer steps between lines of metrics.jsonl / TensorBoard."""
    vis_every: int = 1000
    """Steps between TensorBoard images of the morphed groups (0: never)."""
    max_nonfinite: int = 5
    """Stop after this many non-finite losses in a row."""
    cuda_graph: bool = True
    """Capture the DTM step as a CUDA graph on GPU (replayed for every schedule)."""
    compile: str | None = None
    """torch.compile backend for the student and the DTM step (e.g. 'inductor'); None: eager."""
    dist_timeout_s: float = 600.0
    """Seconds a collective waits for a hung rank before the run fails (a dead rank fails it at once)."""
    knn_every: int = 0
    """Steps between online k-NN evaluations of the student (0: never; a multiple of log_every)."""
    knn_train: str | None = None
    """The online k-NN's training images: a data_prep source (an image folder, a list file, fashion_mnist)."""
    knn_val: str | None = None
    """The online k-NN's evaluation images (fashion_mnist: its test split)."""
    knn_per_class: int | None = 50
    """The first this many images of every class of both k-NN sets (None: all)."""
    knn_crop_ratio: float = 0.875
    """The k-NN images are resized to img_size / knn_crop_ratio, then centre-cropped (the probes' transform)."""

    def __post_init__(self):
        at_least = {"save_every": 1, "keep_last": 1, "log_every": 1, "vis_every": 0, "max_nonfinite": 1,
                    "knn_every": 0}  # fmt: skip
        bad = [f"run.{k}={getattr(self, k)} (at least {low})" for k, low in at_least.items() if getattr(self, k) < low]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"run.max_steps={self.max_steps} (at least 1, or unset for the whole schedule)")
        if self.knn_per_class is not None and self.knn_per_class < 1:
            bad.append(f"run.knn_per_class={self.knn_per_class} (at least 1, or unset for every image)")
        if not 0 < self.knn_crop_ratio <= 1:
            bad.append(f"run.knn_crop_ratio={self.knn_crop_ratio} (in (0, 1])")
        if not self.dist_timeout_s > 0:
            bad.append(f"run.dist_timeout_s={self.dist_timeout_s} (more than 0 seconds)")
        if bad:
            raise ValueError("out of range: " + "; ".join(bad))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dtm: DTMConfig = field(default_factory=DTMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        tokens = self.model.grid**2
        if max(self.dtm.n_max) > tokens:
            raise ValueError(f"dtm.n_max {self.dtm.n_max} exceeds the {tokens} tokens of the student's grid")
        if not 0 <= self.data.num_masked <= tokens:
            raise ValueError(f"data.num_masked {self.data.num_masked} must be in [0, {tokens}]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {
    "model": ModelConfig,
    "teacher": TeacherConfig,
    "dtm": DTMConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}
_VIT = {
    "vits": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vitb": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vitl": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "layer_scale": 1e-5},
    "vith": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "layer_scale": 1e-5, "drop_path": 0.3, "patch_size": 14},
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    **{name: {"model": model} for name, model in _VIT.items()},
    # CPU: a small ViT on 32 px Fashion-MNIST with the weight-free pixels teacher.
    "tiny": {
        "model": {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "drop_path": 0.0},
        "teacher": {"name": "pixels"},
        "dtm": {"n_max": [64, 64], "k_max": [8, 8]},
        "data": {
            "path": "fashion_mnist",
            "backend": "torchvision",
            "workers": 2,
            "num_masked": 24,
            "min_mask_block": 4,
            "min_crop_scale": 0.5,
        },
        "optim": {"epochs": 5, "warmup_epochs": 0.5, "lr": 4e-3},
        "run": {"save_every": 200, "log_every": 10, "vis_every": 200},
    },
}
# vith/14 at 224 px has a 16x16 grid: the DTM defaults follow the token count, and the default teacher is
# OpenAI's CLIP ViT-L/14 (224 px, patch 14: the same 16x16 grid; CLIP-B/16's 196 tokens would not fit).
# Not in the paper, which reports ViT-B and ViT-L.
PRESETS["vith"]["dtm"] = {"n_max": [256, 256], "k_max": [16, 16]}
PRESETS["vith"]["data"] = {"num_masked": 98}
PRESETS["vith"]["teacher"] = {"name": "clip:ViT-L-14"}


def build_config(preset: str = "vitb", overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset, then dotted overrides such as {"optim.lr": 1e-3, "run.output_dir": "x"};
    every override is checked against its field's type (and converted: 3 -> 3.0 for a float)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    tree = Config().to_dict()
    for section, values in PRESETS[preset].items():
        tree[section].update(values)
    kinds = {f"{section}.{f.name}": f.type for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
    for key, value in parse_options(overrides or {}, kinds, "config keys").items():
        section, _, name = key.partition(".")
        tree[section][name] = value
    return _from_dict(tree)


def _from_dict(tree: dict[str, Any]) -> Config:
    unknown = set(tree) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; valid: {sorted(SECTIONS)}")
    parts = {name: kind(**tree.get(name, {})) for name, kind in SECTIONS.items()}
    parts["optim"].betas = tuple(parts["optim"].betas)
    return Config(**parts)


def load_config(path: str | Path) -> Config:
    """A run's recorded config (its config.json); one written by an earlier dtm_ds, without a field this version
    has, is an error naming the fields (what it meant by leaving them out is not guessed)."""
    tree = json.loads(Path(path).read_text())
    _check_recorded({s: tree.get(s, {}) for s in SECTIONS}, path)
    return _from_dict(tree)


def model_config(values: dict[str, Any], where: str | Path = "the model record") -> ModelConfig:
    """A ModelConfig from a recorded dict (an export's sidecar), every field present."""
    _check_recorded({"model": values}, where)
    return ModelConfig(**values)


def _check_recorded(tree: dict[str, dict], where) -> None:
    missing = [f"{s}.{f.name}" for s in tree for f in dataclasses.fields(SECTIONS[s]) if f.name not in tree[s]]
    if missing:
        raise ValueError(
            f"{where} records no {', '.join(missing)}: it was written by an earlier dtm_ds version; re-run or "
            "re-export it with this one"
        )
