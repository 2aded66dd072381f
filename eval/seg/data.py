"""ADE20K checks: the folder layout before training starts, and every annotation as it is loaded.

Layout (DESIGN.md §5): ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
``annotations/{training,validation}/*.png`` of the same stem, uint8 values 0..150 (0 = unlabelled,
dropped by reduce_zero_label, so 1..150 become classes 0..149).
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS
from PIL import Image

NUM_CLASSES = 150
SPLITS = {"train": "training", "val": "validation"}


def check_ade20k(root: str | Path, splits=("train", "val"), scan_labels: bool = True, workers: int = 8) -> dict:
    """Raise a clear error for a missing folder, an empty split, images without annotations or (with
    ``scan_labels``) annotation values outside 0..150. Returns {split: number of images}."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ADE20K root {root} does not exist; expected .../ADEChallengeData2016")
    counts = {}
    for split in splits:
        images, annotations = root / "images" / SPLITS[split], root / "annotations" / SPLITS[split]
        for folder in (images, annotations):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} does not exist (ADE20K layout: images/ and annotations/ × training/ and validation/)"
                )
        stems = sorted(p.stem for p in images.glob("*.jpg"))
        if not stems:
            raise FileNotFoundError(f"{images} holds no .jpg images")
        labelled = {p.stem for p in annotations.glob("*.png")}
        missing = [s for s in stems if s not in labelled]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(stems)} images in {images} have no annotation {annotations}/<name>.png, "
                f"e.g. {missing[:3]}"
            )
        if scan_labels:
            paths = [annotations / f"{s}.png" for s in stems]
            with ThreadPoolExecutor(workers) as pool:
                peaks = list(pool.map(lambda p: int(np.asarray(Image.open(p)).max()), paths))
            bad = [(str(p), v) for p, v in zip(paths, peaks, strict=True) if v > NUM_CLASSES]
            if bad:
                raise ValueError(
                    f"{len(bad)} annotations hold values above {NUM_CLASSES} "
                    f"(valid: 0 = unlabelled, 1..{NUM_CLASSES}), e.g. {bad[:3]}"
                )
        counts[split] = len(stems)
    return counts


@TRANSFORMS.register_module()
class CheckSegLabels(BaseTransform):
    """After LoadAnnotations(reduce_zero_label=True): every value must be a class (0..149) or ignore (255)."""

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def transform(self, results: dict) -> dict:
        seg = results["gt_seg_map"]
        bad = (seg >= self.num_classes) & (seg != self.ignore_index)
        if bad.any():
            values = sorted(set((seg[bad] + 1).tolist()))[:5]  # as stored, before reduce_zero_label
            raise ValueError(
                f"{results.get('seg_map_path')}: annotation values {values} are outside "
                f"0..{self.num_classes} (0 = unlabelled)"
            )
        return results
