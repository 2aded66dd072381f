"""DTM pretraining.

    deepspeed dtm_ds/train.py --ds_config ds_configs/zero2_bf16.json --model vitb --output_dir out
        --data.path=train.beton --teacher.weights=ViT-B-16.pt    (one line)
    python dtm_ds/train.py --ds_config ds_configs/cpu.json --model tiny --output_dir out --max_steps 100

Any config field is overridable as ``--<section>.<field>=value``; the resolved config is saved as
``<output_dir>/config.json``. A run resumes from the latest complete checkpoint in its output_dir, on the
same or another number of ranks (the global batch must stay the same).

One optimizer step is one *window* of ``gradient_accumulation_steps`` micro-batches on every rank. At its
last micro-step the ranks all-reduce two flags (a non-finite loss in any micro-step; a stop signal), the
window's one host synchronisation, so every rank knows both at once: a window with a non-finite loss is
dropped whole (no update, the lr schedule does not move); a stop signal ends the run after the current
window with one checkpoint, on every rank at the same step.
"""

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the package folder must not shadow top-level modules
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

from dtm_ds import devices, distributed, faults
from dtm_ds.checkpoint import Checkpointer, Resume, checkpoint_dir
from dtm_ds.config import SECTIONS, Config, build_config
from dtm_ds.data import PretrainLoader, check_source, loader_spec
from dtm_ds.engine import (
    Window,
    Windows,
    build_engine,
    engine_config,
    engine_dtype,
    ignore_stop_signals,
    lr_factor,
    param_groups,
    set_lr,
    stop_on_signals,
)
from dtm_ds.files import check_writable
from dtm_ds.graphed import GraphedMorph
from dtm_ds.logs import Clock, RunLog, step_flops, step_values
from dtm_ds.morph import morphed_loss, sample_schedule, tokenwise_loss
from dtm_ds.online_knn import OnlineKNN, check_online_knn
from dtm_ds.options import read_config_file
from dtm_ds.run_record import check_records, resolved_settings, write_records
from dtm_ds.seeds import seed_of
from dtm_ds.student import DTMStudent
from dtm_ds.teacher import build_teacher
from dtm_ds.teacher import check_files as check_teacher_files
from dtm_ds.teacher import precision as teacher_precision
from dtm_ds.visualize import morph_figure

__all__ = [
    "Parts",
    "Schedule",
    "TrainState",
    "build",
    "check_inputs",
    "dtm_schedule",
    "finished_message",
    "fit",
    "lost_peer_message",
    "main",
    "plan_line",
    "resume",
    "save",
    "start_line",
    "train_window",
    "written",
]


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps applied
    epoch: int = 0
    epoch_step: int = 0  # windows of ``epoch`` consumed (applied or dropped)
    skipped_windows: int = 0  # windows dropped for a non-finite loss, over the whole run


@dataclass(frozen=True)
class Schedule:
    """The run's length in optimizer steps and its lr (linear warm-up, then cosine)."""

    steps_per_epoch: int
    total_steps: int  # the whole schedule: optim.epochs
    max_steps: int  # where this run stops (run.max_steps, at most total_steps)
    warmup: int
    peak_lr: float
    min_lr: float

    @classmethod
    def of(cls, config: Config, ds_config: dict, loader: PretrainLoader) -> "Schedule":
        o, per_epoch = config.optim, loader.windows_per_epoch
        total = o.epochs * per_epoch
        peak = o.peak_lr(ds_config["train_batch_size"])
        return cls(per_epoch, total, min(config.run.max_steps or total, total), round(o.warmup_epochs * per_epoch),
                   peak, o.min_lr)  # fmt: skip

    def lr(self, step: int) -> float:
        """The peak-group lr of the optimizer step that follows ``step`` applied steps."""
        return self.peak_lr * lr_factor(step, self.total_steps, self.warmup, self.min_lr / self.peak_lr)


@dataclass
class Parts:
    """What a pretraining run computes with, built by ``build``."""

    config: Config
    device: torch.device
    loader: PretrainLoader
    schedule: Schedule
    teacher: torch.nn.Module
    engine: object  # DeepSpeed's engine around the DTMStudent
    optimizer: torch.optim.Optimizer
    windows: Windows
    morph: GraphedMorph
    dtype: torch.dtype  # the engine's input dtype
    flops_per_image: float | None  # of one training step (for MFU), where the device's peak is known
    knn: OnlineKNN | None  # run.knn_every: the online k-NN's sets


