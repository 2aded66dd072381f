"""Load: a 2-rank CPU pretraining run of 1,000 steps with periodic checkpoints must not grow in memory,
slow down or leak file handles (``make test-faults``; about 5 minutes on 2 cores)."""

import json
import statistics
import subprocess

import pytest

from tests.conftest import write_class_folder
from tests.helpers import ROOT, ds_json, run_env, torchrun_cmd, train_cmd

STEPS = 1000


@pytest.mark.faults_slow
def test_thousand_steps_two_ranks_flat_memory_speed_and_fds(tmp_path):
    write_class_folder(tmp_path / "imgs", {"a": 20, "b": 20}, size=(40, 40))
    out = tmp_path / "run"
    extra = ("--optim.epochs=250", "--run.log_every=10", "--run.save_every=100", "--run.keep_last=2")
    cmd = torchrun_cmd(29641) + train_cmd(tmp_path / "imgs", out, ds_json(tmp_path / "ds.json", 4), STEPS, *extra)[1:]
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env(), capture_output=True, timeout=1800)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == STEPS
    window = {name: [r for r in rows if lo < r["step"] <= hi] for name, (lo, hi) in
              {"early": (100, 300), "late": (STEPS - 200, STEPS)}.items()}  # fmt: skip
    rss = {k: statistics.median(r["rss_gib"] for r in v) * 1024 for k, v in window.items()}
    speed = {k: statistics.median(r["img_per_s"] for r in v) for k, v in window.items()}
    fds = {k: max(r["open_fds"] for r in v) for k, v in window.items()}
    print(f"rss MiB {rss}, img/s {speed}, open fds {fds}, peak rss GiB {max(rows[-1]['peak_rss_gib_per_rank']):.3f}")
    assert rss["late"] - rss["early"] < 64, rss  # MiB
    assert speed["late"] > 0.75 * speed["early"], speed
    assert fds["late"] <= fds["early"] + 2, fds
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step00000900", "step00001000"]
