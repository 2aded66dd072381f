"""The paper's pilot study as a command: how morphing changes a teacher's tokens on a user's images.

    python -m dtm_ds pilot --model vitb --teacher_weights ViT-B-16.pt --data /data/imagenet/val --per_class 10
    python -m dtm_ds pilot --model tiny --data fashion_mnist --per_class 40        (the weight-free pixels teacher)

For raw tokens and for morphed tokens (each token replaced by its group's mean, one level of ``n`` merges in
``k`` bipartite iterations on the teacher's own features, the top-left token protected as in training):

* **consistency**: the mean cosine similarity of every token with its right and lower neighbours on the grid;
* **token probe**: a linear classifier on single tokens, each labelled with its image's class, trained on the
  tokens of half of each class's images and scored on the tokens of the other half.

A table on stdout, ``<out>.json`` and ``<out>.png``. The paper reports its own pilot for CLIP-B/16 on ImageNet
(zero-shot token accuracy 26.5 -> 30.8, linear probe 44.2 -> 46.3); this command measures the user's case.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dtm_ds.morph import _group_mean, morph_levels

__all__ = ["even_schedule", "morph_tokens", "pilot", "token_consistency", "token_probe"]


def even_schedule(n: int, k: int) -> Tensor:
    """[1, k]: ``n`` merges spread over ``k`` iterations (the first ``n % k`` take one more)."""
    if n < 0 or k < 1:
        raise ValueError(f"need n >= 0 and k >= 1, got n={n} k={k}")
    return torch.tensor([[n // k + (i < n % k) for i in range(k)]])


def morph_tokens(tokens: Tensor, n: int, k: int) -> tuple[Tensor, float]:
    """``tokens`` [B, N, D] with every token replaced by the mean of its group after ``n`` merges in ``k``
    iterations, and the mean number of groups per image (an iteration merges at most half of the tokens, so
    ``n`` may be clamped, as in training)."""
    morphed = morph_levels(tokens, even_schedule(n, k))
    return _group_mean(tokens, morphed.groups[0]), float(morphed.counts()[0].float().mean())


def token_consistency(tokens: Tensor, grid: int) -> float:
    """Mean cosine similarity of every token with its right and lower neighbours on the ``grid`` x ``grid`` map."""
    x = F.normalize(tokens.float(), dim=-1).view(tokens.shape[0], grid, grid, -1)
    right = (x[:, :, :-1] * x[:, :, 1:]).sum(-1)
    down = (x[:, :-1] * x[:, 1:]).sum(-1)
    return float(torch.cat([right.flatten(), down.flatten()]).mean())


def token_probe(train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor, classes: int,
                epochs: int = 100, lr: float = 0.01, seed: int = 0) -> float:  # fmt: skip
    """Top-1 (%) of a linear classifier on single tokens: ``train`` [I, N, D] tokens of I images labelled by
    their image's label, trained full-batch with AdamW on standardised features, scored on ``val``'s tokens."""
    torch.manual_seed(seed)
    d = train.shape[-1]
    x, y = train.reshape(-1, d).float(), train_labels.repeat_interleave(train.shape[1])
    mean, std = x.mean(0), x.std(0) + 1e-6
    head = torch.nn.Linear(d, classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        loss = F.cross_entropy(head((x - mean) / std), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        v, vy = val.reshape(-1, d).float(), val_labels.repeat_interleave(val.shape[1])
        return round(100 * float((head((v - mean) / std).argmax(1) == vy).float().mean()), 2)


def _tokens(config, data: str, dataset: str | None, per_class: int, device: torch.device):
    """The teacher's tokens [I, N, D] and labels of the first ``per_class`` images of every class of ``data``."""
    from timm.data import create_transform

    from data_prep.datasets import open_listing
    from data_prep.sources import select
    from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD
    from dtm_ds.features import ListingImages, Readable
    from dtm_ds.teacher import build_teacher

    listing = select(open_listing(data, "train", dataset), per_class=per_class)
    size = config.model.img_size
    transform = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=1.0,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip
    loader = torch.utils.data.DataLoader(Readable(ListingImages(listing, transform), size), batch_size=64)
    teacher = build_teacher(config.teacher, config.model, device)
    tokens, labels = [], []
    for images, y in loader:
        tokens.append(teacher(images.to(device)).cpu())
        labels.append(y)
    tokens, labels = torch.cat(tokens), torch.cat(labels)
    return tokens[labels >= 0], labels[labels >= 0], len(listing.classes)


