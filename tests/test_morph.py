import random

import pytest
import torch

from bench.morph_reference import canonical, reference_groups, reference_loss, reference_merges
from dtm_ds.morph import _group_mean, _morph, dtm_loss, sample_schedule


def _check_partitions(metric, merges, protect_first=True):
    got = _morph(metric, merges, protect_first=protect_first)
    assert got.dtype == torch.long and got.shape == metric.shape[:2]
    assert int(got.min()) >= 0 and int(got.max()) < metric.shape[1]
    for i in range(metric.shape[0]):
        want = canonical(reference_groups(metric[i], list(merges), protect_first))
        assert canonical(got[i].tolist()) == want, f"sample {i}, merges {list(merges)}"


@pytest.mark.parametrize("n", [196, 195, 16, 7, 2, 1])
@pytest.mark.parametrize("protect_first", [True, False])
def test_morph_matches_reference_random_schedules(n, protect_first):
    rng = random.Random(n * 2 + protect_first)
    gen = torch.Generator().manual_seed(n)
    for _ in range(6):
        metric = torch.randn(3, n, 8, generator=gen, dtype=torch.float64)
        k = rng.randint(1, 14)
        merges = reference_merges(rng.randint(0, n), k, n) + [0] * (14 - k)
        _check_partitions(metric, merges, protect_first)


@pytest.mark.parametrize(
    "merges",
    [
        [0] * 14,  # identity
        [500] * 3,  # r far beyond (t - 1) // 2: clamped every iteration
        [196],  # k = 1
        [14] * 14,  # k = K = 14
        [0, 5, 0, 7, 0],  # zeros between active iterations are no-ops
        [1] * 40,
    ],
)
def test_morph_edges(merges):
    metric = torch.randn(2, 196, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _check_partitions(metric, merges)
    _check_partitions(metric[:1], merges, protect_first=False)  # B = 1


def test_identity_and_full_merge():
    metric = torch.randn(2, 10, 4, dtype=torch.float64)
    assert torch.equal(_morph(metric, [0, 0]), torch.arange(10).expand(2, 10))
    groups = _morph(metric, [100] * 20)  # merges until only the protected token and one group remain
    assert all(len(set(g.tolist())) == 2 for g in groups)
    assert all(g[0] not in g[1:].tolist() for g in groups)  # the first token is never merged away
    assert all(len(set(g.tolist())) == 1 for g in _morph(metric, [100] * 20, protect_first=False))


def test_per_row_merges_match_rows_alone():
    metric = torch.randn(3, 30, 8, dtype=torch.float64)
    merges = torch.tensor([[5, 5, 0], [14, 0, 0], [1, 2, 3]])
    both = _morph(metric, merges)
    for i in range(3):
        assert torch.equal(both[i], _morph(metric[i : i + 1], merges[i])[0])


def test_group_mean_matches_loop_and_is_differentiable():
    x = torch.randn(2, 12, 5, dtype=torch.float64, requires_grad=True)
    groups = _morph(torch.randn(2, 12, 3, dtype=torch.float64), [3, 3])
    out = _group_mean(x, groups)
    for b in range(2):
        for i in range(12):
            members = (groups[b] == groups[b, i]).nonzero().flatten()
            torch.testing.assert_close(out[b, i], x[b, members].mean(0))
    assert torch.autograd.gradcheck(lambda v: _group_mean(v, groups), (x,))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("loss", ["smooth_l1", "l1", "l2", "negcosine"])
def test_dtm_loss_matches_reference(loss, normalize):
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 20, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = (2 * torch.randn(2, 20, 6, generator=gen, dtype=torch.float64) + 1).requires_grad_()
    schedule = torch.tensor([[4, 4, 4, 0], [0, 0, 0, 0], [2, 2, 2, 2]])
    got = dtm_loss(pred, target, schedule, loss=loss, normalize_target=normalize)
    want = reference_loss(pred, target, schedule, loss=loss, normalize=normalize)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, pred, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-9)
    got.backward()
    assert target.grad is None  # no gradient into the teacher's targets


def test_dtm_loss_identity_is_tokenwise():
    pred, target = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    loss = dtm_loss(pred, target, torch.zeros(2, 3, dtype=torch.long))
    torch.testing.assert_close(loss, torch.nn.functional.smooth_l1_loss(pred, target, beta=2.0))
    with pytest.raises(ValueError, match="loss must be one of"):
        dtm_loss(pred, target, torch.zeros(1, 1, dtype=torch.long), loss="cosine")


