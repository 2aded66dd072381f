"""Pretraining and evaluation input pipelines: FFCV (default) or torchvision ImageFolder.

Determinism: the *global* sample order is a function of (seed, epoch) alone. Each optimizer step takes
the next global batch of ``batch_size x accum x world`` samples and cuts it into chunks of
``batch_size`` (a micro-batch each); rank r runs chunks ``r*accum .. r*accum + accum - 1`` as its
micro-steps. So a chunk's samples depend on (seed, epoch, step, chunk) only, and 2 ranks x accumulation
1 run the same chunks as 1 rank x accumulation 2 (elastic resume). Flips, colour jitter and masks are
functions of (seed, epoch, sample); crops are functions of (seed, epoch, sample) with the torchvision
backend and of (seed, sample, its chunk's first and last ids) with FFCV, whose decoder sees no epoch. So
a run resumed at (epoch, batch) sees exactly the batches it would have seen, and FFCV's decode threads
never share a random state.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoaderSpec:
    """What the pretraining loader produces; checked before anything is decoded."""

    path: str
    batch_size: int  # per rank
    image_size: int = 224
    patch_size: int = 16
    min_crop_scale: float = 0.2
    jitter: float = 0.4
    num_masked: int = 75
    min_mask_block: int = 16
    seed: int = 0
    rank: int = 0
    world: int = 1
    accum: int = 1
    """Micro-batches per optimizer step on each rank (DeepSpeed's gradient_accumulation_steps)."""
    workers: int = 2
    backend: str = "ffcv"  # or "torchvision" (an image folder / any data_prep source)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.backend not in ("ffcv", "torchvision"):
            raise ValueError(f"data backend must be 'ffcv' or 'torchvision', got {self.backend!r}")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, world={self.world})")
        if self.accum < 1:
            raise ValueError(f"gradient accumulation must be >= 1, got {self.accum}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


def seed_of(*keys: int, bits: int = 63) -> int:
    """A seed of ``bits`` bits from integer keys (numpy's SeedSequence mixes them: no collisions between
    nearby keys). 32 bits for ``np.random.seed``; 63 for torch."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> np.uint64(64 - bits))


def epoch_order(num_samples: int, spec: LoaderSpec, epoch: int) -> np.ndarray:
    """This rank's sample ids for ``epoch``, micro-batch after micro-batch (full global batches only).

    The (seed, epoch) permutation is cut into global batches of micro x accum x world samples, each into
    ``accum x world`` chunks; this rank takes its ``accum`` consecutive chunks of every global batch."""
    chunks = spec.accum * spec.world
    steps = num_samples // (spec.batch_size * chunks)
    if steps == 0:
        raise ValueError(
            f"the global batch ({spec.batch_size} per rank x accumulation {spec.accum} x {spec.world} ranks) "
            f"is larger than the {num_samples} samples of {spec.path}"
        )
    perm = np.random.default_rng([spec.seed, epoch]).permutation(num_samples)
    per_step = perm[: steps * spec.batch_size * chunks].reshape(steps, chunks, spec.batch_size)
    return per_step[:, spec.rank * spec.accum : (spec.rank + 1) * spec.accum].reshape(-1)


def augment_on_device(images: torch.Tensor, draws: torch.Tensor, jitter: float) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] in [0, 1] on the images' device: horizontal flip, then
    brightness, contrast and saturation with factors in [1 - jitter, 1 + jitter].

    ``draws`` [B, 4] holds each sample's uniforms in [0, 1): flip, then the three jitter factors."""
    x = images.float().div_(255)
    draws = draws.to(x.dtype)
    x = torch.where((draws[:, 0] < 0.5)[:, None, None, None], x.flip(-1), x)
    if jitter > 0:
        factors = (1 + jitter * (2 * draws[:, 1:] - 1)).T[..., None, None, None]  # (3, B, 1, 1, 1)
        x = (x * factors[0]).clamp_(0, 1)  # brightness
        x = torch.lerp(_grey(x).mean((-2, -1), keepdim=True), x, factors[1]).clamp_(0, 1)  # contrast
        x = torch.lerp(_grey(x), x, factors[2]).clamp_(0, 1)  # saturation
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised with per-channel mean/std."""
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def check_beton(path: str | Path) -> int:
    """Number of samples of a .beton; clear errors for a missing or unreadable one, before any work."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist (convert one with: python -m data_prep.write_ffcv)")
    from ffcv.reader import Reader

    try:
        return Reader(str(path)).num_samples
    except Exception as err:  # FFCV raises assorted errors for truncated/foreign files
        raise ValueError(f"{path} is not a readable FFCV .beton ({type(err).__name__}: {err})") from err
