"""Loader throughput: FFCV vs the torchvision ImageFolder backend on the same generated JPEGs.

~2,000 textured JPEGs of 350-500 px, RandomResizedCrop to 224 px, 2 workers, after a warm-up epoch
(FFCV's numba compilation is excluded and reported). Two figures per backend: decoded crops only
(what the loader backend delivers) and the full pretraining batch (plus flip, colour jitter,
normalisation and block masks, which run on the training device: here the CPU). Also the conversion
rate of data_prep. Prints a table and a final JSON line.

    python -m bench.bench_loader [--images 2000] [--workers 2] [--batch 64]
"""

import json
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch
from PIL import Image

from data_prep.synthetic import texture
from data_prep.write_ffcv import convert
from dtm_ds.data import LoaderSpec, PretrainLoader, epoch_order


def make_jpegs(root: Path, count: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(350, 501, size=2)
        Image.fromarray(texture(int(h), int(w), i)).save(folder / f"{i:05d}.jpg", quality=90)


def _rate(batches, spec) -> float:
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch[0] if isinstance(batch, tuple) else batch["images"])
    return seen / (time.perf_counter() - start)


def measure(spec: LoaderSpec) -> dict:
    torch.set_num_threads(spec.workers)
    start = time.perf_counter()
    loader = PretrainLoader(spec)
    order = epoch_order(loader.source.num_samples, spec, 0)
    for _ in loader.source.batches(order, 0):  # warm-up: FFCV compiles its pipeline here
        pass
    warmup = time.perf_counter() - start
    decode = _rate(loader.source.batches(epoch_order(loader.source.num_samples, spec, 1), 1), spec)
    full = _rate(loader.epoch(2), spec)
    return {"warmup_s": round(warmup, 1), "decode_img_s": round(decode, 1), "full_img_s": round(full, 1)}


def main(images: int = 2000, workers: int = 2, batch: int = 64):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root / "jpegs", images)
        common = {"batch_size": batch, "image_size": 224, "workers": workers}
        results = {}
        for side in (512, 256):  # 512 keeps the originals' size; 256 is FFCV's usual ImageNet setting
            beton = str(root / f"bench{side}.beton")
            conversion = convert(str(root / "jpegs"), beton, max_side=side, workers=workers)
            results[f"ffcv{side}"] = measure(LoaderSpec(path=beton, **common))
        results["torchvision"] = measure(LoaderSpec(path=str(root / "jpegs"), backend="torchvision", **common))
    print(f"\nloader throughput, {images} JPEGs 350-500 px -> 224 px, batch {batch}, {workers} workers")
    print(f"{'backend':<14}{'warm-up s':>10}{'decode img/s':>14}{'full img/s':>12}")
    for name, r in results.items():
        print(f"{name:<14}{r['warmup_s']:>10}{r['decode_img_s']:>14}{r['full_img_s']:>12}")
    ratio = {
        f"{name}_over_torchvision_{k}": round(results[name][k] / results["torchvision"][k], 2)
        for name in ("ffcv512", "ffcv256")
        for k in ("decode_img_s", "full_img_s")
    }
    for name in ("ffcv512", "ffcv256"):
        decode, full = ratio[f"{name}_over_torchvision_decode_img_s"], ratio[f"{name}_over_torchvision_full_img_s"]
        print(f"{name} / torchvision: decode {decode}x, full {full}x")
    print(f"data_prep conversion: {conversion['images_per_s']} img/s")
    summary = {"bench": "loader", **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()}}
    summary |= ratio | {"conversion_img_s": conversion["images_per_s"]}
    print(json.dumps(summary))


if __name__ == "__main__":
    fire.Fire(main)
