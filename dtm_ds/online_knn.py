"""Online k-NN during pretraining: representation quality while the run goes, not only the loss.

Every ``run.knn_every`` steps (a multiple of ``run.log_every``; off by default) the student's encoder gives the
probes' features (the mean of its final-normalised patch tokens, dtm_ds/features.py) for a held-out training and
evaluation set (``run.knn_train``, ``run.knn_val``: data_prep sources, the first ``run.knn_per_class`` images of
every class). Each rank extracts its share (``distributed.shard``); the training features are gathered; each rank
votes for its share of the evaluation images and the counts are summed (``features.knn_over_ranks``, as
eval/knn.py does: DINO's k = 20, T = 0.07). The logging row of that step gets ``knn_top1`` and ``knn_seconds``;
that time is excluded from its img/s. The features depend only on the weights, so a resumed run logs the same
numbers at the same steps.
"""

import time

import torch

from dtm_ds import distributed, faults
from dtm_ds.config import RunConfig

__all__ = ["OnlineKNN", "check_online_knn"]

K, TEMPERATURE = 20, 0.07


def check_online_knn(run: RunConfig, zero_stage: int) -> None:
    """Clear errors before any compute for settings the online k-NN cannot run with."""
    if not run.knn_every:
        return
    if not (run.knn_train and run.knn_val):
        raise ValueError(f"run.knn_every={run.knn_every} needs --run.knn_train and --run.knn_val (data_prep sources, "
                         "e.g. an image folder, or fashion_mnist)")  # fmt: skip
    if run.knn_every % run.log_every:
        raise ValueError(f"run.knn_every={run.knn_every} must be a multiple of run.log_every={run.log_every} "
                         "(its figures go into that step's logging row)")  # fmt: skip
    if zero_stage == 3:
        raise ValueError("run.knn_every needs ZeRO stage 0-2: under ZeRO-3 every rank would have to run the same "
                         "number of forward passes over unequal shares")  # fmt: skip


class OnlineKNN:
    """The two sets, opened once (their errors come before training); ``__call__(student)`` at a k-NN step."""

    def __init__(self, run: RunConfig, device: torch.device):
        from data_prep.datasets import open_listing
        from data_prep.sources import select

        self.device, self.crop_ratio = device, run.knn_crop_ratio
        val_split = "test" if run.knn_val == "fashion_mnist" else "val"
        self.train = select(open_listing(run.knn_train, "train"), per_class=run.knn_per_class)
        self.val = select(open_listing(run.knn_val, val_split), per_class=run.knn_per_class)
        self.classes = len(self.train.classes)

    def __call__(self, student: torch.nn.Module, step: int) -> dict[str, float]:
        """``{"knn_top1": %, "knn_seconds": s}`` at step ``step`` (every rank: a collective). A stop signal
        meanwhile is honoured as always, at the end of the next window."""
        from dtm_ds.features import extract, knn_over_ranks

        started, was_training = time.perf_counter(), student.training
        try:
            train_x, train_y = self._share(student, self.train, extract)
            faults.knn_signal(step)
            val_x, val_y = self._share(student, self.val, extract)
        finally:
            student.train(was_training)
        train_x = distributed.gather_sharded(train_x, len(self.train))
        train_y = distributed.gather_sharded(train_y, len(self.train))
        keep, val_keep = train_y >= 0, val_y >= 0  # unreadable images are left out (counted by the probes)
        top1, _ = knn_over_ranks(train_x[keep], train_y[keep], val_x[val_keep], val_y[val_keep], K, TEMPERATURE,
                                 self.classes, self.device)  # fmt: skip
        return {"knn_top1": top1, "knn_seconds": time.perf_counter() - started}

    def _share(self, student, listing, extract):
        mine = listing.subset(list(distributed.shard(len(listing))))
        return extract(student, mine, crop_ratio=self.crop_ratio, batch=128, workers=0, name="online k-NN",
                       device=self.device, progress=False)  # fmt: skip
