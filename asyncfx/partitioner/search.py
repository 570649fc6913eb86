"""Cut search: the cuts that minimise the predicted round time, and naive baselines.

The search is a dynamic programme over candidate cut positions. The cost of a stage
spanning nodes [s, e) is the larger of its compute and the time its copy stream
finishes sending the boundary tensors it makes (each sent once, as soon as it is made);
the round time of a plan is its most expensive stage, and the programme finds the
plan whose most expensive stage is cheapest. For each end position e, the send-finish
times of every start s come from one vectorised sweep, so a graph of n nodes with m
candidates costs O(m n) for the stage table and O(N m^2) for the programme.

Note (thinning): graphs with more allowed positions than MAX_CANDIDATES keep, in each
of MAX_CANDIDATES equal slices of cumulative cost, the position with the fewest bytes
crossing it, which bounds the table and prefers cheap cuts.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from typing import Sequence

import numpy as np

from asyncfx.errors import PlanError
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.plan import format_bytes

MAX_CANDIDATES = 768


@dataclasses.dataclass(frozen=True)
class Cut:
    """A cut before ``position`` in the latent order, and why it sits there."""

    position: int
    reason: str


def crossing_bytes(model: CostModel) -> np.ndarray:
    """Bytes of the values live across a cut before each position 0..n."""
    n = len(model.graph.nodes)
    delta = np.zeros(n + 2)
    for i, node in enumerate(model.graph.nodes):
        if model.last_reader[i] > i:
            delta[i + 1] += node.out_bytes
            delta[min(model.last_reader[i], n) + 1] -= node.out_bytes
    return np.cumsum(delta)[: n + 1]


def candidate_positions(model: CostModel, limit: int = MAX_CANDIDATES) -> list[int]:
    """Allowed cut positions, thinned to at most ``limit`` (see the module note)."""
    positions = model.graph.cut_positions
    if len(positions) <= limit:
        return list(positions)
    prefix = np.concatenate([[0.0], np.cumsum(model.attributed())])
    crossing = crossing_bytes(model)
    buckets: dict[int, int] = {}
    total = prefix[-1] or 1.0
    for p in positions:
        bucket = min(int(prefix[p] / total * limit), limit - 1)
        if bucket not in buckets or crossing[p] < crossing[buckets[bucket]]:
            buckets[bucket] = p
    return sorted(buckets.values())


def stage_costs(model: CostModel, candidates: Sequence[int]) -> np.ndarray:
    """``table[a, b]``: cost of a stage from point a to point b of [0, *candidates, n].

    A stage computes its own latent nodes plus every step/static node any of them needs,
    once (``CostModel.stage_compute``). For a fixed end, a step/static node is in the
    stage iff its last reader before the end is at or after the start; keeping each one's
    cost at that reader's position makes the replicated cost of every start a suffix sum.
    """
    n = len(model.graph.nodes)
    points = [0, *candidates, n]
    prefix = np.concatenate([[0.0], np.cumsum(model.own)])
    table = np.full((len(points), len(points)), np.inf)
    starts = np.array(points[:-1])
    replicated = np.zeros(n)          # replicated[p]: cost of step/static nodes last read at p
    last_read: dict[str, int] = {}
    reached = 0

    def read(name: str, position: int) -> None:
        cost = model.side.get(name, 0.0)
        if name in last_read:
            replicated[last_read[name]] -= cost
        replicated[position] += cost
        last_read[name] = position

    for b, end in enumerate(points[1:], start=1):
        for position in range(reached, end):
            for name in model.graph.nodes[position].needs:
                read(name, position)
        reached = end
        if end == n:  # the graph output's own needs belong to the last stage
            for name in model.graph.output_needs:
                read(name, n - 1)
        sends = model.last_reader[:end] >= end          # made before `end`, read at or after it
        send_time = np.where(sends, model.transfer[:end], 0.0)
        queued = np.cumsum(send_time[::-1])[::-1]        # sends from node i to the stage end
        finish = np.where(sends, prefix[1:end + 1] + queued, -np.inf)
        latest = np.maximum.accumulate(finish[::-1])[::-1]   # max over nodes >= s
        valid = starts[:b]
        side_from = np.cumsum(replicated[:end][::-1])[::-1]   # step/static cost from s to end
        compute = prefix[end] - prefix[valid] + side_from[valid]
        table[:b, b] = np.maximum(compute, latest[valid] - prefix[valid])
    return table


def search_cuts(model: CostModel, n_stages: int) -> list[Cut]:
    """The cuts that minimise the predicted round time over the candidate positions.

    Deterministic: among equally good plans, each stage starts as early as possible.

    Example:
        >>> cuts = search_cuts(CostModel(graph, PRESETS["nvlink"], "measure"), 4)
        >>> [c.position for c in cuts]
        [212, 498, 760]
    """
    check_stage_count(n_stages, model.graph.max_stages)
    candidates = candidate_positions(model, max(MAX_CANDIDATES, n_stages - 1))
    table = stage_costs(model, candidates)
    m = len(candidates) + 2
    best = np.full((n_stages + 1, m), np.inf)
    choice = np.zeros((n_stages + 1, m), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, n_stages + 1):
        options = np.maximum(best[k - 1][:, None], table)   # [start point, end point]
        choice[k] = np.argmin(options, axis=0)
        best[k] = options[choice[k], np.arange(m)]
    points = [0, *candidates, len(model.graph.nodes)]
    ends = [m - 1]
    for k in range(n_stages, 1, -1):
        ends.append(int(choice[k, ends[-1]]))
    chosen = [points[i] for i in reversed(ends[1:])]
    if len(set(chosen)) != n_stages - 1 or not np.isfinite(best[n_stages, m - 1]):
        raise PlanError(f"no plan with {n_stages} non-empty stages over {len(candidates)} "
                        "candidate cut positions; use fewer devices.")
    thinned = len(candidates) < len(model.graph.cut_positions)
    return explain_cuts(model, chosen, table, candidates, thinned=thinned)


def explain_cuts(model: CostModel, chosen: Sequence[int], table: np.ndarray,
                 candidates: Sequence[int], thinned: bool) -> list[Cut]:
    """Why each cut sits where it does: the stage costs around it (from the search's
    table) and the bytes live across it."""
    bounds = [0, *chosen, len(model.graph.nodes)]
    points = [0, *candidates, len(model.graph.nodes)]
    index = {p: i for i, p in enumerate(points)}
    stage = [float(table[index[a], index[b]]) for a, b in zip(bounds, bounds[1:])]
    bottleneck = int(np.argmax(stage))
    crossing = crossing_bytes(model)
    unit = _unit(model)
    cuts = []
    for k, p in enumerate(chosen):
        node = model.graph.nodes[p - 1]
        reason = (f"after {node.name} ({node.module or 'top level'}): stage {k} costs "
                  f"{unit(stage[k])}, stage {k + 1} {unit(stage[k + 1])}, slowest stage "
                  f"{bottleneck} {unit(stage[bottleneck])}; {format_bytes(crossing[p])} live here")
        if thinned:
            reason += " (among positions kept for few live bytes)"
        cuts.append(Cut(p, reason))
    return cuts


def balanced_cuts(model: CostModel, n_stages: int, costs: Sequence[float] | None = None) -> list[Cut]:
    """The naive baseline: cut k at the allowed position nearest to k/N of the total cost.

    With ``costs=None`` the model's own node costs are balanced; pass ones for equal node
    counts or FLOPs for equal cumulative FLOPs.
    """
    positions = model.graph.cut_positions
    check_stage_count(n_stages, model.graph.max_stages)
    values = model.own if costs is None else costs
    prefix = list(itertools.accumulate(values, initial=0.0))
    total = prefix[-1] or 1.0
    cuts: list[Cut] = []
    lo = 0
    for k in range(1, n_stages):
        hi = len(positions) - (n_stages - 1 - k)  # leave a position for each later cut
        target = total * k / n_stages
        j = bisect.bisect_left([prefix[p] for p in positions[lo:hi]], target) + lo
        best = min((i for i in (j - 1, j) if lo <= i < hi),
                   key=lambda i: (abs(prefix[positions[i]] - target), i))
        p = positions[best]
        cuts.append(Cut(p, f"cumulative cost {prefix[p] / total:.1%} nearest to the "
                           f"{k}/{n_stages} target {k / n_stages:.1%}"))
        lo = best + 1
    return cuts


def check_stage_count(n_stages: int, max_stages: int) -> None:
    if n_stages > max_stages:
        raise PlanError(f"cannot cut into {n_stages} stages: only {max_stages} are possible.")


def _unit(model: CostModel):
    if model.unit == "nodes":
        return lambda v: f"{v:.0f} nodes"
    return lambda v: f"{v * 1e3:.3g} ms"
