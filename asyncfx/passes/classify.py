"""Classify pass: mark every node latent, step or static (a partial evaluation by class)."""
from __future__ import annotations

from collections import Counter
from typing import Mapping

from torch import fx

from asyncfx.passes.meta import VALUE_CLASS, ValueClass, draws_random_numbers


def classify(graph: fx.Graph, placeholder_classes: Mapping[str, ValueClass]) -> Counter:
    """Write each node's :class:`ValueClass` to ``node.meta[VALUE_CLASS]``.

    ``placeholder_classes`` maps placeholder names to their class (the latent input is
    LATENT, the timestep STEP, conditioning STATIC). Every other node takes the largest
    class among its inputs; nodes without inputs (weights, constants) are STATIC.
    Returns the number of nodes of each class.

    Note (random ops): an op tagged ``nondeterministic_seeded`` draws new numbers on
    every call, so it is LATENT whatever its inputs: caching it as STATIC or STEP
    would replay one draw.

    Example:
        >>> counts = classify(gm.graph, {"x": ValueClass.LATENT, "t": ValueClass.STEP})
        >>> gm.graph.output_node().meta[VALUE_CLASS]
        <ValueClass.LATENT: 2>
    """
    counts: Counter = Counter()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name not in placeholder_classes:
                raise ValueError(f"classify: placeholder {node.name!r} has no class; give every "
                                 f"graph input a class (got {sorted(placeholder_classes)}).")
            value_class = placeholder_classes[node.name]
        elif node.op == "call_function" and draws_random_numbers(node.target):
            value_class = ValueClass.LATENT
        else:
            value_class = max((n.meta[VALUE_CLASS] for n in node.all_input_nodes),
                              default=ValueClass.STATIC)
        node.meta[VALUE_CLASS] = value_class
        counts[value_class] += 1
    return counts
