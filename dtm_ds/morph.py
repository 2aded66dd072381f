"""Dynamic Token Morphing: static-shape bipartite token grouping and the morphed distillation loss.

Semantics follow the DTM reference (ToMe-style bipartite soft matching, shared/DESIGN.md §2); the
implementation is static-shape so one step can be captured as a CUDA graph:

* the current sequence is a fixed ``[B, N]`` buffer of group ids plus a per-row length ``t``;
* cosine scores come from a Gram matrix of group *sums* that is built once per call and updated by
  row/column scatter-adds when groups merge (a group's feature is the mean of the teacher tokens it
  holds, and the cosine of two means equals the cosine of their sums), so an iteration costs
  O(B·N²) instead of O(B·N²·C);
* the merges per iteration are a tensor; zero merges (or merges clamped to zero) leave the state
  untouched through ``torch.where``, never through Python branches on tensor values.

Only torch is imported here.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("smooth_l1", "l1", "l2", "negcosine")


def sample_schedule(n_max: Sequence[int], k_max: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """Sample the merges per iteration for every level: LongTensor [L, max(k_max)], zero-padded.

    Level l draws n ~ U{0..n_max[l]} and k ~ U{1..k_max[l]}; it runs k iterations of r = ceil(n / k)
    merges, or floor(n / k) when ceil(n / k) * k would exceed n_max[l]. Pure tensor ops on the
    generator's device, so sampling on an accelerator needs no host round trip.
    """
    if len(n_max) != len(k_max) or not n_max:
        raise ValueError(f"n_max and k_max need one entry per level, got n_max={n_max} k_max={k_max}")
    if min(n_max) < 0 or min(k_max) < 1:
        raise ValueError(f"need n_max >= 0 and k_max >= 1 per level, got n_max={n_max} k_max={k_max}")
    device = generator.device if generator is not None else torch.device("cpu")
    n_hi = torch.tensor(n_max, device=device)
    k_hi = torch.tensor(k_max, device=device)
    u = torch.rand(2, len(n_max), generator=generator, device=device, dtype=torch.float64)
    n = (u[0] * (n_hi + 1)).floor().long().clamp_max(n_hi)
    k = (u[1] * k_hi).floor().long().clamp_max(k_hi - 1) + 1
    ceil = (n + k - 1) // k
    r = torch.where(ceil * k > n_hi, n // k, ceil)
    steps = torch.arange(max(k_max), device=device)
    return torch.where(steps < k[:, None], r[:, None], 0)


def morph(metric: Tensor, merges: Tensor | Sequence[int], protect_first: bool = True) -> Tensor:
    """Group tokens by iterative bipartite soft matching on ``metric``.

    Args:
        metric: [B, N, C] token features (teacher tokens); cast to float32 or wider for matching.
        merges: [K] merges per iteration (zeros are no-op iterations), or [B, K] one row per sample.
        protect_first: the token at position 0 never merges away (the reference's "class token").

    Returns:
        LongTensor [B, N]: the group id of every token, in [0, N); equal ids share a group.
    """
    b = metric.shape[0]
    merges = torch.as_tensor(merges, dtype=torch.long, device=metric.device)
    merges = merges.expand(b, -1) if merges.dim() == 1 else merges
    with torch.no_grad():
        return _morph_gram(_gram(metric), merges, protect_first)


def group_mean(x: Tensor, groups: Tensor) -> Tensor:
    """Replace every token by the mean of its group.

    Args:
        x: [B, N, D] features; gradients flow through.
        groups: [B, N] group ids in [0, N), as returned by :func:`morph`.

    Returns:
        [B, N, D]; O(B·N·D) scatter/gather, no [B, N, N] tensor.
    """
    index = groups.unsqueeze(-1).expand_as(x)
    sums = torch.zeros_like(x).scatter_add(1, index, x)  # (B, N, D) per group id
    counts = torch.zeros(groups.shape, dtype=x.dtype, device=x.device).scatter_add(
        1, groups, torch.ones_like(x[..., 0])
    )
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    return means.gather(1, index)


def dtm_loss(
    pred: Tensor,
    target: Tensor,
    schedule: Tensor,
    loss: str = "smooth_l1",
    beta: float = 2.0,
    protect_first: bool = True,
) -> Tensor:
    """Morphed distillation loss averaged over levels.

    Args:
        pred: [B, N, D] student predictions (gradients flow to it).
        target: [B, N, D] teacher targets; groups are computed from it under no_grad.
        schedule: [L, K] merges per iteration for each level (see :func:`sample_schedule`).
        loss: one of ``LOSSES``; ``smooth_l1`` uses ``beta``.

    Returns:
        Scalar: mean over levels of the per-token loss over all N tokens.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    target = target.detach()
    levels, b = schedule.shape[0], target.shape[0]
    with torch.no_grad():
        gram = _gram(target).repeat(levels, 1, 1)  # (L*B, N, N), one Gram shared by all levels
        merges = schedule.to(target.device).repeat_interleave(b, dim=0)  # (L*B, K)
        groups = _morph_gram(gram, merges, protect_first).view(levels, b, -1)
    total = pred.new_zeros(())
    for level in range(levels):
        total = total + _token_loss(group_mean(pred, groups[level]), group_mean(target, groups[level]), loss, beta)
    return total / levels


def _token_loss(pred: Tensor, target: Tensor, loss: str, beta: float) -> Tensor:
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if loss == "l1":
        return F.l1_loss(pred, target)
    if loss == "l2":
        return F.mse_loss(pred, target)
    return -F.cosine_similarity(pred, target, dim=-1).mean()


def _gram(metric: Tensor) -> Tensor:
    """[B, N, N] dot products of the token features, in at least float32."""
    m = metric.detach()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    return m @ m.transpose(1, 2)


def _trim(merges: Tensor) -> Tensor:
    """Eager CPU only: drop trailing iterations that merge nothing in every row."""
    if torch.compiler.is_compiling() or merges.device.type != "cpu" or merges.numel() == 0:
        return merges
    active = (merges > 0).any(0).nonzero()
    return merges[:, : int(active[-1]) + 1] if len(active) else merges[:, :0]


def _morph_gram(gram: Tensor, merges: Tensor, protect_first: bool) -> Tensor:
    """Run the iterations on a Gram matrix of group sums; ``gram`` is updated in place."""
    b, n, _ = gram.shape
    ids = torch.arange(n, device=gram.device).expand(b, n)
    seq = ids.clone()  # (B, N) group id at each position of the current sequence
    assign = ids.clone()  # (B, N) group id of each original token
    t = torch.full((b,), n, dtype=torch.long, device=gram.device)  # current length per row
    for r in _trim(merges).unbind(1):
        seq, assign, t = _merge_step(gram, seq, assign, t, r, protect_first)
    return assign


def _merge_step(gram: Tensor, seq: Tensor, assign: Tensor, t: Tensor, r: Tensor, protect_first: bool):
    """One bipartite matching iteration on every row, with r[b] merges requested for row b."""
    b, n = seq.shape
    pos = torch.arange(n + 1, device=seq.device)
    slots_a, slots_b = pos[0:n:2], pos[1:n:2]  # positions of the A and B halves
    r = torch.minimum(r, (t - int(protect_first)) // 2).clamp_min(0)  # (B,)
    a_ids, b_ids = seq[:, 0::2], seq[:, 1::2]  # (B, Na), (B, Nb)
    in_a, in_b = slots_a < t[:, None], slots_b < t[:, None]
    can_merge = in_a & (slots_a > 0) if protect_first else in_a

    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # (B, N) norms of the group sums
    rows = gram.gather(1, a_ids.unsqueeze(-1).expand(-1, -1, n))  # (B, Na, N)
    dots = rows.gather(2, b_ids.unsqueeze(1).expand(-1, a_ids.shape[1], -1))  # (B, Na, Nb)
    scores = dots / (norms.gather(1, a_ids).unsqueeze(-1) * norms.gather(1, b_ids).unsqueeze(1))
    best, match = scores.masked_fill(~in_b.unsqueeze(1), -torch.inf).max(dim=-1)  # (B, Na)
    best = best.masked_fill(~can_merge, -torch.inf)

    # The r A tokens with the highest best-scores merge (stable order, as a stable descending argsort).
    order = best.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, pos[: order.shape[1]].expand_as(order))
    merged = rank < r[:, None]  # (B, Na)
    dst = b_ids.gather(1, match)  # (B, Na) group each A token would join

    # Group sums add up: rows, then columns of the Gram matrix (several A may join one B).
    w = merged.to(gram.dtype)
    gram.scatter_add_(1, dst.unsqueeze(-1).expand(-1, -1, n), rows * w.unsqueeze(-1))
    cols = gram.gather(2, a_ids.unsqueeze(1).expand(-1, n, -1))  # (B, N, Na)
    gram.scatter_add_(2, dst.unsqueeze(1).expand(-1, n, -1), cols * w.unsqueeze(1))

    # Original tokens of a merged group now belong to its destination (index n is a dump slot).
    remap = pos.expand(b, -1).scatter(1, torch.where(merged, a_ids, n), dst)
    assign = remap.gather(1, assign)

    # New sequence: unmerged A tokens in their order, then all B tokens in order.
    keep_a = in_a & ~merged
    to_a = torch.where(keep_a, keep_a.long().cumsum(1) - 1, n)
    to_b = torch.where(in_b, keep_a.sum(1, keepdim=True) + slots_b // 2, n)
    new_seq = seq.new_zeros(b, n + 1).scatter(1, torch.cat([to_a, to_b], 1), torch.cat([a_ids, b_ids], 1))
    return torch.where((r > 0).unsqueeze(1), new_seq[:, :n], seq), assign, t - r
