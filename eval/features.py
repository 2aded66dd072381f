"""Frozen-encoder features for k-NN and linear probing: mean-pooled patch tokens of the last block(s).

On many ranks (``torchrun --nproc_per_node N eval/knn.py ...``) each rank extracts its share of the images on
its own device (``distributed.shard``: every image exactly once, whatever the sizes), and the shares are
gathered in item order (``distributed.gather_sharded``). An unreadable image is skipped and counted, as
data_prep skips them.
"""

import sys
from dataclasses import dataclass

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from data_prep.datasets import open_listing
from data_prep.sources import Listing, select
from dtm_ds import distributed
from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD
from dtm_ds.devices import accelerator, cap_workers, quiet_worker, to_device
from dtm_ds.pretrained import encoder_config, load_student
from eval.classifier import ListingImages


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


def probe_device() -> torch.device:
    """The probes' device: this rank's GPU when this machine's accelerator is CUDA, else the CPU."""
    if accelerator() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Readable(Dataset):
    """``ListingImages`` whose unreadable images (a truncated or foreign file) give ``(zeros, -1)`` with one
    warning line naming the file: counted and left out by ``frozen_features``, never a PIL traceback."""

    def __init__(self, images: ListingImages, size: int):
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.images[i]
        except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            where = self.images.listing.paths[i] if self.images.listing.paths is not None else f"item {i}"
            print(f"warning: {where} is unreadable ({type(err).__name__}: {err}); skipped", file=sys.stderr, flush=True)
            return torch.zeros(3, self.size, self.size), -1


@torch.no_grad()
def extract(encoder, listing: Listing, crop_ratio=0.875, blocks=1, batch=256, workers=1, name="features", pixels=False,
            device: torch.device | None = None, progress: bool = True):  # fmt: skip
    """Features [n, blocks * D] (mean over patch tokens of each of the last ``blocks`` blocks, final norm
    applied; ``pixels``: the input image flattened) and labels [n], on timm's evaluation transform (bicubic
    resize + centre crop at the encoder's resolution); a progress bar named ``name`` on stderr. The encoder
    runs on ``device`` (default: ``probe_device()``; in bf16 autocast on a GPU); the results are fp32 on the
    host."""
    from tqdm import tqdm

    device = probe_device() if device is None else device
    encoder = encoder.eval().to(device)
    size = encoder.patch_embed.img_size[0]
    transform = create_transform(
        size, is_training=False, interpolation="bicubic", crop_pct=crop_ratio, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    loader = DataLoader(Readable(ListingImages(listing, transform), size), batch_size=batch, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        worker_init_fn=quiet_worker)  # fmt: skip
    feats, labels = [], []
    for x, y in tqdm(loader, desc=f"features {name}", unit="batch", dynamic_ncols=True, disable=not progress):
        labels.append(y)
        if pixels:
            feats.append(x.flatten(1))
            continue
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(_pooled(encoder, to_device(x, device), blocks).float().to("cpu", non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the non-blocking copies to the host are done
    if not feats:  # an empty share (fewer images than ranks)
        width = 3 * size * size if pixels else blocks * encoder.embed_dim
        return torch.zeros(0, width), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def _pooled(encoder, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """[B, blocks * D]: the mean patch token of each of the last ``blocks`` blocks (final norm applied)."""
    depth = len(encoder.blocks)
    if blocks == 1:
        tokens = [encoder.forward_features(x)[:, encoder.num_prefix_tokens :]]
    else:
        maps = encoder.forward_intermediates(
            x, indices=list(range(depth - blocks, depth)), norm=True, output_fmt="NLC", intermediates_only=True
        )
        tokens = [m[:, encoder.num_prefix_tokens :] for m in maps]
    return torch.cat([t.mean(1) for t in tokens], dim=1)
