"""Remove-checks pass: drop what torch.export leaves in a graph to check its inputs.

Export keeps a guard module call (``_guards_fn``) and assertion ops (ops that return
nothing: ``_assert_scalar``, ``sym_constrain_range``...). A captured graph checks its
inputs itself (``Captured``), and a check kept in the graph would pin a cut: it reads
values of several stages and is nobody's input.
"""
from __future__ import annotations

from torch import fx

from asyncfx.passes.copy_graph import copy_graph, finish


def remove_checks(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` without export's guard call and assertion nodes.

    Example:
        >>> checked = remove_checks(torch.export.export(model, args).module())
    """
    graph = copy_graph(gm)
    drop_checks(graph)
    return finish(gm, graph)


def drop_checks(graph: fx.Graph) -> None:
    """``remove_checks`` on ``graph`` itself, for passes composed on one copy."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op == "output":
            continue
        schema = getattr(node.target, "_schema", None)
        is_guard = node.op == "call_module" and str(node.target) == "_guards_fn"
        if is_guard or (schema is not None and not schema.returns):
            graph.erase_node(node)
