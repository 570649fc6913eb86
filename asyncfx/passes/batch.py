"""Batch separability: whether every output sample depends only on the same sample of
the batched inputs, proven by carrying the batch axis through the graph.

The latent's first dimension is the batch, and so is the first dimension of every other
input of that size (the conditioning and timestep of a classifier-free-guidance batch).
Each op moves the axis by its rule (``batch_rules.py``); an op that may mix samples, one
without a rule, or an output without the batch as its first dimension makes the graph
not separable, and the proof names that node and its module. A separable graph computes
each sample from that sample alone, on any split of its batch (to the last bits kernels
sum otherwise at another batch size).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping

import torch
from torch import fx

from asyncfx.passes.batch_axes import NOTHING, Mixes, Operands, Sample, Shared
from asyncfx.passes.batch_rules import rule_for
from asyncfx.passes.meta import COMPUTE_OPS, VALUE, draws_random_numbers, has_data_dependent_size, module_path


@dataclasses.dataclass(frozen=True)
class Separability:
    """What the proof found: the batch size, the inputs split along their first
    dimension, and, where it failed, why (``failure``, naming the node and its module).

    Example:
        >>> found = batch_separability(captured.graph, ["sample"])
        >>> found.separable, found.inputs
        (True, ('sample', 'encoder_hidden_states'))
    """

    batch: int
    inputs: tuple[str, ...]
    failure: str | None = None

    @property
    def separable(self) -> bool:
        return self.failure is None

    def splits_into(self, groups: int) -> bool:
        """Whether the batch splits into ``groups`` equal groups."""
        return self.separable and groups >= 1 and self.batch % groups == 0


def batch_separability(graph: fx.Graph, latents: list[str]) -> Separability:
    """Prove (or refute) that ``graph`` computes each sample of its batch separately.

    ``latents`` are the placeholders of the latent inputs; their first dimension is the
    batch. Returns a :class:`Separability`; a batch of 1 is trivially separable.

    Example:
        >>> batch_separability(gm.graph, ["x"]).failure
        "node 'mean' (aten.mean.dim, module 'norm') reduces over the batch dimension"
    """
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    shapes = [tuple(placeholders[name].meta[VALUE].shape) for name in latents]
    batch = shapes[0][0] if shapes[0] else 1
    if any(not shape or shape[0] != batch for shape in shapes):
        return Separability(batch, (), "the latents differ in their first dimension, so no batch runs "
                                       "through all of them")
    batched = tuple(name for name, node in placeholders.items() if _leads_with(node.meta.get(VALUE), batch))
    if batch < 2:
        return Separability(batch, batched)
    try:
        _propagate(graph, set(batched))
    except _Refuted as refuted:
        return Separability(batch, batched, str(refuted))
    return Separability(batch, batched)


class _Refuted(Exception):
    pass


def _leads_with(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _propagate(graph: fx.Graph, batched: set[str]) -> None:
    axes: dict[fx.Node, Any] = {}
    values = {node: node.meta.get(VALUE) for node in graph.nodes}
    for node in graph.nodes:
        if node.op == "placeholder":
            axes[node] = Sample(0) if node.name in batched else NOTHING
        elif node.op == "get_attr":
            axes[node] = NOTHING
        elif node.op in COMPUTE_OPS:
            axes[node] = _axis_of(node, axes, values)
        elif node.op == "output":
            _check_outputs(node, axes, values)


def _axis_of(node: fx.Node, axes: dict[fx.Node, Any], values: Mapping[fx.Node, Any]) -> Any:
    inputs = [axes.get(n, NOTHING) for n in node.all_input_nodes]
    if node.target is operator.getitem:
        held = axes.get(node.args[0], NOTHING)
        return held[node.args[1]] if isinstance(held, tuple) else held
    if all(not isinstance(a, Sample) and not isinstance(a, tuple) for a in inputs):
        if not draws_random_numbers(node.target):
            return _shared_result(node, axes, values)
    if has_data_dependent_size(values.get(node)):
        raise _Refuted(_at(node, "has a size computed from the values of batched tensors"))
    try:
        rule = rule_for(node.target)
        if rule is None:
            raise Mixes(f"the op {_op_name(node)} has no batch rule, so it may mix samples")
        return rule(Operands(node, axes, values))
    except Mixes as mixes:
        raise _Refuted(_at(node, str(mixes))) from None
    except (TypeError, IndexError, KeyError, AttributeError, ValueError) as error:
        raise _Refuted(_at(node, f"the batch rule of {_op_name(node)} cannot read it ({error})")) from None


def _shared_result(node: fx.Node, axes: dict[fx.Node, Any], values: Mapping[fx.Node, Any]) -> Any:
    """A node computed from shared values only: shared, uniform where its rule says so."""
    try:
        rule = rule_for(node.target)
        if rule is not None:
            return rule(Operands(node, axes, values))
    except (Mixes, TypeError, IndexError, KeyError, AttributeError, ValueError):
        pass
    value = values.get(node)
    return (NOTHING,) * len(value) if isinstance(value, (list, tuple)) else NOTHING


def _check_outputs(node: fx.Node, axes: dict[fx.Node, Any], values: Mapping[fx.Node, Any]) -> None:
    for index, output in enumerate(node.args[0]):
        if not isinstance(output, fx.Node) or not isinstance(values.get(output), torch.Tensor):
            continue
        axis = axes.get(output, NOTHING)
        if axis == Sample(0) or isinstance(axis, Shared) and axis.period(0) == 1:
            continue
        where = (f"along dimension {axis.dim} in blocks of {axis.inner}" if isinstance(axis, Sample)
                 else "nowhere: it is the same for every sample but not one copy per sample")
        raise _Refuted(_at(output, f"is output {index}, whose batch lies {where}, not one sample per "
                                   "entry of the first dimension"))


def _op_name(node: fx.Node) -> str:
    return str(node.target) if isinstance(node.target, torch._ops.OpOverload) else getattr(
        node.target, "__name__", repr(node.target))


def _at(node: fx.Node, reason: str) -> str:
    module = module_path(node)
    return f"node {node.name!r} ({_op_name(node)}, module {module or '(top)'!r}) {reason}"
