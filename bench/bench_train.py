"""Throughput of the real pretraining loop: ``dtm_ds.train.train_window`` over the real loader, DTM against the
token-wise baseline of the same loop, with the host synchronisations per window counted.

Each variant runs in a process of its own (its engine and memory alone): the run's parts are built by
``dtm_ds.train.build`` from a generated FFCV .beton (or image folder) and the shipped DeepSpeed config of the
device, exactly as pretraining builds them. After 2 warm-up windows, ``--windows`` windows are timed end to
end (img/s, MFU where the device's peak is known), the next ``--windows`` are counted by
``dtm_ds.syncs.HostSyncs`` (calls that would block the host on a GPU, by origin; on a GPU also
``torch.cuda.set_sync_debug_mode``), and 3 more run with the phase clock on. The *DTM share on the critical
path* is 1 - (token-wise window time) / (DTM window time): what morphing adds to a window.

    python -m bench.bench_train                                   # CPU: tiny preset, pixels teacher
    python -m bench.bench_train --preset vitb --teacher ViT-B-16 --micro 64 --windows 30   # one GPU

``python -m bench.bench_train window ...`` is one variant's worker (one JSON line).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SYNC_ORIGINS = ("project", "deepspeed", "torch", "other", "cpu_only")  # dtm_ds.syncs.HostSyncs.by_origin
CHECK_CLIP = {  # a CLIP small enough for a CPU: the tiny preset's 8x8 grid at 32 px
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 4, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def make_data(folder: Path, images: int, size: int, backend: str = "ffcv") -> Path:
    """A generated two-class folder of ``size`` px images, converted to an FFCV .beton for ``backend`` ffcv."""
    from data_prep.synthetic import write_class_folder

    source = folder / f"src_{size}"
    if not source.exists():
        write_class_folder(source, {"a": images // 2, "b": images - images // 2}, size=(size, size))
    if backend != "ffcv":
        return source
    from data_prep.write_ffcv import convert

    beton = folder / f"check_{size}.beton"
    if not beton.exists():
        convert(str(source), str(beton), workers=min(8, os.cpu_count() or 1))
    return beton


def make_teacher(folder: Path, name: str) -> Path:
    """Random weights of open_clip's ``name`` as a state-dict file (nothing is downloaded)."""
    import open_clip

    if name == "dtm-check-clip":
        (folder / "dtm-check-clip.json").write_text(json.dumps(CHECK_CLIP))
        open_clip.add_model_config(folder / "dtm-check-clip.json")
    path = folder / f"{name}.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(name, pretrained=None).state_dict(), path)
    return path


