"""The pretraining loader: batches of augmented images and masks from an FFCV .beton or a data_prep
source, in the run's global order (dtm_ds/data/order.py), on the training device."""

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np
import torch

from dtm_ds.config import Config
from dtm_ds.data.augment import augment_on_device, normalize
from dtm_ds.data.masking import BlockMasking
from dtm_ds.data.order import epoch_order
from dtm_ds.data.spec import LoaderSpec, check_beton
from dtm_ds.devices import cap_workers, to_device

__all__ = ["LoaderSpec", "PretrainLoader", "check_beton", "check_source", "loader_spec"]


class PretrainLoader:
    """Batches of {"images": float [B, 3, S, S] normalised, "masks": bool [B, N], "labels": long [B]}.

    ``epoch(e, start_batch)`` iterates epoch ``e`` from batch ``start_batch`` (a resumed run);
    ``windows(e, w)`` the optimizer windows from window ``w`` of epoch ``e`` on, over every epoch.
    """

    def __init__(self, spec: LoaderSpec, device: torch.device | str = "cpu"):
        spec = dataclasses.replace(spec, workers=cap_workers(spec.workers, f"{spec.backend} loader"))
        self.spec, self.device = spec, torch.device(device)
        self.masking = BlockMasking(spec.grid, spec.num_masked, min(spec.min_mask_block, max(spec.num_masked, 1)))
        self.source = _source(spec, self.device)
        self.batches_per_epoch = len(epoch_order(self.source.num_samples, spec, 0)) // spec.batch_size

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        bs = self.spec.batch_size
        order = epoch_order(self.source.num_samples, self.spec, epoch)[start_batch * bs :]
        for k, (images, labels) in enumerate(self.source.batches(order, epoch)):
            rngs = [np.random.default_rng([self.spec.seed, epoch, int(i)]) for i in order[k * bs : (k + 1) * bs]]
            draws = torch.from_numpy(np.stack([r.random(4) for r in rngs]))  # (B, 4) flip + jitter uniforms
            masks = torch.from_numpy(np.stack([self.masking(r).reshape(-1) for r in rngs]))  # (B, N)
            x = normalize(augment_on_device(self._to_device(images), self._to_device(draws), self.spec.jitter))
            yield {"images": x, "masks": self._to_device(masks), "labels": self._to_device(labels)}

    @property
    def windows_per_epoch(self) -> int:
        return self.batches_per_epoch // self.spec.accum

    def windows(self, epoch: int, window: int) -> Iterator[tuple[int, int, Iterator[dict[str, torch.Tensor]]]]:
        """``(epoch, window, its accum micro-batches)`` from window ``window`` of ``epoch`` on, without end; an
        epoch's leftover micro-batches (fewer than a window) are not used."""
        while True:
            batches = self.epoch(epoch, window * self.spec.accum)
            for w in range(window, self.windows_per_epoch):
                yield epoch, w, itertools.islice(batches, self.spec.accum)
            epoch, window = epoch + 1, 0

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return to_device(t, self.device)


def check_source(spec: LoaderSpec) -> None:
    """The data of ``spec`` opens (a .beton's header, a source's listing): a clear error before any set-up."""
    if spec.backend == "ffcv":
        check_beton(spec.path)
    else:
        from data_prep.sources import detect

        detect(spec.path, "train")


def _source(spec: LoaderSpec, device: torch.device):
    """The backend's source, imported only when used: a machine without FFCV can train from a folder."""
    if spec.backend == "ffcv":
        from dtm_ds.data.ffcv_source import FFCVSource

        return FFCVSource(spec, device)
    from dtm_ds.data.folder_source import FolderSource

    return FolderSource(spec, device)


def loader_spec(config: Config, ds_config: dict, rank: int = 0, world: int = 1) -> LoaderSpec:
    """The LoaderSpec of a pretraining run: its data and model settings, this rank's place."""
    d, m = config.data, config.model
    return LoaderSpec(
        path=d.path,
        batch_size=ds_config["train_micro_batch_size_per_gpu"],
        image_size=m.img_size,
        patch_size=m.patch_size,
        min_crop_scale=d.min_crop_scale,
        jitter=d.jitter,
        num_masked=d.num_masked,
        min_mask_block=d.min_mask_block,
        seed=config.run.seed,
        rank=rank,
        world=world,
        accum=ds_config["gradient_accumulation_steps"],
        workers=d.workers,
        backend=d.backend,
    )
