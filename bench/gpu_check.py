"""One prepared call for a lent GPU machine: every check a CPU cannot make, each part printing one
PASS/FAIL line with its figures; the exit status is 1 unless every part passed.

    bash bench/gpu_check.sh              # on the GPU machine (within 9 minutes on one H200)
    bash bench/gpu_check.sh --dry_run    # the CPU rehearsal: the same parts at tiny sizes

1. wheels      GPU: the carried deepspeed, open_clip, ffcv and fire import. Dry run: python3.12 installs the
               wheelhouse into a clean folder, ffcv's native library loads there, and every requirement of every
               wheel is in the wheelhouse or on the GPU machine.
2. partitions  the CUDA graph replayed for 20 schedules against the eager CPU path (dry run: the static path
               the GPU runs against the slow reference of bench/morph_reference.py).
3. morph_ms    morphing + loss, eager vs CUDA graph.
4. gpu_tests   the tests marked gpu (graph replay, CLIP towers from timm and open_clip in fp16/bf16, collectives
               on NCCL); dry run: they are collected.
5. train_step  bench/bench_train.py on the GPU: the real ``train_window`` at ViT-B/16 on a generated FFCV .beton,
               with an open_clip CLIP-B/16-architecture teacher (random weights from a file) in its default
               precision, ZeRO-2 bf16 (ds_configs/zero2_bf16.json) and the CUDA graph replayed on its own stream,
               against the token-wise run of the same loop: img/s, MFU, peak memory, DTM's share of a window on
               the critical path, host syncs per window (dtm_ds.syncs by origin, and the device's own count by
               torch.cuda.set_sync_debug_mode); #23's targets (>= 3,000 img/s, DTM <= 1 %, one sync) said met or
               not. It fails when a window is not finite, no graph was captured or the project syncs twice.
6. memory      peak GPU memory per preset at micro batch 64 (two real windows each, one process each).
7. pretrain    ``make pretrain`` on a tiny generated .beton: a SIGTERM at micro-step 3 ends it with a checkpoint
               and exit 0, a re-run resumes to step 8; the losses against an uninterrupted run.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_train import compare, make_data, run_window

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("vits", "vitb", "vitl", "vith")


class Parts:
    """Runs each part, prints its PASS/FAIL line; an exception or a missing prerequisite is a FAIL with why."""

    def __init__(self):
        self.rows: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, fn, *args) -> None:
        start = time.perf_counter()
        try:
            ok, figures = fn(*args)
        except Exception as err:  # the part failed: say why, go on with the others
            ok, figures = False, f"{type(err).__name__}: {str(err).strip()[-600:]}"
        self.rows.append((name, ok, figures))
        print(f"{'PASS' if ok else 'FAIL'} {name} ({time.perf_counter() - start:.0f} s): {figures}", flush=True)

    def summary(self) -> int:
        passed = sum(ok for _, ok, _ in self.rows)
        print(f"\n=== gpu_check: {passed}/{len(self.rows)} parts passed ===")
        for name, ok, figures in self.rows:
            print(f"{'PASS' if ok else 'FAIL'} {name:<11} {figures}")
        print(json.dumps({"bench": "gpu_check", "passed": passed, "parts": len(self.rows),
                          **{name: {"ok": ok, "figures": figures} for name, ok, figures in self.rows}}))  # fmt: skip
        return 0 if passed == len(self.rows) else 1


def _run(cmd: list[str], timeout: float, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])} | (env or {})
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def _tail(done: subprocess.CompletedProcess) -> str:
    return (done.stderr or done.stdout).strip()[-600:]


# 1. wheels ------------------------------------------------------------------------------------------------------
_GPU_HAS = """torch torchvision timm numpy numba opencv-python-headless tqdm psutil packaging msgpack einops ninja
    py-cpuinfo huggingface-hub regex safetensors typing-extensions tensorboard nvidia-ml-py pillow pyyaml filelock"""
GPU_HAS = frozenset(_GPU_HAS.split())
"""Packages the GPU machine has (device tool, KINDS.md) that the wheels ask for."""
SATISFIED_BY = {"opencv-python": "opencv-python-headless"}  # the same cv2 module


def wheels(dry_run: bool, wheelhouse: Path) -> tuple[bool, str]:
    if not dry_run:
        import importlib
        from importlib.metadata import version

        for module in ("deepspeed", "open_clip", "ffcv", "fire"):
            importlib.import_module(module)
        names = ("deepspeed", "open_clip_torch", "ffcv", "fire")
        return True, "imported " + ", ".join(f"{n} {version(n)}" for n in names)
    files = sorted(wheelhouse.glob("*.whl"))
    if not files:
        return False, f"no wheels in {wheelhouse}: run bash bench/device_wheels.sh first"
    mb = sum(f.stat().st_size for f in files) / 2**20
    missing = _unmet_requirements(files)
    py312 = _python312()
    if py312 is None:
        return False, "no python3.12 here to install the wheelhouse with"
    with tempfile.TemporaryDirectory() as target:
        done = _run([py312, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", target,
                     *map(str, files)], 300)  # fmt: skip
        if done.returncode:
            return False, f"python3.12 could not install the wheelhouse: {_tail(done)}"
        native = [*Path(target, "ffcv").glob("_libffcv*.so"), *Path(target, "pydantic_core").glob("_pydantic_core*.so")]
        load = _run([py312, "-c", _LOAD_NATIVE, *map(str, native)], 60, {"PYTHONPATH": target})
        if load.returncode or load.stdout.strip() != "ok" or len(native) != 2:
            return False, f"a native module or a pure wheel did not load under python3.12 ({native}): {_tail(load)}"
    names = " and ".join(p.name for p in native)
    figures = f"{len(files)} wheels, {mb:.1f} MiB, installed by python3.12 into a clean folder, {names} load"
    return not missing, figures + (f"; requirements nowhere: {missing}" if missing else "; every requirement met")


_LOAD_NATIVE = """
import importlib.util, sys
for path in sys.argv[1:]:  # the extension modules alone (their packages import torch or typing_extensions)
    name = path.rsplit("/", 1)[1].split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
