"""Dynamic Token Morphing: static-shape bipartite token grouping and the morphed distillation loss.

Semantics follow the DTM reference (ToMe-style bipartite soft matching, shared/DESIGN.md §2); the
implementation is static-shape so one step can be captured as a CUDA graph:

* the current sequence is a fixed ``[B, N]`` buffer of group ids plus a per-row length ``t``;
* cosine scores come from a Gram matrix of group *sums* that is built once per call and updated by
  row and column additions when groups merge (a group's feature is the mean of the teacher tokens it
  holds, and the cosine of two means equals the cosine of their sums), so an iteration costs
  O(B·N²) instead of O(B·N²·C);
* the merges per iteration are a tensor; zero merges (or merges clamped to zero) leave the state
  untouched through ``torch.where``, never through Python branches on tensor values;
* only the eager CPU path reads the schedule on the host (``_host_plan``) to skip iterations, rows
  and sequence positions that cannot merge; traced or on an accelerator everything is full width;
* group means and the loss use index_add / index_select over the flattened batch (O(B·N·D)).

Only torch is imported here.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "Morphed", "dtm_loss", "morph_levels", "morphed_loss", "sample_schedule", "tokenwise_loss"]

LOSSES = ("smooth_l1", "l1", "l2", "negcosine")


class Morphed(NamedTuple):
    """The groups of every level for one schedule (:func:`morph_levels`); :func:`morphed_loss` and the
    pictures take it."""

    groups: Tensor
    """LongTensor [L, B, N]: the group id of every token at every level."""
    slots: list[int]
    """Per level, a bound on the group ids (the number of groups when known on the host, else N)."""

    def counts(self) -> Tensor:
        """LongTensor [L, B]: the number of groups of every level and sample."""
        levels, b, n = self.groups.shape
        present = torch.zeros(levels, b, n, dtype=torch.long, device=self.groups.device)
        return present.scatter_(2, self.groups, 1).sum(2)


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
    # torch.full launches fills: no host-to-device copy, which would wait for the device to drain
    n_hi = torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in n_max])
    k_hi = torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in k_max])
    u = torch.rand(2, len(n_max), generator=generator, device=device, dtype=torch.float64)
    n = (u[0] * (n_hi + 1)).floor().long().clamp_max(n_hi)
    k = (u[1] * k_hi).floor().long().clamp_max(k_hi - 1) + 1
    ceil = (n + k - 1) // k
    r = torch.where(ceil * k > n_hi, n // k, ceil)
    steps = torch.arange(max(k_max), device=device)
    return torch.where(steps < k[:, None], r[:, None], 0)


def _morph(metric: Tensor, merges: Tensor | Sequence[int], protect_first: bool = True) -> Tensor:
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
        return _morph_gram(_gram(metric), merges, protect_first, _host_plan(merges, metric.shape[1], protect_first))


def _group_mean(x: Tensor, groups: Tensor) -> Tensor:
    """Replace every token by the mean of its group.

    Args:
        x: [B, N, D] features; gradients flow through.
        groups: [B, N] group ids in [0, N), as returned by :func:`_morph`.

    Returns:
        [B, N, D]; O(B·N·D) index_add/index_select over the flattened batch, no [B, N, N] tensor.
    """
    b, n, d = x.shape
    flat = _flat_ids(groups, n)
    sums, counts = _segment_sum(x.reshape(b * n, d), flat, b * n)
    return (sums / counts.clamp_min(1).unsqueeze(-1)).index_select(0, flat).view(b, n, d)


def dtm_loss(
    pred: Tensor,
    target: Tensor,
    schedule: Tensor,
    loss: str = "smooth_l1",
    beta: float = 2.0,
    protect_first: bool = True,
    per_level: bool = False,
    normalize_target: bool = False,
) -> Tensor:
    """Morphed distillation loss averaged over levels (``per_level=True``: the [L] level losses).

    Args:
        pred: [B, N, D] student predictions (gradients flow to it).
        target: [B, N, D] teacher targets; groups are computed from it under no_grad.
        schedule: [L, K] merges per iteration for each level (see :func:`sample_schedule`).
        loss: one of ``LOSSES``; ``smooth_l1`` uses ``beta``.
        normalize_target: normalise every morphed target token over its channels (mean 0, unbiased
            variance 1, eps 1e-6 under the root), as the reference's ``--normalize_target``.

    Returns:
        Scalar: mean over levels of the loss over all N tokens (mean over channels, then tokens).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    losses = morphed_loss(pred, target, morph_levels(target, schedule, protect_first), loss, beta, normalize_target)
    return losses if per_level else losses.mean()


