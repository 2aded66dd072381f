"""Pictures of the morphed groups: every patch painted with the mean colour of its group.

python -m dtm_ds visualize RUN_DIR --out groups.png
"""

import torch
import torch.nn.functional as F

from dtm_ds.config import Config
from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD
from dtm_ds.morph import group_mean, morph


def paint_groups(pixels: torch.Tensor, groups: torch.Tensor, patch: int) -> torch.Tensor:
    """pixels [B, 3, H, W], groups [B, N] -> [B, 3, H, W] with each patch the mean colour of its group."""
    b, _, h, w = pixels.shape
    patches = F.unfold(pixels, patch, stride=patch).transpose(1, 2)  # (B, N, 3*p*p)
    colour = patches.view(b, patches.shape[1], 3, -1).mean(-1)  # (B, N, 3)
    painted = group_mean(colour, groups).unsqueeze(-1).expand(-1, -1, -1, patch * patch)
    return F.fold(painted.reshape(b, -1, 3 * patch * patch).transpose(1, 2), (h, w), patch, stride=patch)


def morph_figure(images: torch.Tensor, teacher, config: Config, schedule: torch.Tensor) -> torch.Tensor:
    """[3, rows*H, (1+L)*W] grid: the input, then the groups of every level of ``schedule``."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    pixels = (images.float() * std + mean).clamp(0, 1)
    targets = teacher(images)
    columns = [pixels] + [
        paint_groups(pixels, morph(targets, merges, config.dtm.protect_first), config.model.patch_size)
        for merges in schedule.to(images.device)
    ]
    rows = torch.cat(columns, dim=3)  # (B, 3, H, (1+L)*W)
    return torch.cat(list(rows), dim=1).cpu()


def visualize(run_dir: str, out: str = "groups.png", images: int = 4, seed: int = 0) -> str:
    """Write a PNG of the morphed groups for the first ``images`` pictures of the run's data."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from dtm_ds.config import load_config
    from dtm_ds.data import LoaderSpec, PretrainLoader
    from dtm_ds.morph import sample_schedule
    from dtm_ds.teacher import build_teacher

    config = load_config(Path(run_dir) / "config.json")
    m, d = config.model, config.data
    spec = LoaderSpec(
        path=d.path,
        batch_size=images,
        image_size=m.img_size,
        patch_size=m.patch_size,
        num_masked=d.num_masked,
        min_mask_block=d.min_mask_block,
        backend=d.backend,
        workers=0 if d.backend == "torchvision" else 1,
        jitter=0.0,
        seed=seed,
    )
    batch = next(iter(PretrainLoader(spec).epoch(0)))
    teacher = build_teacher(config.teacher, m, torch.device("cpu"))
    schedule = sample_schedule(config.dtm.n_max, config.dtm.k_max, torch.Generator().manual_seed(seed))
    grid = morph_figure(batch["images"], teacher, config, schedule)
    scale = max(1, 256 // m.img_size)
    picture = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(out)
    return out
