"""Flatten-io pass: a graph that takes the model's tensor arguments as flat positional
inputs and returns a flat tuple.

torch.export's graph keeps a placeholder for every leaf of the model's arguments, numbers
and strings included, which it bakes in as constants, and ``ExportedProgram.module()``
(which the capture takes only where torch rewrote in-place writes) takes and returns the
model's own argument and output structure, through its codegen. asyncfx binds calls itself
(``Captured``), so the graph keeps one placeholder per tensor argument. It changes the
graph it is given (see ``remove_checks``).
"""
from __future__ import annotations

from typing import Sequence

from torch import fx

from asyncfx.errors import CaptureError


def flatten_io(graph: fx.Graph, is_tensor: Sequence[bool], model_class: str) -> None:
    """Make ``graph``'s inputs flat tensors (``is_tensor`` marks the tensor leaves among its
    placeholders; the others must be unused) and its output a flat tuple.

    Example:
        >>> graph = copy_graph(exported.module())
        >>> flatten_io(graph, [True, True, False], "UNet2DConditionModel")
    """
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
