"""Fine-tuning recipes per dataset (a preset each; any field overridable on the command line).

Sources: ImageNet-1K is the BEiT v2 / DTM ViT-B recipe of shared/DESIGN.md §2 (batch 1024, lr 5e-4
absolute at that batch, as BEiT v2's get_started_for_image_classification.md and DTM's Evaluation.md pass
``--lr``; no batch / 256 scaling), layer decay 0.65, drop path 0.1, mixup 0.8, cutmix 1.0, smoothing 0.1,
RandAugment m9, erasing 0.25, 100 epochs). iNaturalist 2018/2019 follow the MAE transfer practice of
reusing the ImageNet recipe (MAE, He et al. 2022, appendix A.3: 100 epochs, layer decay 0.75). The
fine-grained sets follow the common MIM transfer practice for small sets (as in BEiT/iBOT transfer
tables): smaller batch, lower lr, longer schedules. ``fmnist`` is this repository's CPU check on 32 px
Fashion-MNIST (no RandAugment on grey images, no mixup on a few hundred steps).
"""

import dataclasses
from dataclasses import dataclass


@dataclass
class Recipe:
    epochs: int = 100
    """Length of the schedule in epochs."""
    batch_size: int = 1024
    """Global batch; the DeepSpeed JSON's micro batch x accumulation x world must agree."""
    lr: float = 5e-4
    """Peak lr at a global batch of ``lr_batch`` (absolute, as BEiT's and DTM's ``--lr``: 5e-4 at 1024)."""
    lr_batch: int = 1024
    """The global batch ``lr`` is stated at; another batch_size scales it linearly (printed at the start)."""
    min_lr: float = 1e-6
    """Floor of the cosine schedule."""
    warmup_epochs: float = 5
    """Linear warm-up, in epochs."""
    weight_decay: float = 0.05
    """AdamW weight decay (none on 1-D tensors and the CLS token; see decay_tables)."""
    decay_tables: bool = True
    """Weight decay also on the relative-position tables, as BEiT v2 / DTM fine-tune (their
    --disable_weight_decay_on_rel_pos_bias is off); False: timm's rule, none on them."""
    layer_decay: float = 0.65
    """Layer-wise lr decay: block i of L gets layer_decay ** (L + 1 - i) of the head's lr."""
    drop_path: float = 0.1
    """Stochastic depth rate of the last block."""
    img_size: int = 224
    """Training and evaluation resolution."""
    crop_pct: float = 0.875
    """Evaluation: resize to img_size / crop_pct, then centre-crop img_size."""
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range (timm's default)."""
    mixup: float = 0.8
    """Mixup alpha (0: off)."""
    cutmix: float = 1.0
    """CutMix alpha (0: off)."""
    smoothing: float = 0.1
    """Label smoothing."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment policy (None: colour jitter instead)."""
    color_jitter: float = 0.4
    """timm's colour jitter (used when auto_augment is None)."""
    reprob: float = 0.25
    """Random erasing probability."""
    remode: str = "pixel"
    """Random erasing fill: 'pixel' (per-pixel normal noise: BEiT v2's --remode default), 'rand' or 'const'."""
    clip_grad: float = 0.0
    """Gradient clipping norm; 0: none, as BEiT v2 and DTM fine-tune. Replaces the DeepSpeed JSON's value."""


RECIPES = {
    "imagenet": Recipe(warmup_epochs=20),  # ViT-B/16: 100 epochs, 20 warm-up (DESIGN.md §2)
    "inat18": Recipe(layer_decay=0.75),
    "inat19": Recipe(layer_decay=0.75),
    "cub": Recipe(lr_batch=256, epochs=100, batch_size=256, lr=1e-4, layer_decay=0.75, warmup_epochs=10),
    "cars": Recipe(lr_batch=256, epochs=100, batch_size=256, lr=2e-4, layer_decay=0.75, warmup_epochs=10),
    "aircraft": Recipe(lr_batch=256, epochs=100, batch_size=256, lr=2e-4, layer_decay=0.75, warmup_epochs=10),
    "flowers": Recipe(lr_batch=256, epochs=200, batch_size=256, lr=1e-4, layer_decay=0.75, warmup_epochs=10),
    "pets": Recipe(lr_batch=256, epochs=100, batch_size=256, lr=1e-4, layer_decay=0.75, warmup_epochs=10),
    "fmnist": Recipe(
        epochs=5,
        batch_size=64,
        lr=1.25e-3,
        lr_batch=64,
        warmup_epochs=0.5,
        layer_decay=0.9,
        drop_path=0.0,
        img_size=32,
        crop_pct=1.0,
        scale=(0.5, 1.0),
        mixup=0.0,
        cutmix=0.0,
        auto_augment=None,
        color_jitter=0.0,
        reprob=0.0,
    ),
}

LARGE = {"layer_decay": 0.8, "drop_path": 0.2, "epochs": 50, "warmup_epochs": 5}
"""ImageNet ViT-L/16 after 300-epoch pretraining (BEiT v2 get_started_for_image_classification.md; DTM's
Evaluation.md): lr 5e-4 at 1024 as for ViT-B, layer decay 0.8, drop path 0.2, 50 epochs, 5 warm-up."""


def recipe_for(dataset: str, depth: int) -> Recipe:
    """The recipe of ``dataset`` for an encoder of ``depth`` blocks: ImageNet deeper than 12 blocks takes
    the ViT-L values; other sets have one recipe."""
    recipe = RECIPES[dataset]
    return dataclasses.replace(recipe, **LARGE) if dataset == "imagenet" and depth > 12 else recipe