def window(folder: str, preset: str = "tiny", teacher: str = "pixels", size: int = 40, micro: int = 16,
           windows: int = 8, accum: int = 1, tokenwise: bool = False, backend: str = "ffcv",
           ds: str = "") -> dict:  # fmt: skip
    """One variant: the real windows of ``preset`` on this machine's device (see the module docstring).
    ``teacher``: ``pixels`` or an open_clip architecture name (random weights); ``ds``: a DeepSpeed JSON (default:
    the one shipped for this device), its micro batch and accumulation replaced."""
    from dtm_ds import distributed
    from dtm_ds.config import build_config
    from dtm_ds.data import PretrainLoader, loader_spec
    from dtm_ds.devices import default_ds_config
    from dtm_ds.engine import engine_config
    from dtm_ds.logs import Clock, count_step_flops, device_peak_flops, memory_gib
    from dtm_ds.syncs import HostSyncs
    from dtm_ds.teacher import precision
    from dtm_ds.train import Schedule, TrainState, build, train_window

    work = Path(folder)
    data = make_data(work, 256, size, backend)
    device = distributed.init()
    shipped = json.loads(Path(ds or default_ds_config()).read_text())  # default: as a run on this device gets it
    ds_path = work / f"ds_{preset}_{micro}_{accum}_{Path(ds).stem}.json"
    ds_path.write_text(json.dumps(shipped | {"train_micro_batch_size_per_gpu": micro,
                                             "gradient_accumulation_steps": accum}))  # fmt: skip
    overrides = {"data.path": str(data), "data.backend": backend, "dtm.tokenwise": tokenwise,
                 "run.output_dir": str(work / f"run_{preset}")}  # fmt: skip
    if teacher != "pixels":
        overrides |= {"teacher.name": f"clip:{teacher}", "teacher.weights": str(make_teacher(work, teacher))}
    config = build_config(preset, overrides)
    ds_config = engine_config(str(ds_path), 1, None)
    loader = PretrainLoader(loader_spec(config, ds_config), device)
    parts = build(config, ds_config, device, loader, Schedule.of(config, ds_config, loader))
    stream, state, cuda = parts.loader.windows(0, 0), TrainState(), device.type == "cuda"

    def step(clock: Clock):
        out, _ = train_window(parts, state, next(stream)[2], clock)
        state.step += 1
        return out

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        out = step(Clock(None))
    synchronize()
    start = time.perf_counter()
    for _ in range(windows):
        out = step(Clock(None))
    synchronize()
    seconds = (time.perf_counter() - start) / windows
    per_window, device_syncs = [], 0
    for _ in range(windows):
        with HostSyncs() as syncs, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            out = step(Clock(None))
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        per_window.append(syncs.by_origin)
        if os.environ.get("BENCH_SYNCS"):  # where each counted call was made, for a reader hunting them
            print(json.dumps(Counter(f"{o} {w} {at}" for o, w, at in syncs.calls).most_common()), file=sys.stderr)
        device_syncs = max(device_syncs, sum("synchroniz" in str(w.message) for w in caught))
    phases: dict[str, float] = {}
    for _ in range(3):
        step(clock := Clock(device))
        for key, value in clock.times.items():
            phases[key] = phases.get(key, 0.0) + value
    peak, img_s = device_peak_flops(), micro * accum / seconds
    flops = count_step_flops(parts.teacher, config.model, parts.config.model.target_dim, device)
    mem = memory_gib().tolist()
    row = {
        "window": preset, "tokenwise": tokenwise, "micro": micro, "accum": accum, "window_s": seconds,
        "img_s": img_s, "gflop_per_image": flops / 1e9, "mfu": flops * img_s / peak if peak else None,
        "loss": float(out.value.mean()), "finite": bool(torch.isfinite(out.value).all()),
        "peak_gib": mem[0] if cuda else mem[1], "phases_s": phases, "graphs": len(parts.morph.graphs),
        "teacher": precision(config.teacher, device.type), "device": _device_name(device),
        "syncs_per_window": {k: max(c[k] for c in per_window) for k in SYNC_ORIGINS},
        "device_syncs_per_window": device_syncs if cuda else None,
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def run_window(folder: Path, timeout: float = 900, **options) -> dict:
    """``window(**options)`` in a process of its own; its JSON row (a RuntimeError with the output's tail)."""
    cmd = [sys.executable, "-m", "bench.bench_train", "window"]
    cmd += [f"--{k}={v}" for k, v in ({"folder": folder} | options).items()]
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    rows = [line for line in done.stdout.splitlines() if line.startswith('{"window"')]
    if done.returncode or not rows:
        raise RuntimeError(f"the window worker failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return json.loads(rows[-1])


def compare(folder: Path, **options) -> dict:
    """DTM and the token-wise baseline of the same loop, each in its own process: the figures and the DTM share."""
    dtm = run_window(folder, **options)
    base = run_window(folder, **options, tokenwise=True)
    return {"dtm": dtm, "tokenwise": base, "dtm_share": 1 - base["window_s"] / dtm["window_s"]}


def main(preset: str = "tiny", teacher: str = "pixels", size: int | None = None, micro: int = 16, windows: int = 8,
         accum: int = 1, backend: str = "ffcv") -> dict:  # fmt: skip
    size = size or (40 if preset == "tiny" else 256)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        result = compare(Path(tmp), preset=preset, teacher=teacher, size=size, micro=micro, windows=windows,
                         accum=accum, backend=backend)  # fmt: skip
    dtm, base = result["dtm"], result["tokenwise"]
    print(f"\nreal training loop (train_window): preset {preset}, teacher {teacher} ({dtm['teacher']}), micro {micro} "
          f"x accum {accum}, {backend}, {dtm['device']}, {dtm['gflop_per_image']:.2f} GFLOP/image")  # fmt: skip
    print(f"{'':<11}{'window ms':>10}{'img/s':>9}{'MFU %':>7}{'  host syncs/window (project, deepspeed, other)':>48}")
    for name, row in (("dtm", dtm), ("token-wise", base)):
        mfu = f"{100 * row['mfu']:.1f}" if row["mfu"] is not None else "n/a"
        s = row["syncs_per_window"]
        print(f"{name:<11}{1e3 * row['window_s']:>10.1f}{row['img_s']:>9.1f}{mfu:>7}"
              f"{s['project']:>26}{s['deepspeed']:>11}{s['other']:>7}")  # fmt: skip
    print(f"DTM on the critical path: {100 * result['dtm_share']:.2f} % of a window (the paper: about 1 %)")
    summary = {"bench": "train", "preset": preset, "teacher": teacher, "micro": micro, "accum": accum,
               "device": dtm["device"], "dtm_img_s": round(dtm["img_s"], 2), "tokenwise_img_s": round(base["img_s"], 2),
               "dtm_share_pct": round(100 * result["dtm_share"], 2), "syncs_per_window": dtm["syncs_per_window"],
               "mfu_pct": None if dtm["mfu"] is None else round(100 * dtm["mfu"], 2)}  # fmt: skip
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["window"]:  # the worker: no fire (a bare GPU machine may lack it until the wheels are in)
        kinds = {"size": int, "micro": int, "windows": int, "accum": int, "tokenwise": lambda v: v == "True"}
        opts = dict(a.removeprefix("--").split("=", 1) for a in argv[1:])
        window(**{k: kinds.get(k, str)(v) for k, v in opts.items()})
        sys.stdout.flush()
        os._exit(0)  # no interpreter teardown: communication threads can abort a finished process there
    import fire

    fire.Fire(main, serialize=lambda result: None)
