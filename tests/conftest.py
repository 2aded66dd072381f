import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.synthetic import texture, write_class_folder  # noqa: F401  (the tests' images)
from dtm_ds.devices import accelerator

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 4, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}

# DeepSpeed follows dtm_ds's decision in this process and in every run the tests start (CUDA where present)
os.environ.setdefault("DS_ACCELERATOR", accelerator())


def pytest_runtest_setup(item):
    """``@pytest.mark.ranks(n)``: the test starts n ranks; on a CUDA machine each needs its own GPU (NCCL)."""
    marker = item.get_closest_marker("ranks")
    if marker and os.environ["DS_ACCELERATOR"] == "cuda" and torch.cuda.device_count() < marker.args[0]:
        pytest.skip(f"{marker.args[0]} ranks need {marker.args[0]} GPUs here ({torch.cuda.device_count()} present)")


@pytest.fixture
def odd_images(tmp_path):
    """One class folder of readable odd formats and one of unreadable files; returns (root, good, bad)."""
    root = tmp_path / "odd"
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    base = texture(30, 40, 1)
    Image.fromarray(base).save(good / "rgb.jpg", quality=95)
    Image.fromarray(base).convert("L").save(good / "grey.png")
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(good / "grey16.png")  # 16-bit greyscale
    Image.fromarray(base).convert("CMYK").save(good / "cmyk.jpg")
    Image.fromarray(base).convert("P").save(good / "palette.png", transparency=0)
    rgba = Image.fromarray(base).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(good / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    Image.fromarray(base).save(good / "rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(good / "tiny.png")
    Image.fromarray(texture(1600, 2400, 2)).save(good / "huge.jpg", quality=80)
    full = (good / "rgb.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "not_an_image.jpg").write_text("hello")
    (bad / "empty.png").write_bytes(b"")
    return root, sorted(good.iterdir()), sorted(bad.iterdir())


ADE_COLOURS = {1: (200, 60, 40), 2: (40, 160, 60), 3: (50, 70, 210), 4: (220, 210, 60)}


def write_ade20k(root, n_train: int = 6, n_val: int = 3, size=(48, 64), seed=0):
    """A tiny ADEChallengeData2016 folder: textured images whose rectangles of classes 1..4 each have
    their own colour, annotations uint8 with 0 (unlabelled) on a one-pixel border."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, count in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = np.ones((h, w), np.uint8)
            for c in (2, 3, 4):
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                label[y : y + rng.integers(h // 4, h // 2), x : x + rng.integers(w // 4, w // 2)] = c
            img = np.zeros((h, w, 3), np.float32)
            for c, colour in ADE_COLOURS.items():
                img[label == c] = colour
            img = (0.3 * img + 0.7 * texture(h, w, seed + i)).clip(0, 255).astype(np.uint8)
            label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = 0
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(img).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    return root


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip config registered under 'dtm-test-clip' and weights saved by the test."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "dtm-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    weights = folder / "weights.pt"
    torch.save(open_clip.create_model("dtm-test-clip", pretrained=None).state_dict(), weights)
    return str(weights)


@pytest.fixture(scope="session")
def small_beton(tmp_path_factory):
    """A .beton of 24 generated 40x56 images in two classes."""
    from data_prep.write_ffcv import convert

    root = tmp_path_factory.mktemp("pre")
    write_class_folder(root / "src", {"a": 12, "b": 12}, size=(40, 56))
    convert(str(root / "src"), str(root / "pre.beton"), workers=1)
    return root / "pre.beton"


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """40 textured 40x40 images in two classes: the training runs' data."""
    root = tmp_path_factory.mktemp("images")
    write_class_folder(root / "imgs", {"a": 20, "b": 20}, size=(40, 40))
    return root / "imgs"


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A real dtm_ds run directory (tiny preset, 2 steps) for the downstream tests to transfer from."""
    import subprocess

    from tests.helpers import ROOT, ds_json, run_env, train_cmd

    root = tmp_path_factory.mktemp("pre")
    write_class_folder(root / "imgs", {"a": 8, "b": 8}, size=(40, 40))
    cmd = train_cmd(root / "imgs", root / "run", ds_json(root / "ds.json", 8), 2)
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True)
    return root / "run"
