"""What the pretraining loader produces: built from the run's Config (``loader.loader_spec``), whose
DataConfig and ModelConfig are the one source of its defaults."""

from dataclasses import dataclass
from pathlib import Path

from dtm_ds.config import DataConfig, ModelConfig

__all__ = ["LoaderSpec", "check_beton"]

_DATA, _MODEL = DataConfig(), ModelConfig()


@dataclass(frozen=True)
class LoaderSpec:
    """What the pretraining loader produces; checked before anything is decoded."""

    path: str
    batch_size: int  # per rank
    image_size: int = _MODEL.img_size
    patch_size: int = _MODEL.patch_size
    min_crop_scale: float = _DATA.min_crop_scale
    jitter: float = _DATA.jitter
    num_masked: int = _DATA.num_masked
    min_mask_block: int = _DATA.min_mask_block
    seed: int = 0
    rank: int = 0
    world: int = 1
    accum: int = 1
    """Micro-batches per optimizer step on each rank (DeepSpeed's gradient_accumulation_steps)."""
    workers: int = _DATA.workers
    backend: str = _DATA.backend  # or "torchvision" (an image folder / any data_prep source)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        DataConfig(backend=self.backend, min_crop_scale=self.min_crop_scale)  # its checks
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, world={self.world})")
        if self.accum < 1:
            raise ValueError(f"gradient accumulation must be >= 1, got {self.accum}")

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


def check_beton(path: str | Path) -> int:
    """Number of samples of a .beton; clear errors for a missing or unreadable one, or one of another field layout,
    before any work."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist (convert one with: python -m data_prep.write_ffcv)")
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as err:  # FFCV raises assorted errors for truncated/foreign files
        raise ValueError(f"{path} is not a readable FFCV .beton ({type(err).__name__}: {err})") from err
    from ffcv.fields import IntField, RGBImageField

    fields = reader.handlers
    layout = {name: type(field).__name__ for name, field in fields.items()}
    if not (isinstance(fields.get("image"), RGBImageField) and isinstance(fields.get("label"), IntField)):
        raise ValueError(
            f"{path} holds the fields {layout}; the loaders read an RGBImageField 'image' and an IntField 'label' "
            "(write it with: python -m data_prep.write_ffcv)"
        )
    return int(reader.num_samples)
