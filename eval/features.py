"""Frozen-encoder features for k-NN and linear probing: mean-pooled patch tokens of the last block(s).

On many ranks (``torchrun --nproc_per_node N eval/knn.py ...``) each rank extracts its share of the images on
its own device (``distributed.shard``: every image exactly once, whatever the sizes), and the shares are
gathered in item order (``distributed.gather_sharded``). An unreadable image is skipped and counted, as
data_prep skips them.
"""

import sys
from dataclasses import dataclass

import torch

from data_prep.datasets import open_listing
from data_prep.sources import Listing, select
from dtm_ds import distributed
from dtm_ds.devices import cap_workers
from dtm_ds.features import extract, probe_device
from dtm_ds.pretrained import encoder_config, load_student


@dataclass
class Probe:
    """Where the frozen features come from (shared by eval/knn.py and eval/linear.py)."""

    encoder: str
    """A pretraining run folder (its latest checkpoint) or an export."""
    train: str = "fashion_mnist"
    """Training features: a data_prep source or a dataset root."""
    val: str = "fashion_mnist"
    """Evaluation features: a data_prep source or a dataset root."""
    dataset: str | None = None
    """A reader of data_prep/datasets.py for ``train``/``val`` roots; None: detect the layout."""
    eval_split: str = "val"
    """The split of ``val`` to evaluate on (val or test)."""
    train_per_class: int | None = None
    """Use only this many training images per class (a subsample)."""
    random_init: bool = False
    """Same architecture, untrained weights (the baseline)."""
    pixels: bool = False
    """Raw pixels as the features: the encoder's input (resized, centre-cropped, normalised) flattened; the
    floor any encoder should clear."""
    crop_ratio: float = 0.875
    """Resize to size / crop_ratio, then centre-crop (timm's evaluation transform)."""
    blocks: int = 1
    """Concatenate the mean-pooled tokens of the last ``blocks`` blocks."""
    workers: int = 8
    """DataLoader workers (capped by the cores of this machine)."""
    seed: int = 0
    """Seed of a random-init encoder."""
    save_features: str | None = None
    """Also write the features and labels (``train_x``, ``train_y``, ``val_x``, ``val_y``) to this .pt file
    (rank 0)."""


def make_probe(encoder: str, options: dict) -> Probe:
    """A :class:`Probe` from command-line options, each checked against its field's type."""
    from dataclasses import fields

    from dtm_ds.options import parse_options

    return Probe(encoder, **parse_options(options, {f.name: f.type for f in fields(Probe) if f.name != "encoder"}))


def probe_settings(section: str, encoder: str | None, given: dict, defaults: dict, options: dict,
                   config: str | None) -> tuple[Probe, dict]:  # fmt: skip
    """A probe command's :class:`Probe` and its own settings (``given``: each as the command line gave it, None
    when it did not; ``defaults``: their defaults), read from ``config`` (a YAML or JSON file with the sections
    ``probe`` and ``section``, as ``--print_config`` prints them) under the command line."""
    from dtm_ds.options import parse_options, read_config_file

    from_file: dict = {}
    if config:
        flat, _ = read_config_file(config, ("probe", section))
        from_file = {k: v for k, v in flat.items() if k.startswith(f"{section}.")}
        parse_options({k.removeprefix(f"{section}."): v for k, v in from_file.items()},
                      {k: type(v) for k, v in defaults.items()}, f"{section} settings in {config}")  # fmt: skip
        options = {k.removeprefix("probe."): v for k, v in flat.items() if k.startswith("probe.")} | options
    encoder = encoder if encoder is not None else options.get("encoder")
    if encoder is None:
        raise ValueError("--encoder is required (a pretraining run folder or an export), or a --config file with it")
    probe = make_probe(encoder, {k: v for k, v in options.items() if k != "encoder"})
    own = {k: given[k] if given[k] is not None else from_file.get(f"{section}.{k}", defaults[k]) for k in defaults}
    return probe, parse_options(own, {k: type(v) for k, v in defaults.items()}, f"{section} settings")


