"""compile(): capture if needed, price the nodes, search the cuts, refine, make the plan."""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from asyncfx.errors import CaptureError, PlanError
from asyncfx.partitioner.capture import Captured, LatentOption, capture
from asyncfx.partitioner.cost_graph import CostGraph, build_cost_graph
from asyncfx.partitioner.cost_model import CostModel, check_cost
from asyncfx.partitioner.device import DeviceSpec, device_spec
from asyncfx.partitioner.plan import BoundaryTensor, StageInfo, StagePlan
from asyncfx.partitioner.profile import Profile, profile_captured
from asyncfx.partitioner.search import Cut, search_cuts

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
    captured = as_captured(model_or_captured, example_inputs, latent, timestep)
    spec = device_spec(link)
    check_cost(cost)
    started = time.perf_counter()
    flat_inputs = None
    if cost == "measure":
        if example_inputs is None:
            raise PlanError("cost='measure' times the model on real inputs: pass example_inputs "
                            "(and optionally a Profile from asyncfx.profile()).")
        args, kwargs = split_example_inputs(example_inputs)
        flat_inputs = captured.interface.flatten(args, kwargs)
        if profile is None:
            profile = profile_captured(captured, flat_inputs, repeats=repeats)
    graph = cost_graph_for(captured, profile)
    model = CostModel(graph, spec, cost)
    plan = plan_from_cuts(model, search_cuts(model, checked(n_devices, graph)))
    if flat_inputs is not None and refine_rounds > 0:
        from asyncfx.partitioner.refine import refine

        plan = refine(captured, model, plan, flat_inputs, rounds=refine_rounds, repeats=repeats)
    logger.info("compiled %d stage(s) of %s (cost=%s, link=%s) in %.1f s; stage costs (%s) %s",
                plan.n_stages, captured.model_class, cost, spec.name, time.perf_counter() - started,
                plan.cost_unit, ", ".join(plan.format_cost(s.estimated_cost) for s in plan.stages))
    return plan


def compile_profile(profile: Profile, n_devices: int, *, link: str | DeviceSpec = "cpu") -> StagePlan:
    """A plan from a saved profile alone (offline; no model, no refinement).

    Example:
        >>> plan = compile_profile(Profile.load("profile.json"), 4, link="nvlink")
    """
    model = CostModel(profile.graph, device_spec(link), "measure")
    plan = plan_from_cuts(model, search_cuts(model, checked(n_devices, profile.graph)))
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


def checked(n_devices: Any, graph: CostGraph) -> int:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise PlanError(f"n_devices must be a positive integer, got {n_devices!r}.")
    if n_devices > graph.max_stages:
        raise PlanError(
            f"n_devices={n_devices} is more than the {graph.max_stages} stages {graph.model_class} "
            f"can be cut into at this input size (it has {graph.max_stages} cuttable latent "
            f"nodes); use at most {graph.max_stages} devices.")
    return n_devices


def as_captured(model_or_captured: nn.Module, example_inputs: Any, latent: LatentOption = None,
                timestep: str | None = None) -> Captured:
    if isinstance(model_or_captured, Captured):
        return model_or_captured
    if example_inputs is None:
        raise CaptureError(
            f"compile() got a {type(model_or_captured).__name__} without example inputs; pass "
            "example_inputs=(args, kwargs) for one denoiser call, or a Captured from "
            "asyncfx.capture().")
    args, kwargs = split_example_inputs(example_inputs)
    return capture(model_or_captured, args, kwargs, latent=latent, timestep=timestep)


def split_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a tuple of args, a dict of kwargs, a pair, or one tensor."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(f"example_inputs must be a tuple, a dict or (args, kwargs), got "
                       f"{type(example_inputs).__name__}.")


def _share_of_stage_done(own: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    """For each latent node, the share of its stage's own compute done once it is made."""
    share = np.ones(len(own))
    for start, end in zip(bounds, bounds[1:]):
        done = np.cumsum(own[start:end])
        if done[-1] > 0:
            share[start:end] = done / done[-1]
    return share


def plan_from_cuts(model: CostModel, cuts: Sequence[Cut]) -> StagePlan:
    """The StagePlan for cutting the model's latent order before each cut position."""
    graph = model.graph
    positions = [c.position for c in cuts]
    bounds = [0, *positions, len(graph.nodes)]
    prediction = model.predict(positions)
    stage_of = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    last = len(bounds) - 2
    stages, all_weights = [], set()
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        own = graph.nodes[start:end]
        needs = {n for node in own for n in node.needs} | (set(graph.output_needs) if k == last else set())
        weights = graph.stage_weights([*needs, *(n.name for n in own)])
        all_weights |= weights
        stages.append(StageInfo(
            index=k, nodes=[n.name for n in own], first_module=own[0].module,
            last_module=own[-1].module, replicated_nodes=len(needs),
            param_bytes=sum(graph.weights[w] for w in weights),
            estimated_cost=prediction.stage_compute[k],
            cut_reason=cuts[k - 1].reason if k else ""))
    boundaries = []
    made_at = _share_of_stage_done(model.own, bounds)
    for i, node in enumerate(graph.nodes):
        consumers = sorted({last if r == len(graph.nodes) else int(stage_of[r]) for r in node.readers}
                           - {int(stage_of[i])})
        if consumers:
            boundaries.append(BoundaryTensor(
                name=node.name, producer=int(stage_of[i]), consumers=consumers,
                shape=list(node.out_shape), dtype=node.out_dtype, bytes=node.out_bytes,
                module=node.module, made_at=float(made_at[i])))
    return StagePlan(fingerprint=graph.fingerprint, model_class=graph.model_class,
                     inputs=list(graph.inputs), stages=stages, boundaries=boundaries,
                     cost=model.cost, cost_unit=model.unit,
                     total_param_bytes=sum(graph.weights[w] for w in all_weights),
                     link=model.device.name, predicted_round=prediction.round,
                     sequential_cost=float(model.own.sum() + sum(model.side.values())))
