import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def texture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random RGB texture, uint8 [h, w, 3] (compresses like a photo, unlike noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(2, 12, size=(3, 2))
    phase = rng.uniform(0, 6.3, size=3)
    chans = [np.sin(f[c, 0] * 6.3 * x + phase[c]) * np.cos(f[c, 1] * 6.3 * y) for c in range(3)]
    img = (np.stack(chans, -1) * 100 + 128 + rng.normal(0, 6, (h, w, 3))).clip(0, 255)
    return img.astype(np.uint8)


def write_class_folder(root, classes: dict[str, int], size=(40, 48), suffix=".jpg", seed=0) -> list:
    """root/<class>/<i><suffix> with textured images; returns the paths written."""
    paths = []
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / name / f"{i:03d}{suffix}"
            Image.fromarray(texture(*size, seed=seed + 100 * c + i)).save(path)
            paths.append(path)
    return paths


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
