"""GPU checks and timings in one short call (bench/gpu_check.sh runs it; ``--dry_run`` shrinks it for CPU).

1. Partitions: on a GPU, the CUDA graph replayed for 20 sampled schedules against the eager CPU path;
   in the CPU dry run, the static full-width path the GPU runs (``morph_levels(static=True)``) against
   the slow reference of bench/morph_reference.py. Either can fail, and then the check exits 1.
2. Morphing + loss, eager vs CUDA graph, ms.
3. A ViT-B/16 DTM training step through the DeepSpeed engine with a ViT-B/16 CLIP-architecture teacher
   (random weights), batch 64, bf16: the bench_train table, DTM on and off.
A short summary table is printed last.
"""

import importlib.util
import json
import statistics
import sys
import time

import torch

from bench.bench_train import main as bench_train
from bench.morph_reference import canonical, reference_groups
from dtm_ds.graphed import GraphedMorph
from dtm_ds.morph import morph_levels, morphed_loss, sample_schedule


def _time(fn, device, repeats=20):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(dry_run: bool = False) -> dict:
    device = torch.device("cpu" if dry_run else "cuda")
    b, n, c = (2, 49, 16) if dry_run else (64, 196, 512)
    gen = torch.Generator(device=device).manual_seed(0)
    targets = torch.randn(b, n, c, device=device, generator=gen)
    pred = torch.randn(b, n, c, device=device, generator=gen, requires_grad=True)
    graphed = GraphedMorph(cuda_graph=True)
    schedules = [sample_schedule([n, n], [7 if dry_run else 14] * 2, gen) for _ in range(20)]
    equal = 0
    for schedule in schedules:
        if dry_run:  # the GPU's full-width path against the slow reference
            got = morph_levels(targets, schedule, static=True).groups
            want = [[canonical(reference_groups(t, merges.tolist())) for t in targets] for merges in schedule]
        else:  # the replayed graph against the eager CPU path (host plan)
            got = graphed(targets, schedule).groups.cpu()
            want = [
                [canonical(g.tolist()) for g in level] for level in morph_levels(targets.cpu(), schedule.cpu()).groups
            ]
        equal += int([[canonical(g.tolist()) for g in level] for level in got] == want)

    def step(morph):
        morphed_loss(pred, targets, morph(targets, schedules[0]), "smooth_l1", 2.0).mean().backward()

    eager_ms = _time(lambda: step(GraphedMorph(cuda_graph=False)), device)
    graph_ms = _time(lambda: step(graphed), device)
    train = {"device": str(device)}
    if importlib.util.find_spec("deepspeed"):  # the step goes through the DeepSpeed engine
        preset, teacher, batch, steps = ("tiny", "pixels", 4, 2) if dry_run else ("vitb", "clip", 64, 10)
        train = bench_train(preset=preset, teacher=teacher, batch=batch, steps=steps, device=str(device))
    else:
        print("DeepSpeed is not installed here: the training-step timing is skipped")
    rows = {
        "device": train["device"],
        "partitions equal": f"{equal}/{len(schedules)}",
        f"morph+loss eager ms (B={b})": round(eager_ms, 2),
        f"morph+loss graph ms (B={b})": round(graph_ms, 2),
        "train img/s dtm on": train.get("dtm_on_img_s"),
        "train img/s dtm off": train.get("dtm_off_img_s"),
        "dtm cost % of the step": train.get("dtm_cost_pct"),
        "MFU % (dtm on)": train.get("dtm_on_mfu_pct"),
    }
    print("\n=== gpu_check ===")
    for key, value in rows.items():
        print(f"{key:>30}: {value}")
    print(json.dumps({"bench": "gpu_check", **rows}))
    if equal != len(schedules):
        sys.exit(f"partitions differ for {len(schedules) - equal} of {len(schedules)} schedules")
    return rows


if __name__ == "__main__":  # no fire here: the GPU machine has only torch, timm and triton
    main(dry_run="--dry_run" in sys.argv[1:])
