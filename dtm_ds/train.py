"""DTM pretraining.

    deepspeed dtm_ds/train.py --ds_config ds_configs/zero2_bf16.json --model vitb --output_dir out
        --data.path=train.beton --teacher.weights=ViT-B-16.pt    (one line)
    python dtm_ds/train.py --ds_config ds_configs/cpu.json --model tiny --output_dir out --max_steps 100

Any config field is overridable as ``--<section>.<field>=value``; the resolved config is saved as
``<output_dir>/config.json``. A run resumes from the latest complete checkpoint in its output_dir, on the
same or another number of ranks (the global batch must stay the same).

One optimizer step is one *window* of ``gradient_accumulation_steps`` micro-batches on every rank. Each
micro-step all-reduces two flags (a non-finite loss; a stop signal), so every rank knows both at once: a
window with a non-finite loss is dropped whole (no update, the lr schedule does not move); a stop signal
ends the run after the current window with one checkpoint, on every rank at the same step.
"""

import json
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the package folder must not shadow top-level modules
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

from dtm_ds import checkpoint, devices, distributed, faults
from dtm_ds.config import Config, build_config
from dtm_ds.data import seed_of
from dtm_ds.engine import build_engine, engine_config, engine_dtype, local_grad_norm, lr_factor, param_groups, set_lr
from dtm_ds.graphed import GraphedMorph
from dtm_ds.loader import PretrainLoader, check_source, loader_spec
from dtm_ds.logs import Clock, RunLog, step_flops, step_values
from dtm_ds.morph import morphed_loss, sample_schedule
from dtm_ds.run_record import check_and_record, resolved_settings
from dtm_ds.student import DTMStudent
from dtm_ds.teacher import build_teacher
from dtm_ds.teacher import check_files as check_teacher_files
from dtm_ds.teacher import precision as teacher_precision
from dtm_ds.visualize import morph_figure


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps applied
    epoch: int = 0
    epoch_step: int = 0  # windows of ``epoch`` consumed (applied or dropped)
    skipped_windows: int = 0  # windows dropped for a non-finite loss, over the whole run


