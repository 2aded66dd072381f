"""The pretraining loader: batches of augmented images and masks from an FFCV .beton or a data_prep
source, in the run's global order (dtm_ds/data/order.py), on the training device."""

import atexit
import contextlib
import dataclasses
import hashlib
import itertools
import json
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from dtm_ds.config import Config
from dtm_ds.data.augment import Normalize, augment_on_device
from dtm_ds.data.masking import BlockMasking
from dtm_ds.data.order import epoch_order
from dtm_ds.data.spec import LoaderSpec, check_beton
from dtm_ds.devices import cap_workers, to_device

__all__ = ["LoaderSpec", "PretrainLoader", "check_beton", "check_source", "loader_spec"]


class PretrainLoader:
    """Batches of {"images": float [B, 3, S, S] normalised, "masks": bool [B, N], "labels": long [B]}.

    ``epoch(e, start_batch)`` iterates epoch ``e`` from batch ``start_batch`` (a resumed run);
    ``windows(e, w)`` the optimizer windows from window ``w`` of epoch ``e`` on, over every epoch.

    A background thread prepares up to ``AHEAD`` batches ahead of the step: it takes the source's decoded
    crops, draws each sample's flip, jitter and mask, copies the batch to the device (on CUDA: from pinned
    memory on a stream of its own) and augments it there, so the training thread never waits for a mask
    or a copy. The batches are the same whatever the thread's timing (all draws are keyed by sample).
    """

    AHEAD = 2

    def __init__(self, spec: LoaderSpec, device: torch.device | str = "cpu"):
        spec = dataclasses.replace(spec, workers=cap_workers(spec.workers, f"{spec.backend} loader"))
        self.spec, self.device = spec, torch.device(device)
        self.masking = BlockMasking(spec.grid, spec.num_masked, min(spec.min_mask_block, max(spec.num_masked, 1)))
        self.source = _source(spec, self.device)
        self.batches_per_epoch = len(epoch_order(self.source.num_samples, spec, 0)) // spec.batch_size
        self.normalize = Normalize(device=self.device)  # the constants once, not per batch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        bs = self.spec.batch_size
        order = epoch_order(self.source.num_samples, self.spec, epoch)[start_batch * bs :]

        def prepare():
            for k, (images, labels) in enumerate(self.source.batches(order, epoch)):
                rngs = [np.random.default_rng([self.spec.seed, epoch, int(i)]) for i in order[k * bs : (k + 1) * bs]]
                yield self._prepare(images, labels, rngs)

        yield from _Ahead(prepare, self.AHEAD, self.device)

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor, rngs: list) -> dict[str, torch.Tensor]:
        """One batch on the device: the samples' draws and masks (host), the copy, the augmentation."""
        draws = torch.from_numpy(np.stack([r.random(4) for r in rngs]))  # (B, 4) flip + jitter uniforms
        masks = torch.from_numpy(np.stack([self.masking(r).reshape(-1) for r in rngs]))  # (B, N)
        images, draws, masks, labels = (to_device(t, self.device) for t in (images, draws, masks, labels))
        return {"images": self.normalize(augment_on_device(images, draws, self.spec.jitter)), "masks": masks,
                "labels": labels}  # fmt: skip

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


class _Ahead:
    """Iterates ``produce()`` in a daemon thread, up to ``depth`` items ahead; an error there is raised here,
    at the item where it happened. On CUDA the thread works on a stream of its own and each item carries an
    event: the consumer's stream waits for it (no host sync), and the tensors are marked as used there (the
    allocator does not hand their memory back to the producer's stream early). Leaving the loop early (or
    dropping the iterator) stops the thread at its next item."""

    _END = object()
    _live: "weakref.WeakSet[_Ahead]" = weakref.WeakSet()

    def __init__(self, produce: Callable[[], Iterator[dict]], depth: int, device: torch.device):
        self.produce, self.device = produce, device
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dtm-loader-ahead", daemon=True)
        self._live.add(self)
        self.thread.start()

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)  # the current device is per thread: this rank's, not device 0
        stream = torch.cuda.Stream(self.device) if cuda else None
        items = self.produce()
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():  # noqa: SIM117
                for item in items:
                    event = torch.cuda.Event() if cuda else None
                    if cuda:
                        event.record(stream)
                    if not self._put((item, event)):
                        return
        except BaseException as err:  # noqa: BLE001 (handed to the consumer, raised there)
            self._put(err)
            return
        finally:
            items.close()  # the source's own iterators (DataLoader workers, FFCV threads) end here
        self._put(self._END)

    @classmethod
    def stop_all(cls) -> None:
        """At interpreter exit: end every thread still producing (an iterator left unfinished, such as
        ``next(iter(loader.epoch(0)))``) before the runtime tears down under it ("terminate called ...")."""
        for ahead in list(cls._live):
            ahead.stopped.set()
        for ahead in list(cls._live):
            ahead.thread.join(timeout=10)

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[dict]:
        try:
            while (got := self.items.get()) is not self._END:
                if isinstance(got, BaseException):
                    raise got
                item, event = got
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for tensor in item.values():
                        tensor.record_stream(current)
                yield item
        finally:
            self.stopped.set()


atexit.register(_Ahead.stop_all)


def check_source(spec: LoaderSpec) -> dict:
    """The data of ``spec`` opens (a .beton's header, a source's listing): a clear error before any set-up.
    Returns what identifies the data wherever it lives: its sample count and a cheap fingerprint (a .beton:
    its size and first and last MiB; a listing: its file names and labels in order), for the run's records."""
    digest = hashlib.sha256()
    if spec.backend == "ffcv":
        samples, path = int(check_beton(spec.path)), Path(spec.path)
        size = path.stat().st_size
        with path.open("rb") as f:
            digest.update(f"{samples} {size}".encode() + f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    else:
        from data_prep.sources import detect

        listing = detect(spec.path, "train")
        samples = len(listing)
        names = [Path(p).name for p in listing.paths] if listing.paths is not None else [str(listing.arrays.shape)]
        digest.update(json.dumps([listing.labels, names]).encode())
        if listing.arrays is not None:
            digest.update(listing.arrays[:: max(1, samples // 64)].tobytes())
    return {"samples": samples, "fingerprint": digest.hexdigest()[:16]}


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
