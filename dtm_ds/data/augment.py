"""Augmentation on the device (flip, colour jitter) and normalisation with ImageNet statistics."""

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "augment_on_device", "normalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """[B, 3, H, W] in [0, 1] -> normalised with per-channel mean/std: sequences (made into tensors here) or
    [1, 3, 1, 1] tensors on ``x``'s device, made once by the caller (``Normalize``), so no batch copies
    constants to the device."""
    if not isinstance(mean, torch.Tensor):
        mean, std = Normalize(mean, std, x.device, x.dtype).mean_std
    return (x - mean) / std


class Normalize:
    """``normalize`` with its constants made once on ``device`` (from the host: the only copy they need)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu", dtype=torch.float32):
        self.mean_std = tuple(torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device) for v in (mean, std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, *self.mean_std)
