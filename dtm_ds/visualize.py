"""Pictures of the morphed groups, as in the paper's figures: one panel per level, each group in its own
colour over the (grey) image, with its boundary drawn.

python -m dtm_ds visualize RUN_DIR --out groups.png
"""

import torch

from dtm_ds.config import Config
from dtm_ds.data import IMAGENET_MEAN, IMAGENET_STD
from dtm_ds.morph import morph_levels

__all__ = ["GOLDEN", "group_colours", "morph_figure", "paint_groups", "panel_titles", "picture_spec", "visualize"]

GOLDEN = 0.6180339887498949


def group_colours(groups: torch.Tensor) -> torch.Tensor:
    """[B, N] group ids -> [B, N, 3] RGB in [0, 1]: one colour per id (hues a golden-ratio step apart, so
    neighbouring ids differ), the same for every token of a group."""
    hue = (groups.double() * GOLDEN) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64, device=groups.device) + hue.unsqueeze(-1) * 6) % 6
    saturation, value = 0.75, 0.95
    return (value - value * saturation * (torch.minimum(k, 4 - k).clamp(0, 1))).float()  # HSV -> RGB


def _boundaries(groups: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """[B, N] group ids on a ``grid`` x ``grid`` patch layout -> bool [B, grid*patch, grid*patch]: the
    last pixel column (row) of every patch whose right (lower) neighbour is in another group."""
    ids = groups.view(-1, grid, grid)
    right = torch.zeros_like(ids, dtype=torch.bool)
    below = torch.zeros_like(ids, dtype=torch.bool)
    right[:, :, :-1] = ids[:, :, :-1] != ids[:, :, 1:]
    below[:, :-1, :] = ids[:, :-1, :] != ids[:, 1:, :]
    last = torch.arange(grid * patch, device=groups.device) % patch == patch - 1
    up = lambda m: m.repeat_interleave(patch, 1).repeat_interleave(patch, 2)  # noqa: E731
    return up(right) & last.view(1, 1, -1) | up(below) & last.view(1, -1, 1)


def paint_groups(pixels: torch.Tensor, groups: torch.Tensor, patch: int) -> torch.Tensor:
    """pixels [B, 3, H, W] in [0, 1], groups [B, N] -> [B, 3, H, W]: the image in grey, tinted with its
    group's colour (55 %), and white lines where groups meet."""
    b, _, h, w = pixels.shape
    grid = h // patch
    colour = group_colours(groups).transpose(1, 2).reshape(b, 3, grid, grid)
    colour = colour.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    grey = (0.299 * pixels[:, 0:1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:3]).expand(-1, 3, -1, -1)
    painted = 0.45 * grey + 0.55 * colour
    return torch.where(_boundaries(groups, grid, patch).unsqueeze(1), torch.ones_like(painted), painted)


def morph_figure(images: torch.Tensor, teacher, config: Config, schedule: torch.Tensor) -> torch.Tensor:
    """[3, header + rows*H' + footer, (1+L)*W'] picture: the input, then one panel per level of ``schedule``,
    each titled with its level and its sampled n (tokens merged) and k (merging iterations); a footer says
    what the colours and lines are and, with ``dtm.protect_first``, that the top-left patch (the first
    token) never merges (the reference's behaviour). Small images are enlarged (nearest) to about 224 px
    first, so boundaries stay one pixel wide."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    scale = max(1, 224 // images.shape[-1])
    pixels = (images.float() * std + mean).clamp(0, 1)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    schedule = schedule.to(images.device)
    morphed = morph_levels(teacher(images), schedule, config.dtm.protect_first)
    patch = config.model.patch_size * scale
    columns = [pixels] + [paint_groups(pixels, groups, patch) for groups in morphed.groups]
    rows = torch.cat(columns, dim=3)  # (B, 3, H', (1+L)*W')
    body = torch.cat(list(rows), dim=1).cpu()
    width = pixels.shape[-1]
    titles = panel_titles(schedule)
    legend = "colour: a group of tokens; white line: where groups meet"
    if config.dtm.protect_first:
        legend += "; the top-left patch (the first token) never merges"
    header = _text([(i * width + 4, title) for i, title in enumerate(titles)], body.shape[-1])
    return torch.cat([header, body, _text([(4, legend)], body.shape[-1])], dim=1)


def panel_titles(schedule: torch.Tensor) -> list[str]:
    """The picture's column titles: the input, then per level its sampled n (tokens merged, the sum of the
    schedule's row) and k (merging iterations, its non-zero entries)."""
    levels = [f"level {i + 1}: n={int(row.sum())}, k={int((row > 0).sum())}" for i, row in enumerate(schedule)]
    return ["input (one row per image)", *levels]


def _text(items: list[tuple[int, str]], width: int, height: int = 16) -> torch.Tensor:
    """[3, height, width] white strip with each ``(x, text)`` written in black (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    for x, text in items:
        draw.text((x, 2), text, fill="black")
    return torch.frombuffer(bytearray(strip.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1) / 255


def visualize(run_dir: str, out: str = "groups.png", images: int = 4, seed: int = 0) -> str:
    """Write a PNG of the morphed groups for the first ``images`` pictures of the run's data.

    Args:
        run_dir: a pretraining run folder (its latest checkpoint: the teacher and the data of its config).
        out: the PNG to write.
        images: how many pictures (rows).
        seed: of the pictures' crops and of the sampled schedule.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from dtm_ds.config import load_config
    from dtm_ds.data import PretrainLoader
    from dtm_ds.morph import sample_schedule
    from dtm_ds.teacher import build_teacher

    config = load_config(Path(run_dir) / "config.json")
    m = config.model
    spec = picture_spec(config, images, seed)
    batch = next(iter(PretrainLoader(spec).epoch(0)))
    teacher = build_teacher(config.teacher, m, torch.device("cpu"))
    schedule = sample_schedule(config.dtm.n_max, config.dtm.k_max, torch.Generator().manual_seed(seed))
    grid = morph_figure(batch["images"], teacher, config, schedule)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out)
    return out


def picture_spec(config, images: int, seed: int):
    """The run's own loader settings (crop scale, masks, backend) for ``images`` pictures, without colour
    jitter (the picture shows the crops and groups, not the jitter)."""
    import dataclasses

    from dtm_ds.data import loader_spec

    spec = loader_spec(config, {"train_micro_batch_size_per_gpu": images, "gradient_accumulation_steps": 1})
    return dataclasses.replace(spec, jitter=0.0, seed=seed, workers=0 if spec.backend == "torchvision" else 1)
