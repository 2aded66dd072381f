"""Fault injection on real runs (CPU, gloo): kills mid-write, full disks, dead ranks, bf16 NaNs, SIGINT.

Each test states the fault and what must survive it. The slow ones carry the ``faults_slow`` marker and
run with ``make test-faults``.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtm_ds.checkpoint import is_complete
from tests.helpers import (
    ROOT,
    ds_json,
    finetune_cmd,
    run_env,
    step_losses,
    torchrun_cmd,
    train_cmd,
    wait_for_step,
    worker_pids,
)


def _ckpts(out: Path) -> Path:
    return out / "checkpoints"


def test_kill_during_checkpoint_write_falls_back_and_resumes_exactly(image_folder, tmp_path):
    ds = ds_json(tmp_path / "ds.json", 8)
    reference, run = tmp_path / "reference", tmp_path / "run"
    subprocess.run(train_cmd(image_folder, reference, ds, 12), check=True, cwd=ROOT, env=run_env(), capture_output=True)
    killed = subprocess.run(train_cmd(image_folder, run, ds, 12), cwd=ROOT, env=run_env({"kill_in_save": 8}),
                            capture_output=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in _ckpts(run).iterdir() if p.is_dir()) == [".partial-step00000008", "step00000004"]
    assert is_complete(_ckpts(run) / "step00000004") and (_ckpts(run) / "latest").read_text() == "step00000004"
    resumed = subprocess.run(
        train_cmd(image_folder, run, ds, 12), cwd=ROOT, env=run_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step00000004" in resumed.stdout
    torch.testing.assert_close(step_losses(run), step_losses(reference), rtol=1e-6, atol=0)
    assert sorted(p.name for p in _ckpts(run).iterdir() if p.is_dir()) == [f"step{s:08d}" for s in (4, 8, 12)]
    assert (_ckpts(run) / "latest").read_text() == "step00000012"


@pytest.mark.parametrize("kill_at", [2, pytest.param(9, marks=pytest.mark.faults_slow)])
def test_sigkill_at_a_step_then_resume_gives_the_same_losses(image_folder, tmp_path, kill_at):
    """Step 2: before the first checkpoint (a fresh start); step 9: after the step-8 one."""
    ds = ds_json(tmp_path / "ds.json", 8)
    subprocess.run(
        train_cmd(image_folder, tmp_path / "a", ds, 12), check=True, cwd=ROOT, env=run_env(), capture_output=True
    )
    out = tmp_path / "b"
    proc = subprocess.Popen(train_cmd(image_folder, out, ds, 12), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(train_cmd(image_folder, out, ds, 12), check=True, cwd=ROOT, env=run_env(), capture_output=True)
    torch.testing.assert_close(step_losses(out), step_losses(tmp_path / "a"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("when", ["mid_epoch", pytest.param("in_save", marks=pytest.mark.faults_slow)])
def test_finetune_sigkill_resumes_with_equal_losses(pretrained, tmp_path, when):
    """Killed in the middle of epoch 2, or halfway through writing the epoch-2 checkpoint."""
    ds = ds_json(tmp_path / "ds.json", 8)

    def cmd(out, *extra):  # 5 steps per epoch
        flags = ("--train_per_class=4", "--eval_per_class=2", "--log_every=1", "--recipe.epochs=3")
        return finetune_cmd(pretrained, ds, out, *flags, *extra)

    subprocess.run(cmd(tmp_path / "reference"), check=True, cwd=ROOT, env=run_env(), capture_output=True)
    out = tmp_path / "run"
    if when == "mid_epoch":
        proc = subprocess.Popen(cmd(out), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_step(out, 7, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 7 <= max(step_losses(out)) < 15
    else:
        killed = subprocess.run(cmd(out), cwd=ROOT, env=run_env({"kill_in_save": "epoch00000002"}), capture_output=True)
        assert killed.returncode == -signal.SIGKILL and (_ckpts(out) / ".partial-epoch00000002").is_dir()
    assert (_ckpts(out) / "latest").read_text() == "epoch00000001"
    resumed = subprocess.run(cmd(out), cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    torch.testing.assert_close(step_losses(out), step_losses(tmp_path / "reference"), rtol=1e-6, atol=0)
    # a kill between an epoch's eval row and its checkpoint repeats that row (same values), never loses it
    assert _evals_by_epoch(out) == _evals_by_epoch(tmp_path / "reference") and len(_evals_by_epoch(out)) == 3


def _evals_by_epoch(out):
    return {row["epoch"]: row for row in map(json.loads, (out / "eval.jsonl").read_text().splitlines())}


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MiB tmpfs: room for one tiny-preset checkpoint (5.4 MiB) and the logs, not for two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the disk-full test needs a small real filesystem")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_writing_a_checkpoint(image_folder, tmp_path, small_disk):
    ds = ds_json(tmp_path / "ds.json", 8)
    out = small_disk / "run"
    cmd = train_cmd(image_folder, out, ds, 12, "--run.keep_last=2")
    full = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert full.returncode == 2  # reported as one line: the user can act on it (free space, re-run)
    assert "error: writing checkpoint" in full.stderr
    free = float(re.search(r"([0-9.]+) MiB are free on its disk", full.stderr).group(1))
    assert free > 2, free  # the partial folder is gone and its space is back (9 MiB - 5.4 MiB checkpoint - logs)
    assert "The last complete checkpoint, step00000004, is intact" in full.stderr
    assert sorted(p.name for p in _ckpts(out).iterdir()) == ["latest", "step00000004"]
    assert is_complete(_ckpts(out) / "step00000004")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    resumed = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from step00000004" in resumed.stdout
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 12


@pytest.mark.parametrize("fault", ["kill", pytest.param("hang", marks=pytest.mark.faults_slow)])
def test_a_rank_dies_or_hangs_in_a_two_rank_run(image_folder, tmp_path, fault):
    out, ds = tmp_path / "run", ds_json(tmp_path / "ds.json", 4)

    def cmd(steps):
        extra = ("--optim.epochs=100", "--run.dist_timeout_s=15")
        return torchrun_cmd(29631 if fault == "kill" else 29632) + train_cmd(image_folder, out, ds, steps, *extra)[1:]

    proc = subprocess.Popen(
        cmd(400),
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_step(out, 6, proc)
        victim = worker_pids(proc.pid)[1]
        os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        sent = time.time()
        _, stderr = proc.communicate(timeout=120)
        took = time.time() - sent
    finally:  # never leave a stopped or orphaned worker behind (it would hold the port)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    how = "watchdog" if "no training step finished" in stderr else "collective error"
    print(f"{fault}: the launcher exited {took:.1f} s after rank 1 was {'killed' if fault == 'kill' else 'stopped'}"
          f" (rank 0 noticed by its {how})")  # fmt: skip
    assert proc.returncode != 0 and took < (15 if fault == "kill" else 60), took
    assert "rank 0: lost contact with another rank" in stderr and "re-run the same command to resume" in stderr
    if fault == "kill":
        assert "exitcode  : -9" in stderr and "rank      : 1" in stderr  # torchrun's root cause: rank 1, SIGKILL
    resumed = subprocess.run(cmd(14), cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed from step" in resumed.stdout


def test_bf16_nonfinite_losses_are_skipped_and_counted(image_folder, tmp_path):
    ds = tmp_path / "bf16.json"
    ds.write_text(
        json.dumps(json.loads(Path(ds_json(tmp_path / "fp32.json", 8)).read_text()) | {"bf16": {"enabled": True}})
    )
    out = tmp_path / "run"
    cmd = train_cmd(image_folder, out, str(ds), 6)
    subprocess.run(cmd, check=True, cwd=ROOT, env=run_env({"nan_micro": [2]}), capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["skipped_windows"] == 1
    assert all(r["loss"] == r["loss"] for r in rows) and is_complete(_ckpts(out) / "step00000004")


def test_sigint_saves_and_exits_within_bounded_time(image_folder, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(
        image_folder, out, ds_json(tmp_path / "ds.json", 8), 200, "--run.save_every=1000", "--optim.epochs=100"
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for_step(out, 3, proc)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and time.time() - sent < 30
    stopped = json.loads(stdout.strip().splitlines()[-1])["step"]
    assert is_complete(_ckpts(out) / f"step{stopped:08d}")


def test_watchdog_ends_a_rank_stuck_where_no_backend_times_out():
    """A rank blocked without a timeout (here: sleeping after its last step) exits with the message."""
    code = (
        "import time; from dtm_ds.distributed import Watchdog\n"
        "dog = Watchdog(1.0, lambda: 'rank 0: lost contact with another rank. re-run the same command to resume.')\n"
        "dog.pause(); time.sleep(2)  # paused (a checkpoint write): no alarm\n"
        "dog.beat(); time.sleep(30)\n"
    )
    start = time.time()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 1 and 3 < time.time() - start < 20
    assert "no training step finished in 1 s. rank 0: lost contact with another rank" in done.stderr
    assert 'File "<string>", line 4' in done.stderr  # the stuck stack is dumped


def _processes_with(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.faults_slow
@pytest.mark.parametrize("phase", ["checking", "writing"])
def test_a_killed_conversion_leaves_nothing_behind(tmp_path, phase):
    """SIGKILL to ``python -m data_prep.write_ffcv`` (its main process only, as an OOM killer or a lost job
    does) while it checks the images or while FFCV's workers write: no worker survives it, and the next
    conversion removes the temporary file and writes the same .beton as an uninterrupted one."""
    from data_prep.synthetic import write_class_folder

    write_class_folder(tmp_path / "imgs", {"a": 600, "b": 600}, size=(96, 96))
    out, whole = tmp_path / "killed" / "train.beton", tmp_path / "whole" / "train.beton"

    def cmd(target):
        return [sys.executable, "-m", "data_prep.write_ffcv", str(tmp_path / "imgs"), "--out", str(target),
                "--workers", "2"]  # fmt: skip

    subprocess.run(cmd(whole), check=True, cwd=ROOT, env=run_env(), capture_output=True)
    proc = subprocess.Popen(
        cmd(out), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )  # fmt: skip (no pipes: waiting on them would wait for orphans)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        writing, workers = bool(list(out.parent.glob(".train.beton.tmp-*"))), len(_processes_with(str(out))) > 1
        if workers and writing == (phase == "writing"):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the conversion ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.1)  # the death signal is immediate; FFCV's writers on their own write on (here ~1 s)
    left = _processes_with(str(out))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"workers outlived the killed conversion: {left}"
    again = subprocess.run(cmd(out), cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list(out.parent.glob(".train.beton.tmp-*"))
    assert json.loads(again.stdout.strip().splitlines()[-1])["bad_list"] == f"{out}.bad.txt"
    from ffcv.reader import Reader

    a, b = Reader(str(out)), Reader(str(whole))
    assert a.num_samples == b.num_samples == 1200
    image, label = (a.field_names.index(name) for name in ("image", "label"))  # metadata columns f0, f1
    assert (a.metadata[f"f{label}"] == b.metadata[f"f{label}"]).all()
    for key in ("width", "height"):
        assert (a.metadata[f"f{image}"][key] == b.metadata[f"f{image}"][key]).all()