@torch.no_grad()
def morph_levels(target: Tensor, schedule: Tensor, protect_first: bool = True, static: bool = False) -> Morphed:
    """Morph every level of ``schedule`` [L, K] on ``target`` [B, N, D]: the groups [L, B, N] with ids in
    [0, slots[l]) (slots: N on an accelerator or when traced; the number of groups when known on the
    host). All levels run in one batch of L*B rows and share one Gram matrix; this is the part captured
    as a CUDA graph (dtm_ds/graphed.py). ``static``: run the accelerator's full-width path on any device
    (no host plan), as the GPU does."""
    levels, (b, n, _) = schedule.shape[0], target.shape
    gram = _gram(target).repeat(levels, 1, 1)  # (L*B, N, N)
    merges = schedule.to(target.device).repeat_interleave(b, dim=0)  # (L*B, K)
    plan = None if static else _host_plan(merges, n, protect_first, levels)
    groups = _morph_gram(gram, merges, protect_first, plan).view(levels, b, n)
    return Morphed(groups, [n] * levels if plan is None else plan[2])


def morphed_loss(
    pred: Tensor,
    target: Tensor,
    morphed: Morphed,
    loss: str = "smooth_l1",
    beta: float = 2.0,
    normalize_target: bool = False,
) -> Tensor:
    """[L] losses between group means of ``pred`` and of ``target`` [B, N, D] for the groups of ``morphed``.

    Every token of a group carries the same morphed value, so the token mean is a count-weighted mean
    over groups, and (for the elementwise losses) mean(pred) - mean(target) = mean(pred - target).
    ``normalize_target`` normalises each group's target mean over channels before the comparison.
    """
    (groups, slots), (b, n, d) = morphed, target.shape
    levels = groups.shape[0]
    pred, target = pred.reshape(b * n, d), target.detach().reshape(b * n, d)
    diff = pred - target if loss != "negcosine" and not normalize_target else None
    losses = []
    for level in range(levels):
        flat = _flat_ids(groups[level], slots[level])
        if normalize_target:
            p_sum, counts = _segment_sum(pred, flat, b * slots[level])
            size = counts.clamp_min(1).unsqueeze(-1)
            p_mean, t_mean = p_sum / size, _segment_sum(target, flat, b * slots[level])[0] / size
            t_mean = (t_mean - t_mean.mean(-1, keepdim=True)) / (t_mean.var(-1, keepdim=True) + 1e-6).sqrt()
            if loss == "negcosine":
                per_group = -F.cosine_similarity(p_mean, t_mean, dim=-1)
            else:
                per_group = _elementwise(p_mean - t_mean, loss, beta).mean(-1)
        elif diff is None:
            p_sum, counts = _segment_sum(pred, flat, b * slots[level])
            per_group = -F.cosine_similarity(p_sum, _segment_sum(target, flat, b * slots[level])[0], dim=-1)
        else:
            d_sum, counts = _segment_sum(diff, flat, b * slots[level])
            per_group = _elementwise(d_sum / counts.clamp_min(1).unsqueeze(-1), loss, beta).mean(-1)
        losses.append((per_group * counts).sum() / (b * n))
    return torch.stack(losses)


def tokenwise_loss(pred: Tensor, target: Tensor, loss: str = "smooth_l1", beta: float = 2.0,
                   normalize_target: bool = False) -> Tensor:  # fmt: skip
    """The loss without morphing (every token its own group): scalar mean over tokens of the per-token loss
    (mean over channels) between ``pred`` and ``target`` [B, N, D]; the baseline DTM is measured against."""
    target = target.detach()
    if normalize_target:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    if loss == "negcosine":
        return -F.cosine_similarity(pred, target, dim=-1).mean()
    return _elementwise(pred - target, loss, beta).mean()


