"""The compiler as the runtime sees it (``asyncfx.program.Frontend``): ``partition()``'s
denoiser captures through it at a model's first call, which also settles the layout
(batch groups x stages, ``layouts.py``: given, or the fastest predicted, which compiles
then), lowers at the last warm-up step (compiling a plan unless one was given or made),
and re-cuts a compiled plan from the stage times the runtime measured (``rebalance.py``)."""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from torch import nn

from asyncfx.partitioner.binding import LatentOption
from asyncfx.partitioner.capture import capture
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.compile import Compiled, compile_with_costs
from asyncfx.partitioner.device import DeviceSpec
from asyncfx.errors import CaptureError, PlanError
from asyncfx.partitioner.layouts import (NOMINAL_STEPS, LayoutOption, candidate_layouts, check_layout,
                                         check_stage_count, choose_layout, group_example, max_stage_count,
                                         predicted_generation, same_computation, separability,
                                         whole_batch_cost)
from asyncfx.partitioner.lower import lower
from asyncfx.partitioner.staged import check_plan
from asyncfx.partitioner.rebalance import Rebalancer
from asyncfx.passes.batch import Separability
from asyncfx.plan import StagePlan
from asyncfx.program import BatchSplit, CallSpec, Layout, Program, WeightSource


@dataclasses.dataclass(frozen=True)
class PartitionFrontend:
    """Captures with ``latent``/``timestep``, lays ``n_devices`` out as ``layout`` (the given
    plan's, if any; None: the fastest predicted for the call's batch, with ``warmup``
    warm-up steps; a ``Captured`` model is never split into groups), compiles its
    stages with ``cost`` and ``link`` (or takes ``plan``, which is never re-cut).
    ``rebalance``: re-cut compiled plans from measured stage times. ``rank_zero_decides``:
    under torch.distributed, rank 0 compiles and re-cuts, and every rank takes its plan
    (measured costs differ per rank); the layout is then stages only. ``weights``: where
    the stages of a model built without weights load them from.

    Example:
        >>> frontend = PartitionFrontend(n_devices=4, layout=Layout(2, 2))
        >>> program = frontend.capture(model, args, kwargs).lower()
    """

    n_devices: int
    layout: Layout | None = None
    warmup: int = 3
    cost: str = "flops"
    link: str | DeviceSpec = "cpu"
    latent: LatentOption = None
    timestep: str | None = None
    plan: StagePlan | None = None
    rebalance: bool = True
    rank_zero_decides: bool = False
    weights: WeightSource | None = None

    def capture(self, model: nn.Module, args: tuple, kwargs: dict) -> CapturedCall:
        """Capture the call, and settle its layout: the one given, else the fastest predicted
        among those the batch allows."""
        whole = model if isinstance(model, Captured) else self._capture(model, args, kwargs)
        wanted, limit = self.layout, max_stage_count(whole)
        found = separability(whole) if wanted is None or wanted.groups > 1 else None
        if wanted is not None:
            check_stage_count(wanted, limit, whole.model_class)
            if found is not None:
                check_layout(wanted, found, whole.model_class)
            call = self._laid_out(model, whole, found, wanted, (args, kwargs))
            if self.plan is not None:  # now, not when the stages are built after warm-up
                check_plan(call.staged_from, self.plan)
            return call
        stages_only = isinstance(model, Captured) or self.rank_zero_decides  # a Captured has one batch
        options = [Layout(1, self.n_devices)] if stages_only else candidate_layouts(self.n_devices, found)
        fitting = [layout for layout in options if layout.stages <= limit]
        if not fitting:
            check_stage_count(min(options, key=lambda layout: layout.stages), limit, whole.model_class)
        if len(fitting) == 1:  # compiled when lowered
            return self._laid_out(model, whole, found, fitting[0], (args, kwargs))
        return self._choose(model, whole, found, fitting, (args, kwargs))

    def _capture(self, model: nn.Module, args: tuple, kwargs: dict) -> Captured:
        return capture(model, args, kwargs, latent=self.latent, timestep=self.timestep)

    def _laid_out(self, model: nn.Module, whole: Captured, found: Separability | None, layout: Layout,
                  example: tuple[tuple, dict]) -> CapturedCall:
        if layout.groups == 1:
            return CapturedCall(self, whole, example, layout=layout)
        batched = frozenset(found.inputs)
        call = whole.call
        part_example = group_example(call.flatten, call.names, batched, layout.groups, *example)
        part = self._capture(model, *part_example)
        differs = same_computation(whole, part)
        if differs is not None:
            raise PlanError(f"layout {layout} cannot split the batch: {differs}. Use layout='1x"
                            f"{layout.devices}'.")
        return CapturedCall(self, whole, part_example, layout=layout, part=part,
                            split=BatchSplit(layout.groups, batched))

    def _choose(self, model: nn.Module, whole: Captured, found: Separability, layouts: list[Layout],
                example: tuple[tuple, dict]) -> CapturedCall:
        """Compile every candidate layout and keep the fastest predicted (``layouts.py``); a
        layout whose group's batch cannot be captured, or captures other ops, is left out,
        and the plan says why."""
        calls, options, left_out = [], [], []
        for layout in layouts:
            try:
                call = self._laid_out(model, whole, found, layout, example)
            except (CaptureError, PlanError) as refused:  # the model at a group's batch
                left_out.append(f"layout {layout} left out: {refused}")
                continue
            call.compiled = self.compile(call.staged_from, call.example, layout.stages)
            plan = call.compiled.plan if isinstance(call.compiled, Compiled) else call.compiled
            calls.append(call)
            options.append(LayoutOption(layout, plan, predicted_generation(plan, self.warmup)))
        chosen, why = choose_layout(options, options[0].plan.sequential_cost * NOMINAL_STEPS)
        call = calls[options.index(chosen)]
        call.why = "; ".join([why, *left_out])
        call.whole_over_group = options[0].plan.sequential_cost / chosen.plan.sequential_cost
        return call

    def compile(self, captured: Captured, example: tuple[tuple, dict], n_stages: int) -> Compiled | StagePlan:
        """The given plan, or one compiled (with its cost model, where this rank compiled it)."""
        if self.plan is not None:
            return self.plan
        made = self.decide(lambda: compile_with_costs(captured, n_stages, cost=self.cost, link=self.link,
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
    """A capture for the runtime (``asyncfx.program.Lowering``): its call spec and layout,
    the program made from it on demand, and the re-cutting of a compiled plan. With batch
    groups the stages are cut from ``part``, the capture at one group's batch, and
    ``example`` is one group's share of the call."""

    frontend: PartitionFrontend
    captured: Captured
    example: tuple[tuple, dict]
    layout: Layout = Layout(1, 1)
    part: Captured | None = None
    split: BatchSplit = BatchSplit()
    compiled: Compiled | StagePlan | None = None  # made while choosing the layout
    why: str = ""                                 # why this layout (when it was chosen)
    whole_over_group: float | None = None         # the whole batch's predicted time over one group's
    rebalancer: Rebalancer | None = None
    final: bool = False  # re-cutting is over

    @property
    def call(self) -> CallSpec:
        return self.captured.call

    @property
    def staged_from(self) -> Captured:
        """The capture the stages are cut from: one group's."""
        return self.part or self.captured

    def lower(self) -> Program:
        compiled = self.compiled or self.frontend.compile(self.staged_from, self.example, self.layout.stages)
        self.compiled = None
        if isinstance(compiled, Compiled):
            if self.frontend.rebalance:
                self.rebalancer = Rebalancer(compiled.model, compiled.plan)
            compiled = compiled.plan
        return self._lowered(compiled)

    def _lowered(self, plan: StagePlan) -> Program:
        if plan is not self.frontend.plan:  # the compiler's plan (never the user's) records the layout
            self._record_layout(plan)
        return lower(self.staged_from, plan, self.frontend.weights, self.split)

    def _record_layout(self, plan: StagePlan) -> None:
        """Write the layout into a plan compiled for it: its groups, the whole batch's cost
        and why it was chosen."""
        plan.groups = self.layout.groups
        if plan.groups > 1 and not plan.whole_batch_cost and plan.cost != "measure":
            if self.whole_over_group is None:  # a re-cut rescales the group's costs: keep the ratio
                whole = whole_batch_cost(self.captured, plan.cost, plan.link)
                self.whole_over_group = whole / plan.sequential_cost
            plan.whole_batch_cost = self.whole_over_group * plan.sequential_cost
        if self.why and self.why not in plan.notes:
            plan.notes.append(self.why)

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
        return None if plan is None else self._lowered(plan)
