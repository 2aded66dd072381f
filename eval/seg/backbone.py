"""The dtm_ds encoder as an mmseg backbone: a timm BEiT whose blocks give four feature maps.

``DTMBEiT`` takes the parts of the timm ``Beit`` that eval/classifier.py builds and loads (one relative
position table per block, resized to the segmentation window by timm's BEiT filter), and lays them out
as ``patch_embed``, ``cls_token`` and ``layers``, the names mmseg's ``LearningRateDecayOptimizerConstructor``
numbers layers by (``layer_wise_vit``). The class name contains "BEiT" for the same reason.
The Feature2Pyramid neck turns the four maps into strides 4/8/16/32.
"""

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch.utils.checkpoint import checkpoint

from dtm_ds.config import ModelConfig, build_config
from dtm_ds.pretrained import encoder_config
from eval.classifier import build_classifier, load_pretrained


def default_out_indices(depth: int) -> list[int]:
    """Blocks 3, 5, 7, 11 of 12 (BEiT/MAE segmentation), scaled to other depths: 24 -> 7, 11, 15, 23."""
    return [max(round(depth * f / 12) - 1, 0) for f in (4, 6, 8, 12)]


@MODELS.register_module()
class DTMBEiT(BaseModule):
    """Args:
    encoder: a dtm_ds run directory or export (weights and architecture), or None for random init.
    arch: a dtm_ds preset name (tiny, vits, vitb, ...) used when ``encoder`` is None.
    img_size: the square window the relative position tables are sized for (the crop size).
    out_indices: blocks whose outputs form the pyramid; default ``default_out_indices(depth)``.
    """

    def __init__(
        self,
        encoder: str | None = None,
        arch: str | None = None,
        img_size: int = 512,
        drop_path_rate: float = 0.1,
        out_indices: list[int] | None = None,
        grad_checkpointing: bool = False,
        init_cfg=None,
    ):
        super().__init__(init_cfg)
        if (encoder is None) == (arch is None):
            raise ValueError(f"give exactly one of encoder (weights) or arch (random init); got {encoder=} {arch=}")
        model: ModelConfig = encoder_config(encoder) if encoder else build_config(arch).model
        if img_size % model.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {model.patch_size}")
        vit = build_classifier(model, num_classes=0, drop_path=drop_path_rate, img_size=img_size)
        if encoder:
            report = load_pretrained(vit, encoder)
            print_log(f"DTMBEiT: loaded {encoder}; new (unused here): {report['missing']}", logger="current")
        self.img_size, self.patch_size, self.embed_dim = img_size, model.patch_size, model.embed_dim
        self.patch_embed, self.cls_token, self.layers = vit.patch_embed, vit.cls_token, vit.blocks
        self.out_indices = list(out_indices) if out_indices is not None else default_out_indices(model.depth)
        if not all(0 <= i < model.depth for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} must lie in 0..{model.depth - 1}")
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, _, h, w = x.shape
        if h > self.img_size or w > self.img_size:
            raise ValueError(f"input {h}x{w} is larger than the window {self.img_size} (use slide inference)")
        # Smaller inputs (slide windows on small images) are zero-padded to the window the tables fit.
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        grid = self.img_size // self.patch_size
        gh, gw = -(-h // self.patch_size), -(-w // self.patch_size)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        outs = []
        for i, block in enumerate(self.layers):
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
            if i in self.out_indices:
                fmap = x[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, grid, grid)
                outs.append(fmap[:, :, :gh, :gw].contiguous())
        return tuple(outs)
