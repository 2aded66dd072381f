"""Dataset listings for conversion: (path or array source, label) items plus class names.

Every reader validates what it reads and names the bad value in its error.
"""

import csv
import gzip
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class Listing:
    """Items to convert: ``paths[i]`` (or ``arrays[i]`` for in-memory sets) with label ``labels[i]``."""

    labels: list[int]
    classes: list[str]
    paths: list[Path] | None = None
    arrays: np.ndarray | None = None  # (n, H, W) uint8 or (n, H, W, 3)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Item i as a writable uint8 RGB array [H, W, 3]."""
        if self.arrays is None:
            return load_rgb(self.paths[i])
        image = self.arrays[i]
        return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image.copy()

    def subset(self, keep: list[int]) -> "Listing":
        return Listing(
            labels=[self.labels[i] for i in keep],
            classes=self.classes,
            paths=None if self.paths is None else [self.paths[i] for i in keep],
            arrays=None if self.arrays is None else self.arrays[keep],
        )


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode any readable image to uint8 RGB [H, W, 3], EXIF orientation applied."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: keep the top 8 bits
            wide = np.asarray(im, dtype=np.int64)
            im = Image.fromarray((wide >> (8 if wide.max() < 65536 else 24)).clip(0, 255).astype(np.uint8))
        if im.mode in ("P", "PA", "LA"):  # palettes with transparency go through RGBA
            im = im.convert("RGBA")
        return np.array(im.convert("RGB"))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_folder(root: str | Path, classes: list[str] | None = None) -> Listing:
    """``root/<class>/**/<image>``; class index = sorted class-folder order (or ``classes`` order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    classes = classes or found
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise ValueError(f"{root} has class folders not in the class list: {unknown[:5]}")
    paths, labels = [], []
    for name in classes:
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and _is_image(p))
        paths += files
        labels += [index[name]] * len(files)
    if not paths:
        raise ValueError(f"{root} has class folders but no image files ({sorted(IMAGE_SUFFIXES)})")
    return Listing(labels=labels, classes=classes, paths=paths)


def imagenet(root: str | Path, split: str) -> Listing:
    """ImageNet-1K: ``train/<wnid>/*.JPEG``; ``val/<wnid>/*`` or flat ``val/*.JPEG`` + ``LOC_val_solution.csv``.

    Class index = sorted wnid order of ``train/`` (shared by both splits).
    """
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"ImageNet split must be 'train' or 'val', got {split!r}")
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train} not found: ImageNet root must hold train/<wnid>/ (and val/)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if split == "train":
        return image_folder(train, classes)
    val = root / "val"
    if not val.is_dir():
        raise FileNotFoundError(f"{val} not found")
    if any(p.is_dir() for p in val.iterdir()):
        return image_folder(val, classes)
    return _imagenet_flat_val(root, val, classes)


def _imagenet_flat_val(root: Path, val: Path, classes: list[str]) -> Listing:
    csv_path = next((p for p in (root / "LOC_val_solution.csv", val / "LOC_val_solution.csv") if p.is_file()), None)
    if csv_path is None:
        raise FileNotFoundError(f"flat ImageNet val in {val} needs LOC_val_solution.csv in {root} or {val}")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            wnid = row["PredictionString"].split()[0]
            if wnid not in index:
                raise ValueError(f"{csv_path}: image {row['ImageId']} has class {wnid!r}, not among the train classes")
            path = val / f"{row['ImageId']}.JPEG"
            if not path.is_file():
                raise FileNotFoundError(f"{csv_path} lists {row['ImageId']} but {path} does not exist")
            paths.append(path)
            labels.append(index[wnid])
    order = sorted(range(len(paths)), key=lambda i: paths[i].name)
    return Listing(labels=[labels[i] for i in order], classes=classes, paths=[paths[i] for i in order])


def list_file(path: str | Path, root: str | Path | None = None) -> Listing:
    """Lines of ``<path> <integer label>``; relative paths resolve against ``root`` (default: the file's folder)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    paths, labels = [], []
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text list file of '<path> <label>' lines ({err})") from err
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name or not label.lstrip("-").isdigit() or int(label) < 0:
            raise ValueError(f"{path}:{number}: expected '<path> <label >= 0>', got {line!r}")
        paths.append(root / name.strip())
        labels.append(int(label))
    if not paths:
        raise ValueError(f"list file {path} has no entries")
    return Listing(labels=labels, classes=[str(c) for c in range(max(labels) + 1)], paths=paths)


def fashion_mnist(split: str, folder: str | Path = FASHION_MNIST_DIR) -> Listing:
    """Fashion-MNIST idx files (Debian package ``dataset-fashion-mnist``); split 'train' or 'test'."""
    prefix = {"train": "train", "test": "t10k", "val": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    folder = Path(folder)
    images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images, labels):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; install it with: apt-get install dataset-fashion-mnist")
    with gzip.open(images) as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels) as f:
        targets = np.frombuffer(f.read(), np.uint8, offset=8).astype(int)
    if len(pixels) != len(targets):
        raise ValueError(f"{images} has {len(pixels)} images but {labels} has {len(targets)} labels")
    return Listing(labels=targets.tolist(), classes=FASHION_MNIST_CLASSES, arrays=pixels)


def detect(source: str | Path, split: str) -> Listing:
    """Pick the reader from what ``source`` looks like."""
    source = Path(source)
    if str(source) == "fashion_mnist" or (source.is_dir() and any(source.glob("*-idx3-ubyte.gz"))):
        return fashion_mnist(split, FASHION_MNIST_DIR if str(source) == "fashion_mnist" else source)
    if not source.exists():
        raise FileNotFoundError(
            f"{source} does not exist (expected an image folder <class>/<image>, ImageNet train/ + val/, "
            "a list file or fashion_mnist)"
        )
    if source.suffix == ".beton":
        raise ValueError(
            f"{source} is an FFCV .beton, which only pretraining reads (with --data.backend=ffcv); give this "
            "command the images themselves: an image folder, ImageNet train/ + val/, a list file or fashion_mnist"
        )
    if source.is_file():
        return list_file(source)
    if (source / "train").is_dir():
        return imagenet(source, split)
    return image_folder(source)


def select(listing: Listing, per_class: int | None = None, fraction: float | None = None, seed: int = 0) -> Listing:
    """First ``per_class`` items of every class and/or a seeded random ``fraction`` of the items."""
    keep = list(range(len(listing)))
    if per_class is not None:
        seen, kept = defaultdict(int), []
        for i in keep:
            seen[listing.labels[i]] += 1
            if seen[listing.labels[i]] <= per_class:
                kept.append(i)
        keep = kept
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        keep = sorted(random.Random(seed).sample(keep, max(1, round(fraction * len(keep)))))
    return listing.subset(keep)
