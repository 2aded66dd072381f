"""GPU checks and timings in one short call (bench/gpu_check.sh runs it; ``--dry_run`` shrinks it for CPU).

1. Graph-replayed DTM partitions equal eager ones (B=64, N=196, C=512, several schedules).
2. DTM step (groups of L=2 levels + loss) eager vs CUDA graph, ms.
3. A ViT-B/16 DTM training step with a ViT-B/16 CLIP-architecture teacher (random weights), batch 64,
   bf16: the bench_train table.
A short summary table is printed last.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_train import main as bench_train  # noqa: E402
from dtm_ds.dtm_step import DTMStep  # noqa: E402
from dtm_ds.morph import morph_levels, morphed_loss, sample_schedule  # noqa: E402


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
    b, n, c = (4, 196, 64) if dry_run else (64, 196, 512)
    gen = torch.Generator(device=device).manual_seed(0)
    targets = torch.randn(b, n, c, device=device, generator=gen)
    pred = torch.randn(b, n, c, device=device, generator=gen, requires_grad=True)
    graphed = DTMStep(cuda_graph=True)
    schedules = [sample_schedule([n, n], [14, 14], gen) for _ in range(5)]
    equal = 0
    for schedule in schedules:
        groups, _ = graphed(targets, schedule)
        plain, _ = morph_levels(targets.cpu(), schedule.cpu())  # eager CPU path, host plan
        relabel = [torch.unique(g, return_inverse=True)[1] for g in (groups.cpu().flatten(1), plain.flatten(1))]
        equal += int(all(torch.equal(_canonical(x), _canonical(y)) for x, y in zip(*relabel, strict=True)))

    def step(dtm):
        groups, slots = dtm(targets, schedules[0])
        morphed_loss(pred, targets, groups, "smooth_l1", 2.0, slots).mean().backward()

    eager_ms = _time(lambda: step(DTMStep(cuda_graph=False)), device)
    graph_ms = _time(lambda: step(graphed), device)
    train = bench_train(
        preset="tiny" if dry_run else "vitb",
        teacher="pixels" if dry_run else "clip",
        batch=4 if dry_run else 64,
        steps=2 if dry_run else 10,
        device=str(device),
    )
    step_ms = 1e3 * train["batch"] / train["dtm_on_img_s"]
    rows = {
        "device": train["device"],
        "graph partitions == eager": f"{equal}/{len(schedules)}",
        f"dtm step eager ms (B={b})": round(eager_ms, 2),
        f"dtm step graph ms (B={b})": round(graph_ms, 2),
        "train img/s dtm on": train["dtm_on_img_s"],
        "train img/s dtm off": train["dtm_off_img_s"],
        "dtm share of step %": round(100 * graph_ms / step_ms, 2),
        "MFU % (dtm on)": train["dtm_on_mfu_pct"],
    }
    print("\n=== gpu_check ===")
    for key, value in rows.items():
        print(f"{key:>30}: {value}")
    print(json.dumps({"bench": "gpu_check", **rows}))
    return rows


def _canonical(labels: torch.Tensor) -> torch.Tensor:
    """Relabel a row of group ids by first occurrence."""
    first = {}
    return torch.tensor([first.setdefault(int(v), len(first)) for v in labels])


if __name__ == "__main__":  # no fire here: the GPU machine has only torch, timm and triton
    main(dry_run="--dry_run" in sys.argv[1:])