def load_encoder(encoder: str, random_init: bool = False, seed: int = 0):
    """The frozen student of a run directory or an export; at random init (same architecture) if asked."""
    model = load_student(encoder)
    if random_init:
        torch.manual_seed(seed)
        model = type(model)(encoder_config(encoder), model.lm_head.out_features)
    return model.eval()


def evaluated_split(probe: Probe) -> str:
    """The split of ``probe.val`` the probe evaluates on (named in every result)."""
    from data_prep.datasets import resolved_split

    return "test" if probe.val == "fashion_mnist" else resolved_split(probe.dataset, probe.eval_split)


def start() -> torch.device:
    """The probes' device; under a launcher with more than one rank (torchrun), the process group first."""
    if distributed.planned_world() > 1 and not torch.distributed.is_initialized():
        distributed.init()
    return probe_device()


def frozen_features(probe: Probe, gather_val: bool = True):
    """(train_x, train_y, val_x, val_y, number of classes, unreadable counts) for ``probe``, on the host. On
    many ranks each rank extracts its share; the training features are gathered on every rank, the evaluation
    features too unless ``gather_val`` is False (then this rank's share). Unreadable images are left out."""
    model = load_encoder(probe.encoder, probe.random_init, probe.seed)
    if not 1 <= probe.blocks <= len(model.blocks):
        raise ValueError(f"blocks = {probe.blocks}, but {probe.encoder} has {len(model.blocks)} blocks (use 1..that)")
    train_set = select(open_listing(probe.train, "train", probe.dataset), per_class=probe.train_per_class)
    split = evaluated_split(probe)
    if split in ("train", "trainval"):
        raise ValueError(f"eval_split {probe.eval_split!r} is training data; evaluate on val or test")
    test_set = open_listing(probe.val, split, probe.dataset)
    shared = _shared_images(train_set, test_set)
    if shared and distributed.rank() == 0:
        print(f"warning: {shared} of the {len(test_set)} evaluation images are also training images "
              f"(--train {probe.train} and --val {probe.val}); the accuracy is not a held-out one",
              file=sys.stderr, flush=True)  # fmt: skip
    workers = cap_workers(probe.workers, "probe loader")
    common = {"crop_ratio": probe.crop_ratio, "blocks": probe.blocks, "workers": workers, "pixels": probe.pixels}
    train_x, train_y = _gathered(*_share(model, train_set, "train", common), len(train_set))
    test_x, test_y = _share(model, test_set, split, common)
    unreadable = {"train": int((train_y < 0).sum()), split: int(distributed.sum_tensor((test_y < 0).sum()))}
    if probe.save_features:
        every_x, every_y = _gathered(test_x, test_y, len(test_set))
        if distributed.rank() == 0:
            torch.save({"train_x": train_x, "train_y": train_y, "val_x": every_x[every_y >= 0],
                        "val_y": every_y[every_y >= 0]}, probe.save_features)  # fmt: skip
    if gather_val:
        test_x, test_y = _gathered(test_x, test_y, len(test_set))
    train_x, train_y = train_x[train_y >= 0], train_y[train_y >= 0]
    return train_x, train_y, test_x[test_y >= 0], test_y[test_y >= 0], len(train_set.classes), unreadable


def _share(model, listing: Listing, name: str, common: dict):
    """Features and labels of this rank's share of ``listing`` (``distributed.shard``)."""
    return extract(model, listing.subset(list(distributed.shard(len(listing)))), name=name, **common)


def _gathered(x: torch.Tensor, y: torch.Tensor, total: int):
    """Every rank's share, in item order."""
    return distributed.gather_sharded(x, total), distributed.gather_sharded(y, total)


def _shared_images(train: Listing, test: Listing) -> int:
    """Evaluation images that are also training images (the same files)."""
    if train.paths is None or test.paths is None:
        return 0
    return len({p.resolve() for p in train.paths} & {p.resolve() for p in test.paths})
