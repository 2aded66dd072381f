"""Host synchronisations: the counter itself, and the real training loop's count per optimizer window."""

from pathlib import Path

import torch

from bench.bench_train import run_window
from dtm_ds.syncs import HostSyncs, cpu_only
from tests.helpers import ROOT


@cpu_only
def _host_side(x: torch.Tensor) -> int:
    return int(x.sum())


def test_host_syncs_counts_the_calls_that_block_and_only_those():
    x, counts = torch.arange(4.0), torch.tensor([1, 2, 0, 1])
    with HostSyncs() as syncs:
        x.sum().item(), x.tolist(), bool(x[0] > 0), float(x[1]), x.nonzero(), x.cpu()
        torch.tensor([1.0, 2.0], device="cpu")  # Python values copied to a device
        x.repeat_interleave(counts)  # the output size is read from the device
        _host_side(x)
        # none of these waits for a device
        x + 1, torch.full((), 2.0), x.to(torch.float64), x.repeat_interleave(2), torch.tensor([1.0])
        x.repeat_interleave(counts, output_size=4), torch.where(x > 1, x, 0)
    assert [(origin, what) for origin, what, _ in syncs.calls] == [
        ("other", "item"), ("other", "tolist"), ("other", "__bool__"), ("other", "__float__"), ("other", "nonzero"),
        ("other", "cpu"), ("other", "tensor"), ("other", "repeat_interleave"), ("cpu_only", "__int__"),
    ]  # fmt: skip
    assert syncs.calls[0][2] == f"{__file__}:{_line_of('x.sum().item()')}"
    with HostSyncs() as outside:
        pass
    x[0].item()  # after the context: not counted
    assert outside.calls == []


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line and "_line_of" not in line)


def test_one_host_sync_per_window_in_the_real_loop(tmp_path):
    """The real loop (train_window over the FFCV loader, accumulation 2) makes one host sync per optimizer
    window in the project's code (the ranks' agreement on the two flags), whatever the shipped DeepSpeed
    config; DeepSpeed 0.19's own syncs are pinned per config (its throughput timer off: no synchronize), so
    a change that adds one is seen. Counted over 2 windows after 2 warm-ups, the maximum of the windows."""
    rows = {
        name: run_window(tmp_path, micro=4, windows=2, accum=2, ds=str(ROOT / "ds_configs" / f"{name}.json"))
        for name in ("cpu", "zero2_bf16")
    }
    origins = ("project", "deepspeed", "other")
    got = {name: {k: row["syncs_per_window"][k] for k in origins} for name, row in rows.items()}
    assert got == {
        "cpu": {"project": 1, "deepspeed": 2, "other": 0},  # stage 0 clipping: two torch.tensor(..., device=)
        "zero2_bf16": {"project": 1, "deepspeed": 6, "other": 0},  # + the overflow check and norm validity
    }
    assert all(row["finite"] for row in rows.values())