def test_sample_schedule_rule_and_ranges():
    gen = torch.Generator().manual_seed(0)
    n_max, k_max = [196, 50, 0], [14, 3, 5]
    allowed = [
        {tuple(reference_merges(n, k, nm)) for n in range(nm + 1) for k in range(1, km + 1)}
        for nm, km in zip(n_max, k_max, strict=True)
    ]
    seen_k = [set() for _ in n_max]
    for _ in range(400):
        s = sample_schedule(n_max, k_max, gen)
        assert s.shape == (3, 14) and s.dtype == torch.long
        for level, row in enumerate(s.tolist()):
            active = [r for r in row if r]
            assert row[len(active) :] == [0] * (14 - len(active))
            assert any(tuple(active) == tuple(m for m in a if m) for a in allowed[level])
            assert sum(row) <= n_max[level]
            if active:
                seen_k[level].add(len(active))
    assert seen_k[0] == set(range(1, 15)) and seen_k[1] == {1, 2, 3} and seen_k[2] == set()


def test_sample_schedule_merges_follow_the_rule_for_every_draw():
    """The (n, k) of each level recomputed from the generator's own uniforms, then r from the rule as the
    reference states it (reference_merges): ceil(n / k), floor past n_max. Exact over 3,000 draws, and
    every (n, k) of a small level is drawn."""
    n_max, k_max = [196, 20], [14, 6]
    seen = set()
    for seed in range(1500):
        got = sample_schedule(n_max, k_max, torch.Generator().manual_seed(seed))
        u = torch.rand(2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
        for level in range(2):
            n = min(int(u[0][level] * (n_max[level] + 1)), n_max[level])
            k = min(int(u[1][level] * k_max[level]), k_max[level] - 1) + 1
            want = reference_merges(n, k, n_max[level]) + [0] * (14 - k)
            assert got[level].tolist() == want, (seed, level, n, k)
            if level == 1:
                seen.add((n, k))
    assert seen == {(n, k) for n in range(21) for k in range(1, 7)}


def test_sample_schedule_is_seeded_and_uniform():
    a = sample_schedule([196], [14], torch.Generator().manual_seed(5))
    b = sample_schedule([196], [14], torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(1)
    totals = torch.stack([sample_schedule([196], [1], gen)[0, 0] for _ in range(4000)]).double()
    assert abs(totals.mean().item() - 98) < 3 and int(totals.min()) == 0 and int(totals.max()) == 196
    with pytest.raises(ValueError, match="one entry per level"):
        sample_schedule([196, 196], [14], gen)


def test_compiles_once_and_replays_schedules():
    torch._dynamo.reset()
    metric = torch.randn(2, 196, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fn = torch.compile(_morph, fullgraph=True, dynamic=False, backend="aot_eager")
    loss_fn = torch.compile(dtm_loss, fullgraph=True, dynamic=False, backend="aot_eager")
    gen = torch.Generator().manual_seed(11)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            schedule = sample_schedule([196, 196], [14, 14], gen)
            got = fn(metric, schedule[0])
            for i in range(2):
                assert canonical(got[i].tolist()) == canonical(reference_groups(metric[i], schedule[0].tolist()))
            eager = dtm_loss(metric, metric.flip(1), schedule)
            torch.testing.assert_close(loss_fn(metric, metric.flip(1), schedule), eager)


def test_static_width_path_equals_eager_plan():
    """The full-width path (what a CUDA graph replays) gives the eager CPU path's groups."""
    from dtm_ds.morph import _gram, _host_plan, _morph_gram

    gen = torch.Generator().manual_seed(2)
    metric = torch.randn(4, 196, 16, generator=gen, dtype=torch.float64)
    for _ in range(10):
        merges = sample_schedule([196, 196], [14, 14], gen).repeat_interleave(2, dim=0)  # rows of two levels
        eager = _morph_gram(_gram(metric), merges, True, _host_plan(merges, 196, True))
        static = _morph_gram(_gram(metric), merges, True, None)
        assert torch.equal(eager, static)
        for i in range(4):
            assert canonical(eager[i].tolist()) == canonical(reference_groups(metric[i], merges[i].tolist()))


def test_tokenwise_loss_is_the_plain_per_token_loss():
    """The DTM-off baseline against torch's own losses, each with its gradient flowing to ``pred`` only."""
    import torch.nn.functional as F

    from dtm_ds.morph import tokenwise_loss

    gen = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 9, 6, generator=gen, requires_grad=True)
    target = torch.randn(2, 9, 6, generator=gen, requires_grad=True)
    standard = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    want = {
        ("smooth_l1", False): F.smooth_l1_loss(pred, target, beta=2.0),
        ("l1", False): F.l1_loss(pred, target),
        ("l2", False): F.mse_loss(pred, target),
        ("negcosine", False): -F.cosine_similarity(pred, target, dim=-1).mean(),
        ("l2", True): F.mse_loss(pred, standard),
    }
    for (loss, normalize), value in want.items():
        got = tokenwise_loss(pred, target, loss, 2.0, normalize)
        torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7)
        got.backward()
        assert target.grad is None and pred.grad is not None
        pred.grad = None
