"""Benchmark dtm_loss forward+backward against a dense source-matrix formulation and the slow reference.

Settings follow the paper's ViT-B/16 step: B=64, N=196, C=512, L=2, n_max=196, k_max=14, 20 fixed
random schedules, 2 threads. Prints a table and a final JSON line (medians over schedules, ratios).

    python -m bench.bench_morph [--batch 64] [--schedules 20] [--ref_schedules 3]
"""

import json
import math
import statistics
import time

import fire
import torch
import torch.nn.functional as F

from bench.morph_reference import reference_loss
from dtm_ds.morph import dtm_loss, sample_schedule


def dense_loss(pred, target, schedule, beta=2.0):
    """Authors-style formulation: a dense [B, t, N] 0/1 source matrix tracked through shrinking sequences
    (host-side schedule, shapes that depend on it), aggregation by four dense matmuls per level."""
    losses = []
    for merges in schedule.tolist():
        with torch.no_grad():
            source = _dense_groups(target, merges)  # (B, t, N)
            counts = source.sum(-1, keepdim=True)
        pred_m = source.transpose(1, 2) @ ((source @ pred) / counts)
        target_m = source.transpose(1, 2) @ ((source @ target) / counts)
        losses.append(F.smooth_l1_loss(pred_m, target_m, beta=beta))
    return torch.stack(losses).mean()


def _dense_groups(x, merges):
    b, n, _ = x.shape
    size = x.new_ones(b, n, 1)
    source = torch.eye(n, dtype=x.dtype).expand(b, n, n).clone()
    for r in merges:
        r = min(r, (x.shape[1] - 1) // 2)
        if r <= 0:
            continue
        m = x / x.norm(dim=-1, keepdim=True)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
        scores[:, 0, :] = -math.inf
        best, match = scores.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True)[..., None]
        unmerged, src = edges[:, r:].sort(dim=1)[0], edges[:, :r]
        dst = match[..., None].gather(1, src)

        def merge(v, unmerged=unmerged, src=src, dst=dst):
            c = v.shape[-1]
            side_a, side_b = v[:, ::2], v[:, 1::2]
            moved = side_a.gather(1, src.expand(-1, -1, c))
            side_b = side_b.scatter_reduce(1, dst.expand(-1, -1, c), moved, reduce="sum")
            return torch.cat([side_a.gather(1, unmerged.expand(-1, -1, c)), side_b], dim=1)

        x = merge(x * size)
        size = merge(size)
        x = x / size
        source = merge(source)
    return source


def _time(fn, pred, target, schedule, repeats):
    times = []
    for _ in range(repeats):
        pred.grad = None
        start = time.perf_counter()
        fn(pred, target, schedule).backward()
        times.append(time.perf_counter() - start)
    return min(times), pred.grad.clone()


def main(
    batch: int = 64, tokens: int = 196, dim: int = 512, schedules: int = 20, ref_schedules: int = 3, threads: int = 2
):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(batch, tokens, dim, generator=gen, requires_grad=True)
    target = torch.randn(batch, tokens, dim, generator=gen)
    plan = [sample_schedule([tokens] * 2, [14] * 2, gen) for _ in range(schedules)]
    static = torch.compile(dtm_loss, fullgraph=True, dynamic=False, backend="eager")
    static(pred, target, plan[0]).backward()  # trace once, outside the timing
    rows = {"dtm_ds (eager)": [], "dtm_ds (static, all K)": [], "dense source matrix": [], "slow reference": []}
    for i, schedule in enumerate(plan):
        t_ours, g_ours = _time(dtm_loss, pred, target, schedule, 3)
        t_static, _ = _time(static, pred, target, schedule, 2)
        t_dense, g_dense = _time(dense_loss, pred, target, schedule, 2)
        torch.testing.assert_close(g_ours, g_dense, rtol=1e-3, atol=1e-7)  # same loss, same gradient
        rows["dtm_ds (eager)"].append(t_ours)
        rows["dtm_ds (static, all K)"].append(t_static)
        rows["dense source matrix"].append(t_dense)
        if i < ref_schedules:
            rows["slow reference"].append(_time(reference_loss, pred, target, schedule, 1)[0])
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    ours = med["dtm_ds (eager)"]
    print(f"dtm_loss fwd+bwd  B={batch} N={tokens} C={dim} L=2 n_max={tokens} k_max=14  threads={threads}")
    print(f"{'formulation':<26}{'schedules':>10}{'median ms':>12}{'vs eager':>10}")
    for name, value in med.items():
        print(f"{name:<26}{len(rows[name]):>10}{value * 1e3:>12.1f}{value / ours:>9.1f}x")
    result = {f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()}
    result |= {"dense_over_ours": round(med["dense source matrix"] / ours, 2)}
    result |= {"reference_over_ours": round(med["slow reference"] / ours, 1) if "slow reference" in med else None}
    result |= {"dense_over_static": round(med["dense source matrix"] / med["dtm_ds (static, all K)"], 2)}
    print(json.dumps({"bench": "morph", **result}))


if __name__ == "__main__":
    fire.Fire(main)
