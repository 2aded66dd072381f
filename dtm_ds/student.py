"""BEiT-style student: timm's Beit plus a mask token and a prediction head to the teacher's width."""

import torch
from timm.models.beit import Beit
from torch import nn

from dtm_ds.config import ModelConfig


class DTMStudent(Beit):
    """timm ``Beit`` (shared relative position bias, no absolute position embedding, layer scale) whose
    masked patch embeddings are replaced by a learned mask token; all tokens go through the encoder.

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
            use_shared_rel_pos_bias=True,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.lm_head = nn.Linear(cfg.embed_dim, target_dim)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
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
