"""DTM pretraining.

    deepspeed dtm_ds/train.py --ds_config ds_configs/zero2_bf16.json --model vitb --output_dir out
        --data.path=train.beton --teacher.weights=ViT-B-16.pt    (one line)
    python dtm_ds/train.py --ds_config ds_configs/cpu.json --model tiny --output_dir out --max_steps 100

Any config field is overridable as ``--<section>.<field>=value``; the resolved config is saved as
``<output_dir>/config.json``. A run resumes from the latest complete checkpoint in its output_dir, on the
same or another number of ranks (the global batch must stay the same).

One optimizer step is one *window*: ``gradient_accumulation_steps`` micro-batches on every rank. Each
micro-step makes one all-reduce of two flags (its loss is non-finite; a stop signal arrived), so every
rank knows both at the same micro-step. A window with a non-finite loss is dropped whole (no update, its
gradients cleared, the lr schedule does not move); a stop signal ends the run at the end of the current
window with one checkpoint, on every rank at the same step.
"""

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the package folder must not shadow top-level modules
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

from dtm_ds import checkpoint, distributed, faults
from dtm_ds.config import Config, build_config
from dtm_ds.data import LoaderSpec, PretrainLoader, seed_of
from dtm_ds.dtm_step import DTMStep
from dtm_ds.engine import build_engine, engine_config, engine_dtype, grad_norms, lr_factor, param_groups, set_lr
from dtm_ds.logs import Clock, RunLog, step_flops
from dtm_ds.morph import morphed_loss, sample_schedule
from dtm_ds.run_record import check_and_record, engine_layout
from dtm_ds.student import DTMStudent
from dtm_ds.teacher import build_teacher


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    """Optimizer steps applied."""
    epoch: int = 0
    epoch_step: int = 0
    """Windows of ``epoch`` consumed (applied or dropped)."""
    skipped_windows: int = 0
    """Windows dropped for a non-finite loss, over the whole run."""