class Trainer:
    """Builds the loader, teacher and student engine; ``fit()`` trains, logs, checkpoints and resumes."""

    def __init__(self, config: Config, ds_config: dict, device: torch.device):
        self.config, self.device, self.ds_config, self.state = config, device, ds_config, TrainState()
        self.rank, self.world = distributed.rank(), distributed.world()
        self.accum = ds_config["gradient_accumulation_steps"]
        self.loader = PretrainLoader(loader_spec(config, ds_config, self.rank, self.world), device)
        self.steps_per_epoch = self.loader.batches_per_epoch // self.accum
        self.total_steps = config.optim.epochs * self.steps_per_epoch
        self.max_steps = min(config.run.max_steps or self.total_steps, self.total_steps)
        self.stop_requested, self.micro = False, 0  # a stop signal seen; micro-steps run by this process

    def build(self) -> None:
        o, run = self.config.optim, self.config.run
        self.teacher = build_teacher(self.config.teacher, self.config.model, self.device)
        torch.manual_seed(run.seed)  # the same initial student whatever the world size
        student = DTMStudent(self.config.model, self.teacher.dim)
        groups = param_groups(student, o.weight_decay, o.decay_tables)
        self.engine, self.optimizer = build_engine(student, groups, self.ds_config, o.betas, o.eps)
        self.dtype, self.peak_lr = engine_dtype(self.ds_config), o.peak_lr(self.ds_config["train_batch_size"])
        self.warmup = round(o.warmup_epochs * self.steps_per_epoch)
        self.morph = GraphedMorph(self.config.dtm.protect_first, run.cuda_graph, run.compile)
        shape = (self.ds_config["train_micro_batch_size_per_gpu"], self.config.model.grid**2, self.teacher.dim)
        self.morph.prepare(torch.zeros(shape, device=self.device), self.schedule_for(0, 0))  # before loader threads
        if run.compile:
            self.engine.compile(backend=run.compile)
        self.flops_per_image = step_flops(self.teacher, self.config.model, self.teacher.dim, self.device)

    def lr(self, step: int) -> float:
        """The peak-group lr of the optimizer step that follows ``step`` applied steps."""
        return self.peak_lr * lr_factor(step, self.total_steps, self.warmup, self.config.optim.min_lr / self.peak_lr)

    def schedule_for(self, window: int, chunk: int) -> torch.Tensor:
        """The DTM schedule of micro-batch ``chunk`` of window ``window`` (counted over the run, applied or
        dropped): a function of (seed, window, chunk) whatever the ranks and micro-steps, sampled on the
        device (no host round trip). ``dtm.shared_schedule``: one for the whole global batch."""
        chunk = 0 if self.config.dtm.shared_schedule else chunk
        gen = torch.Generator(device=self.device).manual_seed(seed_of(self.config.run.seed, window, chunk))
        return sample_schedule(self.config.dtm.n_max, self.config.dtm.k_max, gen)

    def fit(self) -> dict[str, float]:
        """Windows until ``max_steps`` or a stop signal; logs, pictures and checkpoints on the way."""
        run, s = self.config.run, self.state
        dropped_in_a_row, last = 0, {}
        for sig in (signal.SIGTERM, signal.SIGINT):  # preemption: agree on a step, save there and exit
            signal.signal(sig, lambda *_: setattr(self, "stop_requested", True))
        log = RunLog(run.output_dir, self.rank == 0, self.max_steps, s.step, "pretrain")
        lost = lambda: checkpoint.lost_peer_message(run.output_dir, self.rank)  # noqa: E731
        watchdog = distributed.Watchdog(run.dist_timeout_s, lost, enabled=self.world > 1)
        saved, stop = s.step, False
        while s.step < self.max_steps and not stop:
            batches = self.loader.epoch(s.epoch, s.epoch_step * self.accum)
            while s.epoch_step < self.steps_per_epoch and s.step < self.max_steps and not stop:
                timed = (s.step + 1) % run.log_every == 0 or s.step + 1 == self.max_steps
                out = self.window(batches, timed)
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
                    last = step_values(self.engine, self.optimizer, out["levels"], out["lrs"], out["local_norm"])
                    last |= out["times"] | {"epoch": s.epoch, "skipped_windows": s.skipped_windows}
                    tokens = self.config.model.grid**2
                    log.step(s.step, last, self.engine.train_batch_size(), self.flops_per_image, tokens, self.world)
                if run.vis_every and s.step % run.vis_every == 0 and self.rank == 0:
                    figure = morph_figure(out["images"][:4], self.teacher, self.config, self.schedule_for(0, 0))
                    log.image(s.step, figure)
                if s.step % run.save_every == 0 and s.step < self.max_steps and not stop:
                    saved = self.save(watchdog)
            if s.epoch_step == self.steps_per_epoch:
                s.epoch, s.epoch_step = s.epoch + 1, 0
        if s.step > saved:
            self.save(watchdog)
        watchdog.close()
        log.close()
        if stop and self.rank == 0:
            print(f"stopped by a signal at step {s.step} (all ranks); a re-run resumes there", flush=True)
        return last

    def window(self, batches, timed: bool) -> dict:
        """One optimizer step over ``accum`` micro-batches of ``batches``: per micro-batch, the teacher's
        targets, the masked student, morphing and the DTM level losses [L]; see the module notes."""
        lrs, dtm = set_lr(self.optimizer, self.lr(self.state.step)), self.config.dtm
        clock, data_start = Clock(self.device if timed else None), time.perf_counter()
        window = self.state.step + self.state.skipped_windows
        level_sum, dropped, stop, local_norm = 0.0, False, False, None
        for m in range(self.accum):
            batch, chunk = next(batches), self.rank * self.accum + m
            clock.add("time_data", time.perf_counter() - data_start)
            torch.manual_seed(seed_of(self.config.run.seed, window, chunk))  # drop path: per micro-batch, not per rank
            targets = self.teacher(batch["images"])  # (B, N, D)
            clock("time_teacher")
            pred = self.engine(batch["images"].to(self.dtype), batch["masks"]).float()  # (B, N, D)
            clock("time_student")
            schedule = self.schedule_for(window, chunk)  # (L, K) merges per iteration
            morphed = self.morph(targets, schedule)  # groups (L, B, N)
            levels = morphed_loss(pred, targets, morphed, dtm.loss, dtm.beta, dtm.normalize_target)  # (L,)
            faults.dump(self.micro, images=batch["images"], targets=targets, pred=pred, schedule=schedule)
            clock("time_dtm")
            loss = dtm.loss_weight * levels.mean()
            if faults.nan_loss(self.micro):
                loss = loss * float("nan")
            faults.stop_signal(self.micro)
            nonfinite, stop_now = distributed.agree(~torch.isfinite(loss.detach()), self.stop_requested)
            dropped, stop = dropped or nonfinite, stop or stop_now
            self.engine.backward(loss)  # a dropped window's gradients are cleared by the skipped step
            level_sum, last = level_sum + levels.detach(), m == self.accum - 1
            if last and timed and not dropped:
                local_norm = local_grad_norm(self.engine)  # before the step clears the gradients
            clock("time_student")
            self.optimizer.skip_next = last and dropped
            self.engine.step()
            self.optimizer.skip_next, self.micro = False, self.micro + 1
            clock("time_optimizer")
            data_start = time.perf_counter()
        out = {"levels": level_sum / self.accum, "lrs": lrs, "dropped": dropped, "stop": stop}
        return out | {"local_norm": local_norm, "times": clock.times, "images": batch["images"]}

    def save(self, watchdog) -> int:
        faults.arm_checkpoint_kill(self.engine, self.state.step)
        watchdog.pause()  # a long write is not a hang; the backend's own timeout covers its collectives
        client = {"train_state": asdict(self.state), "world": self.world, "accum": self.accum}
        checkpoint.save(self.engine, self.config.run.output_dir, self.state.step, client, self.config.run.keep_last)
        watchdog.beat()
        return self.state.step

    def resume(self, tag: str) -> None:
        self.state = TrainState(**checkpoint.load(self.engine, self.config.run.output_dir, tag)["train_state"])
        if self.rank == 0:
            s, plain = self.state, tag.removeprefix(checkpoint.UNIVERSAL)
            how = f" (through DeepSpeed's universal format, now on {self.world} ranks)" if tag != plain else ""
            print(f"resumed from {plain}: step {s.step}, epoch {s.epoch} window {s.epoch_step}{how}", flush=True)