def build(config: Config, ds_config: dict, device: torch.device, loader: PretrainLoader, schedule: Schedule) -> Parts:
    """The teacher (its weights), the student in its DeepSpeed engine, the DTM graph: their errors come before
    any file is written."""
    o, run = config.optim, config.run
    teacher = build_teacher(config.teacher, config.model, device)
    if config.model.target_dim not in (None, teacher.dim):
        raise ValueError(f"model.target_dim={config.model.target_dim} but the teacher's targets are {teacher.dim} wide")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, target_dim=teacher.dim))
    torch.manual_seed(run.seed)  # the same initial student whatever the world size
    student = DTMStudent(config.model, teacher.dim)
    engine, optimizer = build_engine(student, param_groups(student, o.weight_decay, o.decay_tables), ds_config,
                                     o.betas, o.eps)  # fmt: skip
    morph = GraphedMorph(config.dtm.protect_first, run.cuda_graph, run.compile)
    shape = (ds_config["train_micro_batch_size_per_gpu"], config.model.grid**2, teacher.dim)
    morph.prepare(torch.zeros(shape, device=device), dtm_schedule(config, device, 0, 0))  # before loader threads
    if run.compile:
        engine.compile(backend=run.compile)
    windows = Windows(engine, optimizer, ds_config["gradient_accumulation_steps"])
    knn = OnlineKNN(run, device) if run.knn_every else None
    return Parts(config, device, loader, schedule, teacher, engine, optimizer, windows, morph,
                 engine_dtype(ds_config), step_flops(teacher, config.model, teacher.dim, device), knn)  # fmt: skip


def dtm_schedule(config: Config, device: torch.device, window: int, chunk: int) -> torch.Tensor:
    """The DTM schedule [L, K] of micro-batch ``chunk`` of window ``window`` (counted over the run, applied or
    dropped): a function of (seed, window, chunk) whatever the ranks and micro-steps, sampled on the device
    (no host round trip). ``dtm.shared_schedule``: one for the whole global batch."""
    chunk = 0 if config.dtm.shared_schedule else chunk
    gen = torch.Generator(device=device).manual_seed(seed_of(config.run.seed, window, chunk))
    return sample_schedule(config.dtm.n_max, config.dtm.k_max, gen)


