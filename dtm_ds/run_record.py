"""What a run folder promises: its config (``config.json``), its engine layout (``engine.json``) and its data
(``data.json``: sample count and fingerprint).

A re-run in the same folder continues the same run, so both are checked before anything is written:
any field that would change the result must be equal. ``MAY_CHANGE`` lists what may differ between
runs (length, logging and checkpoint cadence, timeouts, workers, where the data and weights live).
The number of ranks and the accumulation may change when the global batch and the micro batch stay
the same (elastic resume: the same micro-batches in the same order, see dtm_ds/data/__init__.py).
"""

import json
import os
from pathlib import Path

from dtm_ds.config import Config
from dtm_ds.engine import engine_dtype
from dtm_ds.files import write_atomic

__all__ = [
    "ENGINE_MUST_MATCH",
    "MAY_CHANGE",
    "RESOLVED_AT_START",
    "check_records",
    "resolved_settings",
    "write_records",
]

MAY_CHANGE = frozenset(
    {
        "run.output_dir",
        "run.max_steps",
        "run.save_every",
        "run.keep_last",
        "run.log_every",
        "run.vis_every",
        "run.knn_every",
        "run.knn_train",
        "run.knn_val",
        "run.knn_per_class",
        "run.knn_crop_ratio",
        "run.max_nonfinite",
        "run.dist_timeout_s",
        "run.cuda_graph",
        "run.compile",
        "data.path",
        "data.workers",
        "teacher.weights",
        "model.grad_checkpointing",
    }
)
"""Config fields that may differ from the run folder's ``config.json`` on a re-run."""


def _engine_layout(ds_config: dict, world: int) -> dict:
    """The engine facts a resume depends on."""
    return {
        "train_batch_size": ds_config["train_batch_size"],
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "world": world,
        "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        "dtype": str(engine_dtype(ds_config)).removeprefix("torch."),
        "gradient_clipping": ds_config.get("gradient_clipping", 0.0),
    }


RESOLVED_AT_START = frozenset({"model.target_dim"})
"""Fields whose None means "from the run's parts" (the teacher's width), set before the records are written."""

ENGINE_MUST_MATCH = ("train_batch_size", "train_micro_batch_size_per_gpu", "zero_stage", "dtype", "gradient_clipping")


def check_records(config: Config, ds_config: dict, world: int, data: dict) -> dict | None:
    """Raise ``ValueError`` naming every field that differs from the run folder's records (nothing is written).
    Returns the previous engine layout (None: a new folder). A field the run resolves when it starts
    (``RESOLVED_AT_START``) is compared only once it is set. ``data`` (``dtm_ds.data.check_source``): the
    dataset's sample count and fingerprint, which must be the run's wherever ``data.path`` now points."""
    folder = Path(config.run.output_dir)
    layout = _engine_layout(ds_config, world)
    previous = _read(folder / "engine.json")
    differences = _config_differences(_read(folder / "config.json"), config.to_dict())
    recorded = _read(folder / "data.json")
    if recorded is None and previous is not None:
        differences.append("data: not recorded (an earlier dtm_ds version)")
    elif recorded is not None and recorded != data:
        differences.append(
            f"data: the run was started on {recorded.get('samples')} samples (fingerprint "
            f"{recorded.get('fingerprint')}), data.path {config.data.path} holds {data['samples']} (fingerprint "
            f"{data['fingerprint']}): another dataset or a partial copy (a moved copy of the same data is fine)"
        )
    if previous is not None:
        differences += [
            f"{key}: {previous.get(key)!r} -> {layout[key]!r} (DeepSpeed config)"
            for key in ENGINE_MUST_MATCH
            if key in previous and previous[key] != layout[key]
        ]
    if differences:
        raise ValueError(
            f"{folder} holds a run with other settings; a re-run must continue it unchanged:\n  "
            + "\n  ".join(differences)
            + f"\nFields that may change: {', '.join(sorted(MAY_CHANGE))}. To start afresh, use a new --output_dir."
        )
    return previous


def write_records(config: Config, ds_config: dict, world: int, data: dict) -> None:
    """Rank 0 of a run with work to do: check the folder's records (``check_records``), then write them."""
    check_records(config, ds_config, world, data)
    folder = Path(config.run.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "config.json", json.dumps(config.to_dict(), indent=2))
    write_atomic(folder / "engine.json", json.dumps(_engine_layout(ds_config, world), indent=2))
    write_atomic(folder / "data.json", json.dumps(data, indent=2))


def _config_differences(old: dict | None, new: dict) -> list[str]:
    if old is None:
        return []
    out = []
    for section, fields in new.items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            # a field the folder does not record (an earlier version) differs from any value
            before = old.get(section, {}).get(name, "(not recorded: an earlier dtm_ds version)")
            unresolved = value is None and key in RESOLVED_AT_START
            if key not in MAY_CHANGE and not unresolved and _plain(before) != _plain(value):
                out.append(f"{key}: {before!r} -> {value!r}")
    return out


def _plain(value):
    return json.loads(json.dumps(value))  # tuples and lists compare equal, as they do in config.json


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or use a new --output_dir") from err


def resolved_settings(config: Config, preset: str, ds_config: str, world: int | None = None) -> dict:
    """Every setting a pretraining run of ``preset`` with ``ds_config`` on ``world`` ranks (default: the
    environment's WORLD_SIZE, else 1) would use (``dtm_ds/train.py --print_config``; docs/REPRODUCE.md's
    table holds them)."""
    from dtm_ds.devices import accelerator
    from dtm_ds.engine import engine_config
    from dtm_ds.teacher import precision

    world = world or int(os.environ.get("WORLD_SIZE", 1))
    accel = accelerator()

    engine = _engine_layout(engine_config(ds_config, world, config.optim.batch_size), world)
    peak = config.optim.peak_lr(engine["train_batch_size"])
    derived = {"peak_lr": peak, "peak_lr_rule": f"optim.lr {config.optim.lr:g} x sqrt(global batch / 2048)"}
    derived |= {"accelerator": accel, "teacher_precision": {a: precision(config.teacher, a) for a in ("cuda", "cpu")}}
    return {"preset": preset, "ds_config": ds_config, "engine": engine, **derived, **config.to_dict()}
