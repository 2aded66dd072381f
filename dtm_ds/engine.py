"""The DeepSpeed engine, built one way for pretraining and fine-tuning.

* ``engine_config`` reads the DeepSpeed JSON and checks the batch sizes it implies;
* ``build_engine`` wraps a model with a client AdamW (``WindowAdamW``) and no DeepSpeed scheduler:
  the caller sets every group's lr for the step about to run (``set_lr``), so the lr that is logged is
  the lr that acted, and a skipped window leaves the schedule where it was;
* ``WindowAdamW.skip_next`` turns the next optimizer step into a no-op. DeepSpeed still runs its
  boundary (reductions, clipping, clearing the accumulated gradients) at every ZeRO stage and
  precision, so a window whose loss was non-finite is dropped whole and the next one starts clean;
* ``Windows.run`` is the window protocol that pretraining and fine-tuning share: per micro-batch the
  caller's loss and backward; after the last backward one agreement of every rank on two flags (a
  non-finite loss in any micro-step; a stop signal), the window's only host synchronisation; then the
  skip flag and ``engine.step()``. ``stop_on_signals`` turns SIGTERM/SIGINT into the stop flag.
"""

import contextlib
import difflib
import json
import math
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DEEPSPEED_KEYS", "Window", "WindowAdamW", "Windows", "build_engine", "engine_config", "engine_dtype",
    "grad_norms", "ignore_stop_signals", "lr_factor", "no_decay_names", "param_groups",
    "set_lr", "stop_on_signals",
]  # fmt: skip

_KEYS = """activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger
    communication_data_type compile compression_training csv_monitor curriculum_learning data_efficiency
    data_types dataloader_drop_last datastates_ckpt disable_allgather disable_python_gc dump_state eigenvalue
    elasticity expert_parallel flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op
    gradient_clipping gradient_predivide_factor graph_harvesting hybrid_engine log_level
    managed_gradient_accumulation memory_breakdown nebula optimizer pipeline prescale_gradients
    progressive_layer_drop quantize_training scheduler seq_parallel_communication_data_type sparse_attention
    sparse_gradients steps_per_print tensor_parallel tensorboard timers torch_autocast train_batch_size
    train_micro_batch_size_per_gpu use_data_before_expert_parallelism vocabulary_size wall_clock_breakdown
    wandb weight_quantization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer zero_optimization"""
DEEPSPEED_KEYS = frozenset(_KEYS.split())
"""Top-level keys DeepSpeed 0.19 reads (tests/test_cli.py checks the list against DeepSpeedConfig)."""


def _check_keys(path: str, cfg: dict) -> None:
    """A misspelt top-level key (``zero_optimisation``) is an error naming it and the key it resembles;
    other unknown keys, which DeepSpeed ignores, a warning listing them. Keys starting with ``_`` are
    comments."""
    unknown = sorted(k for k in cfg if k not in DEEPSPEED_KEYS and not k.startswith("_"))
    for key in unknown:
        close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1, cutoff=0.8)
        if close:
            raise ValueError(f"{path}: unknown key {key!r}; did you mean {close[0]!r}? (DeepSpeed ignores it)")
    if unknown:
        warnings.warn(f"{path}: DeepSpeed ignores the unknown keys {unknown}", stacklevel=2)


def engine_config(path: str, world: int, batch_size: int | None, batch_name: str = "optim.batch_size") -> dict:
    """The DeepSpeed JSON with ``train_batch_size`` checked against micro batch x accumulation x world."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (see ds_configs/)")
    try:
        cfg = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object, got {type(cfg).__name__}")
    _check_keys(path, cfg)
    micro, accum = cfg.get("train_micro_batch_size_per_gpu"), cfg.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        raise ValueError(f"{path}: train_micro_batch_size_per_gpu must be a positive integer, got {micro!r}")
    if not isinstance(accum, int) or accum < 1:
        raise ValueError(f"{path}: gradient_accumulation_steps must be a positive integer, got {accum!r}")
    if "scheduler" in cfg:
        raise ValueError(f"{path}: remove the 'scheduler' block; the lr schedule comes from the run's config")
    derived = micro * accum * world
    for name, value in (("train_batch_size in " + path, cfg.get("train_batch_size")), (batch_name, batch_size)):
        if value is not None and value != derived:
            raise ValueError(
                f"{name} = {value} but micro batch {micro} x accumulation {accum} x world {world} = "
                f"{derived}; make them agree"
            )
    return cfg | {"train_batch_size": derived, "gradient_accumulation_steps": accum}


def param_groups(model: torch.nn.Module, weight_decay: float, decay_tables: bool = True) -> list[dict]:
    """No weight decay on 1-D tensors (biases, norms) and the CLS token; ``decay_tables`` False also
    exempts what the model's ``no_weight_decay`` names (relative-position tables, the mask token)."""
    skip = no_decay_names(model, decay_tables)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def no_decay_names(model: torch.nn.Module, decay_tables: bool) -> set[str]:
    """Parameters of more than one dimension without weight decay: the reference's list (BEiT's
    ``no_weight_decay``: CLS token, absolute positions) or, without ``decay_tables``, timm's (which adds
    every relative-position table; the student adds its mask token)."""
    return {"cls_token", "pos_embed"} if decay_tables else set(model.no_weight_decay())


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine from 1 to ``min_ratio`` at ``total`` (a multiplier of the peak lr).
    ``step`` counts optimizer steps done before the one this factor is for (0 for the first)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WindowAdamW(torch.optim.AdamW):
    """AdamW whose next ``step()`` can be skipped (a dropped accumulation window). ``overflow`` tells
    DeepSpeed's stage-0 path that the step did not happen (it then counts a skipped step)."""

    skip_next = False

    @property
    def overflow(self) -> bool:
        return self.skip_next

    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


