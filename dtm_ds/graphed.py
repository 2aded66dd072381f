"""Morphing captured as a CUDA graph: ``GraphedMorph(targets, schedule)`` is ``morph.morph_levels``.

On a GPU the morphing of every level is captured once per input shape as a CUDA graph and replayed for
every sampled schedule (the schedule is a static device tensor, so nothing in the graph depends on its
values). On CPU, or with capture off, it runs eagerly; ``compile`` wraps it in ``torch.compile`` instead.

``launch(targets, schedule_of)`` starts it off the critical path: on a GPU on a stream of its own, after
the work queued so far (the teacher that made the targets) and concurrently with what the caller queues
next (the student's forward); ``Pending.wait()`` makes the caller's stream wait for it (an event, no host
sync) and returns the groups. On CPU it runs at once, in order.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dtm_ds.morph import Morphed, morph_levels

__all__ = ["GraphedMorph", "Pending"]


class GraphedMorph:
    """``morphed = GraphedMorph()(targets [B, N, D], schedule [L, K])``, as ``morph_levels`` returns it."""

    def __init__(self, protect_first: bool = True, cuda_graph: bool = True, compile: str | None = None):
        self.protect_first, self.cuda_graph = protect_first, cuda_graph

        def fn(target: Tensor, schedule: Tensor) -> Morphed:
            return morph_levels(target, schedule, protect_first)

        self.fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=compile) if compile else fn
        self.graphs: dict[tuple, tuple] = {}
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def launch(self, targets: Tensor, schedule_of: Callable[[], Tensor]) -> "Pending":
        """Morph ``targets`` with the schedule ``schedule_of()`` samples (on the morphing stream too)."""
        if not targets.is_cuda:
            schedule = schedule_of()
            return Pending(self(targets, schedule), schedule, None)
        main = torch.cuda.current_stream(targets.device)
        side = self.streams.setdefault(targets.device, torch.cuda.Stream(targets.device))
        side.wait_stream(main)  # the targets exist, and the previous micro-step's loss has read the graph's output
        with torch.cuda.stream(side):
            targets.record_stream(side)
            schedule = schedule_of()
            morphed = self(targets, schedule)
            done = torch.cuda.Event()
            done.record(side)
        return Pending(morphed, schedule, done)

    def prepare(self, targets: Tensor, schedule: Tensor) -> None:
        """Capture the graph for inputs shaped like these now (before the loader's threads start), not at the
        first step; a no-op where no graph is used."""
        key = _key(targets, schedule)
        if self.cuda_graph and targets.is_cuda and key not in self.graphs:
            self.graphs[key] = self._capture(targets, schedule)

    def __call__(self, targets: Tensor, schedule: Tensor) -> Morphed:
        if not (self.cuda_graph and targets.is_cuda):
            return Morphed(*self.fn(targets, schedule))
        self.prepare(targets, schedule)
        graph, static_targets, static_schedule, morphed = self.graphs[_key(targets, schedule)]
        static_targets.copy_(targets)
        static_schedule.copy_(schedule, non_blocking=True)
        graph.replay()
        return morphed  # overwritten by the next replay: consume (backward) before the next step

    def _capture(self, targets: Tensor, schedule: Tensor):
        static_targets = targets.detach().clone()
        static_schedule = schedule.to(targets.device).clone()
        side = torch.cuda.Stream(targets.device)
        side.wait_stream(torch.cuda.current_stream(targets.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy init)
            for _ in range(2):
                self.fn(static_targets, static_schedule)
        torch.cuda.current_stream(targets.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: a loader thread that records CUDA events meanwhile (FFCV) does not break the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            morphed = Morphed(*self.fn(static_targets, static_schedule))
        return graph, static_targets, static_schedule, morphed


def _key(targets: Tensor, schedule: Tensor) -> tuple:
    return tuple(targets.shape), targets.dtype, tuple(schedule.shape), targets.device


@dataclass
class Pending:
    """Morphing under way (``GraphedMorph.launch``): ``wait()`` returns the ``Morphed`` groups, once the
    caller's stream has been made to wait for them."""

    morphed: Morphed
    schedule: Tensor  # [L, K], sampled on the morphing stream
    done: torch.cuda.Event | None

    def wait(self) -> Morphed:
        if self.done is not None:
            current = torch.cuda.current_stream(self.morphed.groups.device)
            current.wait_event(self.done)
            for tensor in (self.morphed.groups, self.schedule):
                tensor.record_stream(current)  # made on the morphing stream, used (and freed) on this one
        return self.morphed
