"""FFCV source for the pretraining loader: seeded crops in the decoder, our own epoch order."""

import numpy as np
import torch
from ffcv.fields.decoders import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import Squeeze, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from dtm_ds.data.crops import crop_box, sample_key
from dtm_ds.data.spec import LoaderSpec, check_beton

__all__ = ["FFCVSource", "SeededRandomResizedCrop", "damaged_rows"]

# What the decoder writes into the first row of a crop whose JPEG bytes do not decode. FFCV runs decoders in a
# thread that drops their exceptions (the consumer would wait forever) and ignores libjpeg-turbo's status, so
# the crop kept a previous batch's pixels. The consumer looks for this mark instead: 16 random pixels (384
# bits) that no real image row matches by chance.
DAMAGED = np.random.default_rng(0x0D7A).integers(0, 256, (16, 3), dtype=np.uint8)


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCrop decoder with the box drawn from the sample's key (dtm_ds.data.crops) instead of
    numba's per-thread random state, so crops are reproducible and independent of thread scheduling."""

    def __init__(self, output_size, scale, ratio=(3 / 4, 4 / 3), seed: int = 0):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = seed

    def generate_code(self):
        jpg, mem_read, my_range = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        (s_lo, s_hi), (r_lo, r_hi), seed = self.scale, self.ratio, self.seed
        mark = DAMAGED[: min(len(DAMAGED), self.output_size[1])].copy()

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            first, last = batch_indices[0], batch_indices[-1]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    pixels = temp_storage[dst_ix]
                    if imdecode_c(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False) != 0:
                        destination[dst_ix] = 0
                        destination[dst_ix, 0, : len(mark)] = mark
                        continue
                    pixels = pixels.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    pixels = data.reshape(height, width, 3)
                key = sample_key(seed, np.int64(source_ix), np.int64(first), np.int64(last))
                top, left, h, w = crop_box(key, np.int64(height), np.int64(width), s_lo, s_hi, r_lo, r_hi)
                resize_crop_c(pixels, top, top + h, left, left + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class _GivenOrder(TraversalOrder):
    """Traversal order that returns whatever order was set for the next epoch (FFCV calls the instance
    with the loader, then asks for the order of each epoch)."""

    def __init__(self):
        self.order = np.zeros(0, dtype=np.int64)

    def __call__(self, loader):
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int):
        return self.order


class FFCVSource:
    """Decoded uint8 [B, 3, S, S] crops and labels for a given sample order."""

    def __init__(self, spec: LoaderSpec, device: torch.device):
        self.num_samples = check_beton(spec.path)
        self.order = _GivenOrder()
        self.order.order = np.arange(self.num_samples, dtype=np.uint64)  # FFCV sizes its epochs from this
        self.spec = spec
        crop = SeededRandomResizedCrop((spec.image_size, spec.image_size), (spec.min_crop_scale, 1.0), seed=spec.seed)
        self.loader = Loader(
            spec.path,
            batch_size=spec.batch_size,
            num_workers=spec.workers,
            order=self.order,
            pipelines={
                "image": [crop, ToTensor(), ToTorchImage(channels_last=False)],
                "label": [IntDecoder(), ToTensor(), Squeeze()],
            },
            drop_last=True,
            batches_ahead=2,
        )

    def batches(self, order: np.ndarray, epoch: int):
        self.order.order = order.astype(np.uint64)
        self.loader.next_epoch = epoch
        bs = self.spec.batch_size
        for k, (images, labels) in enumerate(self.loader):  # FFCV reuses its output buffers: labels are copied
            damaged = damaged_rows(images)
            if damaged:
                samples = [int(order[k * bs + i]) for i in damaged]
                raise ValueError(
                    f"{self.spec.path}: the JPEG bytes of sample(s) {samples} do not decode (a damaged copy?); "
                    "re-write the .beton with python -m data_prep.write_ffcv, then resume"
                )
            yield images, labels.to(torch.long, copy=True)


def damaged_rows(images: torch.Tensor) -> list[int]:
    """Positions in a uint8 [B, 3, S, S] batch of the crops the decoder marked as undecodable (``DAMAGED``)."""
    width = min(len(DAMAGED), images.shape[-1])
    mark = torch.from_numpy(DAMAGED[:width].T.copy())  # (3, width): channel-first, as the batch
    return torch.nonzero((images[:, :, 0, :width] == mark).flatten(1).all(1)).flatten().tolist()