def train_window(p: Parts, s: TrainState, batches, clock: Clock) -> tuple[Window, torch.Tensor]:
    """One optimizer step over the window's micro-batches ``batches``: per micro-batch, the teacher's targets,
    the masked student, morphing and the DTM level losses [L]; the window protocol (dtm_ds/engine.py) does
    the rest. Returns the window and its last micro-batch's images."""
    dtm, seed, accum = p.config.dtm, p.config.run.seed, p.windows.accum
    window, rank, seen = s.step + s.skipped_windows, distributed.rank(), {}

    def loss_of(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        with clock("time_data", sync=False):
            batch, chunk = next(batches), rank * accum + m
        torch.manual_seed(seed_of(seed, window, chunk))  # drop path: per micro-batch, not per rank
        with clock("time_teacher"):
            targets = p.teacher(batch["images"])  # (B, N, D)
        with clock("time_student"):  # on a GPU the morphing (groups (L, B, N)) runs meanwhile, on its own stream
            schedule_of = lambda: dtm_schedule(p.config, p.device, window, chunk)  # noqa: E731 ((L, K) merges)
            pending = None if dtm.tokenwise else p.morph.launch(targets, schedule_of)
            pred = p.engine(batch["images"].to(p.dtype), batch["masks"]).float()  # (B, N, D)
        with clock("time_dtm"):
            if pending is None:  # the baseline: the loss between the raw tokens
                levels = tokenwise_loss(pred, targets, dtm.loss, dtm.beta, dtm.normalize_target)[None]  # (1,)
            else:
                morphed = pending.wait()  # the loss waits for the morphing stream (an event, not the host)
                levels = morphed_loss(pred, targets, morphed, dtm.loss, dtm.beta, dtm.normalize_target)  # (L,)
            faults.dump(p.windows.micro, images=batch["images"], targets=targets, pred=pred,
                        schedule=None if pending is None else pending.schedule)  # fmt: skip
        seen["images"] = batch["images"]
        return dtm.loss_weight * levels.mean(), levels

    set_lr(p.optimizer, p.schedule.lr(s.step))
    return p.windows.run(loss_of, clock, want_norm=clock.device is not None), seen["images"]


def fit(p: Parts, s: TrainState, saver: Checkpointer) -> dict[str, float]:
    """Windows until ``max_steps`` or a stop signal; logs, pictures and checkpoints on the way. Updates ``s``."""
    run, rank, world, sched = p.config.run, distributed.rank(), distributed.world(), p.schedule
    stop_on_signals(p.windows)  # preemption: the ranks agree on a window, save there and exit
    log = RunLog(run.output_dir, rank == 0, sched.max_steps, s.step, "pretrain", monitor=p.engine.monitor)
    watchdog = distributed.Watchdog(run.dist_timeout_s, lambda: lost_peer_message(run.output_dir, rank),
                                    enabled=world > 1)  # fmt: skip
    saved, dropped_in_a_row, last, stop = s.step, 0, {}, False
    for epoch, epoch_step, batches in p.loader.windows(s.epoch, s.epoch_step):
        if s.step >= sched.max_steps or stop:
            break
        timed = (s.step + 1) % run.log_every == 0 or s.step + 1 == sched.max_steps
        window, images = train_window(p, s, batches, clock := Clock(p.device if timed else None))
        watchdog.beat()
        rolled = epoch_step + 1 == sched.steps_per_epoch
        (s.epoch, s.epoch_step), stop = (epoch + 1, 0) if rolled else (epoch, epoch_step + 1), window.stop
        if window.dropped:
            s.skipped_windows, dropped_in_a_row = s.skipped_windows + 1, dropped_in_a_row + 1
            if dropped_in_a_row >= run.max_nonfinite:
                raise FloatingPointError(
                    f"{dropped_in_a_row} non-finite losses in a row at step {s.step + 1}; the last good "
                    f"checkpoint in {checkpoint_dir(run.output_dir)} is intact"
                )
            continue
        s.step, dropped_in_a_row = s.step + 1, 0
        if timed:
            lrs = [g["lr"] for g in p.optimizer.param_groups]  # the lrs that acted
            last = step_values(p.engine, p.optimizer, window.value, lrs, window.local_norm)
            last |= clock.times | {"epoch": s.epoch, "skipped_windows": s.skipped_windows}
            if p.knn is not None and s.step % run.knn_every == 0:  # a logging step (checked): every rank
                last |= p.knn(p.engine.module, s.step)
            tokens = p.config.model.grid**2
            log.step(s.step, last, p.engine.train_batch_size(), p.flops_per_image, tokens, world,
                     excluded_s=last.get("knn_seconds", 0.0) if "knn_top1" in last else 0.0)  # fmt: skip
        if run.vis_every and s.step % run.vis_every == 0 and rank == 0:
            log.image(s.step, morph_figure(images[:4], p.teacher, p.config, dtm_schedule(p.config, p.device, 0, 0)))
        if s.step % run.save_every == 0 and s.step < sched.max_steps and not stop:
            saved = save(p, s, saver, watchdog)
    if s.step > saved:
        save(p, s, saver, watchdog)
    watchdog.close()
    log.close()
    if stop and rank == 0:
        print(f"stopped by a signal at step {s.step} (all ranks); a re-run resumes there", flush=True)
    return last


def save(p: Parts, s: TrainState, saver: Checkpointer, watchdog) -> int:
    faults.arm_checkpoint_kill(p.engine, s.step)
    watchdog.pause()  # a long write is not a hang; the backend's own timeout covers its collectives
    saver.save(p.engine, s.step, {"train_state": asdict(s)})
    watchdog.beat()
    return s.step


def resume(p: Parts, saver: Checkpointer, start: Resume) -> TrainState:
    """The state to continue from: ``start``'s checkpoint loaded into the engine, or a fresh state."""
    if start.tag is None:
        return TrainState()
    s = TrainState(**saver.load(p.engine, start)["train_state"])
    if distributed.rank() == 0:
        how = f" (through DeepSpeed's universal format, now on {distributed.world()} ranks)" if start.universal else ""
        print(f"resumed from {saver.prefix}{start.step:08d}: step {s.step}, epoch {s.epoch} window {s.epoch_step}"
              f"{how}", flush=True)  # fmt: skip
    return s


def main(
    ds_config: str | None = None,
    model: str | None = None,
    output_dir: str | None = None,
    max_steps: int | None = None,
    print_config: bool = False,
    config: str | None = None,
    local_rank: int | None = None,
    **overrides,
) -> None:
    """Pretrain a preset with a DeepSpeed config.

    Args:
        ds_config: DeepSpeed JSON (micro batch, accumulation, precision, ZeRO stage, clipping); see ds_configs/.
            Default: ds_configs/zero2_bf16.json on a GPU machine, ds_configs/cpu.json on a CPU one.
        model: preset: tiny (CPU, pixels teacher), vits, vitb, vitl or vith (default: the config file's, else vitb).
        output_dir: the run folder (same as --run.output_dir); a re-run resumes it.
        max_steps: stop after this many optimizer steps (same as --run.max_steps; the lr schedule still
            spans optim.epochs).
        print_config: print the resolved settings as JSON (for WORLD_SIZE ranks, default 1) and exit;
            reads no data or weights and needs no GPU. The output is a valid ``--config`` file.
        config: a YAML or JSON file with the sections of config.json (``{"optim": {"lr": ...}, ...}``; also
            ``preset`` and ``ds_config``); options on the command line win over it.
        local_rank: set by the deepspeed launcher.
    """
    overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
    overrides |= {k: v for k, v in (("run.output_dir", output_dir), ("run.max_steps", max_steps)) if v is not None}
    if config:  # the file first, the command line over it
        from_file, extra = read_config_file(config, SECTIONS, keep=("preset", "ds_config"), ignore=DERIVED)
        overrides = from_file | overrides
        model, ds_config = model or extra.get("preset"), ds_config or extra.get("ds_config")
    model = model or "vitb"
    config = build_config(model, overrides)
    ds_path, chosen = devices.resolve_ds_config(ds_config)
    if print_config:
        print(json.dumps(resolved_settings(config, model, ds_path) | {"ds_config_chosen": chosen}, indent=2))
        return
    world = distributed.planned_world()
    engine_cfg, data = check_inputs(config, ds_path, world)  # before the distributed set-up: it builds DeepSpeed's ops
    device = distributed.init(local_rank, config.run.dist_timeout_s)
    distributed.check_world(world)
    out, rank0 = config.run.output_dir, distributed.rank() == 0
    loader = PretrainLoader(loader_spec(config, engine_cfg, distributed.rank(), world), device)
    saver = Checkpointer(out, "step", config.run.keep_last)
    schedule = Schedule.of(config, engine_cfg, loader)
    if (done := saver.latest()[1]) >= schedule.max_steps:  # a finished run re-run writes nothing
        if rank0:
            print(finished_message(out, done, schedule.max_steps), flush=True)
        return
    lock = distributed.lock_run_folder(out)  # noqa: F841 (held while main runs): a second launch here exits 2
    start = saver.plan(engine_cfg, world, schedule.max_steps)  # another world: through the universal format
    parts = build(config, start.engine_config(engine_cfg), device, loader, schedule)  # errors: nothing written yet
    if rank0:
        write_records(parts.config, engine_cfg, world, data)  # with the teacher's width
    if rank0:
        print(start_line(config, model, engine_cfg, device, f"{ds_path} ({chosen})", parts.schedule), flush=True)
        print(plan_line(config, loader, parts.schedule), flush=True)
    state = resume(parts, saver, start)
    try:
        last = fit(parts, state, saver)
    except RuntimeError as e:  # a peer died or hung: say where to resume from
        if not distributed.lost_peer(e):
            raise
        sys.exit(lost_peer_message(out, distributed.rank(), e))
    ignore_stop_signals()
    if rank0:
        done = state.step >= parts.schedule.max_steps  # False: stopped by a signal, a re-run continues
        paths = written(out)
        print("wrote: " + ", ".join(f"{k} {v}" for k, v in paths.items()), flush=True)
        print(json.dumps({"done": done, "step": state.step, "loss": last.get("loss")} | paths), flush=True)
    distributed.close()


DERIVED = ("engine", "peak_lr", "peak_lr_rule", "accelerator", "teacher_precision", "ds_config_chosen")
"""What ``--print_config`` adds to the config's sections (derived figures): skipped when its output is read back."""


def check_inputs(config: Config, ds_path: str, world: int) -> tuple[dict, dict]:
    """Every file and setting a run reads, checked for ``world`` ranks before any distributed set-up. The data
    source is opened (its header or listing), the teacher's files are looked for, an existing run folder's
    records are compared, the run folder can be written. Returns the DeepSpeed config and the data's identity
    (``check_source``)."""
    engine_cfg = engine_config(ds_path, world, config.optim.batch_size)
    check_writable(config.run.output_dir, "run.output_dir")
    data = check_source(loader_spec(config, engine_cfg, 0, world))
    check_teacher_files(config.teacher)
    check_online_knn(config.run, engine_cfg.get("zero_optimization", {}).get("stage", 0))
    if config.run.knn_every:
        OnlineKNN(config.run, torch.device("cpu"))  # its sets open (a listing each)
    check_records(config, engine_cfg, world, data)
    return engine_cfg, data


def start_line(config: Config, preset: str, engine_cfg: dict, device: torch.device, ds_config: str,
               schedule: Schedule) -> str:  # fmt: skip
    """One line at the start of a run: where it computes, with which engine settings and teacher precision."""
    zero = engine_cfg.get("zero_optimization", {}).get("stage", 0)
    micro, accum = engine_cfg["train_micro_batch_size_per_gpu"], engine_cfg["gradient_accumulation_steps"]
    world = engine_cfg["train_batch_size"] // (micro * accum)
    return (
        f"pretraining {preset} on {world} x {device.type} ({distributed.backend()}); DeepSpeed config "
        f"{ds_config}: {str(engine_dtype(engine_cfg)).removeprefix('torch.')}, ZeRO {zero}, global batch "
        f"{engine_cfg['train_batch_size']} = {micro} x {accum} x {world}; teacher {config.teacher.name} in "
        f"{teacher_precision(config.teacher, device.type)}; {schedule.max_steps} steps of {schedule.total_steps}"
    )


def plan_line(config: Config, loader: PretrainLoader, schedule: Schedule) -> str:
    """The second line at the start: the data, the schedule in steps, the lr, and where the run writes."""
    out = Path(config.run.output_dir)
    return (
        f"data {config.data.path}: {loader.source.num_samples} samples, {schedule.steps_per_epoch} steps per epoch; "
        f"lr peak {schedule.peak_lr:.4g} after {schedule.warmup} warm-up steps, cosine to {schedule.min_lr:.4g} at "
        f"step {schedule.total_steps}; checkpoints every {config.run.save_every} steps in {checkpoint_dir(out)}, "
        f"logs every {config.run.log_every} in {out / 'metrics.jsonl'} and {out / 'tb'}"
    )


def written(output_dir: str | Path) -> dict[str, str]:
    """Where a run's results are: its latest complete checkpoint, metrics and TensorBoard folder."""
    out = Path(output_dir)
    tag, _ = Checkpointer(out, "step", 1).latest()
    return {"checkpoint": str(checkpoint_dir(out) / tag) if tag else None, "metrics": str(out / "metrics.jsonl"),
            "tensorboard": str(out / "tb")}  # fmt: skip


def lost_peer_message(output_dir: str | Path, rank: int, error: BaseException | None = None) -> str:
    """What a rank says when another rank died or hung: where the run can resume from (and the error)."""
    tag, _ = Checkpointer(output_dir, "step", 1).latest()
    said = f" ({type(error).__name__}: {str(error).strip().splitlines()[0][:300]})" if error else ""
    return (
        f"rank {rank}: lost contact with another rank. The launcher's report names the rank that failed first. "
        f"The last complete checkpoint is {tag or 'none'} in {checkpoint_dir(output_dir)}; re-run the same "
        f"command to resume.{said}"
    )


def finished_message(output_dir: str | Path, step: int, max_steps: int) -> str:
    """What a re-run of a finished run prints (and nothing else happens): where its last checkpoint is, then
    the run's JSON summary line."""
    where = checkpoint_dir(output_dir) / f"step{step:08d}"
    summary = json.dumps({"done": True, "step": step, "loss": None})
    return f"nothing to do: the run is done at step {step} of {max_steps}; its last checkpoint is {where}\n{summary}"


if __name__ == "__main__":
    from dtm_ds import cli

    cli.run(main, lambda: cli.describe_config(__doc__, main), exit_at_once=True)
