"""Weighted k-NN classification on frozen features (DINO protocol: cosine similarity, k=20, T=0.07).

    python eval/knn.py --encoder RUN_DIR_OR_EXPORT --train fashion_mnist --val fashion_mnist [--random_init]

Features are the mean of the encoder's final-norm patch tokens. Data: any data_prep source (image
folder, ImageNet root, list file, ``fashion_mnist``) or ``--dataset NAME`` with its root (same root for
--train and --val; --eval_split picks val or test), resized and centre-cropped to the encoder's size.
"""

import json

import torch
import torch.nn.functional as F

from eval.features import Probe, evaluated_split, frozen_features, make_probe, probe_device


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024):
    """Top-1 of a similarity-weighted vote among the k nearest training features (DINO), computed on the
    training features' device, ``chunk`` test rows at a time."""
    device = train_x.device
    train_y = train_y.to(device)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(test_x), chunk):
        sims, idx = (test_x[start : start + chunk].to(device) @ train_x.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(idx), classes, device=device).scatter_add_(1, train_y[idx], weights)
        correct += (votes.argmax(1) == test_y[start : start + chunk].to(device)).sum()
    return correct.item() / len(test_x)


def main(encoder: str, k: int = 20, temperature: float = 0.07, **options) -> dict:
    """k-NN top-1 of ``encoder``; more options: the probe fields.

    Args:
        encoder: a pretraining run folder (its latest checkpoint) or an export.
        k: neighbours that vote.
        temperature: votes weigh exp(cosine / temperature).
    """
    probe = make_probe(encoder, options)
    train_x, train_y, test_x, test_y, _ = frozen_features(probe)
    device = probe_device()  # the vote runs where the encoder ran
    train_x, test_x = F.normalize(train_x.to(device), dim=-1), F.normalize(test_x.to(device), dim=-1)
    result = {
        "encoder": encoder,
        "random_init": probe.random_init,
        "pixels": probe.pixels,
        "k": k,
        "train": len(train_y),
        "val": len(test_y),
        "eval_split": evaluated_split(probe),
        "top1": round(100 * knn_accuracy(train_x, train_y, test_x, test_y, k, temperature), 2),
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
