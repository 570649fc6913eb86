"""Copy-graph helper of the transform passes: each returns a new GraphModule, leaving
the one it was given as it was."""
from __future__ import annotations

import copy

from torch import fx


def copy_graph_module(gm: fx.GraphModule, class_name: str | None = None) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph (node meta copied, weights shared),
    for a transform pass to change and return.

    Example:
        >>> new = copy_graph_module(gm)
        >>> new.graph is not gm.graph and new.weight is gm.weight
        True
    """
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    output, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(output, type_expr=getattr(old_output, "type", None)).meta = copy.copy(old_output.meta)
    graph._codegen = copy.copy(gm.graph._codegen)  # how inputs and outputs are (un)flattened
    return fx.GraphModule(gm, graph, class_name=class_name or type(gm).__name__)


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Check the changed graph and regenerate its code; returns ``gm``."""
    gm.graph.lint()
    gm.recompile()
    return gm
