"""Convert an image dataset to an FFCV ``.beton`` (RGB image + int label).

    python -m data_prep.write_ffcv SOURCE --out train.beton [--split train] [--max_side 512] ...

SOURCE is an ImageNet root (``train/<wnid>/``, ``val/``), any ImageFolder tree, a list file of
``path label`` lines, ``fashion_mnist`` (the Debian package's idx files), or with ``--dataset`` the
root of a downstream set (inat18, inat19, cub, cars, aircraft, flowers, pets; data_prep/datasets.py).
Unreadable images are
skipped and listed in ``<out>.bad.txt``; more than ``max_bad`` of them (a fraction) fails the
conversion. The output is written under a temporary name and renamed at the end. The class names
in label order go to ``<out>.classes.json``.
"""

import json
import os
import time
from multiprocessing import Pool
from pathlib import Path

import fire
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from PIL import Image
from tqdm import tqdm

from data_prep.datasets import open_listing
from data_prep.sources import Listing, select

WRITE_MODES = ("jpg", "raw", "smart", "proportion")


def check_image(path: Path) -> str | None:
    """None when the file decodes fully; otherwise the reason. JPEGs decode at 1/8 scale (same stream)."""
    try:
        with Image.open(path) as im:
            if im.width < 1 or im.height < 1:
                return "empty image"
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except Exception as err:  # PIL raises many types for bad files; each is reported, none is fatal
        return f"{type(err).__name__}: {err}"


class _Items:
    """Indexed dataset for FFCV's writer: (uint8 RGB image, label)."""

    def __init__(self, listing: Listing):
        self.listing = listing

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, i: int):
        return self.listing.image(i), self.listing.labels[i]


def drop_bad(listing: Listing, workers: int, report: Path, max_bad: float) -> tuple[Listing, int]:
    """Decode-check every file in parallel; write the report; fail above ``max_bad``."""
    if listing.paths is None:
        return listing, 0
    with Pool(workers) as pool:
        reasons = list(tqdm(pool.imap(check_image, listing.paths, chunksize=32), total=len(listing), desc="checking"))
    bad = [(p, r) for p, r in zip(listing.paths, reasons, strict=True) if r is not None]
    report.write_text("".join(f"{p}\t{r}\n" for p, r in bad))
    if len(bad) > max_bad * len(listing):
        raise RuntimeError(
            f"{len(bad)} of {len(listing)} images are unreadable ({len(bad) / len(listing):.1%} > max_bad="
            f"{max_bad:.1%}), e.g. {[f'{p}: {r}' for p, r in bad[:2]]}; all in {report}. "
            "Fix the files or raise --max_bad."
        )
    return listing.subset([i for i, r in enumerate(reasons) if r is None]), len(bad)


def convert(
    source: str,
    out: str,
    split: str = "train",
    max_side: int | None = None,
    write_mode: str = "jpg",
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    workers: int = 2,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    max_bad: float = 0.01,
    dataset: str | None = None,
) -> dict:
    """Write ``out`` (.beton) from ``source``; returns the summary that is also printed."""
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    listing = select(open_listing(source, split, dataset), per_class, fraction, seed)
    listing, bad = drop_bad(listing, workers, Path(f"{out}.bad.txt"), max_bad)
    if len(listing) == 0:
        raise ValueError(f"nothing to write from {source} (split {split!r})")
    field = RGBImageField(write_mode, max_side, jpeg_quality=jpeg_quality, compress_probability=compress_probability)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = DatasetWriter(str(tmp), {"image": field, "label": IntField()}, num_workers=workers)
        writer.from_indexed_dataset(_Items(listing), chunksize=64)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    Path(f"{out}.classes.json").write_text(json.dumps({"classes": listing.classes}, indent=1))
    seconds = time.perf_counter() - start
    summary = {"out": str(out), "written": len(listing), "skipped_bad": bad, "classes": len(listing.classes)}
    summary |= {"seconds": round(seconds, 2), "images_per_s": round(len(listing) / seconds, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    fire.Fire(convert, serialize=lambda summary: None)  # the summary is printed as one JSON line
