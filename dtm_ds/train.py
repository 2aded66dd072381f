"""DTM pretraining.

    deepspeed dtm_ds/train.py --ds_config ds_configs/zero2_bf16.json --model vitb --output_dir out \
        --data.path=train.beton --teacher.weights=ViT-B-16.pt
    python dtm_ds/train.py --ds_config ds_configs/cpu.json --model tiny --output_dir out --max_steps 100

Any config field is overridable as ``--<section>.<field>=value``; the resolved config is saved as
``<output_dir>/config.json``. A run resumes from the latest complete checkpoint in its output_dir.
"""

import io
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the package folder must not shadow top-level modules
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import fire
import numpy as np
import torch

from dtm_ds import checkpoint, distributed
from dtm_ds.config import Config, build_config, save_config
from dtm_ds.data import LoaderSpec, PretrainLoader
from dtm_ds.dtm_step import DTMStep
from dtm_ds.logs import RunLog
from dtm_ds.morph import sample_schedule
from dtm_ds.student import DTMStudent
from dtm_ds.teacher import build_teacher


def engine_config(path: str, world: int, batch_size: int | None, batch_name: str = "optim.batch_size") -> dict:
    """The DeepSpeed JSON with ``train_batch_size`` checked against micro batch x accumulation x world."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (see ds_configs/)")
    try:
        cfg = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({err})") from err
    micro, accum = cfg.get("train_micro_batch_size_per_gpu"), cfg.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        raise ValueError(f"{path}: train_micro_batch_size_per_gpu must be a positive integer, got {micro!r}")
    derived = micro * accum * world
    for name, value in (("train_batch_size in " + path, cfg.get("train_batch_size")), (batch_name, batch_size)):
        if value is not None and value != derived:
            raise ValueError(
                f"{name} = {value} but micro batch {micro} x accumulation {accum} x world {world} = "
                f"{derived}; make them agree"
            )
    return cfg | {"train_batch_size": derived}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms (all 1-D tensors), tokens and relative-position tables."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            plain = p.ndim <= 1 or name in skip or name.endswith("relative_position_bias_table")
            (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine from 1 to ``min_ratio`` at ``total`` (a multiplier of the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Builds the student engine, teacher and loader; ``fit()`` trains, logs, checkpoints and resumes."""

    def __init__(self, config: Config, ds_config: dict, device: torch.device):
        self.config, self.device = config, device
        self.rank, self.world = distributed.rank(), distributed.world()
        self.teacher = build_teacher(config.teacher, config.model, device)
        self.loader = PretrainLoader(_loader_spec(config, ds_config, self.rank, self.world), device)
        self.steps_per_epoch = self.loader.batches_per_epoch // ds_config.get("gradient_accumulation_steps", 1)
        self.total_steps = config.optim.epochs * self.steps_per_epoch
        self.engine = self._engine(ds_config)
        self.dtype = engine_dtype(ds_config)
        self.dtm_step = DTMStep(config.dtm.protect_first, cuda_graph=config.run.cuda_graph, compile=config.run.compile)
        if config.run.compile:
            self.engine.compile(backend=config.run.compile)
        self.state = {"step": 0, "micro": 0, "epoch": 0, "batch": 0, "nonfinite_total": 0}
        self.nonfinite_run = 0
        self.stop_requested = False
        self.watchdog: distributed.Watchdog | None = None
        self.last_values: dict[str, float] = {}

    def _engine(self, ds_config: dict):
        """DeepSpeed engine around the student with a client AdamW and a per-step warmup + cosine schedule."""
        import deepspeed

        o = self.config.optim
        torch.manual_seed(self.config.run.seed)  # the same initial student whatever the world size
        student = DTMStudent(self.config.model, self.teacher.dim)
        peak = o.lr * math.sqrt(ds_config["train_batch_size"] / 2048)
        optimizer = torch.optim.AdamW(param_groups(student, o.weight_decay), lr=peak, betas=o.betas, eps=o.eps)
        warmup = round(o.warmup_epochs * self.steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.total_steps, warmup, o.min_lr / peak)
        )
        cast_float_buffers(student, engine_dtype(ds_config))
        engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
        return engine

    def schedule_for(self, micro: int) -> torch.Tensor:
        """The DTM schedule of a micro-step: a pure function of (seed, micro-step), identical on all ranks,
        sampled on the training device (no host round trip)."""
        gen = torch.Generator(device=self.device).manual_seed(self.config.run.seed * 1_000_003 + micro)
        return sample_schedule(self.config.dtm.n_max, self.config.dtm.k_max, gen)

    def train_step(self, batch: dict[str, torch.Tensor], timed: bool = False) -> dict:
        """One micro-step: teacher targets, masked student forward, DTM loss, backward and engine step.

        The only host synchronisation is the finiteness flag of the loss (one scalar, all ranks agree);
        ``timed`` adds synchronised timings of the phases (use it at logging steps only).
        """
        dtm, micro = self.config.dtm, self.state["micro"]
        torch.manual_seed(int(np.random.default_rng([self.config.run.seed, micro, self.rank]).integers(2**62)))
        clock = Clock(self.device if timed else None)
        targets = self.teacher(batch["images"])  # (B, N, D)
        clock("time_teacher")
        pred = self.engine(batch["images"].to(self.dtype), batch["masks"]).float()  # (B, N, D)
        clock("time_student")
        groups, slots = self.dtm_step(targets, self.schedule_for(micro))  # (L, B, N)
        levels = self.dtm_step.loss(pred, targets, groups, slots, dtm.loss, dtm.beta)  # (L,)
        loss = levels.mean()
        if micro in self.config.run.fault_nan_steps:
            loss = loss * float("nan")
        clock("time_dtm")
        if distributed.any_nonfinite(loss):
            self.state["nonfinite_total"] += 1
            self.nonfinite_run += 1
            self.engine.zero_grad()
            return {"levels": levels.detach(), "skipped": 1.0}
        self.nonfinite_run = 0
        self.engine.backward(loss)
        out = {"levels": levels.detach()}
        if self.engine.zero_optimization_stage() == 0 and self.engine.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            out["grad_norm"] = torch.nn.utils.get_total_norm(grads)  # DeepSpeed reports none at stage 0
        clock("time_student")
        self.engine.step()
        clock("time_optimizer")
        return out | clock.times

    def fit(self) -> dict[str, float]:
        run = self.config.run
        self._resume()
        log = RunLog(run.output_dir, self.rank == 0, self.total_steps, self.state["step"])
        max_steps = min(run.max_steps or self.total_steps, self.total_steps)
        for sig in (signal.SIGTERM, signal.SIGINT):  # preemption: save a checkpoint at the next step and exit
            signal.signal(sig, self._request_stop)
        if distributed.world() > 1:
            self.watchdog = distributed.Watchdog(run.dist_timeout_s, lambda: lost_peer_message(self.config))
        while self.state["step"] < max_steps and not self.stop_requested:
            epoch, start = self.state["epoch"], self.state["batch"]
            data_start = time.perf_counter()
            for batch in self.loader.epoch(epoch, start):
                data_time = time.perf_counter() - data_start
                before = self.state["step"]
                timed = (self.state["step"] + 1) % run.log_every == 0
                last = self.train_step(batch, timed) | {"time_data": data_time}
                if self.watchdog:
                    self.watchdog.beat()
                self._advance()
                if self.nonfinite_run >= run.max_nonfinite:
                    raise FloatingPointError(
                        f"{self.nonfinite_run} non-finite losses in a row at step {self.state['step']}; the last "
                        f"good checkpoint in {checkpoint.checkpoint_dir(run.output_dir)} is intact"
                    )
                if self.state["step"] > before:  # an optimizer step happened (not skipped, end of accumulation)
                    self._after_step(log, last, batch, max_steps)
                if self.state["step"] >= max_steps or self.stop_requested:
                    break
                data_start = time.perf_counter()
        self._save()
        if self.watchdog:
            self.watchdog.close()
        log.close()
        return self.last_values

    def _advance(self) -> None:
        s = self.state
        s["micro"] += 1
        s["batch"] += 1
        if s["batch"] == self.loader.batches_per_epoch:
            s["epoch"], s["batch"] = s["epoch"] + 1, 0
        s["step"] = self.engine.global_steps

    def _after_step(self, log, out: dict, batch, max_steps: int) -> None:
        run, step = self.config.run, self.state["step"]
        if step % run.log_every == 0 or step == max_steps:
            levels = distributed.mean_tensor(out.pop("levels"))  # (L,) averaged over ranks
            values = {"loss": levels.mean().item(), **{f"loss_level{i}": v for i, v in enumerate(levels.tolist())}}
            values |= {k: float(v) for k, v in out.items()}
            values |= {
                "lr": self.engine.get_lr()[0],
                "epoch": self.state["epoch"],
                "nonfinite_total": self.state["nonfinite_total"],
            }
            norm = self.engine.get_global_grad_norm()
            if norm is not None and "grad_norm" not in values:
                values["grad_norm"] = float(norm)
            scale = getattr(self.engine.optimizer, "cur_scale", None)  # fp16 dynamic loss scaling
            if scale is not None:
                values["loss_scale"] = float(scale)
            log.step(step, values, self.engine.train_batch_size())
            self.last_values = values
        if run.vis_every and step % run.vis_every == 0 and self.rank == 0:
            from dtm_ds.visualize import morph_figure

            log.image(step, morph_figure(batch["images"][:4], self.teacher, self.config, self.schedule_for(0)))
        if step % run.save_every == 0 and step < max_steps:
            self._save()

    def _save(self) -> None:
        if self.state["step"] == 0:
            return
        state = self.state | {"config": self.config.to_dict()}
        if self.config.run.fault_kill_in_save == self.state["step"]:
            cut_next_checkpoint_write(self.engine)
        if self.watchdog:  # a long write is not a hang; the backend's own timeout covers its collectives
            self.watchdog.pause()
        checkpoint.save(self.engine, self.config.run.output_dir, self.state["step"], state, self.config.run.keep_last)
        if self.watchdog:
            self.watchdog.beat()

    def _resume(self) -> None:
        tag = checkpoint.latest_tag(self.config.run.output_dir, prefix="step")
        if tag is None:
            return
        _, client = self.engine.load_checkpoint(str(checkpoint.checkpoint_dir(self.config.run.output_dir)), tag)
        self.state = {k: client[k] for k in self.state}
        if self.rank == 0:
            print(
                f"resumed from {tag}: step {self.state['step']}, epoch {self.state['epoch']} batch "
                f"{self.state['batch']}",
                flush=True,
            )

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True


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


