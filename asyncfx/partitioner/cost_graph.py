"""CostGraph: what cut search and plan making need to know about a captured graph.

It is plain data (JSON in profiles), so plans can be compiled offline from a profile
without the model: the latent nodes in topological order with their costs and output
sizes, who reads each of them, which step/static nodes and weights each one needs,
and where cuts are allowed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import fx, nn

from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.cuts import COMPUTE_OPS, cut_positions, latent_order
from asyncfx.plan import PlanInput
from asyncfx.passes.estimate_cost import estimate_cost, tensor_bytes
from asyncfx.passes.meta import (BYTES, FLOPS, MEASURED_SECONDS, VALUE, VALUE_CLASS, ValueClass, module_path,
                                 size_bound)
from asyncfx.passes.split import non_latent_ancestors


@dataclasses.dataclass
class CostNode:
    """A latent node: its cost, its output, and what it reads besides other latent nodes."""

    name: str
    module: str                      # module path, "" at top level
    flops: int
    bytes: int                       # bytes read and written
    out_bytes: int                   # 0 when the output is not a tensor
    out_shape: list[int] | None      # a size that depends on tensor values at its bound
    out_dtype: str | None
    readers: list[int]               # positions of latent readers; len(nodes) = graph output
    needs: list[str]                 # step/static nodes (weights included) it needs, by name
    measured_seconds: float | None = None


@dataclasses.dataclass
class CostGraph:
    """The latent nodes of a captured graph, in order, with everything cuts depend on."""

    fingerprint: str
    model_class: str
    inputs: list[PlanInput]
    nodes: list[CostNode]
    cut_positions: list[int]         # cut before nodes[p] is allowed
    weights: dict[str, int]          # weight (parameter, buffer, constant) -> bytes
    holds: dict[str, list[str]]      # node -> the weights it holds (get_attr, call_module)
    output_needs: list[str]          # step/static nodes the graph output itself needs
    side_nodes: list[CostNode]       # step/static compute nodes (recomputed by each stage)

    @property
    def max_stages(self) -> int:
        return len(self.cut_positions) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_weights(self, names: Sequence[str]) -> set[str]:
        return {w for name in names for w in self.holds.get(name, ())}


def build_cost_graph(captured: Captured) -> CostGraph:
    """The CostGraph of a captured graph, with FLOP/byte estimates (computed if missing)
    and measured seconds where the profile pass has recorded them."""
    gm = captured.graph_module
    order = latent_order(captured.graph)
    if any(FLOPS not in n.meta for n in order):
        estimate_cost(gm)
    position = {node: i for i, node in enumerate(order)}
    weights, holds = _weights(gm)
    index = {node: i for i, node in enumerate(captured.graph.nodes)}
    nodes = [_cost_node(node, position, index) for node in order]
    side = [_cost_node(node, position, index) for node in captured.graph.nodes
            if node.op in COMPUTE_OPS and node.meta[VALUE_CLASS] is not ValueClass.LATENT]
    output = captured.graph.output_node()
    inputs = [PlanInput(i.placeholder, str(i.role), list(i.shape), i.dtype) for i in captured.inputs]
    return CostGraph(fingerprint=captured.fingerprint, model_class=captured.model_class,
                     inputs=inputs, nodes=nodes, cut_positions=cut_positions(order),
                     weights=weights, holds=holds, output_needs=_needs(output, index), side_nodes=side)


def _cost_node(node: fx.Node, position: dict[fx.Node, int], index: dict[fx.Node, int]) -> CostNode:
    n_nodes = len(position)
    value = node.meta.get(VALUE)
    is_tensor = isinstance(value, torch.Tensor)
    latent = node.meta[VALUE_CLASS] is ValueClass.LATENT
    readers = sorted({n_nodes if user.op == "output" else position[user]
                      for user in node.users if user.op == "output" or user in position})
    return CostNode(
        name=node.name, module=module_path(node), flops=int(node.meta[FLOPS]),
        bytes=int(node.meta[BYTES]),
        out_bytes=tensor_bytes(value) if is_tensor else 0,
        out_shape=[size_bound(size) for size in value.shape] if is_tensor else None,
        out_dtype=str(value.dtype) if is_tensor else None,
        readers=readers, needs=_needs(node, index) if latent else [],
        measured_seconds=node.meta.get(MEASURED_SECONDS))


def _needs(node: fx.Node, index: dict[fx.Node, int]) -> list[str]:
    """Names of the step/static nodes ``node`` depends on, in graph order."""
    return [n.name for n in sorted(non_latent_ancestors([node]), key=index.__getitem__)]


def _weights(gm: fx.GraphModule) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Bytes of every distinct tensor the graph holds, and which nodes hold which.
    Tied tensors (one tensor under two names) count once, under their first name."""
    names: dict[int, str] = {}
    weights: dict[str, int] = {}
    holds: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            found = [(node.target, value)] if isinstance(value, torch.Tensor) else []
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            found = [(f"{node.target}.{n}", t) for n, t in
                     [*module.named_parameters(), *module.named_buffers()]]
        else:
            continue
        for name, tensor in found:
            canonical = names.setdefault(id(tensor), name)
            weights[canonical] = tensor.numel() * tensor.element_size()
            holds.setdefault(node.name, []).append(canonical)
    return weights, holds


def _attr(root: nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value