def pilot(model: str = "vitb", data: str = "fashion_mnist", dataset: str | None = None, teacher: str | None = None,
          teacher_weights: str | None = None, per_class: int = 20, n: str = "", k: str = "1,4",
          out: str = "outputs/pilot", epochs: int = 100) -> dict:  # fmt: skip
    """Neighbour consistency and token-probe accuracy of a teacher's tokens, raw and morphed at several (n, k).

    Args:
        model: the preset whose teacher and input size are used (tiny, vits, vitb, vitl, vith).
        data: images: a data_prep source (image folder, list file, fashion_mnist) or a dataset root.
        dataset: a reader of data_prep/datasets.py for a dataset root; None: detect the layout.
        teacher: overrides the preset's teacher (clip:ViT-B-16, timm:<name>, pixels, checkpoint:<run>).
        teacher_weights: the teacher's weights file (CLIP and timm teachers).
        per_class: images per class (half train the token probe, half score it).
        n: comma-separated merges per image (default: a quarter, half and three quarters of the tokens).
        k: comma-separated bipartite iterations the merges are spread over.
        out: the results' path stem: <out>.json and <out>.png.
        epochs: full-batch AdamW steps of the token probe.
    """
    import dataclasses

    from dtm_ds.config import build_config
    from dtm_ds.devices import accelerator

    config = build_config(model)
    changes = {"name": teacher} if teacher else {}
    if teacher_weights:
        changes["weights"] = teacher_weights
    config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, **changes))
    device = torch.device("cuda" if accelerator() == "cuda" else "cpu")
    tokens, labels, classes = _tokens(config, data, dataset, per_class, device)
    grid, count = config.model.grid, tokens.shape[1]
    merges = _ints(n) if n != "" else [count // 4, count // 2, 3 * count // 4]
    iterations = _ints(k)
    if max(merges) >= count:
        raise ValueError(f"n = {max(merges)} merges would leave no token: the grid has {count}")
    is_train = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        is_train[members[: math.ceil(len(members) / 2)]] = True  # the first half of each class's images
    if is_train.all() or not is_train.any():
        raise ValueError(f"per_class = {per_class} leaves no image to score the token probe: use 2 or more")

    def measure(x: Tensor) -> dict:
        probe = token_probe(x[is_train], labels[is_train], x[~is_train], labels[~is_train], classes, epochs)
        return {"consistency": round(token_consistency(x, grid), 4), "token_probe_top1": probe}

    rows = [{"n": 0, "k": 0, "tokens": "raw", "groups": count, **measure(tokens)}]
    for kk in iterations:
        for nn in merges:
            morphed, groups = morph_tokens(tokens, nn, kk)
            rows.append({"n": nn, "k": kk, "tokens": "morphed", "groups": round(groups, 2), **measure(morphed)})
    result = {"teacher": config.teacher.name, "data": data, "images": len(labels), "classes": classes,
              "grid": grid, "rows": rows}  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    _plot(result, Path(f"{out}.png"))
    print(f"pilot: teacher {result['teacher']}, {len(labels)} images of {classes} classes, {grid}x{grid} tokens")
    print(f"{'tokens':>8} {'n':>5} {'k':>3} {'groups':>7} {'consistency':>12} {'token probe top-1':>18}")
    for r in rows:
        print(f"{r['tokens']:>8} {r['n']:>5} {r['k']:>3} {r['groups']:>7.1f} {r['consistency']:>12.4f} "
              f"{r['token_probe_top1']:>18.2f}")  # fmt: skip
    print(f"wrote {out}.json and {out}.png")
    return result


def _ints(values) -> list[int]:
    """``"8,40"``, ``8`` or fire's ``(8, 40)`` as a list of ints."""
    items = values if isinstance(values, list | tuple) else str(values).split(",")
    return [int(v) for v in items]


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw, morphed = result["rows"][0], result["rows"][1:]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    titles = {"consistency": "neighbour consistency (cosine)", "token_probe_top1": "token probe top-1 (%)"}
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for kk in sorted({r["k"] for r in morphed}):
            points = [(r["n"], r[key]) for r in morphed if r["k"] == kk]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"morphed, k={kk}")
        ax.axhline(raw[key], color="grey", linestyle="--", label="raw tokens")
        ax.set_xlabel("merges n per image")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['teacher']} on {result['images']} images ({result['grid']}x{result['grid']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
