"""Remove-checks pass: drop what torch.export leaves in a graph to check its inputs.

Export keeps a guard module call (``_guards_fn``) and assertion ops (ops that return
nothing: ``_assert_scalar``, ``sym_constrain_range``...). A captured graph checks its
inputs itself (``Captured``), and a check kept in the graph would pin a cut: it reads
values of several stages and is nobody's input.

Like the other passes that normalise a traced graph (``flatten_io``, ``name_placeholders``),
it changes the graph it is given: the capture runs them on one copy of the traced graph
and generates its code once.
"""
from __future__ import annotations

from torch import fx


def remove_checks(graph: fx.Graph) -> None:
    """Erase export's guard call and assertion nodes from ``graph``.

    Example:
        >>> graph = copy_graph(torch.export.export(model, args).module())
        >>> remove_checks(graph)
    """
    for node in reversed(list(graph.nodes)):
        if node.users or node.op == "output":
            continue
        schema = getattr(node.target, "_schema", None)
        is_guard = node.op == "call_module" and str(node.target) == "_guards_fn"
        if is_guard or (schema is not None and not schema.returns):
            graph.erase_node(node)
