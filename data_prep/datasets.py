"""Readers for the downstream datasets in their real on-disk layouts (shared/DESIGN.md §5).

Each returns a :class:`data_prep.sources.Listing` (paths, contiguous labels, class names) that feeds
both the FFCV conversion (``python -m data_prep.write_ffcv ROOT --dataset cub``) and direct loaders.
Readers check what they read: missing files, images listed but absent, labels out of range.
"""

import json
from pathlib import Path

from data_prep.sources import Listing, imagenet

SPLITS = ("train", "val", "test", "trainval")


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return path


def _checked(root: Path, rel_paths: list[str], labels: list[int], classes: list[str], what: str) -> Listing:
    paths = [root / p for p in rel_paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} listed images are absent, e.g. {missing[0]}")
    bad = [y for y in labels if not 0 <= y < len(classes)]
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} labels outside the {len(classes)} classes, e.g. class index {bad[0]} "
            f"(0-based; valid 0..{len(classes) - 1}) for {paths[labels.index(bad[0])]}"
        )
    if not paths:
        raise ValueError(f"{what}: no images in this split")
    return Listing(labels=labels, classes=classes, paths=paths)


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in _require(path).read_text().splitlines() if line.strip()]


def inaturalist(root: str | Path, split: str, year: int) -> Listing:
    """iNaturalist 2018/2019: COCO-style ``{train,val}<year>.json``; category ids remapped to contiguous
    labels in sorted id order (``classes`` holds the original ids, the saved class map)."""
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"iNaturalist split must be 'train' or 'val', got {split!r}")
    meta = json.loads(_require(root / f"{split}{year}.json").read_text())
    ids = sorted({int(c["id"]) for c in meta["categories"]})
    label = {c: i for i, c in enumerate(ids)}
    files = {img["id"]: img["file_name"] for img in meta["images"]}
    rel, labels = [], []
    for ann in meta["annotations"]:
        if ann["image_id"] not in files:
            raise ValueError(f"{split}{year}.json: annotation for unknown image id {ann['image_id']}")
        if int(ann["category_id"]) not in label:
            raise ValueError(f"{split}{year}.json: category {ann['category_id']} not in its categories")
        rel.append(files[ann["image_id"]])
        labels.append(label[int(ann["category_id"])])
    return _checked(root, rel, labels, [str(c) for c in ids], f"iNaturalist {year} {split}")


def cub(root: str | Path, split: str) -> Listing:
    """CUB-200-2011: images.txt, image_class_labels.txt (1..200), train_test_split.txt (1 = train)."""
    root = Path(root)
    names = {i: p for i, p in _lines(root / "images.txt")}
    labels = {i: int(c) - 1 for i, c in _lines(root / "image_class_labels.txt")}
    is_train = {i: flag == "1" for i, flag in _lines(root / "train_test_split.txt")}
    classes = [c for _, c in _lines(root / "classes.txt")]
    want = split in ("train", "trainval")
    keep = [i for i in names if is_train[i] == want]
    return _checked(root / "images", [names[i] for i in keep], [labels[i] for i in keep], classes, f"CUB {split}")


def cars(root: str | Path, split: str) -> Listing:
    """Stanford Cars: devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat."""
    from scipy.io import loadmat

    root = Path(root)
    classes = [str(c[0]) for c in loadmat(_require(root / "devkit" / "cars_meta.mat"))["class_names"][0]]
    train = split in ("train", "trainval")
    annos = root / "devkit" / "cars_train_annos.mat" if train else root / "cars_test_annos_withlabels.mat"
    records = loadmat(_require(annos))["annotations"][0]
    rel = [str(r["fname"][0]) for r in records]
    labels = [int(r["class"][0][0]) - 1 for r in records]
    return _checked(root / ("cars_train" if train else "cars_test"), rel, labels, classes, f"Stanford Cars {split}")


def aircraft(root: str | Path, split: str) -> Listing:
    """FGVC-Aircraft, variant level: data/images_variant_<split>.txt (``<id> <variant>``), data/variants.txt."""
    data = Path(root) / "data"
    classes = [line.strip() for line in _require(data / "variants.txt").read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    rel, labels = [], []
    for line in _require(data / f"images_variant_{split}.txt").read_text().splitlines():
        if line.strip():
            image, variant = line.strip().split(" ", 1)
            if variant not in index:
                raise ValueError(f"images_variant_{split}.txt: variant {variant!r} not in variants.txt")
            rel.append(f"{image}.jpg")
            labels.append(index[variant])
    return _checked(data / "images", rel, labels, classes, f"FGVC-Aircraft {split}")


def flowers(root: str | Path, split: str) -> Listing:
    """Flowers-102: jpg/image_%05d.jpg, imagelabels.mat (1..102), setid.mat (trnid, valid, tstid)."""
    from scipy.io import loadmat

    root = Path(root)
    labels = loadmat(_require(root / "imagelabels.mat"))["labels"][0]
    sets = loadmat(_require(root / "setid.mat"))
    keys = {"train": ["trnid"], "val": ["valid"], "test": ["tstid"], "trainval": ["trnid", "valid"]}[split]
    ids = sorted(int(i) for k in keys for i in sets[k][0])
    rel = [f"image_{i:05d}.jpg" for i in ids]
    return _checked(
        root / "jpg",
        rel,
        [int(labels[i - 1]) - 1 for i in ids],
        [str(c) for c in range(1, 103)],
        f"Flowers-102 {split}",
    )


def pets(root: str | Path, split: str) -> Listing:
    """Oxford-IIIT Pets: annotations/{trainval,test}.txt (``<name> <class 1..37> <species> <breed>``)."""
    root = Path(root)
    name = "trainval" if split in ("train", "trainval") else "test"
    rows = _lines(root / "annotations" / f"{name}.txt")
    rows = [r for r in rows if not r[0].startswith("#")]
    breeds = {int(r[1]) - 1: r[0].rsplit("_", 1)[0] for r in rows}
    classes = [breeds.get(i, str(i + 1)) for i in range(37)]
    return _checked(
        root / "images",
        [f"{r[0]}.jpg" for r in rows],
        [int(r[1]) - 1 for r in rows],
        classes,
        f"Oxford-IIIT Pets {split}",
    )


READERS = {
    "imagenet": lambda root, split: imagenet(root, "train" if split in ("train", "trainval") else "val"),
    "inat18": lambda root, split: inaturalist(root, split, 2018),
    "inat19": lambda root, split: inaturalist(root, split, 2019),
    "cub": cub,
    "cars": cars,
    "aircraft": aircraft,
    "flowers": flowers,
    "pets": pets,
}


NO_VAL = ("cub", "cars", "pets")
"""Sets published with a train(val) / test split only: their held-out split is test, so ``val`` reads
test (``resolved_split`` says so); ``train`` reads the whole training part. Never training images."""


def resolved_split(name: str | None, split: str) -> str:
    """The split ``load(name, root, split)`` actually reads."""
    return "test" if name in NO_VAL and split == "val" else split


def load(name: str, root: str | Path, split: str) -> Listing:
    """The listing of dataset ``name`` under ``root`` for ``split`` (train, val, test or trainval)."""
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(READERS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{name} root {root} does not exist (README: Downstream evaluation, layouts)")
    return READERS[name](root, resolved_split(name, split))


def open_listing(source: str | Path, split: str, dataset: str | None = None) -> Listing:
    """A named dataset's reader when ``dataset`` is given, else the layout detected from ``source``."""
    from data_prep.sources import detect

    return load(dataset, source, split) if dataset else detect(source, split)
