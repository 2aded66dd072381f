"""Count the calls that make the host wait for a GPU, on any device (a CPU run included).

``with HostSyncs() as syncs: ...`` records every call that would block the host on a CUDA device, by the
code that made it: reading a tensor's value (``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor,
``cpu``, ``numpy``), data-dependent shapes (``nonzero``, ``masked_select``, ``unique``, boolean indexing
is not seen), a tensor made from Python values on the device (``torch.tensor(..., device=...)``), a copy
from host memory to a CUDA device that is blocking or from pageable memory, and explicit synchronisation
(``torch.cuda.synchronize``, a stream's or event's ``synchronize``, DeepSpeed's
``get_accelerator().synchronize()``). On a CPU run these
calls block nothing, but each one is a place where the same code on a GPU would wait; on a GPU,
``torch.cuda.set_sync_debug_mode`` is the device's own count (bench/gpu_check.py uses both).

``syncs.by_origin`` counts them by the first frame outside torch: ``project`` (dtm_ds, eval, data_prep),
``deepspeed``, or ``other`` (timm, open_clip, ...); a call that torch's own Python code makes is ``torch``
(chiefly the optimizer's step counters, host tensors on a GPU too, so no device sync there); ``syncs.calls``
keeps (origin, what, file:line of the first frame outside torch). Calls
made inside a function marked ``@cpu_only`` or listed in ``_CPU_ONLY`` (code that runs on CPU tensors only,
such as the eager morphing's host plan ``morph._host_plan``, which an accelerator never runs) count as
``cpu_only``.
"""

import sys
import threading
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncs", "cpu_only"]

_ROOT = Path(__file__).resolve().parents[1]
_CPU_ONLY = {(str(_ROOT / "dtm_ds" / "morph.py"), "_host_plan")}  # (file, function); morph.py imports only torch


def cpu_only(fn):
    """Mark ``fn`` as code that runs on CPU tensors only (its calls count as ``cpu_only``, not as syncs)."""
    _CPU_ONLY.add((fn.__code__.co_filename, fn.__code__.co_name))
    return fn


_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
          "masked_select", "unique", "unique_consecutive", "argwhere"}  # fmt: skip
_PROJECT = tuple(str(_ROOT / d) + "/" for d in ("dtm_ds", "eval", "data_prep"))
_SKIP = (str(Path(torch.__file__).parent) + "/", __file__)


def _is_host_copy(func, args, kwargs) -> bool:
    """``t.to(cuda)`` / ``t.cuda()`` / ``cuda_t.copy_(host_t)`` that the host waits for: host memory to a CUDA
    device without ``non_blocking`` from pinned memory (seen on a GPU run only: on CPU no target is CUDA)."""
    name = getattr(func, "__name__", "")
    if name not in ("to", "cuda", "copy_") or not args or not isinstance(args[0], torch.Tensor):
        return False
    if name == "copy_":
        source, target = (args[1] if len(args) > 1 else None), args[0].device
        blocking = not kwargs.get("non_blocking", len(args) > 2 and args[2])
    else:
        source, blocking = args[0], not kwargs.get("non_blocking", False)
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None))
        target = torch.device("cuda") if name == "cuda" else target
    if not isinstance(source, torch.Tensor) or source.is_cuda or target is None:
        return False
    return torch.device(target).type == "cuda" and (blocking or not source.is_pinned())


def _sized_by_values(args, kwargs) -> bool:
    """``repeat_interleave`` with tensor repeats and no ``output_size``: its size is read from the device."""
    repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
    return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None


class HostSyncs(TorchFunctionMode):
    """A context that counts would-be host synchronisations in this thread (see the module's docstring)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []
        self._thread = threading.get_ident()
        self._patched: list[tuple[object, str, object]] = []

    @property
    def by_origin(self) -> Counter:
        return Counter(origin for origin, _, _ in self.calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        made_on_device = name == "tensor" and kwargs.get("device") is not None
        sized_by_values = name == "repeat_interleave" and _sized_by_values(args, kwargs)
        if name in _READS or made_on_device or sized_by_values or _is_host_copy(func, args, kwargs):
            self._record(name)
        return func(*args, **kwargs)

    def _record(self, what: str) -> None:
        if threading.get_ident() != self._thread:
            return
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        inside_torch = frame is not None and frame.f_code.co_filename.startswith(_SKIP[0])
        while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
            frame = frame.f_back
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"
        origin = "project" if where.startswith(_PROJECT) else "deepspeed" if "/deepspeed/" in where else "other"
        origin = "torch" if inside_torch else origin
        outer = frame
        while outer is not None and (outer.f_code.co_filename, outer.f_code.co_name) not in _CPU_ONLY:
            outer = outer.f_back
        origin = "cpu_only" if outer is not None else origin
        self.calls.append((origin, what, where))

    def __enter__(self):
        targets = [(torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize")]
        accelerators = sys.modules.get("deepspeed.accelerator")  # DeepSpeed's, where the run has imported it
        if accelerators is not None:
            targets.append((accelerators.get_accelerator(), "synchronize"))
        for owner, attr in targets:
            original = getattr(owner, attr)
            self._patched.append((owner, attr, original))
            setattr(owner, attr, self._counting(original, attr))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def _counting(self, original, attr: str):
        def synchronize(*args, **kwargs):
            self._record(attr)
            return original(*args, **kwargs)

        return synchronize
