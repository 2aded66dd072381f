"""Linear probe on cached frozen features: MAE's probe head (BatchNorm without affine + a linear layer), trained
with AdamW (lr 1e-3, no weight decay, cosine to 0, batch 256, 100 epochs) on features extracted once, without
augmentation. This is a fast probe, not MAE's linear-probing recipe (LARS, lr 0.1 x batch / 256 at batch 16,384,
90 epochs with 10 of warm-up, RandomResizedCrop + flip on every pass), whose figures it does not reproduce.

    python eval/linear.py --encoder RUN_DIR_OR_EXPORT --train fashion_mnist --val fashion_mnist [--blocks 4]
    torchrun --nproc_per_node 8 eval/linear.py ...     (each rank extracts its share; rank 0 trains the probe)

Features: the mean-pooled patch tokens of the last ``blocks`` blocks, final norm applied. Top-1/top-5 on the
evaluation split.
"""

import dataclasses
import json

import torch
from torch import nn

from dtm_ds import distributed
from eval.classifier import accuracy
from eval.features import Probe, evaluated_split, frozen_features, probe_settings, start


def train_probe(train_x, train_y, classes: int, epochs: int = 100, lr: float = 1e-3, batch: int = 256, seed: int = 0):
    """BatchNorm1d(affine=False) + Linear trained with AdamW and a cosine schedule on cached features."""
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], classes))
    probe, train_y = probe.to(train_x.device), train_y.to(train_x.device)  # trains where the features are
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


DEFAULTS = {"epochs": 100, "lr": 1e-3}


def main(encoder: str | None = None, epochs: int | None = None, lr: float | None = None, config: str | None = None,
         print_config: bool = False, **options) -> dict | None:  # fmt: skip
    """Linear-probe top-1/top-5 of ``encoder``; more options: the probe fields.

    Args:
        encoder: a pretraining run folder (its latest checkpoint) or an export.
        epochs: passes over the cached training features (default 100).
        lr: peak AdamW lr, cosine to 0 (default 1e-3).
        config: a YAML or JSON file with the sections ``probe`` and ``linear`` (as --print_config prints them);
            options on the command line win over it.
        print_config: print the settings as JSON and exit (a valid --config file); reads no data or weights.
    """
    probe, own = probe_settings("linear", encoder, {"epochs": epochs, "lr": lr}, DEFAULTS, options, config)
    if print_config:
        print(json.dumps({"probe": dataclasses.asdict(probe), "linear": own}, indent=2))
        return None
    encoder, epochs, lr = probe.encoder, own["epochs"], own["lr"]
    device = start()
    train_x, train_y, test_x, test_y, classes, unreadable = frozen_features(probe)
    rank = distributed.rank()
    distributed.close()  # every feature is gathered: rank 0 trains and evaluates the probe
    if rank != 0:
        return None
    linear = train_probe(train_x.to(device), train_y, classes, epochs, lr, seed=probe.seed)
    with torch.no_grad():
        top1, top5 = accuracy(linear(test_x.to(device)), test_y.to(device))
    result = {
        "encoder": encoder,
        "random_init": probe.random_init,
        "blocks": probe.blocks,
        "train": len(train_y),
        "val": len(test_y),
        "eval_split": evaluated_split(probe),
        "unreadable": unreadable,
        "recipe": "cached features, BatchNorm (no affine) + linear, AdamW, cosine, no augmentation",
        "top1": round(100 * top1 / len(test_y), 2),
        "top5": round(100 * top5 / len(test_y), 2),
    }
    print(json.dumps(result), flush=True)
    return result


def describe() -> str:
    from dtm_ds import cli

    rows = [r for r in cli.dataclass_rows(Probe) if r[0] != "--encoder"]
    return cli.describe(__doc__, [("Options", cli.function_rows(main)), ("Probe (--<field>=value)", rows)])


if __name__ == "__main__":
    from dtm_ds.cli import run

    run(main, describe)
