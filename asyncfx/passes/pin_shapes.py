"""Pin-shapes pass: outputs whose size torch.export could not prove fixed get the size a
real call gave them, checked at every call.

A denoiser's output may pass through a size that depends on tensor values although the
output itself does not change size: a model may keep only the valid prompt tokens
(``x[:, :mask.sum()]``), runs its blocks over latent and prompt tokens together, then
returns the last ``n`` latent tokens, a size export writes as
``Max(0, u0 - Max(0, u0 - n))``. The runtime keeps outputs in buffers of a known shape, so
each such output is routed through :func:`expect_shape`: its ``node.meta`` value takes
the shape the example call gave, and a call that returns another shape raises
:class:`~asyncfx.errors.OutputShapeError` instead of computing on.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import torch
from torch import fx

from asyncfx.errors import OutputShapeError
from asyncfx.passes.copy_graph import copy_graph, finish
from asyncfx.passes.meta import VALUE, has_data_dependent_size


def expect_shape(tensor: torch.Tensor, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """``tensor``, if it has ``shape``; the graph calls this on each pinned output.

    Example:
        >>> expect_shape(torch.zeros(2, 3), (2, 3), "output 0").shape
        torch.Size([2, 3])
    """
    if tuple(tensor.shape) != shape:
        raise OutputShapeError(
            f"{where} has shape {tuple(tensor.shape)} at this call but {shape} at the call it was "
            "captured from: its size depends on tensor values (a mask's count), and asyncfx needs each "
            "output's shape fixed to keep it between steps. Keep the output's shape fixed in the model "
            "(a mask applied with torch.where instead of boolean indexing), or capture again for calls "
            "like this one.")
    return tensor


def pin_output_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], model_class: str) -> fx.GraphModule:
    """``gm`` with each output whose size depends on tensor values routed through
    :func:`expect_shape` with the shape a run on ``inputs`` gives it (the run is made only
    for such graphs; ``gm`` itself is returned when no output needs pinning).

    Example:
        >>> gm = pin_output_shapes(captured.graph_module, example_inputs, "Model")
    """
    if not has_outputs_to_pin(gm.graph):
        return gm
    with torch.no_grad():
        observed = gm(*inputs)
    graph = copy_graph(gm)
    output = graph.output_node()
    flat = list(output.args[0])
    for index, (node, value) in enumerate(zip(flat, observed)):
        if not (isinstance(node, fx.Node) and has_data_dependent_size(node.meta.get(VALUE))):
            continue
        shape = tuple(value.shape)
        with graph.inserting_before(output):
            pinned = graph.call_function(
                expect_shape, (node, shape, f"output {index} of {model_class}.forward ({node.target}"
                                            f"{traced_at(node)})"))
        pinned.meta.update(node.meta)
        pinned.meta[VALUE] = torch.empty_strided(shape, value.stride(), dtype=value.dtype, device="meta")
        flat[index] = pinned
    output.args = (tuple(flat),)
    return finish(gm, graph)


def has_outputs_to_pin(graph: fx.Graph) -> bool:
    """Whether an output of ``graph`` (flat, as export's or a capture's) has a size
    computed from tensor values, which ``pin_output_shapes`` pins.

    Example:
        >>> has_outputs_to_pin(captured.graph)
        False
    """
    return any(isinstance(n, fx.Node) and has_data_dependent_size(n.meta.get(VALUE))
               for n in graph.output_node().args[0])


def traced_at(node: fx.Node) -> str:
    """`` at file:line in function: `source``` of the innermost frame export recorded.

    Example:
        >>> traced_at(node)
        ' at transformer_mochi.py:412 in forward: `valid = torch.nonzero(mask)`'
    """
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    path, line, function, source = frames[-1]
    return f" at {os.path.basename(path)}:{line} in {function}: `{source.strip()}`"
