"""Throughput of one DTM training step through the DeepSpeed engine, split by phase, DTM on and off.

The student (DTMStudent) runs inside the same engine pretraining builds (dtm_ds/engine.py: client AdamW,
parameter groups, bf16 on GPU); the teacher is the ``pixels`` teacher or a ViT-B/16 CLIP-architecture
tower from timm with random weights and a random 512-d projection; inputs are synthetic uint8 crops
(decoding is measured by bench_loader; "data" here is the on-device part: flip, jitter, normalisation,
masks). Each phase is timed with the device synchronised. *DTM on* morphs targets and predictions
(CUDA graph on GPU) and takes the morphed loss; *DTM off* skips morphing entirely: the token-wise
smooth-L1 between predictions and targets. Both report the share of the step spent in the loss phase.
MFU uses FLOPs counted by torch.utils.flop_counter and the device's dense bf16 peak where known.

    python -m bench.bench_train --preset vits --teacher clip --batch 8
    python -m bench.bench_train --preset vitb --teacher clip --batch 64 --device cuda --dtype bf16
"""

import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from dtm_ds import distributed
from dtm_ds.config import build_config
from dtm_ds.data import augment_on_device, normalize
from dtm_ds.data.masking import BlockMasking
from dtm_ds.engine import build_engine, param_groups, set_lr
from dtm_ds.graphed import GraphedMorph
from dtm_ds.logs import PEAK_BF16
from dtm_ds.morph import morphed_loss, sample_schedule
from dtm_ds.student import DTMStudent
from dtm_ds.teacher import PixelTeacher, TokenTeacher


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


def build(preset: str, teacher: str, device: torch.device, dtype: torch.dtype, batch: int):
    """The preset's config, the teacher, and the student inside the DeepSpeed engine pretraining uses."""
    config = build_config(preset)
    m, o = config.model, config.optim
    tutor = PixelTeacher(m.patch_size) if teacher == "pixels" else RandomClipTeacher(m.img_size)
    tutor.dtype = dtype
    tutor = tutor.to(device)
    tutor.encoder.to(dtype)
    torch.manual_seed(0)
    student = DTMStudent(m, tutor.dim)
    ds_config = {
        "train_micro_batch_size_per_gpu": batch,
        "train_batch_size": batch * distributed.world(),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 3.0,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {"stage": 2 if device.type == "cuda" else 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    groups = param_groups(student, o.weight_decay, o.decay_tables)
    engine, optimizer = build_engine(student, groups, ds_config, o.betas, o.eps)
    return config, tutor, engine, optimizer


def run_steps(config, teacher, engine, optimizer, batch: int, steps: int, dtm_on: bool, device, dtype) -> dict:
    """Median seconds per phase over ``steps`` engine steps (after two warm-up steps)."""
    m, d, dtm = config.model, config.data, config.dtm
    masking = BlockMasking((m.grid, m.grid), d.num_masked, min(d.min_mask_block, d.num_masked))
    graphed = GraphedMorph(dtm.protect_first, cuda_graph=True)
    gen = torch.Generator(device=device).manual_seed(0)
    raw = torch.randint(0, 256, (batch, 3, m.img_size, m.img_size), dtype=torch.uint8, device=device)
    timer = Timer(device)

    def data():
        rng = np.random.default_rng(len(timer.times.get("data", [])))
        masks = torch.from_numpy(masking.batch(batch, rng)).to(device, non_blocking=True)
        draws = torch.from_numpy(rng.random((batch, 4))).to(device, non_blocking=True)
        return normalize(augment_on_device(raw, draws, d.jitter)), masks

    def loss_of(pred, targets):
        if not dtm_on:  # token-wise distillation: no morphing at all
            return F.smooth_l1_loss(pred, targets, beta=dtm.beta)
        morphed = graphed(targets, sample_schedule(dtm.n_max, dtm.k_max, gen))
        return morphed_loss(pred, targets, morphed, dtm.loss, dtm.beta, dtm.normalize_target).mean()

    for step in range(steps + 2):  # two warm-up steps (graph capture, allocator)
        if step == 2:
            timer.times.clear()
        set_lr(optimizer, 1e-4)
        images, masks = timer("data", data)
        targets = timer("teacher", teacher, images)
        pred = timer("student fwd", lambda x, mask: engine(x.to(dtype), mask).float(), images, masks)
        loss = timer("loss", loss_of, pred, targets)
        timer("student bwd", engine.backward, loss)
        timer("optimizer", engine.step)
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
    distributed.init()
    config, tutor, engine, optimizer = build(preset, teacher, device, dtype, batch)
    rows = {
        name: run_steps(config, tutor, engine, optimizer, batch, steps, on, device, dtype)
        for name, on in (("dtm on", True), ("dtm off", False))
    }
    flops = step_flops(tutor, engine.module, batch, config.model.img_size, config.model.grid**2, device)
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{threads} threads"
    print(f"\ntraining step (DeepSpeed engine): preset {preset}, teacher {teacher}, batch {batch}, {dtype}, {name}")
    phases = list(rows["dtm on"])
    print(f"{'':<10}" + "".join(f"{p:>13}" for p in phases) + f"{'step ms':>10}{'img/s':>9}{'loss %':>8}{'MFU %':>7}")
    result = {"bench": "train", "preset": preset, "teacher": teacher, "batch": batch, "device": name}
    for label, times in rows.items():
        total = sum(times.values())
        mfu = 100 * flops / total / peak if peak else None
        share = 100 * times["loss"] / total
        cells = "".join(f"{1e3 * times[p]:>11.1f}ms" for p in phases)
        print(f"{label:<10}{cells}{1e3 * total:>10.1f}{batch / total:>9.1f}{share:>8.2f}{mfu or float('nan'):>7.1f}")
        key = label.replace(" ", "_")
        result |= {
            f"{key}_img_s": round(batch / total, 2),
            f"{key}_loss_share_pct": round(share, 3),
            f"{key}_mfu_pct": None if mfu is None else round(mfu, 2),
            **{f"{key}_{p.replace(' ', '_')}_ms": round(1e3 * t, 3) for p, t in times.items()},
        }
    on, off = (sum(rows[k].values()) for k in ("dtm on", "dtm off"))
    result["dtm_cost_pct"] = round(100 * (on - off) / off, 2)
    print(f"DTM costs {result['dtm_cost_pct']:.2f} % of the token-wise step (the paper: about 1 %)")
    result["gflop_per_step"] = round(flops / 1e9, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda result: None)