@dataclass(frozen=True)
class Window:
    """What one optimizer window did."""

    value_sum: torch.Tensor  # the sum over the window's micro-steps of what the loss function reported (device)
    micro_steps: int
    dropped: bool  # a micro-step's loss was non-finite on some rank: no update anywhere
    stop: bool  # some rank saw a stop signal: every rank ends the run after this window
    local_norm: torch.Tensor | None  # this rank's gradient norm before the step (``want_norm``, stage 0)

    @property
    def value(self) -> torch.Tensor:
        """The window's mean of the reported values."""
        return self.value_sum / self.micro_steps


class Windows:
    """The window protocol around one engine. ``run(loss_of)`` runs ``accum`` micro-steps, where
    ``loss_of(m)`` returns micro-step ``m``'s ``(loss, value)``: ``loss`` is backpropagated, ``value``
    (detached) is averaged over the window for the caller's logs. ``micro`` counts this process's
    micro-steps (the fault injections of dtm_ds/faults.py are keyed by it); ``stop_requested`` is set by
    the signal handler of ``stop_on_signals``."""

    def __init__(self, engine, optimizer: WindowAdamW, accum: int):
        self.engine, self.optimizer, self.accum = engine, optimizer, accum
        self.micro, self.stop_requested = 0, False

    def run(self, loss_of: Callable, clock=None, want_norm: bool = False) -> Window:
        """``clock`` (dtm_ds.logs.Clock): backward is timed as ``time_student``, the step as ``time_optimizer``."""
        from dtm_ds import distributed, faults

        clock = clock or (lambda phase: contextlib.nullcontext())
        value_sum, nonfinite, local_norm = 0.0, None, None
        dropped = stop = False
        for m in range(self.accum):
            loss, value = loss_of(m)
            if faults.nan_loss(self.micro):
                loss = loss * float("nan")
            faults.stop_signal(self.micro)
            bad = ~torch.isfinite(loss.detach())  # stays on the device: no sync per micro-step
            nonfinite = bad if nonfinite is None else nonfinite | bad
            value_sum, last = value_sum + value.detach(), m == self.accum - 1
            with clock("time_student"):
                self.engine.backward(loss)  # a dropped window's gradients are cleared by the skipped step
                if last:  # the window's one host sync: every rank learns both flags before the step
                    dropped, stop = distributed.agree(nonfinite, self.stop_requested)
                if last and want_norm and not dropped:
                    local_norm = _local_grad_norm(self.engine)  # before the step clears the gradients
            with clock("time_optimizer"):
                self.optimizer.skip_next = last and dropped
                self.engine.step()
                self.optimizer.skip_next, self.micro = False, self.micro + 1
        return Window(value_sum, self.accum, dropped, stop, local_norm)


def stop_on_signals(windows: Windows) -> None:
    """SIGTERM and SIGINT (preemption, Ctrl-C) set ``windows.stop_requested``: the ranks agree on a window,
    save there and exit 0."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(windows, "stop_requested", True))


def ignore_stop_signals() -> None:
    """Saved and done: a late stop signal must not turn exit 0 into -15."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> list[float]:
    """Set every group's lr to ``lr`` x its ``lr_scale`` (layer decay; 1 when absent); returns them."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return [group["lr"] for group in optimizer.param_groups]


def build_engine(model: torch.nn.Module, groups: list[dict], ds_config: dict, betas=(0.9, 0.999), eps=1e-8):
    """``(engine, optimizer)``: DeepSpeed around ``model`` with a ``WindowAdamW`` over ``groups``."""
    import deepspeed

    optimizer = WindowAdamW(groups, lr=0.0, betas=tuple(betas), eps=eps)
    _cast_float_buffers(model, engine_dtype(ds_config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer


def _cast_float_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed's bf16/fp16 modes cast parameters only; float buffers (timm BEiT's zero ``k_bias``) must
    follow, or attention mixes dtypes."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)


def engine_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed keeps the model in, for casting its inputs."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def _local_grad_norm(engine) -> torch.Tensor | None:
    """This rank's gradient norm where DeepSpeed reports none (stage 0 in fp32); call before ``step()``."""
    if engine.zero_optimization_stage() != 0:
        return None
    return torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])


def grad_norms(engine, local_norm: torch.Tensor | None) -> dict[str, float]:
    """The global gradient norm of the step just taken, before and after DeepSpeed's clipping.

    DeepSpeed reports the pre-clip norm for ZeRO and bf16/fp16; at stage 0 in fp32 it reports none, so
    the caller passes the norm it computed before ``step()`` (``local_norm``)."""
    norm = engine.get_global_grad_norm()
    if norm is None and local_norm is not None:
        norm = local_norm.item()
    if norm is None:
        return {}
    norm = float(norm)
    clip = engine.gradient_clipping()
    clipped = norm * min(1.0, clip / (norm + 1e-6)) if clip > 0 else norm  # torch's clip_grad_norm_ rule
    return {"grad_norm": norm, "grad_norm_clipped": clipped}
