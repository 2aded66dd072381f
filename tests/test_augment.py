"""Augmentation and masks as the loaders really produce them, against computations written out here: crop
areas from pixels whose colour encodes their position, jitter factors from solid-colour images, mask blocks
by connected components."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from data_prep.write_ffcv import convert
from dtm_ds.data import LoaderSpec, PretrainLoader, augment_on_device, epoch_order

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet's, written out
H, W, S = 300, 400, 32  # source images, loader output


def _pixels(batch: torch.Tensor) -> np.ndarray:
    """The loader's normalised [B, 3, S, S] back to [0, 1] with the constants above."""
    return batch.numpy() * STD[None, :, None, None] + MEAN[None, :, None, None]


def _folder(root, image: np.ndarray, count: int = 64):
    """Two classes of ``count`` / 2 identical lossless PNGs."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(count // 2):
            Image.fromarray(image).save(root / c / f"{i:03d}.png")
    return root


def _ramp() -> np.ndarray:
    """R = column, G = row, each 0..255 across the image: a crop's box can be read off its colours."""
    x, y = np.meshgrid(np.linspace(0, 255, W), np.linspace(0, 255, H))
    return np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)


def _reference_areas(lo: float, n: int, seed: int = 0) -> np.ndarray:
    """torchvision's RandomResizedCrop rule, in numpy: area fraction U[lo, 1], log-uniform ratio in
    [3/4, 4/3], 10 tries, then the whole image (its aspect 4/3 is within the range)."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        for _ in range(10):
            target = H * W * rng.uniform(lo, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= W and 0 < h <= H:
                out.append(w * h / (H * W))
                break
        else:
            out.append(1.0)
    return np.array(out)


def _loader(path, backend: str, **spec) -> PretrainLoader:
    fields = {"batch_size": 16, "image_size": S, "patch_size": 4, "num_masked": 16, "min_mask_block": 4,
              "workers": 0 if backend == "torchvision" else 1, "backend": backend} | spec  # fmt: skip
    return PretrainLoader(LoaderSpec(path=str(path), **fields))


@pytest.fixture(scope="module")
def ramp_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ramp")
    folder = _folder(root / "src", _ramp())
    convert(str(folder), str(root / "ramp.beton"), write_mode="raw", workers=1)
    return {"torchvision": folder, "ffcv": root / "ramp.beton"}


@pytest.mark.parametrize("backend", ["torchvision", "ffcv"])
def test_crop_areas_lie_in_the_scale_range_and_follow_the_rule(ramp_sources, backend):
    """The crop box of every sample, read back from the colours of its output: areas within
    [min_crop_scale, 1], and their mean and spread as torchvision's rule gives (16,000 reference draws)."""
    lo = 0.5
    loader = _loader(ramp_sources[backend], backend, min_crop_scale=lo, jitter=0.0)
    areas, flipped = [], []
    for epoch in range(3):
        for batch in loader.epoch(epoch):
            x = _pixels(batch["images"])  # (B, 3, S, S)
            flipped += list(x[:, 0, :, -1].mean(1) < x[:, 0, :, 0].mean(1))  # red falls from left to right
            width = np.abs(x[:, 0, :, -1] - x[:, 0, :, 0]).mean(1) * (W - 1) / (1 - 1 / S)  # R spans the columns
            height = (x[:, 1, -1, :] - x[:, 1, 0, :]).mean(1) * (H - 1) / (1 - 1 / S)  # G spans the rows
            areas += list(width * height / (H * W))
    areas, want = np.array(areas), _reference_areas(lo, 16000)
    assert len(areas) == 192
    assert areas.min() > lo - 0.03 and areas.max() < 1.03, (areas.min(), areas.max())
    assert abs(areas.mean() - want.mean()) < 0.03, (areas.mean(), want.mean())
    assert abs(areas.std() - want.std()) < 0.03, (areas.std(), want.std())
    assert 0.35 < np.mean(flipped) < 0.65, np.mean(flipped)  # half the samples flipped (192: sd 0.036)


COLOUR = np.array([150, 100, 50])


def _grey(c):
    return 0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]


