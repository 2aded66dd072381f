import numpy as np
import pytest
from scipy import ndimage

from dtm_ds.data.masking import BlockMasking


def _mean_component_size(masks: np.ndarray, grid) -> float:
    sizes = []
    for m in masks:
        labels, count = ndimage.label(m.reshape(grid))
        sizes += np.bincount(labels.ravel())[1:].tolist()
    return float(np.mean(sizes))


@pytest.mark.parametrize("grid,num", [((14, 14), 75), ((14, 14), 0), ((14, 14), 196), ((4, 4), 6), ((8, 6), 20)])
def test_exact_counts(grid, num):
    gen = BlockMasking(grid=grid, num_masked=num, min_block=min(16, max(num, 1)))
    masks = gen.batch(64, np.random.default_rng(0))
    assert masks.shape == (64, grid[0] * grid[1]) and masks.dtype == bool
    assert (masks.sum(1) == num).all()


def test_seeded():
    gen = BlockMasking()
    a = gen.batch(8, np.random.default_rng(3))
    b = gen.batch(8, np.random.default_rng(3))
    c = gen.batch(8, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({m.tobytes() for m in a}) == 8  # samples differ from each other


def test_blocky_compared_with_random_masking():
    rng = np.random.default_rng(0)
    block = BlockMasking().batch(200, rng)
    uniform = np.zeros_like(block)
    for row in uniform:
        row[rng.choice(196, 75, replace=False)] = True
    block_size, random_size = _mean_component_size(block, (14, 14)), _mean_component_size(uniform, (14, 14))
    assert block_size > 3 * random_size, (block_size, random_size)
    assert block_size > 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_masked must be in"):
        BlockMasking(grid=(2, 2), num_masked=5)
    with pytest.raises(ValueError, match="min_aspect"):
        BlockMasking(min_aspect=2.0)
