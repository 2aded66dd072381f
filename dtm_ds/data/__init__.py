"""The pretraining input pipeline: FFCV (default) or torchvision sources, in the run's global order, augmented on
the device, with BEiT block masks. Modules: ``loader`` (PretrainLoader, LoaderSpec from the Config), ``order``
(epoch order and chunks), ``augment`` (flip, jitter, normalisation), ``crops`` (seeded boxes), ``masking``,
``ffcv_source`` and ``folder_source`` (the two backends, imported only when used).

Determinism: the *global* sample order is a function of (seed, epoch) alone. Each optimizer step takes
the next global batch of ``batch_size x accum x world`` samples and cuts it into chunks of
``batch_size`` (a micro-batch each); rank r runs chunks ``r*accum .. r*accum + accum - 1`` as its
micro-steps. So a chunk's samples depend on (seed, epoch, step, chunk) only, and 2 ranks x accumulation
1 run the same chunks as 1 rank x accumulation 2 (elastic resume). Flips, colour jitter and masks are
functions of (seed, epoch, sample); crops are functions of (seed, epoch, sample) with the torchvision
backend and of (seed, sample, its chunk's first and last ids) with FFCV, whose decoder sees no epoch. So
a run resumed at (epoch, batch) sees exactly the batches it would have seen, and FFCV's decode threads
never share a random state.
"""

from dtm_ds.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment_on_device, normalize
from dtm_ds.data.loader import LoaderSpec, PretrainLoader, check_beton, check_source, loader_spec
from dtm_ds.data.order import epoch_order

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "LoaderSpec", "PretrainLoader", "augment_on_device", "check_beton",
    "check_source", "epoch_order", "loader_spec", "normalize",
]  # fmt: skip
