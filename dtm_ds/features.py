"""Frozen-encoder features and the k-NN vote, shared by the probes (eval/knn.py, eval/linear.py), the online k-NN
during pretraining (dtm_ds/online_knn.py) and the pilot study (dtm_ds/pilot.py): the mean-pooled patch tokens of
the last block(s) on timm's evaluation transform, unreadable images skipped and counted."""

import sys

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from data_prep.sources import Listing
from dtm_ds import distributed
from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD
from dtm_ds.devices import accelerator, quiet_worker, to_device

__all__ = ["ListingImages", "Readable", "extract", "knn_correct", "knn_over_ranks", "probe_device"]


class ListingImages(Dataset):
    """(transformed PIL image, label) from a data_prep listing."""

    def __init__(self, listing: Listing, transform):
        self.listing, self.transform = listing, transform

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.listing.image(i))), self.listing.labels[i]


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
    runs on ``device`` (default: ``probe_device()``; in bf16 autocast on a GPU, and in its weights' dtype
    where they are bf16 or fp16, as a bf16 engine's student is during the online k-NN); the results are fp32 on the
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
    weights = next(encoder.parameters()).dtype
    low = weights if weights in (torch.bfloat16, torch.float16) else None  # a bf16 engine's student, even on CPU
    feats, labels = [], []
    for x, y in tqdm(loader, desc=f"features {name}", unit="batch", dynamic_ncols=True, disable=not progress):
        labels.append(y)
        if pixels:
            feats.append(x.flatten(1))
            continue
        with torch.autocast(device.type, low or torch.bfloat16, enabled=device.type == "cuda" or low is not None):
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


def knn_correct(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024,
                classes: int | None = None) -> torch.Tensor:  # fmt: skip
    """How many of ``test_x`` a similarity-weighted vote among the k nearest training features (DINO) gets
    right: a long tensor on the training features' device, computed there ``chunk`` test rows at a time (no
    host synchronisation). ``classes``: the number of classes (default: from the labels)."""
    device = train_x.device
    train_y = train_y.to(device)
    if classes is None:
        classes = int(max(train_y.max(), test_y.max())) + 1
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start_row in range(0, len(test_x), chunk):
        sims, idx = (test_x[start_row : start_row + chunk].to(device) @ train_x.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(idx), classes, device=device).scatter_add_(1, train_y[idx], weights)
        correct += (votes.argmax(1) == test_y[start_row : start_row + chunk].to(device)).sum()
    return correct


def knn_over_ranks(train_x, train_y, val_x, val_y, k: int, temperature: float, classes: int,
                   device: torch.device) -> tuple[float, int]:  # fmt: skip
    """Top-1 (%) and the number of evaluation images of the k-NN vote when every rank holds all the training
    features and its share of the evaluation ones (a collective: the counts are summed over the ranks)."""
    train_x, val_x = F.normalize(train_x.to(device), dim=-1), F.normalize(val_x.to(device), dim=-1)
    correct = knn_correct(train_x, train_y, val_x, val_y, min(k, len(train_x)), temperature, classes=classes)
    counts = torch.stack([correct.double(), torch.full((), float(len(val_x)), dtype=torch.float64, device=device)])
    correct, evaluated = distributed.sum_tensor(counts).tolist()
    return round(100 * correct / max(evaluated, 1), 2), int(evaluated)