import fire, hjson, ftfy, fastargs, terminaltables, assertpy, termcolor, wcwidth
print("ok")
"""


def _unmet_requirements(files: list[Path]) -> list[str]:
    """Requirements of the wheels (Python 3.12 on Linux, no extras) found neither among them nor on the GPU."""
    import zipfile

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
    have = {canonicalize_name(f.name.split("-")[0]) for f in files} | {canonicalize_name(n) for n in GPU_HAS}
    unmet = set()
    for wheel in files:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for line in lines:
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                name = canonicalize_name(SATISFIED_BY.get(req.name, req.name))
                if (req.marker is None or req.marker.evaluate(env)) and name not in have:
                    unmet.add(f"{req.name} (for {wheel.name.split('-')[0]})")
    return sorted(unmet)


def _python312() -> str | None:
    candidates = ["python3.12", *sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    for c in candidates:
        try:
            done = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"], capture_output=True,
                                  text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.stdout.strip() == "True":
            return c
    return None


# 2, 3. the DTM step -----------------------------------------------------------------------------------------------
def partitions(dry_run: bool) -> tuple[bool, str]:
    from bench.morph_reference import canonical, reference_groups
    from dtm_ds.graphed import GraphedMorph
    from dtm_ds.morph import morph_levels, sample_schedule

    device = torch.device("cpu" if dry_run else "cuda")
    b, n, c = (2, 49, 16) if dry_run else (64, 196, 512)
    gen = torch.Generator(device=device).manual_seed(0)
    targets = torch.randn(b, n, c, device=device, generator=gen)
    graphed, equal = GraphedMorph(cuda_graph=True), 0
    schedules = [sample_schedule([n, n], [7 if dry_run else 14] * 2, gen) for _ in range(20)]
    for schedule in schedules:
        if dry_run:
            got = morph_levels(targets, schedule, static=True).groups
            want = [[canonical(reference_groups(t, merges.tolist())) for t in targets] for merges in schedule]
        else:
            got = graphed(targets, schedule).groups.cpu()
            want = [[canonical(g.tolist()) for g in lv] for lv in morph_levels(targets.cpu(), schedule.cpu()).groups]
        equal += int([[canonical(g.tolist()) for g in level] for level in got] == want)
    graphs = "" if dry_run else f", {len(graphed.graphs)} graph captured"
    return equal == len(schedules), f"partitions equal: {equal}/{len(schedules)} (B={b}, N={n}){graphs}"


def morph_ms(dry_run: bool) -> tuple[bool, str]:
    from dtm_ds.graphed import GraphedMorph
    from dtm_ds.morph import morphed_loss, sample_schedule

    device = torch.device("cpu" if dry_run else "cuda")
    b, n, c = (2, 49, 16) if dry_run else (64, 196, 512)
    gen = torch.Generator(device=device).manual_seed(0)
    targets = torch.randn(b, n, c, device=device, generator=gen)
    pred = torch.randn(b, n, c, device=device, generator=gen, requires_grad=True)
    schedule = sample_schedule([n, n], [7 if dry_run else 14] * 2, gen)

    def step(morph):
        morphed_loss(pred, targets, morph(targets, schedule), "smooth_l1", 2.0).mean().backward()

    eager, graph = (_median_ms(lambda m=m: step(m), device) for m in (GraphedMorph(cuda_graph=False), GraphedMorph()))
    return True, f"morph+loss eager {eager:.2f} ms, graph {graph:.2f} ms (B={b}; {eager / graph:.1f}x)"


def _median_ms(fn, device: torch.device, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


# 4. the gpu-marked tests ------------------------------------------------------------------------------------------
def gpu_tests(dry_run: bool) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"]
    done = _run([*cmd, "--collect-only"] if dry_run else cmd, 400)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else _tail(done)
    if dry_run:  # -q --collect-only prints "<file>: <count>"
        count = sum(int(line.rsplit(": ", 1)[1]) for line in done.stdout.splitlines() if ".py: " in line)
        return done.returncode == 0 and count >= 4, f"{count} tests collected (no CUDA here to run them)"
    return done.returncode == 0, last if done.returncode == 0 else done.stdout[-1500:]


# 5, 6. the real training window -----------------------------------------------------------------------------------
TARGETS = {"img_s": 3000, "dtm_share": 0.01, "project_syncs": 1}
"""#23's targets for ViT-B/16 DTM on one H100/H200: img/s, DTM's share of a window, host syncs per window."""


