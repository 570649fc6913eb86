"""Name-placeholders pass: each graph input is named after the argument it stands for
(``added_cond_kwargs.time_ids`` -> ``added_cond_kwargs_time_ids``), so that stage graphs
and plans read in the model's terms. It changes the graph it is given (see
``remove_checks``)."""
from __future__ import annotations

import re
from typing import Sequence

from torch import fx

from asyncfx.errors import CaptureError


def name_placeholders(graph: fx.Graph, names: Sequence[str]) -> None:
    """Name ``graph``'s placeholders after ``names``, in order (fx adds a suffix to
    reserved names such as ``input``: read the names given from the graph).

    Example:
        >>> name_placeholders(graph, ["sample", "added_cond_kwargs.time_ids"])
        >>> [n.name for n in graph.find_nodes(op="placeholder")]
        ['sample', 'added_cond_kwargs_time_ids']
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise CaptureError(f"captured graph has {len(placeholders)} inputs for {len(names)} "
                           "tensor arguments; please report this model.")
    by_name = {n.name: n for n in graph.nodes}
    for node, name in zip(placeholders, names):
        wanted = re.sub(r"\W", "_", name)
        holder = by_name.get(wanted)
        if holder is not None and holder is not node:  # free the name first
            holder._rename(f"{wanted}_node")
        node._rename(wanted)
        node.target = node.name