class Trainer:
    """Builds the loader, teacher and student engine; ``fit()`` trains, logs, checkpoints and resumes."""

    def __init__(self, config: Config, ds_config: dict, device: torch.device):
        self.config, self.device = config, device
        self.rank, self.world = distributed.rank(), distributed.world()
        self.accum = ds_config["gradient_accumulation_steps"]
        self.loader = PretrainLoader(_loader_spec(config, ds_config, self.rank, self.world), device)
        self.steps_per_epoch = self.loader.batches_per_epoch // self.accum
        self.total_steps = config.optim.epochs * self.steps_per_epoch
        self.max_steps = min(config.run.max_steps or self.total_steps, self.total_steps)
        self.ds_config, self.state = ds_config, TrainState()

    def build(self) -> None:
        o = self.config.optim
        self.teacher = build_teacher(self.config.teacher, self.config.model, self.device)
        torch.manual_seed(self.config.run.seed)  # the same initial student whatever the world size
        student = DTMStudent(self.config.model, self.teacher.dim)
        self.engine, self.optimizer = build_engine(
            student, param_groups(student, o.weight_decay, o.decay_tables), self.ds_config, o.betas, o.eps
        )
        self.dtype = engine_dtype(self.ds_config)
        self.peak_lr = o.peak_lr(self.ds_config["train_batch_size"])
        self.warmup = round(o.warmup_epochs * self.steps_per_epoch)
        self.dtm_step = DTMStep(self.config.dtm.protect_first, self.config.run.cuda_graph, self.config.run.compile)
        if self.config.run.compile:
            self.engine.compile(backend=self.config.run.compile)
        self.flops_per_image = step_flops(self.teacher, self.config.model, self.teacher.dim, self.device)

    def lr(self, step: int) -> float:
        """The peak-group lr of the optimizer step that follows ``step`` applied steps."""
        o = self.config.optim
        return self.peak_lr * lr_factor(step, self.total_steps, self.warmup, o.min_lr / self.peak_lr)

    def schedule_for(self, window: int, chunk: int) -> torch.Tensor:
        """The DTM schedule of micro-batch ``chunk`` of window ``window`` (windows applied or dropped, counted
        over the run): a pure function of (seed, window, chunk), whatever the number of ranks and
        micro-steps; sampled on the training device (no host round trip). ``dtm.shared_schedule``: one
        schedule for the whole global batch."""
        chunk = 0 if self.config.dtm.shared_schedule else chunk
        gen = torch.Generator(device=self.device).manual_seed(seed_of(self.config.run.seed, window, chunk))
        return sample_schedule(self.config.dtm.n_max, self.config.dtm.k_max, gen)

    def micro_step(self, batch: dict[str, torch.Tensor], chunk: int, clock: Clock) -> torch.Tensor:
        """Teacher targets, masked student forward and the DTM level losses [L] of one micro-batch."""
        window, dtm = self.state.step + self.state.skipped_windows, self.config.dtm
        torch.manual_seed(seed_of(self.config.run.seed, window, chunk))  # drop path: per micro-batch, not per rank
        targets = self.teacher(batch["images"])  # (B, N, D)
        clock("time_teacher")
        pred = self.engine(batch["images"].to(self.dtype), batch["masks"]).float()  # (B, N, D)
        clock("time_student")
        groups, slots = self.dtm_step(targets, self.schedule_for(window, chunk))  # (L, B, N)
        levels = morphed_loss(pred, targets, groups, dtm.loss, dtm.beta, slots, dtm.normalize_target)  # (L,)
        clock("time_dtm")
        return levels

    def window(self, batches, timed: bool) -> dict:
        """One optimizer step over ``accum`` micro-batches from ``batches``; see the module notes."""
        lrs = set_lr(self.optimizer, self.lr(self.state.step))
        clock, data_start = Clock(self.device if timed else None), time.perf_counter()
        level_sum, dropped, stop, local_norm = 0.0, False, False, None
        for m in range(self.accum):
            batch = next(batches)
            clock.add("time_data", time.perf_counter() - data_start)
            levels = self.micro_step(batch, self.rank * self.accum + m, clock)
            loss = self.config.dtm.loss_weight * levels.mean()
            if faults.nan_loss(self.micro):
                loss = loss * float("nan")
            nonfinite, stop_now = distributed.agree(~torch.isfinite(loss.detach()), self.stop_requested)
            dropped, stop = dropped or nonfinite, stop or stop_now
            self.engine.backward(loss)  # a dropped window's gradients are cleared by the skipped step
            level_sum = level_sum + levels.detach()
            last = m == self.accum - 1
            if last and timed and not dropped and self.engine.zero_optimization_stage() == 0:
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                local_norm = torch.nn.utils.get_total_norm(grads)  # DeepSpeed reports none at stage 0 fp32
            clock("time_student")
            self.optimizer.skip_next = last and dropped
            self.engine.step()
            self.optimizer.skip_next = False
            clock("time_optimizer")
            self.micro += 1
            data_start = time.perf_counter()
        out = {"levels": level_sum / self.accum, "lrs": lrs, "dropped": dropped, "stop": stop}
        return out | {"local_norm": local_norm, "times": clock.times, "images": batch["images"]}

    def fit(self) -> dict[str, float]:
        run, s = self.config.run, self.state
        self.stop_requested, self.micro, dropped_in_a_row, last = False, 0, 0, {}
        for sig in (signal.SIGTERM, signal.SIGINT):  # preemption: agree on a step, save there and exit
            signal.signal(sig, lambda *_: setattr(self, "stop_requested", True))
        log = RunLog(run.output_dir, self.rank == 0, self.max_steps, s.step, "pretrain")
        watchdog = None
        if self.world > 1:
            watchdog = distributed.Watchdog(run.dist_timeout_s, lambda: lost_peer_message(self.config))
        saved, stop = s.step, False
        while s.step < self.max_steps and not stop:
            batches = self.loader.epoch(s.epoch, s.epoch_step * self.accum)
            while s.epoch_step < self.steps_per_epoch and s.step < self.max_steps and not stop:
                timed = (s.step + 1) % run.log_every == 0 or s.step + 1 == self.max_steps
                out = self.window(batches, timed)
                if watchdog:
                    watchdog.beat()
                s.epoch_step, stop = s.epoch_step + 1, out["stop"]
                if out["dropped"]:
                    s.skipped_windows, dropped_in_a_row = s.skipped_windows + 1, dropped_in_a_row + 1
                    if dropped_in_a_row >= run.max_nonfinite:
                        raise FloatingPointError(
                            f"{dropped_in_a_row} non-finite losses in a row at step {s.step + 1}; the last good "
                            f"checkpoint in {checkpoint.checkpoint_dir(run.output_dir)} is intact"
                        )
                    continue
                s.step, dropped_in_a_row = s.step + 1, 0
                if timed:
                    last = self.log_values(out)
                    tokens = self.config.model.grid**2
                    log.step(s.step, last, self.engine.train_batch_size(), self.flops_per_image, tokens, self.world)
                if run.vis_every and s.step % run.vis_every == 0 and self.rank == 0:
                    self.log_picture(log, s.step, out["images"])
                if s.step % run.save_every == 0 and s.step < self.max_steps and not stop:
                    saved = self.save(watchdog)
            if s.epoch_step == self.steps_per_epoch:
                s.epoch, s.epoch_step = s.epoch + 1, 0
        if s.step > saved:
            self.save(watchdog)
        if watchdog:
            watchdog.close()
        log.close()
        if stop and self.rank == 0:
            print(f"stopped by a signal at step {s.step} (all ranks); a re-run resumes there", flush=True)
        return last

    def log_values(self, out: dict) -> dict:
        """The values of a logging step: window and rank means of the losses, the lrs that acted, the
        gradient norms, the loss scale, per-rank peak memory (one gather; logging steps only)."""
        n = len(out["levels"])
        rows = distributed.gather_rows(torch.cat([out["levels"].double().cpu(), _memory_gib()]))  # (world, n + m)
        levels = rows[:, :n].mean(0)
        values = {"loss": levels.mean().item(), **{f"loss_level{i}": v for i, v in enumerate(levels.tolist())}}
        wds = [g["weight_decay"] for g in self.optimizer.param_groups]
        values |= {"lr": max(out["lrs"]), "lr_groups": out["lrs"], "weight_decay_groups": wds}
        values |= grad_norms(self.engine, out["local_norm"]) | out["times"]
        memory = {name: rows[:, n + i].tolist() for i, name in enumerate(_MEMORY)}
        if self.engine.fp16_enabled():
            values["loss_scale"] = float(self.engine.optimizer.cur_scale)
        return values | {"epoch": self.state.epoch, "skipped_windows": self.state.skipped_windows} | memory

    def log_picture(self, log: RunLog, step: int, images: torch.Tensor) -> None:
        from dtm_ds.visualize import morph_figure

        log.image(step, morph_figure(images[:4], self.teacher, self.config, self.schedule_for(0, 0)))

    def save(self, watchdog) -> int:
        s = self.state
        faults.arm_checkpoint_kill(self.engine, s.step)
        if watchdog:  # a long write is not a hang; the backend's own timeout covers its collectives
            watchdog.pause()
        client = {"train_state": asdict(s), "world": self.world, "accum": self.accum}
        checkpoint.save(self.engine, self.config.run.output_dir, s.step, client, self.config.run.keep_last)
        if watchdog:
            watchdog.beat()
        return s.step

    def resume(self, tag: str) -> None:
        folder = checkpoint.checkpoint_dir(self.config.run.output_dir)
        with checkpoint.weights_only():
            _, client = self.engine.load_checkpoint(str(folder), tag, load_lr_scheduler_states=False)
        if client is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load {folder / tag}")
        self.state, plain = TrainState(**client["train_state"]), tag.removeprefix(checkpoint.UNIVERSAL)
        if tag.startswith(checkpoint.UNIVERSAL):  # converted for this resume only; removed once all have loaded
            distributed.barrier()
            distributed.on_rank0(lambda: shutil.rmtree(folder / tag, ignore_errors=True))
        if self.rank == 0:
            s = self.state
            how = f" (through DeepSpeed's universal format, now on {self.world} ranks)" if tag != plain else ""
            print(f"resumed from {plain}: step {s.step}, epoch {s.epoch} window {s.epoch_step}{how}", flush=True)


