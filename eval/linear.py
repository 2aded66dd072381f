"""Linear probe on frozen features (MAE protocol: BatchNorm without affine + a linear layer).

    python eval/linear.py --encoder RUN_DIR_OR_EXPORT --train fashion_mnist --val fashion_mnist [--blocks 4]

Features (mean-pooled patch tokens of the last ``blocks`` blocks, final norm applied) are extracted
once and cached in memory, so the probe trains in seconds; no augmentation. Top-1/top-5 on the
evaluation split.
"""

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from data_prep.datasets import open_listing
from data_prep.sources import select
from eval.classifier import accuracy
from eval.features import extract
from eval.knn import load_encoder


def train_probe(train_x, train_y, classes: int, epochs: int = 100, lr: float = 1e-3, batch: int = 256, seed: int = 0):
    """BatchNorm1d(affine=False) + Linear trained with AdamW and a cosine schedule on cached features."""
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], classes))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(train_x) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x)).split(batch):
            loss = nn.functional.cross_entropy(probe(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval()


def main(
    encoder: str,
    train: str = "fashion_mnist",
    val: str = "fashion_mnist",
    dataset: str | None = None,
    eval_split: str = "val",
    blocks: int = 1,
    epochs: int = 100,
    lr: float = 1e-3,
    train_per_class: int | None = None,
    random_init: bool = False,
    crop_ratio: float = 0.875,
    workers: int = 1,
    seed: int = 0,
) -> dict:
    """Linear-probe top-1/top-5 of ``encoder``; ``random_init`` is the same architecture untrained."""
    model = load_encoder(encoder, random_init, seed)
    train_set = select(open_listing(train, "train", dataset), per_class=train_per_class)
    test_set = open_listing(val, "test" if val == "fashion_mnist" else eval_split, dataset)
    train_x, train_y = extract(model, train_set, crop_ratio, blocks, workers=workers)
    test_x, test_y = extract(model, test_set, crop_ratio, blocks, workers=workers)
    probe = train_probe(train_x, train_y, len(train_set.classes), epochs, lr, seed=seed)
    with torch.no_grad():
        top1, top5 = accuracy(probe(test_x), test_y)
    result = {
        "encoder": encoder,
        "random_init": random_init,
        "blocks": blocks,
        "train": len(train_y),
        "val": len(test_y),
        "top1": round(100 * top1 / len(test_y), 2),
        "top5": round(100 * top5 / len(test_y), 2),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda result: None)
