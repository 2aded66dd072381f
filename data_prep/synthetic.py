"""Synthetic image sets for tests, benchmarks and the GPU check: smooth random textures (they compress like
photos, unlike noise) written as class folders."""

import numpy as np
from PIL import Image


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
