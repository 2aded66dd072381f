"""BEiT block-wise masking with an exact number of masked patches per sample."""

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BlockMasking"]


@dataclass(frozen=True)
class BlockMasking:
    """Block-wise masks on a ``grid`` of patches (BEiT): rectangles of at least ``min_block`` patches
    with aspect ratio in [min_aspect, 1 / min_aspect], up to ``attempts`` tries per block, until
    ``num_masked`` patches are masked. When blocks can no longer be placed (the last few patches),
    the remainder is taken from unmasked patches bordering the mask, so every sample has exactly
    ``num_masked`` masked patches.
    """

    grid: tuple[int, int] = (14, 14)
    num_masked: int = 75
    min_block: int = 16
    min_aspect: float = 0.3
    attempts: int = 10

    def __post_init__(self):
        total = self.grid[0] * self.grid[1]
        if not 0 <= self.num_masked <= total:
            raise ValueError(f"num_masked must be in [0, {total}] for a {self.grid} grid, got {self.num_masked}")
        if not 0 < self.min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {self.min_aspect}")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask: bool [H, W], True = masked."""
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._place_block(mask, self.num_masked - count, rng)
            if added == 0:
                break
            count += added
        if count < self.num_masked:
            self._top_up(mask, self.num_masked - count, rng)
        return mask

    def batch(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """bool [size, H * W] masks, flattened in patch order."""
        return np.stack([self(rng).reshape(-1) for _ in range(size)])

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        height, width = self.grid
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        for _ in range(self.attempts):
            area = rng.uniform(self.min_block, max(self.min_block, budget))
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h < height and 0 < w < width):
                continue
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[:] = True
                return new
        return 0

    def _top_up(self, mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
        for _ in range(missing):
            border = np.zeros_like(mask)
            border[1:] |= mask[:-1]
            border[:-1] |= mask[1:]
            border[:, 1:] |= mask[:, :-1]
            border[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(border & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            mask.flat[rng.choice(candidates)] = True
