"""Copy-graph helpers of the transform passes: each pass changes a copy of the graph it
is given and returns a new GraphModule over it, leaving the one it was given as it was.

The GraphModules they make generate their Python code when first run or read
(``_LazyGraphModule``, as torch's own compilers make theirs): a capture goes through
several graphs that are never run, and generating each one's code took about a tenth of
a small model's capture.
"""
from __future__ import annotations

import copy

from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule


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
    code generated when it is first run or read)."""
    graph.lint()
    return lazy_graph_module(root, graph, class_name or type(root).__name__)


def lazy_graph_module(root: fx.GraphModule | nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A GraphModule of ``graph`` over ``root``'s attributes whose code is generated when it
    is first run or read (and again only then after a ``recompile()``).

    Example:
        >>> module = lazy_graph_module(gm, copy_graph(gm), "Copy")
        >>> torch.equal(module(x), gm(x))
        True
    """
    return _LazyGraphModule(root, graph, class_name=class_name)
