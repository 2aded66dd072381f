"""Convert an image dataset to an FFCV ``.beton`` (RGB image + int label).

    python -m data_prep.write_ffcv SOURCE --out train.beton [--split train] [--max_side 512] ...

SOURCE is an ImageNet root (``train/<wnid>/``, ``val/``), any ImageFolder tree, a list file of
``path label`` lines, ``fashion_mnist`` (the Debian package's idx files), or with ``--dataset`` the
root of a downstream set (inat18, inat19, cub, cars, aircraft, flowers, pets; data_prep/datasets.py).
Unreadable images are
skipped and listed in ``<out>.bad.txt``; more than ``max_bad`` of them (a fraction) fails the
conversion. The output is written under a temporary name and renamed at the end; a conversion killed
at any point leaves at most that temporary file, which the next conversion to the same ``out`` removes,
and no process behind (the checking and writing workers end with it). The class names in label order go
to ``<out>.classes.json``.
"""

import contextlib
import ctypes
import functools
import json
import os
import signal
import time
from multiprocessing import Pool
from pathlib import Path
from unittest import mock

import ffcv.writer
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
        checks = pool.imap(check_image, listing.paths, chunksize=32)
        reasons = list(tqdm(checks, total=len(listing), desc="checking images", unit="img"))
    bad = [(p, r) for p, r in zip(listing.paths, reasons, strict=True) if r is not None]
    report.write_text("".join(f"{p}\t{r}\n" for p, r in bad))
    if len(bad) > max_bad * len(listing):
        raise RuntimeError(
            f"{len(bad)} of {len(listing)} images are unreadable ({len(bad) / len(listing):.1%} > max_bad="
            f"{max_bad:.1%}), e.g. {[f'{p}: {r}' for p, r in bad[:2]]}; all in {report}. "
            "Fix the files or raise --max_bad."
        )
    return listing.subset([i for i, r in enumerate(reasons) if r is None]), len(bad)


_CONVERTING: set[int] = set()


def _die_with_parent() -> None:
    """In a process forked during a conversion (the checking pool, FFCV's writers): SIGKILL when the parent
    dies, so a killed conversion leaves no worker writing on (Linux ``PR_SET_PDEATHSIG``)."""
    if os.getppid() not in _CONVERTING:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


os.register_at_fork(after_in_child=_die_with_parent)


def _remove_stale_temporaries(out: Path) -> None:
    """Remove ``.<out>.tmp-<pid>`` files of conversions that were killed (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        alive = pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid()
        if not alive:
            print(f"removing {tmp}: left by a conversion that was killed", flush=True)
            tmp.unlink(missing_ok=True)


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
    """Write ``out`` (.beton) from ``source``; returns the summary that is also printed.

    Args:
        source: an ImageNet root, an ImageFolder tree, a list file (``path label`` lines) or fashion_mnist.
        out: the .beton to write (beside it: ``.bad.txt``, the unreadable files; ``.classes.json``).
        split: train or val (ImageNet and the downstream sets).
        max_side: resize so the longer side is at most this (None: as stored).
        write_mode: jpg, raw, smart or proportion (FFCV's RGBImageField modes).
        jpeg_quality: 1..100, for the JPEG-compressed images.
        compress_probability: proportion mode: the share of images stored as JPEG.
        workers: checking and writing processes.
        per_class: keep only this many images per class (a subsample).
        fraction: keep this fraction of the images (a subsample).
        seed: of the subsample.
        max_bad: the largest share of unreadable images that is skipped rather than an error.
        dataset: read ``source`` as this downstream set (inat18, inat19, cub, cars, aircraft, flowers, pets).
    """
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    _CONVERTING.add(os.getpid())  # workers forked meanwhile die with this process (``_die_with_parent``)
    try:
        return _convert(source, out, split, max_side, write_mode, jpeg_quality, compress_probability, workers,
                        per_class, fraction, seed, max_bad, dataset)  # fmt: skip
    finally:
        _CONVERTING.discard(os.getpid())


def _convert(source, out: Path, split, max_side, write_mode, jpeg_quality, compress_probability, workers, per_class,
             fraction, seed, max_bad, dataset) -> dict:  # fmt: skip
    start = time.perf_counter()
    listing = select(open_listing(source, split, dataset), per_class, fraction, seed)
    listing, bad = drop_bad(listing, workers, Path(f"{out}.bad.txt"), max_bad)
    if len(listing) == 0:
        raise ValueError(f"nothing to write from {source} (split {split!r})")
    field = RGBImageField(write_mode, max_side, jpeg_quality=jpeg_quality, compress_probability=compress_probability)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    labelled = functools.partial(tqdm, desc=f"writing {out.name}", unit="img")
    try:
        with mock.patch.object(ffcv.writer, "tqdm", labelled):  # FFCV's own bar, unlabelled otherwise
            writer = DatasetWriter(str(tmp), {"image": field, "label": IntField()}, num_workers=workers)
            writer.from_indexed_dataset(_Items(listing), chunksize=64)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    Path(f"{out}.classes.json").write_text(json.dumps({"classes": listing.classes}, indent=1))
    seconds = time.perf_counter() - start
    summary = {"out": str(out), "written": len(listing), "skipped_bad": bad, "classes": len(listing.classes)}
    summary["bad_list"] = f"{out}.bad.txt" if listing.paths is not None else None
    summary |= {"seconds": round(seconds, 2), "images_per_s": round(len(listing) / seconds, 1)}
    print(json.dumps(summary))
    return summary


def describe() -> str:
    from dtm_ds import cli

    return cli.describe(__doc__, [("Options", cli.function_rows(convert))])


if __name__ == "__main__":
    from dtm_ds import cli

    cli.run(convert, describe)  # the summary is printed as one JSON line
