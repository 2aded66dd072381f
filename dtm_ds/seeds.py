"""Seeds from integer keys: every random draw of a run (sample order, per-sample augmentation, crops, drop path,
the DTM schedule) is keyed by (seed, epoch or window, sample or chunk), so resume and world size change nothing."""

import numpy as np

__all__ = ["seed_of"]


def seed_of(*keys: int, bits: int = 63) -> int:
    """A seed of ``bits`` bits from integer keys (numpy's SeedSequence mixes them: no collisions between
    nearby keys). 32 bits for ``np.random.seed``; 63 for torch."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> np.uint64(64 - bits))