def _factors(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(brightness, contrast x saturation) of every sample of a batch of the solid COLOUR image: brightness
    scales the grey level; on a flat image contrast and saturation both scale each channel's distance from
    that grey level, so red's distance gives their product."""
    out = _pixels(batch).mean((2, 3))  # (B, 3): the image is flat
    c = COLOUR / 255
    brightness = _grey(out) / _grey(c)
    gain = (out[:, 0] - _grey(out)) / (brightness * (c[0] - _grey(c)))
    return brightness, gain


@pytest.fixture(scope="module")
def solid(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("solid"), np.broadcast_to(COLOUR.astype(np.uint8), (24, 24, 3)).copy(), 256)


def test_jitter_factors_are_two_sided_around_one_and_change_with_the_epoch(solid):
    j = 0.4
    loader = _loader(solid, "torchvision", jitter=j)
    spec = loader.spec
    per_epoch = []
    for epoch in (0, 1):
        order = epoch_order(256, spec, epoch)
        found = {}
        for k, batch in enumerate(loader.epoch(epoch)):
            for i, b, s in zip(order[k * 16 : (k + 1) * 16], *_factors(batch["images"]), strict=True):
                found[int(i)] = (b, s)
        per_epoch.append(found)
    brightness, gain = (np.array([f[i] for f in per_epoch[0].values()]) for i in (0, 1))
    assert brightness.min() >= 1 - j - 1e-3 and brightness.max() <= 1 + j + 1e-3, (brightness.min(), brightness.max())
    assert abs(brightness.mean() - 1) < 0.05, brightness.mean()  # U[0.6, 1.4]: sd 0.23, 256 samples
    assert brightness.max() - brightness.min() > 1.5 * j  # the whole range is used
    assert gain.min() >= (1 - j) ** 2 - 1e-3 and gain.max() <= (1 + j) ** 2 + 1e-3, (gain.min(), gain.max())
    assert abs(gain.mean() - 1) < 0.07, gain.mean()  # the product of two independent U[0.6, 1.4]: mean 1
    same = [i for i in per_epoch[0] if np.allclose(per_epoch[0][i], per_epoch[1][i], atol=1e-4)]
    assert len(same) <= 2, same  # each sample's draws change with the epoch
    resumed = list(loader.epoch(1, start_batch=5))
    again = list(loader.epoch(1))[5:]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, again, strict=True))


def test_contrast_factor_is_two_sided_around_one():
    """A two-pixel grey image [a, b]: contrast moves both away from their mean by the factor."""
    j, n = 0.4, 4000
    draws = torch.rand(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = 80, 160
    images = torch.tensor([a, b], dtype=torch.uint8).repeat(n, 3, 1, 1)  # (n, 3, 1, 2)
    draws[:, 0] = 0.9  # no flip
    out = augment_on_device(images, draws, j).double()
    brightness = out[:, 0, 0].sum(-1) / ((a + b) / 255)
    contrast = (out[:, 0, 0, 1] - out[:, 0, 0, 0]) / (brightness * (b - a) / 255)
    for values in (brightness, contrast):
        assert values.min() >= 1 - j - 1e-5 and values.max() <= 1 + j + 1e-5
        assert abs(values.mean().item() - 1) < 0.02


def _components(masks: np.ndarray, grid: int) -> np.ndarray:
    sizes = []
    for mask in masks:
        labels, _ = ndimage.label(mask.reshape(grid, grid))
        sizes += list(np.bincount(labels.ravel())[1:])
    return np.array(sizes)


def test_loader_masks_are_blocks_of_the_minimum_size(solid):
    """The loader's masks at BEiT's setting (75 of 196 patches, blocks of >= 16): exact counts, and blocks
    (connected components) of at least the minimum up to rounding of a block's sides (16 -> 2 x 7 = 14)."""
    loader = _loader(solid, "torchvision", image_size=56, num_masked=75, min_mask_block=16, jitter=0.0)
    masks = np.concatenate([b["masks"].numpy() for e in range(2) for b in loader.epoch(e)])  # (512, 196)
    assert masks.shape == (512, 196) and (masks.sum(1) == 75).all()
    sizes = _components(masks, 14)
    assert sizes.min() >= 12 and np.percentile(sizes, 5) >= 14, (sizes.min(), np.percentile(sizes, 5))
    assert sizes.mean() > 40, sizes.mean()  # blocks, not scattered patches


def test_the_loader_thread_hands_on_items_in_order_errors_at_their_place_and_stops_when_left():
    """``_Ahead`` (the loader's prepare-ahead thread): every item in order, a producer's error raised in the
    consumer after the items before it, and a consumer that stops early ends the thread (no thread left
    producing into a queue nobody reads)."""
    from dtm_ds.data.loader import _Ahead

    def produce(n, fail_at=None):
        def items():
            for i in range(n):
                if i == fail_at:
                    raise OSError(f"unreadable sample {i}")
                yield {"i": torch.tensor(i)}

        return items

    assert [int(x["i"]) for x in _Ahead(produce(7), 2, torch.device("cpu"))] == list(range(7))
    got = []
    with pytest.raises(OSError, match="unreadable sample 3"):
        for x in _Ahead(produce(7, fail_at=3), 2, torch.device("cpu")):
            got.append(int(x["i"]))
    assert got == [0, 1, 2]
    ahead = _Ahead(produce(10**9), 2, torch.device("cpu"))
    stream = iter(ahead)
    assert int(next(stream)["i"]) == 0
    stream.close()  # what a loop that breaks (or a dropped generator) does
    ahead.thread.join(timeout=5)
    assert not ahead.thread.is_alive() and ahead.items.qsize() <= 2
