"""Frozen teachers: images normalised for the student [B, 3, H, W] -> targets [B, N, D] on the student's grid.

Weights come only from local files the user names; nothing is downloaded.
"""

from pathlib import Path

import torch
from torch import nn

from dtm_ds.config import ModelConfig, TeacherConfig
from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipTeacher",
    "PixelTeacher",
    "Teacher",
    "TokenTeacher",
    "build_teacher",
    "check_files",
    "precision",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Teacher(nn.Module):
    """Frozen wrapper: re-normalises the input, runs ``encode`` under ``dtype`` autocast (none for fp32)
    without autograd, returns fp32."""

    def __init__(self, encoder: nn.Module, dim: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32):
        super().__init__()
        self.encoder, self.dim, self.dtype = encoder.eval().requires_grad_(False), dim, dtype
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, folded into one affine map
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # always in eval mode (no dropout, frozen norms)
        return super().train(False)

    @torch.no_grad()  # there is no backpropagation through the teacher, so no need for gradients
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.scale + self.shift
        with torch.autocast(x.device.type, self.dtype, enabled=self.dtype != torch.float32):
            return self.encode(x).float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class PixelTeacher(Teacher):
    """Per-patch normalised pixels (mean 0, variance 1 over each patch's p*p*3 values); no weights."""

    def __init__(self, patch_size: int):
        super().__init__(nn.Identity(), 3 * patch_size**2)
        self.patch_size = patch_size

    def encode(self, x):
        p = self.patch_size
        patches = nn.functional.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, 3*p*p)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True, unbiased=False)
        return (patches - mean) / (var + 1e-6).sqrt()


class ClipTeacher(Teacher):
    """open_clip vision tower: patch tokens after ``ln_post`` (CLS excluded), projected by ``proj`` unless
    ``project`` is False (the reference's --no_clip_proj)."""

    project = True

    def encode(self, x):
        _, tokens = self.encoder(x)
        return tokens @ self.encoder.proj.to(tokens.dtype) if self.project else tokens


class TokenTeacher(Teacher):
    """timm ViT or a dtm_ds student: final-norm tokens of ``forward_features`` without prefix tokens."""

    def encode(self, x):
        return self.encoder.forward_features(x)[:, self.encoder.num_prefix_tokens :]


def build_teacher(cfg: TeacherConfig, model: ModelConfig, device: torch.device) -> Teacher:
    """The teacher named by ``cfg``, checked against the student's grid, on ``device`` in its dtype."""
    kind, _, name = cfg.name.partition(":")
    dtype = _dtype(cfg.dtype, device)
    if kind == "pixels":
        teacher = PixelTeacher(model.patch_size)
    elif kind == "clip":
        teacher = _clip(name, _weights_file(cfg), model, cfg, cfg.target == "projected")
    elif kind == "timm":
        teacher = _timm(name, _weights_file(cfg), model, cfg.input_norm)
    else:
        teacher = _checkpoint(name, model)
    teacher.dtype = dtype
    teacher = teacher.to(device=device)
    if cfg.weights_dtype == "compute":
        teacher.encoder.to(dtype)
    elif cfg.weights_dtype == "fp32" or dtype == torch.float32 or device.type == "cpu":
        teacher.encoder.float()  # no autocast to cast fp16 weights for fp32 compute (nor fp16 kernels on CPU)
    with torch.no_grad():
        probe = teacher(torch.zeros(1, 3, model.img_size, model.img_size, device=device))
    if probe.shape[1] != model.grid**2:
        raise ValueError(
            f"teacher {cfg.name} gives {probe.shape[1]} tokens for {model.img_size} px input, the "
            f"student has a {model.grid}x{model.grid} grid ({model.grid**2} tokens)"
        )
    return teacher


def precision(cfg: TeacherConfig, accel: str) -> str:
    """What ``cfg`` means on ``accel`` ('cuda' or 'cpu'), in words (``--print_config``, the start line)."""
    dtype = str(_dtype(cfg.dtype, torch.device(accel))).removeprefix("torch.")
    if dtype == "float32":
        return f"float32 on {accel} (weights in float32, no autocast)"
    weights = {"stored": "the weights as stored (OpenAI archives: float16)", "fp32": "float32 weights"}
    if accel == "cpu" and cfg.weights_dtype == "stored":
        weights["stored"] = "float32 weights (CPU)"
    return f"{dtype} autocast on {accel} over {weights.get(cfg.weights_dtype, f'{dtype} weights')}"


