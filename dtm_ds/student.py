"""BEiT-style student: timm's Beit plus a mask token and a prediction head to the teacher's width."""

import torch
from timm.models.beit import Beit
from torch import nn

from dtm_ds.config import ModelConfig

__all__ = ["DTMStudent"]


class DTMStudent(Beit):
    """timm ``Beit`` (relative position bias per ``cfg.rel_pos_bias``, no absolute position embedding,
    layer scale) whose masked patch embeddings are replaced by a learned mask token; all tokens go
    through the encoder. ``cfg.init='reference'`` re-initialises it as the reference does.

    ``forward(images [B, 3, H, W], mask bool [B, N]) -> [B, N, target_dim]`` (final norm, CLS dropped,
    linear head). Without a mask it is the plain encoder.
    """

    def __init__(self, cfg: ModelConfig, target_dim: int):
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            num_classes=0,
            global_pool="token",  # keeps timm's final norm on all tokens (no fc_norm)
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            drop_path_rate=cfg.drop_path,
            init_values=cfg.layer_scale,
            use_abs_pos_emb=False,
            use_rel_pos_bias=cfg.rel_pos_bias in ("both", "block"),
            use_shared_rel_pos_bias=cfg.rel_pos_bias in ("both", "shared"),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.lm_head = nn.Linear(cfg.embed_dim, target_dim)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        if cfg.init == "reference":
            _reference_init(self)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1 + N, D] normalised tokens; masked patches enter the encoder as the mask token."""
        if mask is None:
            return super().forward_features(x)

        def replace_masked(module, args, tokens):  # (B, N, D) patch embeddings
            return torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)

        hook = self.patch_embed.register_forward_hook(replace_masked)
        try:
            return super().forward_features(x)
        finally:
            hook.remove()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.forward_features(x, mask)[:, self.num_prefix_tokens :])

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict that timm's ``Beit`` with the same architecture loads (no mask token, no head)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("mask_token", "lm_head"))}


@torch.no_grad()
def _reference_init(model: Beit, std: float = 0.02) -> None:
    """The reference's init (models/modeling_dtm.py): every linear and convolution weight, the CLS and mask
    tokens drawn from a normal of ``std`` truncated at +-std (an effective std of about 0.54 std), biases
    zero, then BEiT's rescale of each block's output projections by 1 / sqrt(2 * block number). Norms
    keep (1, 0) and relative-position tables zero, as built."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=std, a=-std, b=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for token in (model.cls_token, getattr(model, "mask_token", None)):
        if token is not None:
            nn.init.trunc_normal_(token, std=std, a=-std, b=std)
    model.fix_init_weight()
