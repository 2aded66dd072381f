"""How far FFCV's crop resize (OpenCV INTER_AREA, in its decoder) is from the reference's bicubic resize.

The reference resizes RandomResizedCrop boxes with PIL bicubic (``--train_interpolation bicubic``); FFCV's
``resize_crop`` uses OpenCV's area interpolation. Both run here on the same boxes (dtm_ds.data.crops, scale
[0.2, 1]) of 1/f-noise images (the power spectrum of natural photographs), 500 x 375 to 224 x 224:
mean absolute difference in 8-bit levels, PSNR, and the same for two bicubic implementations (PIL vs
torchvision antialiased) as the scale of what counts as small.

    python -m bench.bench_resize [--images 64]
"""

import json
import sys

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from ffcv.libffcv import resize_crop
from PIL import Image

from dtm_ds.data.crops import crop_box, sample_key


def pink_noise(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 [h, w, 3] with a 1/f amplitude spectrum (natural-image statistics), per channel."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(h, w))
    channels = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random((h, w)))
        img = np.fft.ifft2(amplitude * phase).real
        channels.append((img - img.mean()) / img.std())
    return (np.stack(channels, -1) * 48 + 128).clip(0, 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse)


def main(images: int = 64, size: int = 224) -> dict:
    rows = {"area_vs_pil_bicubic": [], "torchvision_vs_pil_bicubic": []}
    for i in range(images):
        src = pink_noise(375, 500, i)
        top, left, h, w = crop_box(sample_key(0, i, 0, 0), 375, 500, 0.2, 1.0, 3 / 4, 4 / 3)
        area = np.zeros((size, size, 3), np.uint8)
        resize_crop(src, top, top + h, left, left + w, area)
        pil = np.asarray(Image.fromarray(src[top : top + h, left : left + w]).resize((size, size), Image.BICUBIC))
        tv = TF.resized_crop(torch.from_numpy(src).permute(2, 0, 1), top, left, h, w, [size, size],
                             TF.InterpolationMode.BICUBIC, antialias=True).permute(1, 2, 0).numpy()  # fmt: skip
        for key, other in (("area_vs_pil_bicubic", area), ("torchvision_vs_pil_bicubic", tv)):
            rows[key].append((np.abs(other.astype(np.int16) - pil.astype(np.int16)).mean(), _psnr(other, pil)))
    result = {"bench": "resize", "images": images, "size": size}
    for key, values in rows.items():
        diff, psnr = np.array(values).mean(0)
        result |= {f"{key}_mean_abs_levels": round(float(diff), 3), f"{key}_psnr_db": round(float(psnr), 2)}
        print(f"{key:<28} mean |diff| {diff:6.3f} of 255, PSNR {psnr:5.2f} dB")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(images=int(sys.argv[sys.argv.index("--images") + 1]) if "--images" in sys.argv else 64)