def train_step(dry_run: bool, folder: Path) -> tuple[bool, str]:
    preset, clip, size = ("tiny", "dtm-check-clip", 40) if dry_run else ("vitb", "ViT-B-16", 256)
    result = compare(folder, preset=preset, teacher=clip, size=size, micro=4 if dry_run else 64,
                     windows=3 if dry_run else 20)  # fmt: skip
    row, base, share = result["dtm"], result["tokenwise"], result["dtm_share"]
    img_s, peak, syncs = row["img_s"], row["peak_gib"], row["syncs_per_window"]
    mfu = f"MFU {100 * row['mfu']:.1f} %" if row["mfu"] is not None else "MFU n/a (no peak for this device)"
    met = {"img/s": img_s >= TARGETS["img_s"], "DTM share": share <= TARGETS["dtm_share"],
           "one project sync": syncs["project"] <= TARGETS["project_syncs"]}  # fmt: skip
    figures = (f"{preset} micro {row['micro']}: {img_s:.0f} img/s (token-wise {base['img_s']:.0f}), {mfu}, "
               f"{row['gflop_per_image']:.1f} GFLOP/image, peak {peak:.2f} GiB, DTM {100 * share:.2f} % of a window "
               f"on the critical path, host syncs per window {syncs} (device count "
               f"{row['device_syncs_per_window']}), teacher {row['teacher']}, loss {row['loss']:.4f}, {row['graphs']} "
               f"graph(s); targets (img/s >= {TARGETS['img_s']}, DTM <= 1 %, 1 sync): "
               + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in met.items()))  # fmt: skip
    graphed = dry_run or row["graphs"] == 1
    return row["finite"] and base["finite"] and graphed and img_s > 0 and met["one project sync"], figures


