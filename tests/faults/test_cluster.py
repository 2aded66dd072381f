"""Cluster-scale reliability on CPU (gloo, real DeepSpeed): a stop signal to any process of a 2-rank job,
kills and stops under gradient accumulation, resume on another number of ranks, a changed config, a
finished run re-run, SLURM's environment, FFCV and ZeRO-2/bf16 resume, and a kill fuzz (slow)."""

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtm_ds.checkpoint import is_complete
from tests.helpers import ROOT, ds_json, run_env, step_losses, torchrun_cmd, train_cmd, wait_for_step, worker_pids

LONG = ("--optim.epochs=100",)  # a schedule far longer than the test: stops happen mid-run
STEPS = 60  # the kill fuzz's run length
SLOW = pytest.mark.faults_slow  # cases that repeat coverage with more ranks or another signal: make test-faults


def _run(cmd, env=None, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=env or run_env(), capture_output=True, text=True)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


def _two_ranks(port: int, image_folder, out, ds, steps, *extra) -> list[str]:
    return torchrun_cmd(port) + train_cmd(image_folder, out, ds, steps, *LONG, *extra)[1:]


def _start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen, pid: int | None, sig: int) -> tuple[str, str, float]:
    """Send ``sig`` to ``pid`` (None: to every process of the job, as ``scancel`` does); wait for the job;
    (stdout, stderr, seconds from signal to exit). A SIGKILL always goes to every process of the job (a lost
    node): torchrun's workers run in sessions of their own, and a launcher killed alone leaves them running."""
    try:
        sent = time.time()
        for target in _tree(proc.pid) if sig == signal.SIGKILL or pid is None else [pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
        stdout, stderr = proc.communicate(timeout=120)
        return stdout, stderr, time.time() - sent
    finally:  # never leave a worker behind (it would hold the port)
        for target in _tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, children first (those of every thread: the loader thread forks the
    DataLoader workers)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    if not Path(f"/proc/{pid}").exists():
        return []
    return [p for child in children for p in _tree(int(child))] + [pid]


def _stopped_step(stdout: str) -> int:
    return int(re.search(r"stopped by a signal at step (\d+) \(all ranks\)", stdout).group(1))


@pytest.fixture(scope="module")
def two_rank_reference(image_folder, tmp_path_factory):
    """Per-step losses of an uninterrupted 2-rank run (micro batch 4, 40 steps)."""
    tmp = tmp_path_factory.mktemp("reference")
    _run(_two_ranks(29641, image_folder, tmp / "run", ds_json(tmp / "ds.json", 4), 40, "--run.save_every=1000"))
    return step_losses(tmp / "run")


@pytest.mark.parametrize("target", ["one_worker", pytest.param("both_workers", marks=SLOW), "launcher"])
def test_a_stop_signal_to_any_process_stops_every_rank_at_one_step(image_folder, tmp_path, two_rank_reference, target):
    """SIGTERM to rank 1 only, to both ranks 0.3 s apart (what ``srun`` and ``scancel`` do), or to torchrun
    (which forwards it to both): the ranks agree on one step through the per-micro-step all-reduce, write
    one complete checkpoint there and exit 0; a re-run continues exactly. torchrun itself, when it is the
    one signalled, re-raises the signal after its workers exit (exit code 1, ``SignalException``)."""
    out, ds = tmp_path / "run", ds_json(tmp_path / "ds.json", 4)
    cmd = _two_ranks(29642, image_folder, out, ds, 40, "--run.save_every=1000")
    proc = _start(cmd)
    wait_for_step(out, 4, proc)
    workers = worker_pids(proc.pid)
    if target == "both_workers":
        os.kill(workers[0], signal.SIGTERM)
        time.sleep(0.3)
    victim = proc.pid if target == "launcher" else workers[1]
    stdout, stderr, took = _stop(proc, victim, signal.SIGTERM)
    stopped = _stopped_step(stdout)
    print(f"SIGTERM to {target}: exit {proc.returncode} after {took:.1f} s, both ranks stopped at step {stopped}")
    if target == "launcher":
        assert proc.returncode == 1 and "SignalException" in stderr and "got signal: 15" in stderr
    else:
        assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert "[rank" not in stderr and {k: summary[k] for k in ("done", "step", "loss", "checkpoint")} == {
        "done": False,  # stopped by the signal before max_steps: a re-run continues
        "step": stopped,
        "loss": step_losses(out)[stopped],
        "checkpoint": str(out / "checkpoints" / f"step{stopped:08d}"),
    }
    assert took < 30 and 4 <= stopped < 40
    folders = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert folders == [f"step{stopped:08d}"] and is_complete(out / "checkpoints" / folders[0])
    resumed = _run(cmd)
    assert f"resumed from step{stopped:08d}" in resumed.stdout
    torch.testing.assert_close(step_losses(out), two_rank_reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sig", [pytest.param("SIGKILL", marks=SLOW), "SIGTERM"])
def test_kill_or_stop_with_accumulation_resumes_exactly(image_folder, tmp_path, sig):
    """gradient_accumulation_steps 2: a SIGKILL falls back to the last checkpoint, a SIGTERM saves at the
    end of the current window; either way the resumed run's per-step losses equal an uninterrupted run's."""
    ds = ds_json(tmp_path / "acc.json", 4, accum=2)
    _run(train_cmd(image_folder, tmp_path / "reference", ds, 24, *LONG))
    out = tmp_path / "run"
    cmd = train_cmd(image_folder, out, ds, 24, *LONG)
    proc = _start(cmd)
    wait_for_step(out, 6, proc)
    stdout, stderr, took = _stop(proc, proc.pid, getattr(signal, sig))
    if sig == "SIGTERM":
        stopped = _stopped_step(stdout)
        assert proc.returncode == 0 and took < 30 and is_complete(out / "checkpoints" / f"step{stopped:08d}")
    _run(cmd)
    torch.testing.assert_close(step_losses(out), step_losses(tmp_path / "reference"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("engine", ["zero2_bf16", pytest.param("fp32", marks=SLOW)])
def test_resume_on_another_number_of_ranks(image_folder, tmp_path, two_rank_reference, engine):
    """2 ranks x accumulation 1, SIGKILL after step 6 (last checkpoint: step 4, or 8), resumed on 1 rank x
    accumulation 2: the same micro-batches, schedules and draws, so the per-step losses equal the
    uninterrupted 2-rank run's. ZeRO-2's per-rank optimizer state goes through DeepSpeed's universal
    checkpoint. Tolerance rtol 1e-6: the gradient is summed in another order (1 rank adds its micro-batches,
    2 ranks all-reduce), which moves the last float bits; bf16 rounds the weights after each step."""
    extra = {"bf16": {"enabled": True}} if engine == "zero2_bf16" else {}
    stage = 2 if engine == "zero2_bf16" else 0
    out = tmp_path / "run"
    two = _two_ranks(
        29643, image_folder, out, ds_json(tmp_path / "ds4.json", 4, stage, **extra), 40, "--run.save_every=4"
    )
    reference = two_rank_reference
    if engine == "zero2_bf16":  # bf16 weights: its own 2-rank reference
        _run(_two_ranks(29644, image_folder, tmp_path / "ref", ds_json(tmp_path / "r.json", 4, stage, **extra), 12))
        reference = step_losses(tmp_path / "ref")
    proc = _start(two)
    wait_for_step(out, 6, proc)
    _stop(proc, proc.pid, signal.SIGKILL)
    one = train_cmd(image_folder, out, ds_json(tmp_path / "acc.json", 4, stage, accum=2, **extra), 12, *LONG)
    resumed = _run(one + ["--run.save_every=4"])
    resumed_at = int(re.search(r"resumed from step(\d+)", resumed.stdout).group(1))  # 4, or 8 if the kill was late
    assert resumed_at in (4, 8) and ("universal format, now on 1 ranks" in resumed.stdout) == (stage > 0)
    losses = step_losses(out)
    torch.testing.assert_close(losses, {s: reference[s] for s in losses}, rtol=1e-6, atol=0)


@SLOW
def test_grow_from_one_rank_to_two(image_folder, tmp_path):
    """The other direction: 1 rank x accumulation 2 (ZeRO-2, bf16) for 4 steps, then the same run on 2 ranks x
    accumulation 1. The 1-rank optimizer state goes through the universal format, and every step equals an
    uninterrupted 2-rank run's (rtol 1e-6)."""
    extra, out = {"bf16": {"enabled": True}}, tmp_path / "run"
    _run(train_cmd(image_folder, out, ds_json(tmp_path / "acc.json", 4, 2, accum=2, **extra), 4, *LONG))
    grown = _run(_two_ranks(29653, image_folder, out, ds_json(tmp_path / "ds4.json", 4, 2, **extra), 8))
    assert "resumed from step00000004" in grown.stdout and "universal format, now on 2 ranks" in grown.stdout
    _run(_two_ranks(29654, image_folder, tmp_path / "ref", ds_json(tmp_path / "r.json", 4, 2, **extra), 8))
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 9))
    torch.testing.assert_close(losses, step_losses(tmp_path / "ref"), rtol=1e-6, atol=0)


def test_a_nonfinite_loss_on_one_rank_drops_the_window_on_every_rank(image_folder, tmp_path):
    """2 ranks; rank 1 alone gets a NaN loss at its micro-step 2 (window 2). Both ranks drop that window: the
    run equals one where both ranks got the NaN there (had rank 0 stepped alone, the all-reduced NaN gradient
    or diverged parameters would show in every later loss), and the checkpoint counts one skipped window."""
    ds = ds_json(tmp_path / "ds.json", 4)
    one, both = tmp_path / "one", tmp_path / "both"
    _run(_two_ranks(29651, image_folder, one, ds, 6, "--run.save_every=3"), env=run_env({"nan_micro": [2], "rank": 1}))
    _run(_two_ranks(29652, image_folder, both, ds, 6, "--run.save_every=3"), env=run_env({"nan_micro": [2]}))
    rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_windows"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in rows)  # finite
    assert step_losses(one) == step_losses(both)
    states = torch.load(one / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["train_state"]["step"] == 6 and states["train_state"]["skipped_windows"] == 1


def test_zero3_on_another_number_of_ranks_is_refused_before_any_step(image_folder, tmp_path):
    """DeepSpeed's universal checkpoint does not carry ZeRO-3's optimizer state exactly (measured: the
    first step after an elastic resume is off by 2e-5): a clear error instead of a silent drift."""
    out = tmp_path / "run"
    _run(_two_ranks(29647, image_folder, out, ds_json(tmp_path / "ds4.json", 4, 3), 2))
    one = _run(train_cmd(image_folder, out, ds_json(tmp_path / "acc.json", 4, 3, accum=2), 4, *LONG), check=False)
    assert one.returncode == 2 and "error: step00000002 was saved by 2 ranks with ZeRO-3" in one.stderr
    assert max(step_losses(out)) == 2


def test_a_changed_config_is_refused_before_anything_is_written(image_folder, tmp_path):
    ds = ds_json(tmp_path / "ds.json", 8)
    out = tmp_path / "run"
    _run(train_cmd(image_folder, out, ds, 2))
    before = (out / "config.json").read_text()
    changed = _run(train_cmd(image_folder, out, ds, 4, "--optim.lr=0.01", "--model.depth=2"), check=False)
    assert changed.returncode != 0
    assert "optim.lr: 0.004 -> 0.01" in changed.stderr and "model.depth: 4 -> 2" in changed.stderr
    assert (out / "config.json").read_text() == before and max(step_losses(out)) == 2
    other_batch = _run(train_cmd(image_folder, out, ds_json(tmp_path / "ds4.json", 4), 4), check=False)
    assert "train_batch_size: 8 -> 4 (DeepSpeed config)" in other_batch.stderr
    allowed = _run(train_cmd(image_folder, out, ds, 4, "--run.log_every=2", "--run.keep_last=1"))  # may change
    assert "resumed from step00000002" in allowed.stdout


def test_a_finished_run_re_run_writes_nothing(image_folder, tmp_path):
    ds = ds_json(tmp_path / "ds.json", 8)
    out = tmp_path / "run"
    _run(train_cmd(image_folder, out, ds, 4))
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = _run(train_cmd(image_folder, out, ds, 4))
    assert f"nothing to do: the run is done at step 4 of 4; its last checkpoint is {out}/checkpoints/step00000004" in (
        again.stdout
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_slurm_srun_environment_maps_to_ranks(image_folder, tmp_path):
    """Two processes started as ``srun --ntasks 2`` starts them (SLURM_* only): they form one 2-rank job."""
    out, ds = tmp_path / "run", ds_json(tmp_path / "ds.json", 4)
    cmd = train_cmd(image_folder, out, ds, 2)
    base = {k: v for k, v in run_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "4242", "MASTER_PORT": "29645"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=base | slurm | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][1][-2000:]
    assert json.loads((out / "engine.json").read_text())["world"] == 2
    assert json.loads(outputs[0][0].strip().splitlines()[-1])["step"] == 2


@pytest.fixture(scope="module")
def beton(image_folder, tmp_path_factory):
    from data_prep.write_ffcv import convert

    out = tmp_path_factory.mktemp("beton") / "train.beton"
    convert(str(image_folder), str(out), workers=1)
    return out


@pytest.mark.parametrize("engine", ["ffcv", "zero2_bf16"])
def test_sigkill_resume_is_exact_with_ffcv_and_with_zero2_bf16(image_folder, beton, tmp_path, engine):
    """The GPU defaults, on CPU: the FFCV loader (numba decode threads, seeded crops), and ZeRO-2 in bf16."""
    if engine == "ffcv":
        ds, data = ds_json(tmp_path / "ds.json", 8), ("--data.backend=ffcv", "--data.workers=1")
        source = beton
    else:
        ds, data, source = ds_json(tmp_path / "ds.json", 8, 2, bf16={"enabled": True}), (), image_folder
    _run(train_cmd(source, tmp_path / "reference", ds, 12, *LONG, *data))
    out = tmp_path / "run"
    cmd = train_cmd(source, out, ds, 12, *LONG, *data)
    proc = _start(cmd)
    wait_for_step(out, 6, proc)
    _stop(proc, proc.pid, signal.SIGKILL)
    _run(cmd)
    torch.testing.assert_close(step_losses(out), step_losses(tmp_path / "reference"), rtol=0, atol=0)


@SLOW
def test_sigkill_resume_is_exact_with_ffcv_on_two_ranks(beton, tmp_path):
    """FFCV on 2 ranks: each rank's loader decodes its own chunks of the global order with its own decode
    threads; a job killed after step 6 and re-run equals an uninterrupted 2-rank FFCV run bit for bit."""
    ds, data = ds_json(tmp_path / "ds.json", 4), ("--data.backend=ffcv", "--data.workers=1", "--run.save_every=4")
    _run(_two_ranks(29655, beton, tmp_path / "reference", ds, 10, *data))
    out = tmp_path / "run"
    cmd = _two_ranks(29656, beton, out, ds, 10, *data)
    proc = _start(cmd)
    wait_for_step(out, 6, proc)
    _stop(proc, proc.pid, signal.SIGKILL)
    resumed = _run(cmd)
    assert re.search(r"resumed from step0000000[48]", resumed.stdout)
    torch.testing.assert_close(step_losses(out), step_losses(tmp_path / "reference"), rtol=0, atol=0)


@SLOW
def test_kill_fuzz_every_resume_is_exact(image_folder, tmp_path):
    """20 rounds, each a fresh run of 60 steps killed at a moment drawn at random: at a uniform time within the
    training part of the run (a step, a checkpoint write or its publication), or inside the write of a
    random checkpoint at a random fraction of its bytes. Each resumes with the same command (no hand)
    and its per-step losses equal the uninterrupted run's."""
    ds = ds_json(tmp_path / "acc.json", 4, accum=2)
    proc = _start(train_cmd(image_folder, tmp_path / "reference", ds, STEPS, *LONG, "--run.save_every=2"))
    first = _first_metrics(tmp_path / "reference", proc)
    wait_for_step(tmp_path / "reference", STEPS, proc)
    training_s = 1.1 * (time.time() - first)  # all steps and a little past: the last save and the exit
    print(f"reference: {STEPS} steps in {training_s / 1.1:.2f} s after the first")
    proc.communicate(timeout=300)
    reference, rng = step_losses(tmp_path / "reference"), random.Random(0)
    for round_ in range(20):
        out = tmp_path / f"round{round_}"
        cmd = train_cmd(image_folder, out, ds, STEPS, *LONG, "--run.save_every=2")
        if round_ % 2:
            how = {"kill_in_save": 2 * rng.randint(1, STEPS // 2 - 1), "fraction": round(rng.random(), 3)}
            assert _run(cmd, env=run_env(how), check=False).returncode == -signal.SIGKILL
        else:
            how = {"after_first_step_s": round(rng.uniform(0, training_s), 3)}
            proc = _start(cmd)
            _first_metrics(out, proc)
            time.sleep(how["after_first_step_s"])
            _stop(proc, proc.pid, signal.SIGKILL)
        killed_at = max(step_losses(out), default=0)
        _run(cmd)
        assert step_losses(out) == reference, how
        print(f"round {round_}: killed by {how} after step {killed_at}; resumed run equal over {STEPS} steps")


def _first_metrics(out: Path, proc: subprocess.Popen) -> float:
    """Wait for the first logged step; its time."""
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    return time.time()


def test_distributed_evaluation_counts_every_image_once(pretrained, tmp_path):
    """3 ranks, 20 evaluation images: 7 + 7 + 6, no padding (a DistributedSampler would count 21)."""
    from tests.helpers import finetune_cmd

    cmd = finetune_cmd(pretrained, ds_json(tmp_path / "ds.json", 4), tmp_path / "ft", "--train_per_class=2",
                       "--eval_per_class=2", "--recipe.epochs=1", "--recipe.batch_size=12")  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--master_port=29646"]
    done = _run(torchrun + cmd[1:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["eval_images"] == 20 and result["top1"] / 5 == pytest.approx(round(result["top1"] / 5))  # k of 20


def test_finetune_stop_with_accumulation_saves_mid_epoch_and_resumes_exactly(pretrained, tmp_path):
    """Fine-tuning with accumulation 2 over 17 micro-batches per epoch (70 image_folder, micro batch 4): 8
    windows an epoch, the 17th micro-batch dropped explicitly (it never spills into the next epoch). A
    SIGTERM saves `epochNNNNNNNN-stepNNNNNNNN` mid-epoch and exits 0; the re-run continues there with
    the same per-step losses and evaluation rows as an uninterrupted run."""
    from tests.helpers import finetune_cmd

    def cmd(out):
        return finetune_cmd(pretrained, ds_json(tmp_path / "acc.json", 4, accum=2), out, "--train_per_class=7",
                            "--eval_per_class=2", "--log_every=1", "--recipe.epochs=3")  # fmt: skip

    _run(cmd(tmp_path / "reference"))
    reference = step_losses(tmp_path / "reference")
    rows = [json.loads(line) for line in (tmp_path / "reference" / "eval.jsonl").read_text().splitlines()]
    assert sorted(reference) == list(range(1, 25)) and [r["step"] for r in rows] == [8, 16, 24]
    out = tmp_path / "run"
    proc = _start(cmd(out))
    wait_for_step(out, 3, proc)
    stdout, stderr, took = _stop(proc, proc.pid, signal.SIGTERM)
    assert proc.returncode == 0 and took < 30, stderr[-2000:]
    epoch, window = map(int, re.search(r"stopped by a signal in epoch (\d+) after window (\d+)", stdout).groups())
    tag = f"epoch{epoch:08d}-step{window:08d}"
    assert (out / "checkpoints" / "latest").read_text() == tag and is_complete(out / "checkpoints" / tag)
    resumed = _run(cmd(out))
    assert step_losses(out) == reference, resumed.stdout[-1000:]
    assert (out / "eval.jsonl").read_text() == (tmp_path / "reference" / "eval.jsonl").read_text()


@SLOW  # the 1-rank case with accumulation stays in make test
def test_finetune_stop_on_two_ranks_saves_mid_epoch_and_resumes_exactly(pretrained, tmp_path):
    """Fine-tuning on 2 ranks (micro batch 4 each, global batch 8): a SIGTERM to rank 1 alone stops both
    ranks after the same window, one mid-epoch checkpoint is written, the job exits 0, and the re-run gives
    the per-step losses and evaluation rows of an uninterrupted 2-rank run (each epoch's train loss too: the
    checkpoint holds the ranks' mean of the epoch's loss sums, not rank 0's own)."""
    from tests.helpers import finetune_cmd

    def cmd(out, port):
        extra = ("--train_per_class=7", "--eval_per_class=2", "--log_every=1", "--recipe.epochs=3")
        return torchrun_cmd(port) + finetune_cmd(pretrained, ds_json(tmp_path / "ds.json", 4), out, *extra)[1:]

    _run(cmd(tmp_path / "reference", 29657))
    reference = step_losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, 25))
    out = tmp_path / "run"
    proc = _start(cmd(out, 29658))
    wait_for_step(out, 3, proc)
    stdout, stderr, took = _stop(proc, worker_pids(proc.pid)[1], signal.SIGTERM)
    assert proc.returncode == 0 and took < 30, stderr[-2000:]
    epoch, window = map(int, re.search(r"stopped by a signal in epoch (\d+) after window (\d+)", stdout).groups())
    tag = f"epoch{epoch:08d}-step{window:08d}"
    assert (out / "checkpoints" / "latest").read_text() == tag and is_complete(out / "checkpoints" / tag)
    _run(cmd(out, 29659))
    assert step_losses(out) == reference
    assert (out / "eval.jsonl").read_text() == (tmp_path / "reference" / "eval.jsonl").read_text()


@pytest.mark.parametrize("job", ["pretrain", "finetune", pytest.param("pretrain_2_ranks", marks=SLOW),
                                 pytest.param("finetune_2_ranks", marks=SLOW)])  # fmt: skip
def test_a_job_wide_sigterm_with_loader_workers_saves_and_exits_0(image_folder, pretrained, tmp_path, job):
    """SIGTERM to every process of the job (``scancel``, ``systemctl stop``, ``kill -- -PGID``) with 2 DataLoader
    workers: the workers ignore it (the main process owns the stop), the run agrees on a window, saves one
    complete checkpoint and exits 0; torch's own worker handler would have ended them and the run with
    "DataLoader worker ... is killed by signal: Terminated". On 2 ranks the signal reaches torchrun, both
    ranks, and each rank's workers: both ranks stop at one step and exit 0; torchrun, signalled itself,
    re-raises the signal once they have (exit 1, ``SignalException``)."""
    from tests.helpers import finetune_cmd

    out, ranks = tmp_path / "run", 2 if job.endswith("_2_ranks") else 1
    if job.startswith("pretrain"):
        ds = ds_json(tmp_path / "ds.json", 2, accum=8)  # a window longer than the 2 batches the loader holds ready
        cmd = train_cmd(image_folder, out, ds, 400, *LONG, "--run.save_every=1000")
        cmd[cmd.index("--data.workers=0")] = "--data.workers=2"
    else:
        cmd = finetune_cmd(pretrained, ds_json(tmp_path / "ds.json", 8), out, "--train_per_class=7",
                           "--eval_per_class=2", "--log_every=1", "--recipe.epochs=50")  # fmt: skip
        cmd[cmd.index("--workers") + 1] = "2"
        cmd[cmd.index("--recipe.batch_size=8")] = f"--recipe.batch_size={8 * ranks}"
    if ranks == 2:
        cmd = torchrun_cmd(29667 if job.startswith("pretrain") else 29668) + cmd[1:]
    proc = _start(cmd)
    wait_for_step(out, 3, proc)
    deadline = time.time() + 60  # each epoch starts its workers anew: signal while they run
    while len(_tree(proc.pid)) < 1 + 2 * ranks and time.time() < deadline:  # 2 cores: 1 worker a rank at least
        time.sleep(0.05)
    assert len(_tree(proc.pid)) >= 1 + 2 * ranks, "the loader workers did not start"
    if ranks == 1:
        stdout, stderr, took = _stop(proc, -proc.pid, signal.SIGTERM)  # the process group: every process of the job
        assert proc.returncode == 0 and took < 60, stderr[-2000:]
    else:
        stdout, stderr, took = _stop(proc, None, signal.SIGTERM)  # torchrun's workers have sessions of their own
        assert proc.returncode == 1 and "SignalException" in stderr and took < 60, stderr[-2000:]
        assert "exitcode" not in stderr.replace("exitcode  : 0", ""), stderr[-2000:]  # no rank failed
    assert "stopped by a signal" in stdout and "killed by signal" not in stderr
    tag = (out / "checkpoints" / "latest").read_text()
    assert is_complete(out / "checkpoints" / tag)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=SLOW)])
def test_a_second_launch_on_a_folder_in_use_is_refused_and_a_dead_holder_frees_it(image_folder, tmp_path, ranks):
    """Two launches on one output folder (a requeue while the old job still runs): the second exits 2 before
    writing anything, naming the holder's host and pid (on 2 ranks: every rank of the second job says so and
    exits 2, the first job trains on undisturbed); the lock dies with its holder (SIGKILL: no clean-up ran),
    so the next launch resumes."""
    import socket

    out, ds = tmp_path / "run", ds_json(tmp_path / "ds.json", 4)

    def launch(steps: int, port: int) -> list[str]:
        cmd = train_cmd(image_folder, out, ds, steps, *LONG, "--run.save_every=2")
        return cmd if ranks == 1 else torchrun_cmd(port) + cmd[1:]

    first = _start(launch(400, 29669))
    try:
        wait_for_step(out, 3, first)
        holder = first.pid if ranks == 1 else worker_pids(first.pid)[0]
        second = _run(launch(400, 29670), check=False)
        assert second.returncode == (2 if ranks == 1 else 1), second.stderr[-2000:]  # torchrun: 1, a rank failed
        for r in range(ranks):
            assert f"error (rank {r}): {out} is in use by host {socket.gethostname()} pid {holder} since " in (
                second.stderr if ranks == 2 else "error (rank 0): " + second.stderr.split("error: ", 1)[-1]
            ), [line for line in second.stderr.splitlines() if "in use" in line]
        assert ranks == 1 or "exitcode  : 2" in second.stderr.split("Root Cause")[1]  # a refusal, not a hang
        assert "pretraining tiny on" not in second.stdout  # refused before the build (and any write)
        at = max(step_losses(out))
        wait_for_step(out, at + 2, first)  # the first job trains on
    finally:
        _stop(first, first.pid, signal.SIGKILL)
    saved = int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
    third = _run(launch(saved + 2, 29669))
    assert "resumed from step" in third.stdout and json.loads(third.stdout.strip().splitlines()[-1])["done"]


@SLOW
def test_a_damaged_newest_checkpoint_falls_back_and_none_intact_is_refused(image_folder, tmp_path):
    """One flipped byte inside a tensor of the newest checkpoint (its size unchanged): the resume warns naming
    the file and continues from the previous checkpoint, with the losses of an uninterrupted run; with
    ``keep_last=1`` and the only checkpoint damaged, exit 2 instead of a restart from step 0."""

    def flip(tag_dir: Path) -> None:
        states = tag_dir / "mp_rank_00_model_states.pt"
        data = bytearray(states.read_bytes())
        data[len(data) // 2] ^= 0x10
        states.write_bytes(bytes(data))

    ds = ds_json(tmp_path / "ds.json", 4)
    whole, out = tmp_path / "whole", tmp_path / "run"
    _run(train_cmd(image_folder, whole, ds, 10, "--run.keep_last=2"))
    _run(train_cmd(image_folder, out, ds, 8, "--run.keep_last=2"))  # checkpoints at steps 4 and 8
    flip(out / "checkpoints" / "step00000008")
    resumed = _run(train_cmd(image_folder, out, ds, 10, "--run.keep_last=2"))
    assert "step00000008 is damaged: mp_rank_00_model_states.pt does not match its recorded SHA-256" in resumed.stderr
    assert "resumed from step00000004" in resumed.stdout
    assert step_losses(out) == step_losses(whole)  # steps 5..8 recomputed as they were
    only = tmp_path / "only"
    _run(train_cmd(image_folder, only, ds, 4, "--run.keep_last=1"))
    flip(only / "checkpoints" / "step00000004")
    refused = _run(train_cmd(image_folder, only, ds, 6, "--run.keep_last=1"), check=False)
    assert refused.returncode == 2 and "no intact checkpoint" in refused.stderr, refused.stderr[-2000:]
    assert "refusing to restart from step 0" in refused.stderr and len(step_losses(only)) == 4


@SLOW
def test_a_full_disk_on_rank_1_is_said_by_rank_1_and_every_rank_exits(image_folder, tmp_path):
    """2 ranks, ZeRO-1 (each rank writes its optimizer shard); rank 1's writes of checkpoint 4 fail as on a full
    disk. Every rank agrees the save failed and exits 2 with its own line: rank 1 names ENOSPC, rank 0 says
    another rank failed; neither says only "lost contact". The checkpoint of step 2 is intact; the re-run
    resumes from it."""
    ds = ds_json(tmp_path / "ds.json", 4, stage=1)
    out = tmp_path / "run"
    cmd = _two_ranks(29681, image_folder, out, ds, 6, "--run.save_every=2")
    full = _run(cmd, env=run_env({"full_in_save": 4, "rank": 1}), check=False)
    assert full.returncode != 0
    said = r"error \(rank 1\): writing checkpoint \S+step00000004 failed \(OSError: \[Errno 28\] No space left"
    assert re.search(said, full.stderr), full.stderr[-3000:]
    assert "error (rank 0): writing checkpoint" in full.stderr and "failed on another rank" in full.stderr
    assert "lost contact" not in full.stderr and "The last complete checkpoint, step00000002, is intact" in full.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = _run(_two_ranks(29682, image_folder, out, ds, 6, "--run.save_every=2"))
    assert "resumed from step00000002" in resumed.stdout


@SLOW
def test_a_resume_on_other_data_is_refused_and_a_moved_copy_resumes(image_folder, tmp_path):
    """The run folder records its data (data.json: sample count and fingerprint). Resumed with data.path on a
    partial copy (one image missing) or on another dataset: refused before anything is written, naming the
    counts. On a moved copy of the same data: it resumes."""
    import shutil

    ds, out = ds_json(tmp_path / "ds.json", 4), tmp_path / "run"
    _run(train_cmd(image_folder, out, ds, 2))
    assert json.loads((out / "data.json").read_text())["samples"] == 40
    partial, moved = tmp_path / "partial", tmp_path / "moved"
    shutil.copytree(image_folder, partial)
    next((partial / "a").iterdir()).unlink()
    shutil.copytree(image_folder, moved)
    refused = _run(train_cmd(partial, out, ds, 4), check=False)
    said = "data: the run was started on 40 samples"
    assert refused.returncode == 2 and said in refused.stderr, refused.stderr[-2000:]
    assert f"data.path {partial} holds 39" in refused.stderr
    resumed = _run(train_cmd(moved, out, ds, 4))
    assert "resumed from step00000002" in resumed.stdout and max(step_losses(out)) == 4


@SLOW
def test_online_knn_on_two_ranks_equals_one_rank(image_folder, tmp_path):
    """Each of 2 ranks extracts its share of the online k-NN sets (24 and 13 images: the world does not divide
    them) and votes for its share: the logged figures equal a 1-rank run of the same global batch."""
    from tests.test_train import _knn_rows, _knn_sets

    knn = _knn_sets(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(train_cmd(image_folder, one, ds_json(tmp_path / "ds1.json", 4, accum=2), 6, *knn))
    _run(torchrun_cmd(29673) + train_cmd(image_folder, two, ds_json(tmp_path / "ds2.json", 4), 6, *knn)[1:])
    assert sorted(_knn_rows(one)) == [2, 4, 6] and _knn_rows(two) == _knn_rows(one)
