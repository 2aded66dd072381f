"""Weighted k-NN classification on frozen features (DINO protocol: cosine similarity, k=20, T=0.07).

    python eval/knn.py --encoder RUN_DIR_OR_EXPORT --train fashion_mnist --val fashion_mnist [--random_init]

Features are the mean of the encoder's final-norm patch tokens. Data: any data_prep source (image
folder, ImageNet root, list file, ``fashion_mnist``), resized and centre-cropped to the encoder's size.
"""

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from data_prep.sources import Listing, detect, select
from dtm_ds.checkpoint import load_student
from dtm_ds.data import normalize


class EvalImages(Dataset):
    """Resize (shorter side to size / crop_ratio, bicubic) + centre crop to ``size``; uint8 [3, S, S]."""

    def __init__(self, listing: Listing, size: int, crop_ratio: float = 0.875):
        self.listing, self.size, self.resize = listing, size, round(size / crop_ratio)

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, i: int):
        image = torch.from_numpy(self.listing.image(i)).permute(2, 0, 1)
        image = TF.resize(image, [self.resize], TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(image, [self.size, self.size]), self.listing.labels[i]


@torch.no_grad()
def features(encoder, listing: Listing, size: int, crop_ratio: float, batch: int = 256, workers: int = 1):
    """L2-normalised mean-pooled patch-token features [n, D] and labels [n]."""
    loader = DataLoader(EvalImages(listing, size, crop_ratio), batch_size=batch, num_workers=workers)
    feats, labels = [], []
    for images, y in loader:
        tokens = encoder.forward_features(normalize(images.float() / 255))[:, encoder.num_prefix_tokens :]
        feats.append(torch.nn.functional.normalize(tokens.mean(1), dim=-1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07, chunk: int = 1024):
    """Top-1 of a similarity-weighted vote among the k nearest training features (DINO)."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for start in range(0, len(test_x), chunk):
        sims, idx = (test_x[start : start + chunk] @ train_x.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(idx), classes).scatter_add_(1, train_y[idx], weights)
        correct += (votes.argmax(1) == test_y[start : start + chunk]).sum().item()
    return correct / len(test_x)


def main(
    encoder: str,
    train: str = "fashion_mnist",
    val: str = "fashion_mnist",
    k: int = 20,
    temperature: float = 0.07,
    train_per_class: int | None = None,
    random_init: bool = False,
    crop_ratio: float = 0.875,
    workers: int = 1,
    seed: int = 0,
) -> dict:
    """k-NN top-1 of ``encoder`` (a run directory or an exported state dict); ``random_init`` keeps its
    architecture but not its weights (the baseline)."""
    model = load_student(encoder).eval()
    if random_init:
        torch.manual_seed(seed)
        model = type(model)(model_config(encoder), model.lm_head.out_features).eval()
    size = model.patch_embed.img_size[0]
    train_set = select(detect(train, "train"), per_class=train_per_class)
    train_x, train_y = features(model, train_set, size, crop_ratio, workers=workers)
    test_x, test_y = features(
        model, detect(val, "test" if val == "fashion_mnist" else "val"), size, crop_ratio, workers=workers
    )
    result = {
        "encoder": encoder,
        "random_init": random_init,
        "k": k,
        "train": len(train_y),
        "val": len(test_y),
        "top1": round(100 * knn_accuracy(train_x, train_y, test_x, test_y, k, temperature), 2),
    }
    print(json.dumps(result), flush=True)
    return result


def model_config(encoder: str):
    from dtm_ds.config import ModelConfig, load_config

    path = Path(encoder)
    if path.is_dir():
        return load_config(path / "config.json").model
    return ModelConfig(**json.loads(Path(f"{path}.json").read_text())["model"])


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