def _elementwise(delta: Tensor, loss: str, beta: float) -> Tensor:
    zero = delta.new_zeros(()).expand_as(delta)
    if loss == "smooth_l1":
        return F.smooth_l1_loss(delta, zero, beta=beta, reduction="none")
    if loss == "l1":
        return delta.abs()
    return delta * delta


def _flat_ids(groups: Tensor, slots: int) -> Tensor:
    """[B, N] group ids in [0, slots) -> [B*N] row ids into a flattened [B*slots] buffer."""
    b = groups.shape[0]
    return (groups + torch.arange(0, b * slots, slots, device=groups.device).unsqueeze(1)).reshape(-1)


def _segment_sum(x: Tensor, flat: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Sums [size, D] and member counts [size] of the rows of x [M, D] per target row ``flat`` [M].

    index_add over a flattened batch is several times faster on CPU than scatter_add along dim 1."""
    sums = x.new_zeros(size, x.shape[1]).index_add(0, flat, x)
    counts = x.new_zeros(size).index_add(0, flat, x.new_ones(x.shape[0]))
    return sums, counts


def _gram(metric: Tensor) -> Tensor:
    """[B, N, N] dot products of the token features, in at least float32."""
    m = metric.detach()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    return m @ m.transpose(1, 2)


def _host_plan(merges: Tensor, n: int, protect_first: bool, levels: int = 1) -> tuple[list, Tensor, list[int]] | None:
    """Eager CPU only: per iteration, the most merges any row makes, the span of rows that merge and
    the longest sequence among them; each row's final length; each level's most groups (for ``levels``
    levels of equally many rows).

    Lets the eager path skip no-op iterations and rows, score only the live part of the sequences,
    update only as many Gram rows as merge, and size the loss buffers to the groups that exist. None
    when tracing or on an accelerator, where every iteration runs over everything at static width.
    """
    if torch.compiler.is_compiling() or merges.device.type != "cpu":
        return None
    t = torch.full(merges.shape[:1], n, dtype=torch.long)
    steps = []
    for r in merges.unbind(1):
        r = torch.minimum(r, (t - int(protect_first)) // 2).clamp_min(0)
        active = r.nonzero()
        rows = slice(int(active[0]), int(active[-1]) + 1) if len(active) else slice(0)
        steps.append((int(r.max()) if len(active) else 0, rows, int(t[rows].max()) if len(active) else 0))
        t = t - r
    return steps, t, t.view(levels, -1).amax(1).tolist()  # and each level's most groups


def _morph_gram(gram: Tensor, merges: Tensor, protect_first: bool, plan=None) -> Tensor:
    """Run the iterations on a Gram matrix of group sums (updated in place); returns compact group ids:
    a group's id is its position in the final sequence."""
    b, n, _ = gram.shape
    ids = torch.arange(n + 1, device=gram.device)
    seq = ids[:n].expand(b, n).clone()  # (B, N) group id at each position of the current sequence
    assign = seq.clone()  # (B, N) group id of each original token
    t = torch.full((b,), n, dtype=torch.long, device=gram.device)  # current length per row
    for k, r in enumerate(merges.unbind(1)):
        cap, rows, width = ((n + 1) // 2, slice(None), n) if plan is None else plan[0][k]
        if cap > 0:
            state = _merge_step(gram[rows], seq[rows, :width], assign[rows], t[rows], r[rows], cap, protect_first)
            seq[rows, :width], assign[rows], t[rows] = state
    position = seq.new_zeros(b, n + 1).scatter(1, torch.where(ids[:n] < t[:, None], seq, n), ids[:n].expand(b, n))
    return position.gather(1, assign)


def _merge_step(gram: Tensor, seq: Tensor, assign: Tensor, t: Tensor, r: Tensor, cap: int, protect_first: bool):
    """One bipartite matching iteration on every row, r[b] merges requested for row b (at most ``cap``).

    ``seq`` [B, W] holds the first W >= max(t) positions of the sequences; ids index the Gram [B, N, N].
    """
    b, width = seq.shape
    n = gram.shape[1]
    pos = torch.arange(n + 1, device=seq.device)
    slots_a, slots_b = pos[0:width:2], pos[1:width:2]  # positions of the A and B halves
    r = torch.minimum(r, (t - int(protect_first)) // 2).clamp_min(0)  # (B,)
    a_ids, b_ids = seq[:, 0::2], seq[:, 1::2]  # (B, Na), (B, Nb)
    in_a, in_b = slots_a < t[:, None], slots_b < t[:, None]
    can_merge = in_a & (slots_a > 0) if protect_first else in_a
    best, match = _best_matches(gram, a_ids, b_ids, in_b)
    best = best.masked_fill(~can_merge, -torch.inf)

    # The r A tokens with the highest best-scores merge (stable descending order); only the first
    # ``cap`` candidates can be among them.
    order = best.argsort(dim=-1, descending=True, stable=True)[:, :cap]
    src = a_ids.gather(1, order)  # (B, cap)
    dst = b_ids.gather(1, match.gather(1, order))  # (B, cap) group each candidate joins
    w = (pos[:cap] < r[:, None]).to(gram.dtype)  # (B, cap) 1 for the candidates that merge
    _add_groups(gram, src, dst, w)

    # Original tokens of a merged group now belong to its destination (index n is a dump slot).
    remap = pos.expand(b, -1).scatter(1, torch.where(w > 0, src, n), dst)
    assign = remap.gather(1, assign)

    # New sequence: unmerged A tokens in their order, then all B tokens in order.
    keep_a = in_a & ~torch.zeros_like(in_a).scatter(1, order, w > 0)
    to_a = torch.where(keep_a, keep_a.long().cumsum(1) - 1, width)
    to_b = torch.where(in_b, keep_a.sum(1, keepdim=True) + slots_b // 2, width)
    new_seq = seq.new_zeros(b, width + 1).scatter(1, torch.cat([to_a, to_b], 1), torch.cat([a_ids, b_ids], 1))
    return torch.where((r > 0).unsqueeze(1), new_seq[:, :width], seq), assign, t - r


def _best_matches(gram: Tensor, a_ids: Tensor, b_ids: Tensor, in_b: Tensor) -> tuple[Tensor, Tensor]:
    """Best cosine score [B, Na] of every A group over the valid B groups, and that B's index [B, Na]."""
    b, n, _ = gram.shape
    cells = (a_ids.unsqueeze(-1) * n + b_ids.unsqueeze(1)).view(b, -1)  # (B, Na*Nb) cells of the flat Gram
    dots = gram.view(b, n * n).gather(1, cells).view(b, a_ids.shape[1], -1)  # (B, Na, Nb)
    inv_norm = gram.diagonal(dim1=1, dim2=2).rsqrt()  # (B, N) 1 / norm of each group sum
    # The positive per-row factor 1/|a| does not change the argmax over B, so it is applied after the
    # max; invalid B columns get -inf through the additive bias of the same pass.
    bias = torch.zeros_like(in_b, dtype=gram.dtype).masked_fill(~in_b, -torch.inf).unsqueeze(1)
    best, match = torch.addcmul(bias, dots, inv_norm.gather(1, b_ids).unsqueeze(1)).max(dim=-1)
    return best * inv_norm.gather(1, a_ids), match


def _add_groups(gram: Tensor, src: Tensor, dst: Tensor, w: Tensor) -> None:
    """Gram of group sums after groups ``src`` [B, R] join ``dst`` [B, R] where ``w`` [B, R] is 1.

    G' = E G E^T, E adding rows src into rows dst. Rows: index_add of the moved rows. Columns: by the
    symmetry of G, column s of E G equals E applied to row s of G, so the moved rows give the new
    columns without reading the Gram column-wise.
    """
    b, n, _ = gram.shape
    offset = torch.arange(0, b * n, n, device=gram.device).unsqueeze(1)
    flat = gram.view(b * n, n)
    moved = flat.index_select(0, (src + offset).reshape(-1)).view(b, -1, n) * w.unsqueeze(-1)  # (B, R, N)
    flat.index_add_(0, (dst + offset).reshape(-1), moved.view(-1, n))
    across = moved.gather(2, src.unsqueeze(1).expand_as(moved[:, :, : src.shape[1]])) * w.unsqueeze(1)  # (B, R, R)
    cols = moved.scatter_add(2, dst.unsqueeze(1).expand_as(across), across)  # (B, R, N): columns src of E G
    gram.scatter_add_(2, dst.unsqueeze(1).expand(-1, n, -1), cols.transpose(1, 2))
