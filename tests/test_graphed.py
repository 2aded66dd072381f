import os
import subprocess

import pytest
import torch

from bench.morph_reference import canonical, reference_groups, reference_loss
from dtm_ds.graphed import GraphedMorph
from dtm_ds.morph import morphed_loss, sample_schedule


def test_graphed_morph_on_cpu_equals_the_slow_reference():
    """GraphedMorph's groups and per-level losses against bench/morph_reference.py (one sample, one group at
    a time), not against another entry point of the same code."""
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
        for level, merges in enumerate(schedule):
            want_groups = [canonical(reference_groups(t, merges.tolist())) for t in target]
            assert [canonical(g.tolist()) for g in morphed.groups[level]] == want_groups
        want = torch.stack([reference_loss(pred, target, schedule[i : i + 1], "l2") for i in range(2)])
        torch.testing.assert_close(morphed_loss(pred, target, morphed, "l2", 2.0), want)


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


def _dry_run(wheelhouse) -> subprocess.CompletedProcess:
    env = os.environ | {"WHEELHOUSE": str(wheelhouse)}
    return subprocess.run(["bash", "bench/gpu_check.sh", "--dry_run"], capture_output=True, text=True, timeout=900,
                          env=env)  # fmt: skip


def _parts(stdout: str) -> dict[str, bool]:
    return {line.split()[1]: line.startswith("PASS") for line in stdout.splitlines() if line[:5] in ("PASS ", "FAIL ")}


def test_gpu_check_cpu_dry_run(tmp_path):
    """The GPU check rehearsed on CPU, every part at tiny sizes; without a wheelhouse (it is built by
    bench/device_wheels.sh, from PyPI) the wheels part fails and says so, and the exit status is 1."""
    (tmp_path / "empty").mkdir()
    done = _dry_run(tmp_path / "empty")
    parts = _parts(done.stdout.split("=== gpu_check")[0])
    want = ["wheels", "partitions", "morph_ms", "gpu_tests", "train_step", "memory", "pretrain"]
    assert list(parts) == want, done.stdout[-3000:] + done.stderr[-2000:]
    assert {k for k, ok in parts.items() if not ok} == {"wheels"}, done.stdout[-3000:]
    assert f"no wheels in {tmp_path / 'empty'}: run bash bench/device_wheels.sh first" in done.stdout
    assert "partitions equal: 20/20" in done.stdout  # the static path against the slow reference
    assert "re-run resumed at step 4, done at 8; losses vs uninterrupted: max rel diff 0.0" in done.stdout
    assert done.returncode == 1 and "=== gpu_check: 6/7 parts passed ===" in done.stdout


@pytest.mark.faults_slow
def test_gpu_check_rehearsal_with_the_wheelhouse(tmp_path):
    """The whole rehearsal: the wheelhouse built from PyPI for cp312, installed by python3.12, then every part."""
    built = subprocess.run(["bash", "bench/device_wheels.sh", str(tmp_path / "whl")], capture_output=True, text=True,
                           timeout=1200)  # fmt: skip
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    done = _dry_run(tmp_path / "whl")
    assert done.returncode == 0 and "=== gpu_check: 7/7 parts passed ===" in done.stdout, done.stdout[-3000:]


def test_launch_on_cpu_runs_at_once_with_the_schedule_it_sampled():
    """``launch`` (the GPU's concurrent morphing) on CPU: sequential, the groups of a direct call with the
    schedule that ``schedule_of`` returned, which the pending result keeps (the fault dump saves it)."""
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(2, 49, 8, generator=gen)
    graphed, drawn = GraphedMorph(), []

    def schedule_of():
        drawn.append(sample_schedule([49, 49], [7, 7], gen))
        return drawn[-1]

    pending = graphed.launch(target, schedule_of)
    assert len(drawn) == 1 and pending.done is None and pending.schedule is drawn[0]
    got, want = pending.wait(), graphed(target, drawn[0])
    assert torch.equal(got.groups, want.groups) and got.slots == want.slots
