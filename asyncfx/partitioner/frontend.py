"""The compiler as the runtime sees it (``asyncfx.program.Frontend``): ``partition()``'s
denoiser captures through it at a model's first call, lowers at the last warm-up step
(compiling a plan unless one was given), and re-cuts a compiled plan from the stage
times the runtime measured (``rebalance.py``)."""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from torch import nn

from asyncfx.partitioner.binding import LatentOption
from asyncfx.partitioner.capture import capture
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.compile import Compiled, compile_with_costs
from asyncfx.partitioner.device import DeviceSpec
from asyncfx.partitioner.lower import lower
from asyncfx.partitioner.rebalance import Rebalancer
from asyncfx.plan import StagePlan
from asyncfx.program import CallSpec, Program, WeightSource


@dataclasses.dataclass(frozen=True)
class PartitionFrontend:
    """Captures with ``latent``/``timestep``, compiles ``n_stages`` stages with ``cost`` and
    ``link`` (or takes ``plan``, which is never re-cut). ``rebalance``: re-cut compiled
    plans from measured stage times. ``rank_zero_decides``: under torch.distributed, rank
    0 compiles and re-cuts, and every rank takes its plan (measured costs differ per rank).
    ``weights``: where the stages of a model built without weights load them from.

    Example:
        >>> frontend = PartitionFrontend(n_stages=2)
        >>> program = frontend.capture(model, args, kwargs).lower()
    """

    n_stages: int
    cost: str = "flops"
    link: str | DeviceSpec = "cpu"
    latent: LatentOption = None
    timestep: str | None = None
    plan: StagePlan | None = None
    rebalance: bool = True
    rank_zero_decides: bool = False
    weights: WeightSource | None = None

    def capture(self, model: nn.Module, args: tuple, kwargs: dict) -> CapturedCall:
        captured = model if isinstance(model, Captured) else capture(
            model, args, kwargs, latent=self.latent, timestep=self.timestep)
        return CapturedCall(self, captured, (args, kwargs))

    def compile(self, captured: Captured, example: tuple[tuple, dict]) -> Compiled | StagePlan:
        """The given plan, or one compiled (with its cost model, where this rank compiled it)."""
        if self.plan is not None:
            return self.plan
        made = self.decide(lambda: compile_with_costs(captured, self.n_stages, cost=self.cost, link=self.link,
                                                      example_inputs=example))
        return made if isinstance(made, Compiled) else made.plan

    def decide(self, decision: Callable[[], Compiled | Recut]) -> Compiled | Recut:
        """``decision()`` here, or under torch.distributed on rank 0, whose plan (and whether
        it is final) every rank takes; the other ranks get a Recut."""
        if not self.rank_zero_decides:
            return decision()
        import torch.distributed as dist

        if dist.get_rank() == 0:
            made = decision()
            plan, final = (made.plan, False) if isinstance(made, Compiled) else made
            dist.broadcast_object_list([None if plan is None else plan.to_dict(), final], src=0)
            return made
        box = [None, None]
        dist.broadcast_object_list(box, src=0)
        return Recut(None if box[0] is None else StagePlan.from_dict(box[0]), box[1])


class Recut(NamedTuple):
    """What looking at measured stage times decided: a new plan (None: keep it), and
    whether the plan is final (re-cutting is over)."""

    plan: StagePlan | None
    final: bool


@dataclasses.dataclass
class CapturedCall:
    """A capture for the runtime (``asyncfx.program.Lowering``): its call spec, the
    program made from it on demand, and the re-cutting of a compiled plan."""

    frontend: PartitionFrontend
    captured: Captured
    example: tuple[tuple, dict]
    rebalancer: Rebalancer | None = None
    final: bool = False  # re-cutting is over

    @property
    def call(self) -> CallSpec:
        return self.captured.call

    def lower(self) -> Program:
        compiled = self.frontend.compile(self.captured, self.example)
        if isinstance(compiled, Compiled):
            if self.frontend.rebalance:
                self.rebalancer = Rebalancer(compiled.model, compiled.plan)
            compiled = compiled.plan
        return lower(self.captured, compiled, self.frontend.weights)

    @property
    def rebalances(self) -> bool:
        """Whether measured stage times may still re-cut this capture's plan."""
        return self.frontend.plan is None and self.frontend.rebalance and not self.final

    def rebalanced(self, seconds: list[float], parallel: bool) -> Program | None:
        """The program of a better plan given the measured stage times, or None."""
        if not self.rebalances:
            return None
        rebalancer = self.rebalancer

        def observe() -> Recut:
            if rebalancer is None:
                return Recut(None, True)
            return Recut(rebalancer.observe(seconds, parallel), rebalancer.finished)

        plan, self.final = self.frontend.decide(observe)
        return None if plan is None else lower(self.captured, plan, self.frontend.weights)
