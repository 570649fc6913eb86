"""compile(): capture if needed, price the nodes, search the cuts, refine, make the plan."""
from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from torch import nn

from asyncfx.errors import PlanError
from asyncfx.partitioner.binding import LatentOption
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.cost_graph import CostGraph, build_cost_graph
from asyncfx.partitioner.empty_weights import meta_tensor_names
from asyncfx.partitioner.cost_model import CostModel, check_cost
from asyncfx.partitioner.device import DeviceSpec, device_spec
from asyncfx.partitioner.examples import as_captured, split_example_inputs
from asyncfx.partitioner.make_plan import checked_stage_count, plan_from_cuts
from asyncfx.partitioner.profile import Profile, profile_captured
from asyncfx.partitioner.refine import refine
from asyncfx.partitioner.search import search_cuts
from asyncfx.plan import StagePlan

logger = logging.getLogger(__name__)


def compile(model_or_captured: nn.Module, n_devices: int, *, example_inputs: Any = None,
            cost: str = "flops", link: str | DeviceSpec = "cpu", profile: Profile | None = None,
            refine_rounds: int = 5, repeats: int = 5, latent: LatentOption = None,
            timestep: str | None = None) -> StagePlan:
    """Cut a model into ``n_devices`` stages that minimise the predicted round time.

    ``example_inputs`` (needed unless a :class:`Captured` is given, and for
    ``cost="measure"``) is a tuple of positional arguments, a dict of keyword arguments,
    or a pair ``(args, kwargs)``. Costs:

    - ``"flops"``: FLOPs and bytes estimated on fake tensors, priced by ``link``'s device
      roofline (no run needed);
    - ``"measure"``: per-node times measured where the inputs live (or taken from
      ``profile``), then up to ``refine_rounds`` rounds of timing each stage as a whole
      and searching again with corrected costs;
    - ``"uniform"``: equal node counts, transfers free.

    ``link`` (a preset name of ``asyncfx.partitioner.device.PRESETS`` or a DeviceSpec)
    prices boundary transfers between devices. On CUDA, measurements run on the current
    stream: compile under ``torch.cuda.stream(partition.stream)`` to balance the stages
    for the SM partitions of ``devices="sm-partitions:N"`` rather than for the whole GPU.

    Example:
        >>> model, args, kwargs = asyncfx.zoo.tiny.sd_unet()
        >>> plan = asyncfx.compile(model, 2, example_inputs=(args, kwargs))
        >>> plan.n_stages
        2
    """
    return compile_with_costs(as_captured(model_or_captured, example_inputs, latent, timestep), n_devices,
                              example_inputs=example_inputs, cost=cost, link=link, profile=profile,
                              refine_rounds=refine_rounds, repeats=repeats).plan


class Compiled(NamedTuple):
    """A plan and the cost model its cuts were searched with (re-cutting starts from it)."""

    plan: StagePlan
    model: CostModel


def compile_with_costs(captured: Captured, n_devices: int, *, example_inputs: Any = None, cost: str = "flops",
                       link: str | DeviceSpec = "cpu", profile: Profile | None = None,
                       refine_rounds: int = 5, repeats: int = 5) -> Compiled:
    """``compile()`` of a capture, with the cost model it searched with.

    Example:
        >>> plan, costs = compile_with_costs(captured, 2)
    """
    spec = device_spec(link)
    check_cost(cost)
    started = time.perf_counter()
    flat_inputs = None
    if cost == "measure":
        if meta_tensor_names(captured.graph_module):
            raise PlanError(f"cost='measure' times the graph's nodes, which needs the weights, and this "
                            f"{captured.model_class} was built without them (on the meta device). Use "
                            "cost='flops' (the default); rebalance=True then corrects the plan from the "
                            "stage times measured while sampling.")
        if example_inputs is None:
            raise PlanError("cost='measure' times the model on real inputs, and a Captured keeps its graph, "
                            "not the tensors it was captured from (they may be large, or change): pass "
                            "example_inputs=(args, kwargs), the call it was captured with (and optionally "
                            "a Profile from asyncfx.profile()).")
        args, kwargs = split_example_inputs(example_inputs)
        flat_inputs = captured.interface.flatten(args, kwargs)
        if profile is None:
            profile = profile_captured(captured, flat_inputs, repeats=repeats)
    graph = cost_graph_for(captured, profile)
    model = CostModel(graph, spec, cost)
    plan = plan_from_cuts(model, search_cuts(model, checked_stage_count(n_devices, graph)))
    if flat_inputs is not None and refine_rounds > 0:
        plan = refine(captured, model, plan, flat_inputs, rounds=refine_rounds, repeats=repeats)
    logger.info("compiled %d stage(s) of %s (cost=%s, link=%s) in %.1f s; stage costs (%s) %s",
                plan.n_stages, captured.model_class, cost, spec.name, time.perf_counter() - started,
                plan.cost_unit, ", ".join(plan.format_cost(s.estimated_cost) for s in plan.stages))
    return Compiled(plan, model)


def compile_profile(profile: Profile, n_devices: int, *, link: str | DeviceSpec = "cpu") -> StagePlan:
    """A plan from a saved profile alone (offline; no model, no refinement).

    Example:
        >>> plan = compile_profile(Profile.load("profile.json"), 4, link="nvlink")
    """
    model = CostModel(profile.graph, device_spec(link), "measure")
    plan = plan_from_cuts(model, search_cuts(model, checked_stage_count(n_devices, profile.graph)))
    plan.notes.append(f"compiled from a profile measured on {profile.device} "
                      f"({profile.threads} threads, median of {profile.repeats} runs)")
    return plan


def cost_graph_for(captured: Captured, profile: Profile | None) -> CostGraph:
    if profile is None:
        return build_cost_graph(captured)
    if profile.graph.fingerprint != captured.fingerprint:
        raise PlanError(f"the profile was measured on another graph (profile {profile.graph.fingerprint}, "
                        f"{profile.graph.model_class}; this graph {captured.fingerprint}); profile "
                        "this model at these input shapes again.")
    return profile.graph
