"""torchvision source for the pretraining loader: any data_prep source through a DataLoader.

For machines without FFCV and as the benchmark's baseline; same crops rule (dtm_ds.data.crops), bicubic."""

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from data_prep.sources import detect
from dtm_ds.data.crops import crop_box, sample_key
from dtm_ds.data.spec import LoaderSpec
from dtm_ds.devices import quiet_worker

__all__ = ["FolderSource"]


class _CropDataset(Dataset):
    def __init__(self, spec: LoaderSpec):
        self.listing = detect(spec.path, "train")
        self.spec = spec

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, item: tuple[int, int]):
        index, key = item
        image = torch.from_numpy(self.listing.image(index)).permute(2, 0, 1)  # (3, H, W) uint8
        s = self.spec
        top, left, h, w = crop_box(key, image.shape[1], image.shape[2], s.min_crop_scale, 1.0, 3 / 4, 4 / 3)
        size = [s.image_size, s.image_size]
        crop = TF.resized_crop(image, top, left, h, w, size, TF.InterpolationMode.BICUBIC, antialias=True)
        return crop, self.listing.labels[index]


class FolderSource:
    """Decoded uint8 [B, 3, S, S] crops and labels for a given sample order, from worker processes."""

    def __init__(self, spec: LoaderSpec, device: torch.device):
        self.dataset = _CropDataset(spec)
        self.spec, self.device = spec, device
        self.num_samples = len(self.dataset)

    def batches(self, order: np.ndarray, epoch: int):
        items = [(int(i), sample_key(self.spec.seed, int(i), epoch, 0)) for i in order]  # crops keyed by epoch
        loader = DataLoader(
            self.dataset,
            batch_size=self.spec.batch_size,
            sampler=items,
            num_workers=self.spec.workers,
            drop_last=True,
            worker_init_fn=quiet_worker,  # a job-wide SIGTERM is the main process's to handle
            pin_memory=self.device.type == "cuda",  # batches land in pinned memory: the copy to the GPU is async
        )
        for images, labels in loader:
            yield images, labels.long()
