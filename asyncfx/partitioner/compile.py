"""compile(): capture if needed, estimate costs, cut the latent nodes into stages."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx, nn

from asyncfx.errors import CaptureError, PlanError
from asyncfx.partitioner.capture import Captured, capture
from asyncfx.partitioner.cuts import Cut, balanced_cuts, cut_positions, latent_order
from asyncfx.partitioner.plan import BoundaryTensor, PlanInput, StageInfo, StagePlan
from asyncfx.passes.estimate_cost import estimate_cost
from asyncfx.passes.meta import BYTES, FLOPS, VALUE
from asyncfx.passes.split import boundary_consumers, stage_members, stage_of_nodes

#: Note (machine balance): the flop counter gives memory-bound ops (norms, activations,
#: adds) zero FLOPs, yet they take time. Pricing a byte moved like this many FLOPs, about
#: the FLOP-to-bandwidth ratio of a CPU core, keeps them from clustering in one stage.
FLOPS_PER_BYTE = 10

COSTS = {"flops": "FLOP-equivalents", "uniform": "nodes"}


def compile(model_or_captured: nn.Module, n_devices: int, *, example_inputs: Any = None,
            cost: str = "flops", latent: str | None = None) -> StagePlan:
    """Cut a model into ``n_devices`` stages of balanced estimated cost.

    ``example_inputs`` (needed unless a :class:`Captured` is given) is a tuple of
    positional arguments, a dict of keyword arguments, or a pair ``(args, kwargs)``.
    ``cost="flops"`` balances an analytical FLOP/byte estimate; ``cost="uniform"``
    balances node counts.

    Example:
        >>> model, args, kwargs = asyncfx.zoo.tiny.sd_unet()
        >>> plan = asyncfx.compile(model, 2, example_inputs=(args, kwargs))
        >>> [len(s.nodes) for s in plan.stages]
        [131, 163]
    """
    captured = as_captured(model_or_captured, example_inputs, latent)
    if cost not in COSTS:
        raise PlanError(f"cost={cost!r} is not known; use one of {sorted(COSTS)}.")
    order = latent_order(captured.graph)
    positions = cut_positions(order)
    check_n_devices(n_devices, len(positions) + 1, captured.model_class)
    costs = node_costs(captured.graph_module, order, cost)
    cuts = balanced_cuts(costs, positions, n_devices)
    return make_plan(captured, order, costs, cuts, cost)


def as_captured(model_or_captured: nn.Module, example_inputs: Any, latent: str | None) -> Captured:
    if isinstance(model_or_captured, Captured):
        return model_or_captured
    if example_inputs is None:
        raise CaptureError(
            f"compile() got a {type(model_or_captured).__name__} without example inputs; pass "
            "example_inputs=(args, kwargs) for one denoiser call, or a Captured from "
            "asyncfx.capture().")
    args, kwargs = split_example_inputs(example_inputs)
    return capture(model_or_captured, args, kwargs, latent=latent)


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


def check_n_devices(n_devices: Any, max_stages: int, model_class: str) -> None:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise PlanError(f"n_devices must be a positive integer, got {n_devices!r}.")
    if n_devices > max_stages:
        raise PlanError(
            f"n_devices={n_devices} is more than the {max_stages} stages {model_class} can be cut "
            f"into at this input size (it has {max_stages} cuttable latent nodes); use at most "
            f"{max_stages} devices.")


def node_costs(gm: fx.GraphModule, order: Sequence[fx.Node], cost: str) -> list[float]:
    if cost == "uniform":
        return [1.0] * len(order)
    if any(FLOPS not in n.meta for n in order):
        estimate_cost(gm)
    return [float(max(n.meta[FLOPS], FLOPS_PER_BYTE * n.meta[BYTES])) for n in order]


def make_plan(captured: Captured, order: Sequence[fx.Node], costs: Sequence[float],
              cuts: Sequence[Cut], cost: str) -> StagePlan:
    """The StagePlan for cutting ``order`` before each cut position."""
    bounds = [0] + [c.position for c in cuts] + [len(order)]
    assignment = [list(order[a:b]) for a, b in zip(bounds, bounds[1:])]
    members = stage_members(captured.graph, assignment)
    tensors_per_stage = [stage_tensors(captured.graph_module, nodes) for nodes in members]
    all_tensors = {id(t): t for ts in tensors_per_stage for t in ts}
    stages = []
    for k, (own, nodes) in enumerate(zip(assignment, members)):
        stages.append(StageInfo(
            index=k, nodes=[n.name for n in own], first_module=module_path(own[0]),
            last_module=module_path(own[-1]), replicated_nodes=len(nodes) - len(own),
            param_bytes=sum(_nbytes(t) for t in tensors_per_stage[k]),
            estimated_cost=sum(costs[bounds[k]:bounds[k + 1]]),
            cut_reason=cuts[k - 1].reason if k else ""))
    stage_of = stage_of_nodes(assignment)
    boundaries = [_boundary(node, stage_of[node], consumers)
                  for node, consumers in boundary_consumers(captured.graph, assignment).items()]
    inputs = [PlanInput(i.placeholder, str(i.role), list(i.shape), i.dtype) for i in captured.inputs]
    return StagePlan(fingerprint=captured.fingerprint, model_class=captured.model_class,
                     inputs=inputs, stages=stages, boundaries=boundaries, cost=cost,
                     cost_unit=COSTS[cost],
                     total_param_bytes=sum(_nbytes(t) for t in all_tensors.values()))


def stage_tensors(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> list[torch.Tensor]:
    """The distinct parameters, buffers and constants the given nodes hold."""
    found: dict[int, torch.Tensor] = {}
    for node in nodes:
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            tensors = [value] if isinstance(value, torch.Tensor) else []
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            tensors = [*module.parameters(), *module.buffers()]
        else:
            continue
        found.update((id(t), t) for t in tensors)
    return list(found.values())


def _attr(root: nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _boundary(node: fx.Node, producer: int, consumers: list[int]) -> BoundaryTensor:
    value = node.meta[VALUE]
    return BoundaryTensor(name=node.name, producer=producer, consumers=consumers,
                          shape=list(value.shape), dtype=str(value.dtype),
                          bytes=value.numel() * value.element_size(), module=module_path(node))


def module_path(node: fx.Node) -> str:
    """The path of the module a node came from (``down_blocks.2.resnets.0``), "" for top level."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return str(node.target) if node.op == "call_module" else ""