def main(
    ds_config: str | None = None,
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
            Default: ds_configs/zero2_bf16.json on a GPU machine, ds_configs/cpu.json on a CPU one.
        model: preset: tiny (CPU, pixels teacher), vits, vitb, vitl or vith.
        output_dir: the run folder (same as --run.output_dir); a re-run resumes it.
        max_steps: stop after this many optimizer steps (same as --run.max_steps; the lr schedule still
            spans optim.epochs).
        print_config: print the resolved settings as JSON (for WORLD_SIZE ranks, default 1) and exit;
            reads no data or weights and needs no GPU.
        local_rank: set by the deepspeed launcher.
    """
    overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
    overrides |= {k: v for k, v in (("run.output_dir", output_dir), ("run.max_steps", max_steps)) if v is not None}
    config = build_config(model, overrides)
    ds_path, chosen = devices.resolve_ds_config(ds_config)
    if print_config:
        print(json.dumps(resolved_settings(config, model, ds_path) | {"ds_config_chosen": chosen}, indent=2))
        return
    world = distributed.planned_world()
    engine_cfg = check_inputs(config, ds_path, world)  # before the distributed set-up: it builds DeepSpeed's ops
    device = distributed.init(local_rank, config.run.dist_timeout_s)
    distributed.check_world(world)
    out = config.run.output_dir
    trainer = Trainer(config, engine_cfg, device)
    tag = checkpoint.latest_tag(out, prefix="step")
    done = checkpoint.checkpoint_step(out, tag) if tag else 0
    if done >= trainer.max_steps:  # a finished run re-run writes nothing
        if distributed.rank() == 0:
            print(checkpoint.finished_message(out, tag, trainer.max_steps), flush=True)
        return
    tag = checkpoint.resume_tag(out, tag, engine_cfg, world)  # another world: through the universal format
    trainer.build()  # teacher weights, student, engine: their errors come before any file is written
    check_and_record(config, engine_cfg, world, write=distributed.rank() == 0, target_dim=trainer.teacher.dim)
    if distributed.rank() == 0:
        print(start_line(config, model, engine_cfg, device, f"{ds_path} ({chosen})", trainer), flush=True)
    if tag:
        trainer.resume(tag)
    try:
        last = trainer.fit()
    except RuntimeError as e:  # a peer died or hung: say where to resume from
        if not distributed.lost_peer(e):
            raise
        sys.exit(checkpoint.lost_peer_message(out, distributed.rank(), e))
    for sig in (signal.SIGTERM, signal.SIGINT):  # saved and done: a late stop signal must not turn exit 0 into -15
        signal.signal(sig, signal.SIG_IGN)
    if distributed.rank() == 0:
        done = trainer.state.step >= trainer.max_steps  # False: stopped by a signal, a re-run continues
        print(json.dumps({"done": done, "step": trainer.state.step, "loss": last.get("loss")}), flush=True)
    distributed.close()


def check_inputs(config: Config, ds_path: str, world: int) -> dict:
    """Every file and setting a run reads, checked for ``world`` ranks before any distributed set-up; returns
    the DeepSpeed config. The data source is opened (its header or listing), the teacher's files are
    looked for, an existing run folder's records are compared."""
    engine_cfg = engine_config(ds_path, world, config.optim.batch_size)
    check_source(loader_spec(config, engine_cfg, 0, world))
    check_teacher_files(config.teacher)
    check_and_record(config, engine_cfg, world, write=False)  # nothing is written before this
    return engine_cfg


def start_line(config: Config, preset: str, engine_cfg: dict, device: torch.device, ds_config: str, trainer) -> str:
    """One line at the start of a run: where it computes, with which engine settings and teacher precision."""
    zero = engine_cfg.get("zero_optimization", {}).get("stage", 0)
    micro, accum, world = engine_cfg["train_micro_batch_size_per_gpu"], trainer.accum, trainer.world
    return (
        f"pretraining {preset} on {world} x {device.type} ({distributed.backend()}); DeepSpeed config "
        f"{ds_config}: {str(engine_dtype(engine_cfg)).removeprefix('torch.')}, ZeRO {zero}, global batch "
        f"{engine_cfg['train_batch_size']} = {micro} x {accum} x {world}; teacher {config.teacher.name} in "
        f"{teacher_precision(config.teacher, device.type)}; {trainer.max_steps} steps of {trainer.total_steps}"
    )


if __name__ == "__main__":
    from dtm_ds import cli

    cli.run(main, lambda: cli.describe_config(__doc__, main), exit_at_once=True)
