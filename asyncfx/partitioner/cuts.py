"""Where a graph may be cut: the latent nodes in topological order and the allowed positions."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from asyncfx.passes.block_calls import block_spans
from asyncfx.passes.meta import COMPUTE_OPS, VALUE, VALUE_CLASS, ValueClass, has_data_dependent_size


def latent_order(graph: fx.Graph) -> list[fx.Node]:
    """The latent compute nodes in topological order: what stages are cut from."""
    return [n for n in graph.nodes if n.op in COMPUTE_OPS and n.meta[VALUE_CLASS] is ValueClass.LATENT]


def cut_positions(order: Sequence[fx.Node]) -> list[int]:
    """Positions ``p`` (cut before ``order[p]``) where every value crossing the cut is a
    tensor of a fixed shape. A multi-output op (``split``, ``chunk``) and the ``getitem``
    nodes that unpack it are never separated: a list of tensors is not a boundary tensor;
    nor is a tensor whose size depends on tensor values (a boolean-mask selection), since
    boundary buffers are allocated before the values are known. A block whose call the
    capture recorded for a step cache (``passes.block_calls``) is never split either: the
    cache stands its results in for its arguments, stage by stage."""
    index = {node: i for i, node in enumerate(order)}
    blocked = [False] * (len(order) + 1)
    for first, last in block_spans(order):
        for p in range(first + 1, last + 1):
            blocked[p] = True
    for i, node in enumerate(order):
        value = node.meta.get(VALUE)
        if isinstance(value, torch.Tensor) and not has_data_dependent_size(value):
            continue
        last_use = max((index[u] for u in node.users if u in index), default=i)
        for p in range(i + 1, last_use + 1):
            blocked[p] = True
    return [p for p in range(1, len(order)) if not blocked[p]]
