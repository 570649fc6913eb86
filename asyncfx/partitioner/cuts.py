"""Where a graph may be cut, and the simple balanced cut over the latent nodes' order."""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from typing import Sequence

import torch
from torch import fx

from asyncfx.errors import PlanError
from asyncfx.passes.meta import VALUE, VALUE_CLASS, ValueClass

COMPUTE_OPS = ("call_function", "call_method", "call_module")


def latent_order(graph: fx.Graph) -> list[fx.Node]:
    """The latent compute nodes in topological order: what stages are cut from."""
    return [n for n in graph.nodes if n.op in COMPUTE_OPS and n.meta[VALUE_CLASS] is ValueClass.LATENT]


def cut_positions(order: Sequence[fx.Node]) -> list[int]:
    """Positions ``p`` (cut before ``order[p]``) where every value crossing the cut is a
    tensor. A multi-output op (``split``, ``chunk``) and the ``getitem`` nodes that unpack it
    are never separated: a list of tensors is not a boundary tensor."""
    index = {node: i for i, node in enumerate(order)}
    blocked = [False] * (len(order) + 1)
    for i, node in enumerate(order):
        if isinstance(node.meta.get(VALUE), torch.Tensor):
            continue
        last_use = max((index[u] for u in node.users if u in index), default=i)
        for p in range(i + 1, last_use + 1):
            blocked[p] = True
    return [p for p in range(1, len(order)) if not blocked[p]]


@dataclasses.dataclass(frozen=True)
class Cut:
    """A cut before ``position`` in the latent order, and why it sits there."""

    position: int
    reason: str


def balanced_cuts(costs: Sequence[float], positions: Sequence[int], n_stages: int) -> list[Cut]:
    """Choose ``n_stages - 1`` cut positions that split ``costs`` into nearly equal parts.

    Cut k goes to the allowed position whose cumulative cost is nearest to k/N of the
    total, keeping room for the cuts after it. Deterministic; ties go to the earlier
    position.
    """
    if n_stages - 1 > len(positions):
        raise PlanError(f"cannot cut {len(costs)} nodes into {n_stages} stages: only "
                        f"{len(positions) + 1} stages are possible.")
    prefix = list(itertools.accumulate(costs, initial=0.0))
    total = prefix[-1] or 1.0
    cuts: list[Cut] = []
    lo = 0
    for k in range(1, n_stages):
        hi = len(positions) - (n_stages - 1 - k)  # leave a position for each later cut
        target = total * k / n_stages
        j = bisect.bisect_left([prefix[p] for p in positions[lo:hi]], target) + lo
        candidates = [i for i in (j - 1, j) if lo <= i < hi]
        best = min(candidates, key=lambda i: (abs(prefix[positions[i]] - target), i))
        p = positions[best]
        cuts.append(Cut(p, f"cumulative cost {prefix[p] / total:.1%} nearest to the "
                           f"{k}/{n_stages} target {k / n_stages:.1%}"))
        lo = best + 1
    return cuts
