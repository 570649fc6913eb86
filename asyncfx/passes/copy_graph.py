"""Copy-graph helpers of the transform passes: each pass changes a copy of the graph it
is given and returns a new GraphModule over it, leaving the one it was given as it was."""
from __future__ import annotations

import copy

from torch import fx


def copy_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm``'s graph (node meta copied, values shared) for a pass to change.

    Example:
        >>> graph = copy_graph(gm)
        >>> graph is not gm.graph and len(graph.nodes) == len(gm.graph.nodes)
        True
    """
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    output, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(output, type_expr=getattr(old_output, "type", None)).meta = copy.copy(old_output.meta)
    graph._codegen = copy.copy(gm.graph._codegen)  # how inputs and outputs are (un)flattened
    return graph


def finish(root: fx.GraphModule, graph: fx.Graph, class_name: str | None = None) -> fx.GraphModule:
    """The changed graph checked, as a new GraphModule whose weights are ``root``'s (its
    code generated once)."""
    graph.lint()
    return fx.GraphModule(root, graph, class_name=class_name or type(root).__name__)
