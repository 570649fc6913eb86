"""The captures of a model a denoiser keeps, and what it built from each.

Note (shapes): a call with other shapes, dtypes or non-tensor arguments than the
capture is captured anew. Earlier captures are kept as spares (with their executors,
up to ``MAX_SPARES``), so a pipeline that alternates kinds of call (an extra call
without classifier-free guidance at some steps; a call that fills a cache, then calls
that read it) switches back without capturing again. A switch does not start a new
generation: each capture keeps its own streams of calls (see the call clock).

Note (editing): the stages are captured from the model as it was; a model edited after
``partition()`` is captured again when the next generation starts: a LoRA loaded, fused
or re-weighted, new weights loaded, other attention processors set, or anything else
that changes its modules, tensors or their attributes (``model_state.state_signature``,
about 10 ms for a large UNet). Stage copies on other devices would otherwise keep the
old weights. The state is taken again after the model's first call of its own (a
warm-up step): what a forward makes for itself at its first call (a rotary table),
which the capture's trace left unmade, is not an edit.

Note (lazy compilation): a capture only binds calls. Warm-up steps compute exactly what
the original model computes, so until the last warm-up step the original model
answers; the plan, the stages and the executor are made at that step, the first to
need stage buffers (``start``). A plan that may be re-cut from measured stage times
(see the note on re-cutting) is made two steps earlier where the warm-up has them: the
stages run one of those steps to warm up and the next to be timed.

Note (re-cutting): the executors that run stages at once time them. At the last warm-up step of
every generation the capture's compiled plan (never a plan the user gave) is cut again
where those times call for it (``rebalance``; ``asyncfx.partitioner.rebalance``): from
the times of the previous generation's parallel steps, or, in the first generation,
from the warm-up step before. Every stream of calls is then at a warm-up step (streams
start with the generation or later), which writes the new plan's boundary values before
the first parallel step reads them.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from asyncfx.errors import ArgumentsError, InputMismatchError, WeightsReleasedError
from asyncfx.program import CallSpec, Frontend, Lowering, Program
from asyncfx.runtime.clock import Placement, StreamKey
from asyncfx.runtime.executor import BoundaryStore, Executor
from asyncfx.runtime.model_state import state_signature
from asyncfx.runtime.progress import Progress
from asyncfx.runtime.timesteps import StreamTimesteps

logger = logging.getLogger(__name__)

#: Earlier captures kept for calls that fit them again (see the note on shapes); each may
#: hold an executor with its stage copies.
MAX_SPARES = 3

#: ``launch(program)``: the executor that runs a program's stages.
Launch = Callable[[Program], Executor]


@dataclasses.dataclass
class Stream:
    """What one stream of calls keeps between its calls (see the call clock)."""

    start: int = 0                        # the generation step of its first call
    step: int = 0                         # the steps it has taken
    store: BoundaryStore = dataclasses.field(default_factory=BoundaryStore)
    cached: dict[int, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    times: StreamTimesteps = dataclasses.field(default_factory=StreamTimesteps)
    warmup: int = 0                       # its warm-up steps (``switch_below`` may add some)
    prediction: torch.Tensor | None = None  # its latest warm-up step's noise prediction
    cache_decisions: dict[int, Any] = dataclasses.field(default_factory=dict)  # a step cache's, by call

    def adapt_warmup(self, step: int, prediction: torch.Tensor, switch_below: float) -> None:
        """After warm-up step ``step``: one more warm-up step if it was the last and the
        noise prediction still changed by ``switch_below`` or more (relative to the previous
        step's, in norm) from the previous step (``partition(switch_below=)``)."""
        previous, self.prediction = self.prediction, prediction.detach()
        if step != self.warmup - 1 or previous is None or previous.shape != prediction.shape:
            return
        previous, current = previous.float(), prediction.detach().float()
        change = (current - previous).norm() / previous.norm().clamp_min(torch.finfo(torch.float32).tiny)
        if change.item() >= switch_below:
            self.warmup += 1


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a model's output (its noise prediction)."""
    return next(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


@dataclasses.dataclass
class Capture:
    """One capture of the model and what was built from it."""

    key: int                              # the call clock's name for it
    lowering: Lowering
    signature: int | None = None          # the model's state when it was captured (note on editing)
    module_dicts: list[dict] = dataclasses.field(default_factory=list)  # its modules' __dict__s
    settled: bool = False                 # signed again after the model's first call of its own
    program: Program | None = None
    executor: Executor | None = None
    streams: dict[StreamKey, Stream] = dataclasses.field(default_factory=dict)
    progress: Progress = Progress(enabled=False)  # says when building the stages takes a while
    call: CallSpec = dataclasses.field(init=False)  # the lowering's, read at every call

    def __post_init__(self) -> None:
        self.call = self.lowering.call

    def stream(self, placement: Placement, warmup: int) -> Stream:
        """The kept state of the call's stream; a new one, with ``warmup`` steps, where the
        stream starts (over)."""
        key, step = placement.stream, placement.stream_step
        if step == 0 or key not in self.streams:
            self.streams[key] = Stream(start=placement.step - step, warmup=warmup)
        return self.streams[key]

    def start(self, launch: Launch) -> Executor:
        """The executor, made now if there is none (lowering first where needed)."""
        if self.executor is None:
            with self.progress.working(f"building the stages of {self.call.model_class}"):
                if self.program is None:
                    self.program = self.lowering.lower()
                self.executor = launch(self.program)
            logger.info("running %d stage(s) of %s on %s", self.program.n_stages, self.call.model_class,
                        running_on(self.executor))
        return self.executor

    def rebalance(self) -> bool:
        """Re-cut the plan where the stage times measured since the last look call for it
        (``Lowering.rebalanced``; a collective under torch.distributed: every rank calls it
        at the same step). The executor is replaced and every stream's boundary values are
        dropped, so it is called only where every stream's next step is a warm-up step."""
        if self.executor is None or not self.lowering.rebalances:
            return False
        measured = self.executor.measured()
        program = None if measured is None else self.lowering.rebalanced(measured.seconds, measured.parallel)
        if program is None:
            return False
        self.close()
        self.program = program
        for stream in self.streams.values():
            stream.store, stream.cached = BoundaryStore(), {}
        return True

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None


class CaptureCache:
    """The current capture of a model and up to ``MAX_SPARES`` earlier ones.

    Example:
        >>> cache = CaptureCache(frontend, rebuild=True, signed=True)
        >>> capture, flat = cache.bind(model, args, kwargs)   # captures at the first call
    """

    def __init__(self, frontend: Frontend, *, rebuild: bool, signed: bool,
                 progress: Progress = Progress(False)):
        self.frontend, self.progress = frontend, progress
        self.rebuild = rebuild  # new shapes are captured anew (not with a user's plan)
        self.signed = signed    # edits are looked for (not for a graph given as the model)
        self.current: Capture | None = None
        self.spares: list[Capture] = []
        self.why_empty = "its first call"  # why there is no current capture (logged)
        self.refusal: str | None = None  # why new captures are refused (the model's weights were released)
        self._keys = itertools.count()

    def captures(self) -> list[Capture]:
        return ([self.current] if self.current is not None else []) + self.spares

    def bind(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[Capture, list[torch.Tensor]]:
        """The capture that fits the call (the current one, a spare, or a new one) and the
        call's flat graph inputs."""
        if self.current is None:
            self.capture(model, args, kwargs, reason=self.why_empty)
        try:
            return self.current, self.current.call.flatten(args, kwargs)
        except ArgumentsError:
            raise  # a mistake in the call: a new capture would not fit it either
        except InputMismatchError as mismatch:
            if not self.rebuild:
                raise
            found = self._switch_to_spare(args, kwargs)
            if found is not None:
                return self.current, found
            self.capture(model, args, kwargs, keep_current=True,
                         reason=f"the call differs from the capture: {mismatch}")
            return self.current, self.current.call.flatten(args, kwargs)

    def capture(self, model: nn.Module, args: tuple, kwargs: dict, *, keep_current: bool = False,
                reason: str = "") -> Capture:
        """Capture for a call like this one, now the current capture; ``keep_current`` keeps
        the one before as a spare (note on shapes). A capture that fails keeps the old."""
        if self.refusal is not None:
            raise WeightsReleasedError(f"capturing again ({reason}) is not possible: {self.refusal}")
        logger.info("capturing %s: %s", type(model).__name__, reason)
        with self.progress.working(_capturing(model)):
            lowering = self.frontend.capture(model, args, kwargs)
        if keep_current and self.current is not None:
            self._keep_spare(self.current)
        else:
            self.close_all()
        self.current = Capture(next(self._keys), lowering, progress=self.progress,
                               signature=state_signature(model) if self.signed else None,
                               module_dicts=[module.__dict__ for module in model.modules()])
        return self.current

    def edited(self, model: nn.Module) -> bool:
        """Whether the model was edited since the current capture (note on editing)."""
        signature = self.current.signature
        return signature is not None and state_signature(model) != signature

    def settle(self, model: nn.Module) -> None:
        """Take the model's state again after its first call since the capture: what a forward
        keeps for itself (a table made at its first call) is not an edit."""
        current = self.current
        if not current.settled and current.signature is not None:
            current.signature = state_signature(model)
        current.settled = True

    def sign_again(self, model: nn.Module) -> None:
        """Take the model's state again for every capture: what the denoiser itself did to
        the model (releasing its weights) is not an edit."""
        for capture in self.captures():
            if capture.signature is not None:
                capture.signature = state_signature(model)

    def forget(self, why: str) -> None:
        """Drop every capture (the model was converted): the next call captures again."""
        self.close_all()
        self.current = None
        self.why_empty = why

    def close(self) -> None:
        """Stop every executor; the next call starts new ones from the same programs."""
        for capture in self.captures():
            capture.close()

    def close_all(self) -> None:
        """Stop every executor and drop the spares."""
        self.close()
        self.spares = []

    def _keep_spare(self, capture: Capture) -> None:
        self.spares.insert(0, capture)
        for dropped in self.spares[MAX_SPARES:]:
            dropped.close()
        del self.spares[MAX_SPARES:]

    def _switch_to_spare(self, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        """The call's flat inputs if a spare fits them (the latest that does), now current."""
        for index, spare in enumerate(self.spares):
            try:
                flat = spare.call.flatten(args, kwargs)
            except InputMismatchError:
                continue
            del self.spares[index]
            self.spares.insert(0, self.current)
            self.current = spare
            logger.debug("switched back to an earlier capture of %s, which fits this call",
                         spare.call.model_class)
            return flat
        return None


def _capturing(model: nn.Module) -> str:
    """What capturing the model for a call does, as progress says it."""
    model_class = getattr(model, "model_class", None)  # a graph captured already
    if isinstance(model_class, str):
        return f"laying out the captured {model_class}"
    return f"capturing {type(model).__name__} (torch.export) and laying it out"


def running_on(executor: Any) -> str:
    """The executor and its devices, e.g. ``LocalExecutor on cuda:0, cuda:1``."""
    devices = getattr(executor, "devices", None)
    return type(executor).__name__ + (f" on {', '.join(str(d) for d in devices)}" if devices else "")