_MEMORY = ("peak_device_mem_gib_per_rank", "peak_rss_gib_per_rank")


def _memory_gib() -> torch.Tensor:
    """[peak device memory, peak resident memory] of this process in GiB (device: 0 on CPU)."""
    import resource

    device = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return torch.tensor([device, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64)


def lost_peer_message(config: Config) -> str:
    tag = checkpoint.latest_tag(config.run.output_dir, prefix="step")
    return (
        f"rank {distributed.rank()}: lost contact with another rank. The launcher's report names the rank that "
        f"failed first. The last complete checkpoint is {tag or 'none'} in "
        f"{checkpoint.checkpoint_dir(config.run.output_dir)}; re-run the same command to resume."
    )


def _lost_peer(config: Config, error: Exception) -> None:
    first_line = str(error).strip().splitlines()[0][:300]
    sys.exit(f"{lost_peer_message(config)} ({type(error).__name__}: {first_line})")


def _loader_spec(config: Config, ds_config: dict, rank: int, world: int) -> LoaderSpec:
    d, m = config.data, config.model
    return LoaderSpec(
        path=d.path,
        batch_size=ds_config["train_micro_batch_size_per_gpu"],
        image_size=m.img_size,
        patch_size=m.patch_size,
        min_crop_scale=d.min_crop_scale,
        jitter=d.jitter,
        num_masked=d.num_masked,
        min_mask_block=d.min_mask_block,
        seed=config.run.seed,
        rank=rank,
        world=world,
        accum=ds_config["gradient_accumulation_steps"],
        workers=d.workers,
        backend=d.backend,
    )


def main(
    ds_config: str = "ds_configs/cpu.json",
    model: str = "vitb",
    output_dir: str | None = None,
    max_steps: int | None = None,
    print_config: bool = False,
    local_rank: int | None = None,
    **overrides,
) -> None:
    """Pretrain a preset with a DeepSpeed config.

    Args:
        ds_config: DeepSpeed JSON (micro batch, accumulation, precision, ZeRO stage, clipping); see ds_configs/.
        model: preset: tiny (CPU, pixels teacher), vits, vitb, vitl or vith.
        output_dir: the run folder (same as --run.output_dir); a re-run resumes it.
        max_steps: stop after this many optimizer steps (same as --run.max_steps; the lr schedule still
            spans optim.epochs).
        print_config: print the resolved settings as JSON (for WORLD_SIZE ranks, default 1) and exit;
            reads no data or weights and needs no GPU.
        local_rank: set by the deepspeed launcher.
    """
    overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
    if output_dir is not None:
        overrides["run.output_dir"] = output_dir
    if max_steps is not None:
        overrides["run.max_steps"] = max_steps
    config = build_config(model, overrides)
    if print_config:
        print(json.dumps(resolved_settings(config, model, ds_config), indent=2))
        return
    device = distributed.init(local_rank, config.run.dist_timeout_s)
    engine_cfg = engine_config(ds_config, distributed.world(), config.optim.batch_size)
    trainer = Trainer(config, engine_cfg, device)
    tag = checkpoint.latest_tag(config.run.output_dir, prefix="step")
    done = checkpoint.checkpoint_step(config.run.output_dir, tag) if tag else 0
    check_and_record(config, engine_cfg, distributed.world(), write=False)  # nothing is written before this
    if done >= trainer.max_steps:  # a finished run re-run writes nothing
        if distributed.rank() == 0:
            print(
                f"nothing to do: the run is done at step {done} of {trainer.max_steps}; its last checkpoint is "
                f"{checkpoint.checkpoint_dir(config.run.output_dir) / tag}",
                flush=True,
            )
            print(json.dumps({"done": True, "step": done, "loss": None}), flush=True)
        return
    saved_on = checkpoint.zero_ranks(config.run.output_dir, tag) if tag else 0
    if saved_on not in (0, distributed.world()):
        # a ZeRO checkpoint of another number of ranks: its optimizer state is partitioned per rank, so it
        # goes through DeepSpeed's universal format (stage 0 keeps it whole and loads on any world)
        if engine_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
            raise checkpoint.CheckpointError(
                f"{tag} was saved by {saved_on} ranks with ZeRO-3; DeepSpeed's universal checkpoint does not restore "
                f"ZeRO-3's optimizer state exactly on another number of ranks (per-step losses drift, 2e-5 after "
                f"one step on the tiny preset). Resume on {saved_on} ranks, or use ZeRO-1/2 for runs that change size"
            )
        engine_cfg["checkpoint"] = engine_cfg.get("checkpoint", {}) | {"load_universal": True}
        trainer.ds_config = engine_cfg
        tag = distributed.on_rank0(lambda: checkpoint.to_universal(config.run.output_dir, tag))
    trainer.build()  # teacher weights, student, engine: their errors come before any file is written
    check_and_record(config, engine_cfg, distributed.world(), write=distributed.rank() == 0)
    if tag:
        trainer.resume(tag)
    try:
        last = trainer.fit()
    except torch.distributed.DistError as e:  # a peer died or hung (RuntimeError on some backends)
        _lost_peer(config, e)
    except RuntimeError as e:
        if distributed.world() == 1 or not any(s in str(e) for s in ("gloo", "NCCL", "Connection", "timed out")):
            raise
        _lost_peer(config, e)
    for sig in (signal.SIGTERM, signal.SIGINT):  # saved and done: a late stop signal must not turn exit 0 into -15
        signal.signal(sig, signal.SIG_IGN)
    if distributed.rank() == 0:
        done = trainer.state.step >= trainer.max_steps  # False: stopped by a signal, a re-run continues
        print(json.dumps({"done": done, "step": trainer.state.step, "loss": last.get("loss")}), flush=True)
    distributed.close()


def resolved_settings(config: Config, preset: str, ds_config: str) -> dict:
    """Every setting a run of ``preset`` with ``ds_config`` on WORLD_SIZE ranks would use."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    engine = engine_layout(engine_config(ds_config, world, config.optim.batch_size), world)
    peak = config.optim.peak_lr(engine["train_batch_size"])
    derived = {"peak_lr": peak, "peak_lr_rule": f"optim.lr {config.optim.lr:g} x sqrt(global batch / 2048)"}
    return {"preset": preset, "ds_config": ds_config, "engine": engine, **derived, **config.to_dict()}


def describe() -> str:
    """``--help``: the command's options, then every config field by section."""
    from dtm_ds import cli
    from dtm_ds.config import SECTIONS

    sections = [("Options", cli.function_rows(main, skip=("local_rank",)))]
    for name, kind in SECTIONS.items():
        sections.append(
            (f"{name} (--{name}.<field>=value; defaults before the preset)", cli.dataclass_rows(kind, f"{name}."))
        )
    return cli.describe(__doc__, sections)


if __name__ == "__main__":
    from dtm_ds.cli import run

    run(main, describe, exit_at_once=True)
