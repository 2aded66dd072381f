"""Throughput of one DTM training step, split by phase, with DTM on and off.

Student (dtm_ds DTMStudent), teacher (the ``pixels`` teacher, or a ViT-B/16 CLIP-architecture tower from
timm with random weights and a random 512-d projection), DTM step (CUDA graph on GPU) and AdamW, on
synthetic uint8 crops (decoding is measured by bench_loader.py; "data" here is the on-device part:
flip, jitter, normalisation and masks). Each phase is timed with the device synchronised. DTM off
means n_max = 0 at every level (token-wise distillation). MFU uses FLOPs counted by
torch.utils.flop_counter and the device's dense bf16 peak where known.

    python bench/bench_train.py --preset vits --teacher clip --batch 8
    python bench/bench_train.py --preset vitb --teacher clip --batch 64 --device cuda --dtype bf16
"""

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtm_ds.config import build_config  # noqa: E402
from dtm_ds.data import augment_on_device, normalize  # noqa: E402
from dtm_ds.dtm_step import DTMStep  # noqa: E402
from dtm_ds.logs import PEAK_BF16  # noqa: E402
from dtm_ds.masking import BlockMasking  # noqa: E402
from dtm_ds.morph import morphed_loss, sample_schedule  # noqa: E402
from dtm_ds.student import DTMStudent  # noqa: E402
from dtm_ds.teacher import PixelTeacher, TokenTeacher  # noqa: E402


class RandomClipTeacher(TokenTeacher):
    """CLIP ViT-B/16 architecture (timm) with random weights: final-norm patch tokens @ a 768x512 projection."""

    def __init__(self, img_size: int):
        import timm

        tower = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0, img_size=img_size)
        super().__init__(tower, 512)
        self.proj = torch.nn.Parameter(torch.randn(768, 512) / 768**0.5, requires_grad=False)

    def encode(self, x):
        return super().encode(x) @ self.proj.to(x.dtype)


class Timer:
    def __init__(self, device):
        self.device, self.times = device, {}

    def __call__(self, phase, fn, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.setdefault(phase, []).append(time.perf_counter() - start)
        return out


def build(preset: str, teacher: str, device: torch.device, dtype: torch.dtype):
    config = build_config(preset)
    m = config.model
    tutor = PixelTeacher(m.patch_size) if teacher == "pixels" else RandomClipTeacher(m.img_size)
    tutor.dtype = dtype
    tutor = tutor.to(device)
    tutor.encoder.to(dtype)
    torch.manual_seed(0)
    student = DTMStudent(m, tutor.dim).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
    return config, tutor, student, optimizer


def run_steps(config, teacher, student, optimizer, batch: int, steps: int, dtm_on: bool, device, dtype) -> dict:
    m, d = config.model, config.data
    n_max = config.dtm.n_max if dtm_on else [0] * len(config.dtm.n_max)
    masking = BlockMasking((m.grid, m.grid), d.num_masked, min(d.min_mask_block, d.num_masked))
    dtm = DTMStep(config.dtm.protect_first, cuda_graph=True)
    gen = torch.Generator(device=device).manual_seed(0)
    raw = torch.randint(0, 256, (batch, 3, m.img_size, m.img_size), dtype=torch.uint8, device=device)
    timer = Timer(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def data():
        rng = np.random.default_rng(len(timer.times.get("data", [])))
        masks = torch.from_numpy(masking.batch(batch, rng)).to(device, non_blocking=True)
        draws = torch.from_numpy(rng.random((batch, 4))).to(device, non_blocking=True)
        return normalize(augment_on_device(raw, draws, d.jitter)), masks

    def forward(images, masks):
        with autocast:
            return student(images, masks).float()

    def dtm_loss(pred, targets):
        groups, slots = dtm(targets, sample_schedule(n_max, config.dtm.k_max, gen))
        return morphed_loss(pred, targets, groups, config.dtm.loss, config.dtm.beta, slots).mean()

    for step in range(steps + 2):  # two warm-up steps (graph capture, allocator)
        if step == 2:
            timer.times.clear()
        images, masks = timer("data", data)
        targets = timer("teacher", teacher, images)
        pred = timer("student fwd", forward, images, masks)
        loss = timer("dtm", dtm_loss, pred, targets)
        timer("student bwd", loss.backward)
        timer("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return {k: statistics.median(v) for k, v in timer.times.items()}


def step_flops(teacher, student, batch: int, img: int, tokens: int, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.randn(batch, 3, img, img, device=device)
    mask = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    with FlopCounterMode(display=False) as counter:
        teacher(images)
        student(images, mask).float().pow(2).mean().backward()
    student.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(
    preset: str = "vits",
    teacher: str = "clip",
    batch: int = 8,
    steps: int = 5,
    device: str | None = None,
    dtype: str = "auto",
    threads: int = 2,
) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
    }[dtype]
    torch.set_num_threads(threads)
    config, tutor, student, optimizer = build(preset, teacher, device, dtype)
    rows = {
        name: run_steps(config, tutor, student, optimizer, batch, steps, on, device, dtype)
        for name, on in (("dtm on", True), ("dtm off", False))
    }
    flops = step_flops(tutor, student, batch, config.model.img_size, config.model.grid**2, device)
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{threads} threads"
    print(f"\ntraining step: preset {preset}, teacher {teacher}, batch {batch}, {dtype}, {name}")
    phases = list(rows["dtm on"])
    print(f"{'':<10}" + "".join(f"{p:>13}" for p in phases) + f"{'step ms':>10}{'img/s':>9}{'dtm %':>7}{'MFU %':>7}")
    result = {"bench": "train", "preset": preset, "teacher": teacher, "batch": batch, "device": name}
    for label, times in rows.items():
        total = sum(times.values())
        mfu = 100 * flops / total / peak if peak else None
        share = 100 * times["dtm"] / total
        cells = "".join(f"{1e3 * times[p]:>11.1f}ms" for p in phases)
        print(f"{label:<10}{cells}{1e3 * total:>10.1f}{batch / total:>9.1f}{share:>7.2f}{mfu or float('nan'):>7.1f}")
        key = label.replace(" ", "_")
        result |= {
            f"{key}_img_s": round(batch / total, 2),
            f"{key}_dtm_share_pct": round(share, 3),
            f"{key}_mfu_pct": None if mfu is None else round(mfu, 2),
            **{f"{key}_{p.replace(' ', '_')}_ms": round(1e3 * t, 3) for p, t in times.items()},
        }
    result["gflop_per_step"] = round(flops / 1e9, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda result: None)
