"""The run's global sample order, cut into this rank's micro-batches (see dtm_ds/data/__init__.py)."""

import numpy as np

from dtm_ds.data.spec import LoaderSpec

__all__ = ["epoch_order"]


def epoch_order(num_samples: int, spec: LoaderSpec, epoch: int) -> np.ndarray:
    """This rank's sample ids for ``epoch``, micro-batch after micro-batch (full global batches only).

    The (seed, epoch) permutation is cut into global batches of micro x accum x world samples, each into
    ``accum x world`` chunks; this rank takes its ``accum`` consecutive chunks of every global batch."""
    chunks = spec.accum * spec.world
    steps = num_samples // (spec.batch_size * chunks)
    if steps == 0:
        raise ValueError(
            f"the global batch ({spec.batch_size} per rank x accumulation {spec.accum} x {spec.world} ranks) "
            f"is larger than the {num_samples} samples of {spec.path}"
        )
    perm = np.random.default_rng([spec.seed, epoch]).permutation(num_samples)
    per_step = perm[: steps * spec.batch_size * chunks].reshape(steps, chunks, spec.batch_size)
    return per_step[:, spec.rank * spec.accum : (spec.rank + 1) * spec.accum].reshape(-1)
