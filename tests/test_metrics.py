"""metrics.jsonl and TensorBoard log the values that acted on each step, at full precision."""

import json
import math
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import write_class_folder
from tests.helpers import ROOT, ds_json, run_env, train_cmd

STEPS = 6


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(out, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    if tag in events.Tags()["tensors"]:
        return {e.step: float(e.tensor_proto.float_val[0]) for e in events.Tensors(tag)}
    return {e.step: e.value for e in events.Scalars(tag)}


def _expected_lr(step: int, peak: float, total: int, warmup: int, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to ``min_lr`` at ``total`` (step is 1-based)."""
    done = step - 1
    if done < warmup:
        return peak * (done + 1) / warmup
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (done - warmup) / (total - warmup)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 ranks x micro 2 x accumulation 2, and 1 rank x micro 8, with one DTM schedule per optimizer step
    (dtm.shared_schedule): both see the same 8 samples per step with the same draws (dtm_ds/data/__init__.py)."""
    tmp = tmp_path_factory.mktemp("metrics")
    write_class_folder(tmp / "imgs", {"a": 20, "b": 20}, size=(40, 40))
    flags = ("--dtm.shared_schedule=true", "--optim.warmup_epochs=0.4", "--optim.epochs=2", "--optim.min_lr=1e-6")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29651"]
    windows = train_cmd(tmp / "imgs", tmp / "windows", ds_json(tmp / "acc.json", 2, accum=2), STEPS, *flags)
    single = train_cmd(tmp / "imgs", tmp / "single", ds_json(tmp / "ds8.json", 8), STEPS, *flags)
    tiny_lr = train_cmd(tmp / "imgs", tmp / "tiny_lr", ds_json(tmp / "ds8.json", 8), 1, "--optim.lr=1.6e-8",
                         "--optim.min_lr=0", "--optim.warmup_epochs=0")  # fmt: skip
    for cmd in (torchrun + windows[1:], single, tiny_lr):
        subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    return tmp


@pytest.mark.ranks(2)
def test_logged_loss_is_the_window_and_rank_mean(runs):
    windows, single = _rows(runs / "windows"), _rows(runs / "single")
    assert [r["step"] for r in windows] == list(range(1, STEPS + 1))
    for a, b in zip(windows, single, strict=True):  # rtol: 4 chunk means averaged vs one 8-sample mean
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["loss_level0"] == pytest.approx(b["loss_level0"], rel=1e-5)
    assert len(windows[0]["peak_rss_gib_per_rank"]) == 2 and len(single[0]["peak_rss_gib_per_rank"]) == 1
    assert windows[-1]["tokens_per_s"] == pytest.approx(64 * windows[-1]["img_per_s"])
    assert windows[-1]["img_per_s_per_rank"] == pytest.approx(windows[-1]["img_per_s"] / 2)


@pytest.mark.ranks(2)
def test_logged_lr_is_the_one_the_step_used(runs):
    """Global batch 8 (lr 4e-3 x sqrt(8 / 2048)), 5 steps per epoch, 2 epochs, warm-up 2 steps."""
    peak = 4e-3 * math.sqrt(8 / 2048)
    for row in _rows(runs / "windows"):
        expected = _expected_lr(row["step"], peak, total=10, warmup=2, min_lr=1e-6)
        assert row["lr"] == pytest.approx(expected, rel=1e-12, abs=0), row["step"]
        assert row["lr_groups"] == [row["lr"], row["lr"]] and row["weight_decay_groups"] == [0.05, 0.0]
        assert row["grad_norm_clipped"] == pytest.approx(min(row["grad_norm"], 3.0), rel=1e-5)
    board = _tensorboard(runs / "windows", "train/lr")
    assert {s: pytest.approx(v, rel=1e-7) for s, v in board.items()} == {
        r["step"]: r["lr"] for r in _rows(runs / "windows")
    }


@pytest.mark.ranks(2)
def test_a_tiny_lr_survives_metrics_jsonl_and_tensorboard(runs):
    (row,) = _rows(runs / "tiny_lr")
    assert row["lr"] == 1.6e-8 * math.sqrt(8 / 2048) and 0.99e-9 < row["lr"] < 1.01e-9  # not rounded to 0 or 1e-09
    assert _tensorboard(runs / "tiny_lr", "train/lr")[1] == pytest.approx(row["lr"], rel=1e-7)


def test_step_flops_count_the_student_three_times_and_the_teacher_once():
    """MFU's numerator (GPU only in training): 6 x params x tokens for the student's matmuls (forward and
    backward) within 25 % (attention scores and the head add to it); the pixels teacher adds nothing."""
    import torch

    from dtm_ds.config import build_config
    from dtm_ds.logs import count_step_flops
    from dtm_ds.teacher import build_teacher

    model = build_config("vits").model
    teacher = build_teacher(build_config("tiny").teacher, model, torch.device("cpu"))  # pixels
    flops = count_step_flops(teacher, model, teacher.dim, torch.device("cpu"))
    matmul_params = 12 * model.depth * model.embed_dim**2  # qkv, proj and the 4x MLP of every block
    assert 1.0 < flops / (6 * matmul_params * model.grid**2) < 1.25, flops


def _vit_forward_flops(width: int, depth: int, tokens: int, patches: int, patch: int, out: int) -> float:
    """The textbook count of one image through a ViT: 2 x (multiply-adds) of every matmul, the attention
    scores and their weighted sum included; norms, softmax and biases left out."""
    blocks = depth * (2 * 12 * width**2 * tokens + 2 * 2 * tokens**2 * width)  # qkv, proj, MLP; QK^T and AV
    return blocks + 2 * 3 * patch**2 * width * patches + 2 * width * out * patches  # patch embedding, head


def test_step_flops_count_the_clip_teacher_attention(tmp_path):
    """MFU's numerator against an independent count within 5 %: an open_clip teacher (whose attention runs as
    nn.MultiheadAttention's fused inference op, invisible to torch's flop counter unless it is turned off)
    counted once, the student forward and backward (3x its forward)."""
    import json

    import open_clip
    import torch

    from dtm_ds.config import build_config
    from dtm_ds.logs import count_step_flops
    from dtm_ds.teacher import build_teacher

    vision = {"image_size": 32, "layers": 6, "width": 256, "patch_size": 4, "head_width": 64}  # the tiny grid
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    clip = {"embed_dim": 128, "vision_cfg": vision, "text_cfg": text}
    (tmp_path / "flops-clip.json").write_text(json.dumps(clip))
    open_clip.add_model_config(tmp_path / "flops-clip.json")
    torch.save(open_clip.create_model("flops-clip", pretrained=None).state_dict(), tmp_path / "clip.pt")
    config = build_config("tiny", {"teacher.name": "clip:flops-clip", "teacher.weights": str(tmp_path / "clip.pt")})
    m = config.model
    teacher = build_teacher(config.teacher, m, torch.device("cpu"))
    assert torch.backends.mha.get_fastpath_enabled()
    counted = count_step_flops(teacher, m, teacher.dim, torch.device("cpu"))
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    patches = m.grid**2
    want = _vit_forward_flops(256, 6, patches + 1, patches, 4, 128)  # the teacher (most of it): forward only
    want += 3 * _vit_forward_flops(m.embed_dim, m.depth, patches + 1, patches, 4, teacher.dim)
    assert abs(counted / want - 1) < 0.05, (counted, want)


def test_peak_bf16_by_device_name():
    """Each H100 variant has its own peak (SXM, PCIe, NVL), L4 is not L40 or L40S, unknown devices are None."""
    from dtm_ds.logs import peak_bf16

    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L40S": 362e12,
             "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12, "NVIDIA GeForce RTX 4090": None,
             "Tesla V100-SXM2-16GB": None}  # fmt: skip
    assert {name: peak_bf16(name) for name in names} == names


def test_img_per_s_leaves_out_the_time_of_an_online_knn(tmp_path):
    """Two lines 3 s apart, 1 s of which an online k-NN took: 40 images per step x 6 steps / 2 s = 120 img/s."""
    import time

    from dtm_ds.logs import RunLog

    log = RunLog(str(tmp_path), True, 10, 0, "pretrain", plain=True)
    log.last_time = time.perf_counter() - 3.0
    log.step(6, {"loss": 1.0, "knn_top1": 50.0}, 40, excluded_s=1.0)
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["img_per_s"] == pytest.approx(120, rel=0.01) and row["knn_top1"] == 50.0
