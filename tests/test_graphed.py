import subprocess

import torch

from bench.morph_reference import canonical
from dtm_ds.graphed import GraphedMorph
from dtm_ds.morph import dtm_loss, morphed_loss, sample_schedule


def test_eager_morph_equals_dtm_loss():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 49, 8, generator=gen), torch.randn(3, 49, 8, generator=gen)
    graphed = GraphedMorph(cuda_graph=True)  # CPU: falls back to eager
    for _ in range(3):
        schedule = sample_schedule([49, 30], [7, 3], gen)
        morphed = graphed(target, schedule)
        assert morphed.groups.shape == (2, 3, 49)
        want = [[len(set(row.tolist())) for row in level] for level in morphed.groups]  # distinct ids per sample
        assert morphed.counts().tolist() == want
        assert (morphed.counts() < 49).any()  # something merged in these draws
        torch.testing.assert_close(
            morphed_loss(pred, target, morphed, "l2", 2.0), dtm_loss(pred, target, schedule, "l2", per_level=True)
        )


def test_compiled_morph_equals_eager_without_recompiling():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 64, 8, generator=gen)
    eager, compiled = GraphedMorph(), GraphedMorph(compile="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            schedule = sample_schedule([64, 64], [8, 8], gen)
            (a, _), (b, slots) = eager(target, schedule), compiled(target, schedule)
            assert slots == [64, 64]  # traced: static width
            for x, y in zip(a.flatten(0, 1), b.flatten(0, 1), strict=True):
                assert canonical(x.tolist()) == canonical(y.tolist())


def test_gpu_check_cpu_dry_run():
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry_run"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "partitions equal: 20/20" in done.stdout  # the static path against the slow reference
