"""Slow, obviously-correct DTM reference written from shared/DESIGN.md §2.

One sample at a time, tokens kept in plain Python lists; used by the tests and by bench/bench_morph.py.
"""

import math

import torch


def reference_merges(n: int, k: int, n_max: int) -> list[int]:
    """Merges per iteration for one level: k iterations of ceil(n/k), or floor(n/k) past n_max."""
    r = math.ceil(n / k)
    if r * k > n_max:
        r = n // k
    return [r] * k


def reference_groups(metric: torch.Tensor, merges: list[int], protect_first: bool = True) -> list[list[int]]:
    """Partition of the tokens of one sample ([N, C] metric) as a list of member lists."""
    # Each token: [feature (size-weighted mean of its members), size, members]
    tokens = [[metric[i].clone(), 1, [i]] for i in range(metric.shape[0])]
    for r in merges:
        t = len(tokens)
        r = min(r, (t - 1) // 2 if protect_first else t // 2)
        if r <= 0:
            continue
        side_a, side_b = tokens[0::2], tokens[1::2]
        a = torch.stack([tok[0] / tok[0].norm() for tok in side_a])
        b = torch.stack([tok[0] / tok[0].norm() for tok in side_b])
        scores = (a @ b.T).tolist()
        if protect_first:
            scores[0] = [-math.inf] * len(side_b)
        best = [max(row) for row in scores]
        match = [row.index(max(row)) for row in scores]
        ranked = sorted(range(len(side_a)), key=lambda i: -best[i])  # stable: ties keep position order
        sources = ranked[:r]
        weighted = [tok[0] * tok[1] for tok in side_b]
        for i in sources:
            feat, size, members = side_a[i]
            j = match[i]
            weighted[j] = weighted[j] + feat * size
            side_b[j] = [side_b[j][0], side_b[j][1] + size, side_b[j][2] + members]
        side_b = [[weighted[j] / tok[1], tok[1], tok[2]] for j, tok in enumerate(side_b)]
        tokens = [tok for i, tok in enumerate(side_a) if i not in sources] + side_b
    return [sorted(tok[2]) for tok in tokens]


def canonical(groups) -> list[int]:
    """Relabel a partition by first occurrence: from member lists or from a per-token id list."""
    if groups and isinstance(groups[0], list):
        label = {}
        for g, members in enumerate(groups):
            for i in members:
                label[i] = g
        groups = [label[i] for i in range(len(label))]
    first = {}
    return [first.setdefault(g, len(first)) for g in groups]


def reference_loss(pred, target, schedule, loss="smooth_l1", beta=2.0, protect_first=True, normalize=False):
    """Morphed loss, one sample and one group at a time; differentiable in pred. ``normalize``: each
    morphed target token standardised over its channels (unbiased variance, eps 1e-6)."""
    levels = []
    for merges in schedule.tolist():
        per_sample = []
        for p, q in zip(pred, target, strict=True):
            rows = []
            for members in reference_groups(q.detach(), merges, protect_first):
                pm, qm = p[members].mean(0), q[members].mean(0)
                if normalize:
                    qm = (qm - qm.mean()) / torch.sqrt(qm.var() + 1e-6)
                rows += [(pm, qm)] * len(members)
            per_sample.append(torch.stack([_elementwise(pm, qm, loss, beta) for pm, qm in rows]).mean())
        levels.append(torch.stack(per_sample).mean())
    return torch.stack(levels).mean()


def _elementwise(p, q, loss, beta):
    d = p - q
    if loss == "smooth_l1":
        return torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta).mean()
    if loss == "l1":
        return d.abs().mean()
    if loss == "l2":
        return (d * d).mean()
    return -(p @ q) / (p.norm() * q.norm())
