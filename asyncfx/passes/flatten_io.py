"""Flatten-io pass: a graph that takes the model's tensor arguments as flat positional
inputs and returns a flat tuple.

torch.export's module takes and returns the model's own argument and output structure
(pytrees, through its codegen) and keeps a placeholder for every leaf, numbers and
strings included, which it bakes in as constants. asyncfx binds calls itself
(``Captured``), so the graph keeps one placeholder per tensor argument.
"""
from __future__ import annotations

from typing import Sequence

from torch import fx

from asyncfx.errors import CaptureError
from asyncfx.passes.copy_graph import copy_graph, finish


def flatten_io(gm: fx.GraphModule, is_tensor: Sequence[bool], model_class: str) -> fx.GraphModule:
    """``gm`` with flat tensor inputs (``is_tensor`` marks the tensor leaves among its
    placeholders; the others must be unused) and a flat tuple output.

    Example:
        >>> flat = flatten_io(exported.module(), [True, True, False], "UNet2DConditionModel")
    """
    graph = copy_graph(gm)
    flatten_graph_io(graph, is_tensor, model_class)
    return finish(gm, graph, class_name=f"Captured{model_class}")


def flatten_graph_io(graph: fx.Graph, is_tensor: Sequence[bool], model_class: str) -> None:
    """``flatten_io`` on ``graph`` itself, for passes composed on one copy."""
    graph.set_codegen(fx.graph.CodeGen())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, tensor in zip(placeholders, is_tensor):
        if not tensor:
            if node.users:
                raise CaptureError(f"non-tensor input {node.name} of {model_class} is still used "
                                   "in the exported graph; pass it as a tensor instead.")
            graph.erase_node(node)
    output = graph.output_node()
    output.args = (tuple(output.args[0]),)
