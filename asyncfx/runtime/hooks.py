"""Send hooks: a stage graph that reports each boundary tensor the moment it is made.

Both executors that move boundary tensors between devices use them to start each
transfer while the stage computes the rest: the distributed executor posts a
non-blocking send, the local executor a copy on its copy stream (or, inside a CUDA
graph, an event the copy waits for).
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import fx, nn


class _SendHook(nn.Module):
    """A node of the stage graph that hands a freshly made boundary tensor to a callback."""

    def __init__(self, callback: Callable[[str, torch.Tensor], None]):
        super().__init__()
        self.callback = callback

    def forward(self, name: str, tensor: torch.Tensor) -> None:
        self.callback(name, tensor)


def with_send_hooks(module: fx.GraphModule, outputs: Sequence[str],
                    callback: Callable[[str, torch.Tensor], None]) -> fx.GraphModule:
    """A copy of the stage module (sharing its weights) that calls ``callback(name, value)``
    right after each node named in ``outputs`` has computed its value.

    Example:
        >>> hooked = with_send_hooks(stage, ["add_3"], lambda name, value: print(name, value.shape))
        >>> outputs = hooked(*args)        # prints add_3 as soon as it is computed
    """
    if not outputs:
        return module
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(module.graph._codegen)
    graph.output(graph.graph_copy(module.graph, {}))
    hooked = fx.GraphModule(module, graph)
    hooked.add_submodule("asyncfx_send_hook", _SendHook(callback))
    wanted = set(outputs)
    for node in list(hooked.graph.nodes):
        if node.name in wanted:
            with hooked.graph.inserting_after(node):
                hooked.graph.call_module("asyncfx_send_hook", (node.name, node))
    hooked.recompile()
    return hooked
