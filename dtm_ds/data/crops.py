"""Seeded RandomResizedCrop boxes, compiled by numba and shared by the FFCV and torchvision backends.

The box of a sample is a pure function of an integer key, so decode threads need no shared random
state and a resumed run crops exactly as an uninterrupted one. Integers stay below 2**63 so Python
and numba compute the same values.
"""

import math

from numba import njit

__all__ = ["crop_box", "sample_key"]

_M32 = 4294967296


@njit(cache=True)
def _hash32(x: int) -> int:
    """Integer mixer on 32 bits (xor-shift-multiply); x >= 0."""
    x = x % _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B % _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B % _M32
    return (x >> 16) ^ x


@njit(cache=True)
def sample_key(seed: int, sample: int, first: int, last: int) -> int:
    """Key of a sample: its id and the first/last ids of its batch (so it changes between epochs)."""
    return _hash32(_hash32(_hash32(_hash32(seed) + sample) + first) + last)


@njit(cache=True)
def _uniform(key: int, k: int) -> float:
    return _hash32(key + k * 0x9E3779B9) / _M32


@njit(cache=True)
def crop_box(key: int, height: int, width: int, scale_lo: float, scale_hi: float, ratio_lo: float, ratio_hi: float):
    """(top, left, h, w) of a RandomResizedCrop: area fraction in [scale_lo, scale_hi], log-uniform aspect
    ratio in [ratio_lo, ratio_hi], 10 attempts, then the central crop with a clamped aspect ratio."""
    area = height * width
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    for k in range(10):
        target = area * (scale_lo + (scale_hi - scale_lo) * _uniform(key, 4 * k))
        aspect = math.exp(log_lo + (log_hi - log_lo) * _uniform(key, 4 * k + 1))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(_uniform(key, 4 * k + 2) * (height - h + 1))
            left = int(_uniform(key, 4 * k + 3) * (width - w + 1))
            return top, left, h, w
    w, h = width, height
    if width / height < ratio_lo:
        h = int(round(w / ratio_lo))
    elif width / height > ratio_hi:
        w = int(round(h * ratio_hi))
    return (height - h) // 2, (width - w) // 2, h, w
