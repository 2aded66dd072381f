"""The teacher's precision (fp16 autocast by default on GPU, fp32 on CPU) and its input, checked against
computations written out by hand from the raw pixels."""

import numpy as np
import pytest
import torch

from dtm_ds.config import TeacherConfig, build_config
from dtm_ds.teacher import _dtype, build_teacher, precision

CPU = torch.device("cpu")
# written out here, not imported: a swapped or mistyped constant in the code must not pass
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _normalise(raw: np.ndarray, stats) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W]: (pixel / 255 - mean) / std per channel, one loop per channel."""
    mean, std = stats
    out = np.empty((raw.shape[0], 3, *raw.shape[1:3]), np.float64)
    for c in range(3):
        out[:, c] = (raw[..., c] / 255.0 - mean[c]) / std[c]
    return torch.from_numpy(out).float()


def _clip_targets(weights: str, x: torch.Tensor) -> torch.Tensor:
    """open_clip's own vision tower on ``x``: ln_post patch tokens times the visual projection."""
    import open_clip

    clip = open_clip.create_model("dtm-test-clip", pretrained=None)
    clip.load_state_dict(torch.load(weights, weights_only=True))
    clip.visual.output_tokens = True
    _, tokens = clip.visual.eval()(x)
    return tokens @ clip.visual.proj


def test_auto_is_fp16_on_gpu_and_fp32_on_cpu():
    assert _dtype("auto", torch.device("cuda")) == torch.float16  # the paper's (and the design card's) setting
    assert _dtype("auto", CPU) == torch.float32
    assert _dtype("bf16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        _dtype("fp16", CPU)
    auto = TeacherConfig()
    assert precision(auto, "cuda") == "float16 autocast on cuda over the weights as stored (OpenAI archives: float16)"
    assert precision(auto, "cpu") == "float32 on cpu (weights in float32, no autocast)"
    with pytest.raises(ValueError, match="teacher.weights_dtype must be stored, fp32 or compute"):
        TeacherConfig(weights_dtype="fp8")


@pytest.mark.parametrize(("input_norm", "stats"), [("student", IMAGENET), ("own", CLIP)])
def test_cpu_targets_equal_open_clip_on_the_hand_normalised_pixels(tiny_clip, input_norm, stats):
    """The student's input is ImageNet-normalised raw pixels; the teacher sees either that very tensor (the
    reference) or the raw pixels normalised with CLIP's statistics. Its targets, in fp32 on CPU, equal
    open_clip's tower run on the input computed by hand."""
    raw = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    student_input = _normalise(raw, IMAGENET)
    cfg = TeacherConfig(name="clip:dtm-test-clip", weights=tiny_clip, input_norm=input_norm)
    teacher = build_teacher(cfg, build_config("tiny").model, CPU)
    assert teacher.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    want = _clip_targets(tiny_clip, _normalise(raw, stats))
    torch.testing.assert_close(teacher(student_input), want, rtol=1e-5, atol=1e-5)


def test_the_teacher_computes_under_autocast_in_its_dtype(tiny_clip):
    """bf16 on CPU (the one reduced precision a CPU runs): the tower's matrix products run in bf16 while the
    stored weights stay fp32 (no cast), or become bf16 with weights_dtype=compute; the targets come back
    fp32 and close to the fp32 ones."""
    model = build_config("tiny").model
    images = torch.randn(2, 3, 32, 32)
    want = build_teacher(TeacherConfig(name="clip:dtm-test-clip", weights=tiny_clip), model, CPU)(images)
    for weights_dtype, param_dtype in (("stored", torch.float32), ("compute", torch.bfloat16)):
        cfg = TeacherConfig(name="clip:dtm-test-clip", weights=tiny_clip, dtype="bf16", weights_dtype=weights_dtype)
        teacher = build_teacher(cfg, model, CPU)
        assert {p.dtype for p in teacher.parameters()} == {param_dtype}
        seen: list[torch.dtype] = []
        mlp = teacher.encoder.transformer.resblocks[0].mlp.c_fc
        handle = mlp.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out.dtype))
        got = teacher(images)
        handle.remove()
        assert seen == [torch.bfloat16], weights_dtype
        assert got.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min() > 0.99, (weights_dtype, float(cos.min()))


def test_openai_like_weights_in_a_gelu_model_are_an_error_until_the_activation_is_named(tiny_clip, tmp_path):
    """Weights whose every value is a float16 number (as OpenAI released CLIP, trained with QuickGELU) in a
    GELU model: a clear error; with teacher.activation=quick_gelu the targets are open_clip's QuickGELU
    tower's, with gelu its GELU tower's."""
    import open_clip

    state = {k: v.half().float() for k, v in torch.load(tiny_clip, weights_only=True).items()}
    torch.save(state, tmp_path / "openai_like.pt")
    model, weights = build_config("tiny").model, str(tmp_path / "openai_like.pt")
    with pytest.raises(ValueError, match=r"look like OpenAI's CLIP .* teacher.activation=quick_gelu"):
        build_teacher(TeacherConfig(name="clip:dtm-test-clip", weights=weights), model, CPU)
    x = torch.randn(2, 3, 32, 32)
    for activation, quick in (("quick_gelu", True), ("gelu", False)):
        cfg = TeacherConfig(name="clip:dtm-test-clip", weights=weights, activation=activation)
        clip = open_clip.create_model("dtm-test-clip", pretrained=None, force_quick_gelu=quick)
        clip.load_state_dict(state)
        clip.visual.output_tokens = True
        _, tokens = clip.visual.eval()(x)
        torch.testing.assert_close(build_teacher(cfg, model, CPU)(x), tokens @ clip.visual.proj)
    quick_gelu = TeacherConfig(name="clip:dtm-test-clip", weights=weights, activation="quick_gelu")
    gelu = TeacherConfig(name="clip:dtm-test-clip", weights=weights, activation="gelu")
    assert not torch.allclose(build_teacher(quick_gelu, model, CPU)(x), build_teacher(gelu, model, CPU)(x))