def memory(dry_run: bool, folder: Path) -> tuple[bool, str]:
    presets = ("tiny",) if dry_run else PRESETS
    cells, ok = [], True
    for preset in presets:
        clip = "dtm-check-clip" if dry_run else ("ViT-L-14" if preset == "vith" else "ViT-B-16")
        try:
            row = run_window(folder, preset=preset, teacher=clip, size=40 if dry_run else 256,
                             micro=4 if dry_run else 64, windows=2)  # fmt: skip
            cells.append(f"{preset} {row['peak_gib']:.1f} GiB ({row['img_s']:.0f} img/s)")
        except RuntimeError as err:
            ok = False
            cells.append(f"{preset} failed: {str(err)[-200:]}")
    return ok, ", ".join(cells) + " at micro batch " + ("4 (dry run, host RSS)" if dry_run else "64")


# 7. make pretrain, a stop signal, a resume ------------------------------------------------------------------------
def pretrain(dry_run: bool, folder: Path) -> tuple[bool, str]:
    beton = make_data(folder, 512, 40)
    launcher = f"DEEPSPEED={sys.executable} -m deepspeed.launcher.runner"  # no .venv there: the carried DeepSpeed
    deepspeed = [] if dry_run else ["-o", ".venv/.installed", launcher]
    micro = ["--ds_config", str(_small_ds(folder))] if dry_run else []  # the GPU: the device's default JSON
    common = ["--max_steps", "8", "--run.log_every=1", "--run.save_every=100", "--data.backend=ffcv"]
    common.append("--data.workers=2")

    def make(out: Path, faults: str | None):
        args = " ".join([*micro, *common])
        cmd = ["make", "--no-print-directory", *deepspeed, "pretrain", "MODEL=tiny", f"DATA={beton}", f"OUT={out}",
               f"ARGS={args}"]  # fmt: skip
        return _run(cmd, 300, {"DTM_FAULTS": faults} if faults else {"DTM_FAULTS": ""})

    stopped = make(folder / "stopped", json.dumps({"sigterm_micro": 3}))
    if stopped.returncode:
        return False, f"the stopped run exited {stopped.returncode}: {_tail(stopped)}"
    said = "stopped by a signal at step 4" in stopped.stdout
    ckpt = (folder / "stopped" / "checkpoints" / "latest").read_text().strip()
    resumed = make(folder / "stopped", None)
    again = "resumed from step00000004" in resumed.stdout and '"done": true, "step": 8' in resumed.stdout
    whole = make(folder / "whole", None)
    a, b = _losses(folder / "stopped"), _losses(folder / "whole")
    differ = max(abs(a[s] - b[s]) / abs(b[s]) for s in b) if sorted(a) == sorted(b) == list(range(1, 9)) else None
    ok = said and ckpt == "step00000004" and again and whole.returncode == 0 and differ is not None and differ < 1e-2
    return ok, (f"SIGTERM at micro-step 3: exit 0, {'said so' if said else 'NOT said'}, checkpoint {ckpt}; "
                f"re-run {'resumed at step 4, done at 8' if again else 'did NOT resume: ' + _tail(resumed)}; "
                f"losses vs uninterrupted: max rel diff {differ}")  # fmt: skip


def _small_ds(folder: Path) -> Path:
    path = folder / "ds_small.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
                                "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}))  # fmt: skip
    return path


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def main(dry_run: bool = False) -> int:
    parts = Parts()
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
          f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}", flush=True)  # fmt: skip
    if not dry_run and not torch.cuda.is_available():
        print("FAIL device: torch sees no CUDA device; on a CPU machine run with --dry_run", flush=True)
        return 1
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        folder = Path(tmp)
        parts("wheels", wheels, dry_run, ROOT / os.environ.get("WHEELHOUSE", ".whl"))
        parts("partitions", partitions, dry_run)
        parts("morph_ms", morph_ms, dry_run)
        parts("gpu_tests", gpu_tests, dry_run)
        parts("train_step", train_step, dry_run, folder)
        parts("memory", memory, dry_run, folder)
        parts("pretrain", pretrain, dry_run, folder)
    return parts.summary()


if __name__ == "__main__":  # no fire here: a bare GPU machine may lack it until the wheels are in
    argv = sys.argv[1:]
    sys.exit(main(dry_run="--dry_run" in argv))