def cut_next_checkpoint_write(engine) -> None:
    """Fault injection: the engine's next checkpoint file gets half its bytes, then the process is killed."""

    def write_half_and_die(state_dict, path: str) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    engine.checkpoint_engine.save = write_half_and_die


def cast_float_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed's bf16/fp16 modes cast parameters only; float buffers (timm BEiT's zero ``k_bias``) must
    follow, or attention mixes dtypes."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)


def engine_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed keeps the student in, for casting its inputs."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


class Clock:
    """Accumulates wall time per phase; synchronises the device first when given one (else no-op)."""

    def __init__(self, device: torch.device | None):
        self.device, self.times, self.last = device, {}, time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.device is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self.last
        self.last = now


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
        workers=d.workers,
        backend=d.backend,
    )


def main(
    ds_config: str = "ds_configs/cpu.json",
    model: str = "vitb",
    output_dir: str | None = None,
    max_steps: int | None = None,
    local_rank: int | None = None,
    **overrides,
) -> None:
    """Pretrain preset ``model`` (tiny, vits, vitb, vitl, vith) with DeepSpeed config ``ds_config``."""
    overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
    if output_dir is not None:
        overrides["run.output_dir"] = output_dir
    if max_steps is not None:
        overrides["run.max_steps"] = max_steps
    config = build_config(model, overrides)
    device = distributed.init(local_rank, config.run.dist_timeout_s)
    engine_cfg = engine_config(ds_config, distributed.world(), config.optim.batch_size)
    Path(config.run.output_dir).mkdir(parents=True, exist_ok=True)
    if distributed.rank() == 0:
        save_config(config, Path(config.run.output_dir) / "config.json")
    trainer = Trainer(config, engine_cfg, device)
    try:
        last = trainer.fit()
    except torch.distributed.DistError as e:  # a peer died or hung (RuntimeError on some backends)
        _lost_peer(config, e)
    except RuntimeError as e:
        if distributed.world() == 1 or not any(s in str(e) for s in ("gloo", "NCCL", "Connection", "timed out")):
            raise
        _lost_peer(config, e)
    if distributed.rank() == 0:
        print(json.dumps({"done": True, "step": trainer.state["step"], "loss": last.get("loss")}), flush=True)


if __name__ == "__main__":
    fire.Fire(main)
