"""Weighted k-NN classification on frozen features (DINO protocol: cosine similarity, k=20, T=0.07).

    python eval/knn.py --encoder RUN_DIR_OR_EXPORT --train fashion_mnist --val fashion_mnist [--random_init]

Features are the mean of the encoder's final-norm patch tokens. Data: any data_prep source (image
folder, ImageNet root, list file, ``fashion_mnist``) or ``--dataset NAME`` with its root (same root for
--train and --val; --eval_split picks val or test), resized and centre-cropped to the encoder's size.
"""

import dataclasses
import json

from dtm_ds import distributed
from dtm_ds.features import knn_correct, knn_over_ranks
from eval.features import Probe, evaluated_split, frozen_features, probe_settings, start


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024):
    """Top-1 of ``knn_correct`` (one host synchronisation)."""
    return knn_correct(train_x, train_y, test_x, test_y, k, temperature, chunk).item() / len(test_x)


DEFAULTS = {"k": 20, "temperature": 0.07}


def main(encoder: str | None = None, k: int | None = None, temperature: float | None = None,
         config: str | None = None, print_config: bool = False, **options) -> dict | None:  # fmt: skip
    """k-NN top-1 of ``encoder``; more options: the probe fields. On many ranks (torchrun), each rank extracts
    its share of both sets and votes for its share of the evaluation images against all training features.

    Args:
        encoder: a pretraining run folder (its latest checkpoint) or an export.
        k: neighbours that vote (default 20).
        temperature: votes weigh exp(cosine / temperature) (default 0.07).
        config: a YAML or JSON file with the sections ``probe`` and ``knn`` (as --print_config prints them);
            options on the command line win over it.
        print_config: print the settings as JSON and exit (a valid --config file); reads no data or weights.
    """
    given = {"k": k, "temperature": temperature}
    probe, own = probe_settings("knn", encoder, given, DEFAULTS, options, config)
    if print_config:
        print(json.dumps({"probe": dataclasses.asdict(probe), "knn": own}, indent=2))
        return None
    encoder, k, temperature = probe.encoder, own["k"], own["temperature"]
    device = start()
    train_x, train_y, test_x, test_y, classes, unreadable = frozen_features(probe, gather_val=False)
    top1, evaluated = knn_over_ranks(train_x, train_y, test_x, test_y, k, temperature, classes, device)
    result = {
        "encoder": encoder,
        "random_init": probe.random_init,
        "pixels": probe.pixels,
        "k": k,
        "train": len(train_y),
        "val": evaluated,
        "eval_split": evaluated_split(probe),
        "unreadable": unreadable,
        "ranks": distributed.world(),
        "top1": top1,
    }
    rank = distributed.rank()
    distributed.close()
    if rank == 0:
        print(json.dumps(result), flush=True)
    return result


def describe() -> str:
    from dtm_ds import cli

    rows = [r for r in cli.dataclass_rows(Probe) if r[0] != "--encoder"]
    return cli.describe(__doc__, [("Options", cli.function_rows(main)), ("Probe (--<field>=value)", rows)])


if __name__ == "__main__":
    from dtm_ds.cli import run

    run(main, describe)