def check_files(cfg: TeacherConfig) -> None:
    """The teacher's files exist (before any set-up; ``build_teacher`` reads them later)."""
    kind, _, name = cfg.name.partition(":")
    if kind in ("clip", "timm"):
        _weights_file(cfg)
    elif kind == "checkpoint" and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"teacher {cfg.name}: {name} does not exist (a dtm_ds run folder or export)")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # the paper's setting: fp16 autocast (OpenAI's CLIP weights are fp16-native)
        return torch.float16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise ValueError("teacher.dtype fp16 is not supported on CPU; use fp32 or bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _weights_file(cfg: TeacherConfig) -> Path:
    if not cfg.weights:
        raise ValueError(f"teacher {cfg.name} needs teacher.weights=<local file>; nothing is downloaded")
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(512)
    if not head:
        raise ValueError(f"teacher weights file {path} is empty")
    if head.lstrip()[:1] == b"<" or head.lstrip()[:9].lower() == b"<!doctype":
        raise ValueError(f"teacher weights file {path} is a web page (HTML), not weights: download the file itself")
    return path


def _norm(input_norm: str, mean, std):
    return (IMAGENET_MEAN, IMAGENET_STD) if input_norm == "student" else (mean, std)


def _clip(name: str, weights: Path, model: ModelConfig, cfg: TeacherConfig, project: bool = True) -> Teacher:
    import open_clip

    try:  # an OpenAI TorchScript archive
        state = torch.jit.load(str(weights), map_location="cpu").state_dict()
        clip = open_clip.model.build_model_from_openai_state_dict(state)
        _check_archive(clip.visual, open_clip.get_model_config(name), name, weights)
    except RuntimeError:  # an open_clip state dict
        state = _read_state(weights)
        quick = _quick_gelu(name, state, cfg.activation, weights)
        clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
        _load_state(clip, state, f"clip:{name}", weights)
    visual = clip.visual
    if tuple(visual.image_size) != (model.img_size, model.img_size):
        raise ValueError(
            f"teacher clip:{name} expects {tuple(visual.image_size)} px input, the student uses {model.img_size} px"
        )
    visual.output_tokens = True
    teacher = ClipTeacher(visual, visual.proj.shape[int(project)], *_norm(cfg.input_norm, CLIP_MEAN, CLIP_STD))
    teacher.project = project
    return teacher


def _quick_gelu(name: str, state: dict, activation: str, weights: Path) -> bool:
    """Whether to force QuickGELU on open_clip's ``name`` for these weights. OpenAI trained CLIP with
    QuickGELU and released it in float16; the same weights under GELU give targets about 1 % off, silently.
    So weights whose every value is a float16 number, loaded into a GELU model, are an error unless the
    user says which activation they need."""
    import open_clip

    if activation != "auto":
        return activation == "quick_gelu"
    if (open_clip.get_model_config(name) or {}).get("quick_gelu") or not _float16_exact(state):
        return False
    raise ValueError(
        f"teacher weights {weights} look like OpenAI's CLIP (every value is a float16 number, as OpenAI "
        f"released them), which was trained with QuickGELU, but clip:{name} uses GELU (targets about 1 % off). "
        f"Use teacher.activation=quick_gelu (or teacher.name=clip:{name}-quickgelu, or OpenAI's TorchScript "
        "archive); teacher.activation=gelu if these are other weights stored in float16"
    )


def _float16_exact(state: dict) -> bool:
    floats = [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1]
    return bool(floats) and all(torch.equal(v.half().float(), v.float()) for v in floats)


def _check_archive(visual: nn.Module, config: dict | None, name: str, weights: Path) -> None:
    """An OpenAI archive carries its own architecture: it must be the named model's, when open_clip
    knows the name."""
    if config is None:
        return
    want = config["vision_cfg"]
    got = {"width": visual.conv1.out_channels, "patch_size": visual.conv1.kernel_size[0]}
    got["layers"] = len(visual.transformer.resblocks)
    differ = {k: (got[k], want[k]) for k in got if k in want and got[k] != want[k]}
    if differ:
        found = ", ".join(f"{k} {g} (clip:{name}: {w})" for k, (g, w) in differ.items())
        raise ValueError(f"teacher weights {weights} are a different CLIP than clip:{name}: {found}")


def _timm(name: str, weights: Path, model: ModelConfig, input_norm: str) -> Teacher:
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=model.img_size)
    _load_state(net, _read_state(weights), f"timm:{name}", weights)
    cfg = net.pretrained_cfg
    return TokenTeacher(
        net, net.num_features, *_norm(input_norm, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    )


def _checkpoint(path: str, model: ModelConfig) -> Teacher:
    from dtm_ds.pretrained import load_student

    student = load_student(path)
    return TokenTeacher(student, student.embed_dim)


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # random bytes, a cut download, a pickle of other objects: one line naming the file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"teacher weights file {path} ({path.stat().st_size} bytes) is not a readable torch state dict or "
            f"OpenAI archive ({type(err).__name__}: {first}); is the file complete?"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"teacher weights file {path} holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _load_state(net: nn.Module, state: dict, name: str, path: Path) -> None:
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights {path} do not fit teacher {name}: {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not fit teacher {name}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (of {len(missing)} / {len(unexpected)})"
        )
