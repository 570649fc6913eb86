"""Layouts: batch groups x stages, and the fastest one for a model.

A classifier-free-guidance batch (or any batch) whose samples the model computes
separately (``passes.batch``) can be split over G groups of devices, each running the
same N-stage chain on its share: exact, since no group reads another's values. The
compiler captures the model again at the group's batch, compiles each factorisation
``G x N`` of the devices and predicts a generation of ``NOMINAL_STEPS`` steps: the
warm-up steps one stage after another at the group's batch, the others one round each.
It takes the fastest, or the one with the fewest stages among those within
``LAYOUT_TOLERANCE`` of it: fewer stages read fewer stale values.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree

from asyncfx.errors import PlanError
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.cost_graph import build_cost_graph
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.cuts import cut_positions, latent_order
from asyncfx.partitioner.device import DeviceSpec, device_spec
from asyncfx.passes.batch import Separability, batch_separability
from asyncfx.plan import StagePlan
from asyncfx.program import InputRole, Layout

#: Layouts predicted within this share of the fastest count as fast: the one with the
#: fewest stages among them is taken.
LAYOUT_TOLERANCE = 0.05
#: Steps of the generation the layouts are compared on (a typical sampler's).
NOMINAL_STEPS = 50


def separability(captured: Captured) -> Separability:
    """Whether ``captured`` computes each sample of its batch separately (``passes.batch``)."""
    latents = [i.placeholder for i in captured.inputs if i.role is InputRole.LATENT]
    return batch_separability(captured.graph, latents)


def check_layout(layout: Layout, found: Separability, model_class: str) -> None:
    """Raise PlanError unless the batch splits into ``layout.groups`` groups."""
    if layout.groups == 1:
        return
    if not found.separable:
        raise PlanError(f"layout {layout} splits the batch over {layout.groups} groups, but {model_class} "
                        f"does not compute its samples separately: {found.failure}. Use layout='1x"
                        f"{layout.devices}' (stages only).")
    if found.batch % layout.groups:
        raise PlanError(f"layout {layout} splits the batch over {layout.groups} groups, but the call's batch "
                        f"is {found.batch}; use a number of groups that divides it, or layout='1x"
                        f"{layout.devices}'.")


def candidate_layouts(n_devices: int, found: Separability) -> list[Layout]:
    """Every ``G x N`` with ``G * N = n_devices`` whose G splits the batch (G=1 always)."""
    groups = [g for g in range(1, n_devices + 1) if n_devices % g == 0 and (g == 1 or found.splits_into(g))]
    return [Layout(g, n_devices // g) for g in groups]


def max_stage_count(captured: Captured) -> int:
    """How many stages the captured graph can be cut into: one more than its cut positions."""
    return len(cut_positions(latent_order(captured.graph))) + 1


def check_stage_count(layout: Layout, max_stages: int, model_class: str) -> None:
    """Raise PlanError when the layout has more stages than the model can be cut into."""
    if layout.stages > max_stages:
        groups = f" in {layout.groups} batch groups" if layout.groups > 1 else ""
        raise PlanError(f"{layout.devices} devices{groups} need {layout.stages} stages, more than the "
                        f"{max_stages} {model_class} can be cut into at this input size (it has "
                        f"{max_stages - 1} places to cut); use at most {max_stages} devices a group.")


def group_example(call_flatten: Callable[[tuple, dict], list[torch.Tensor]], names: Sequence[str],
                  batched: frozenset[str], groups: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The first group's share of a call: its batched tensors' first ``1/groups``."""
    flat = call_flatten(args, kwargs)
    split = {id(t) for t, name in zip(flat, names) if name in batched}

    def share(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[: tensor.shape[0] // groups] if id(tensor) in split else tensor

    return pytree.tree_map_only(torch.Tensor, share, (args, kwargs))


def same_computation(whole: Captured, part: Captured) -> str | None:
    """Why the capture at a group's batch computes otherwise than the whole (None: it does
    not): the model took other branches at the smaller batch."""
    ops = [[str(n.target) for n in c.graph.nodes if n.op == "call_function"] for c in (whole, part)]
    if ops[0] == ops[1]:
        return None
    differ = next((i for i, (a, b) in enumerate(zip(*ops)) if a != b), min(map(len, ops)))
    return (f"at the group's batch {part.model_class} runs other ops than at the whole batch (op {differ}: "
            f"{ops[0][differ] if differ < len(ops[0]) else 'none'} against "
            f"{ops[1][differ] if differ < len(ops[1]) else 'none'}): its forward depends on the batch size")


@dataclasses.dataclass(frozen=True)
class LayoutOption:
    """One layout, its compiled plan and the predicted time of a nominal generation (in
    the plan's cost unit)."""

    layout: Layout
    plan: StagePlan
    seconds: float

    def describe(self, sequential: float) -> str:
        return f"{self.layout} {sequential / self.seconds:.2f}x"


def whole_batch_cost(captured: Captured, cost: str, link: str | DeviceSpec) -> float:
    """The whole batch's predicted time on one device (the cost model of ``cost``; 0 for
    ``"measure"``, which would time it)."""
    if cost == "measure":
        return 0.0
    return CostModel(build_cost_graph(captured), device_spec(link), cost).sequential()


def predicted_generation(plan: StagePlan, warmup: int, steps: int = NOMINAL_STEPS) -> float:
    """A generation of ``steps`` steps on ``plan``'s layout, in its cost unit: ``warmup``
    steps with its stages one after another, then one round a step."""
    sequential = plan.sequential_cost or sum(s.estimated_cost for s in plan.stages)
    round_time = plan.predicted_round if plan.n_stages > 1 else sequential
    warm = min(warmup, steps)
    return warm * sequential + (steps - warm) * round_time


def choose_layout(options: Sequence[LayoutOption], sequential: float) -> tuple[LayoutOption, str]:
    """The fastest option, or the fewest stages within ``LAYOUT_TOLERANCE`` of it, and why."""
    fastest = min(o.seconds for o in options)
    close = [o for o in options if o.seconds <= fastest * (1 + LAYOUT_TOLERANCE)]
    chosen = min(close, key=lambda o: (o.layout.stages, o.seconds))
    ranked = ", ".join(o.describe(sequential) for o in sorted(options, key=lambda o: o.seconds))
    why = (f"layout {chosen.layout} chosen: predicted speedup over one device at {NOMINAL_STEPS} steps "
           f"{ranked}" + (f"; the fewest stages within {LAYOUT_TOLERANCE:.0%} of the fastest"
                          if len(close) > 1 else ""))
    return chosen, why
