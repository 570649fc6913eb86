"""Cost model: seconds per node, per stage and per round for a set of cuts.

A round is one denoising step with all stages running at once. Its time is the
slowest stage's compute, or later if a boundary tensor produced late in its stage has
not reached its consumer by the end of the round: transfers overlap the compute that
follows their production, not the compute before it. Each stage sends its boundary
tensors one after another (one copy stream per stage), each as soon as it is made.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from asyncfx.errors import PlanError
from asyncfx.partitioner.cost_graph import CostGraph, CostNode
from asyncfx.partitioner.device import DeviceSpec

COSTS = ("flops", "measure", "uniform")


def check_cost(cost: str) -> None:
    """Raise PlanError unless ``cost`` names one of COSTS."""
    if cost not in COSTS:
        raise PlanError(f"cost={cost!r} is not known; use one of {list(COSTS)}.")


@dataclasses.dataclass
class Prediction:
    """Predicted times of one plan, in the cost model's unit (seconds, or nodes)."""

    stage_compute: list[float]     # own latent nodes + the step/static nodes each recomputes
    stage_arrival: list[float]     # when its last boundary input arrives, from round start
    round: float                   # max over stages of compute and arrival


class CostModel:
    """Prices the nodes of a CostGraph on a device.

    ``cost="flops"`` uses the device's roofline on the estimated FLOPs and bytes,
    ``"measure"`` the profiled seconds, ``"uniform"`` one unit per latent node and free
    transfers and replicated nodes (pure node-count balance). ``scale`` multiplies each latent node's cost
    (refinement from measured stage times).

    Example:
        >>> model = CostModel(build_cost_graph(captured), PRESETS["cpu"], "flops")
        >>> model.predict([120, 260]).round          # seconds for a 3-stage cut
    """

    def __init__(self, graph: CostGraph, device: DeviceSpec, cost: str,
                 scale: Sequence[float] | None = None):
        check_cost(cost)
        self.graph, self.device, self.cost = graph, device, cost
        self.scale = np.ones(len(graph.nodes)) if scale is None else np.asarray(scale, dtype=float)
        self.own = np.array([self._seconds(n) for n in graph.nodes]) * self.scale
        # uniform balances the latent nodes themselves: replicated nodes count nothing
        self.side = {n.name: 0.0 if cost == "uniform" else self._seconds(n) for n in graph.side_nodes}
        self.transfer = np.array([self.transfer_seconds(n.out_bytes) for n in graph.nodes])
        self.last_reader = np.array([max(n.readers, default=-1) for n in graph.nodes])

    @property
    def unit(self) -> str:
        return "nodes" if self.cost == "uniform" else "seconds"

    def rescaled(self, factors: Sequence[float]) -> "CostModel":
        return CostModel(self.graph, self.device, self.cost, self.scale * np.asarray(factors))

    def _seconds(self, node: CostNode) -> float:
        if self.cost == "uniform":
            return 1.0
        if self.cost == "flops":
            return self.device.compute_seconds(node.flops, node.bytes)
        if node.measured_seconds is None:
            raise PlanError(f"node {node.name} ({node.module or 'top level'}) has no measured time; "
                            "profile the model first (asyncfx.profile) or use cost='flops'.")
        return node.measured_seconds

    def sequential(self) -> float:
        """The whole model on one device: every node once."""
        return float(self.own.sum() + sum(self.side.values()))

    def transfer_seconds(self, nbytes: float) -> float:
        return 0.0 if self.cost == "uniform" else self.device.transfer_seconds(nbytes)

    def attributed(self) -> np.ndarray:
        """Each latent node's cost plus the step/static nodes it is the first to need.

        The search adds costs node by node; a shared step/static node (the time MLP) is
        then counted once, where it is first needed, instead of in every stage."""
        seen: set[str] = set()
        extra = np.zeros(len(self.graph.nodes))
        for i, node in enumerate(self.graph.nodes):
            new = [n for n in node.needs if n not in seen and n in self.side]
            seen.update(node.needs)
            extra[i] = sum(self.side[n] for n in new)
        return self.own + extra

    def predict(self, cuts: Sequence[int]) -> Prediction:
        """Stage and round times for cuts before the given node positions."""
        bounds = [0, *cuts, len(self.graph.nodes)]
        stage_of = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
        last = len(bounds) - 2
        compute, arrival = [], [0.0] * (last + 1)
        for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
            compute.append(self.stage_compute(start, end, include_output=k == last))
            clock, elapsed = 0.0, 0.0  # copy-stream free time, compute time so far
            for i in range(start, end):
                elapsed += self.own[i]
                consumers = sorted({last if r == len(stage_of) else int(stage_of[r])
                                    for r in self.graph.nodes[i].readers} - {k})
                for consumer in consumers:
                    clock = max(clock, elapsed) + self.transfer[i]
                    arrival[consumer] = max(arrival[consumer], clock)
        return Prediction(compute, arrival, max(max(compute), max(arrival)))

    def stage_compute(self, start: int, end: int, include_output: bool = False) -> float:
        needs = {n for node in self.graph.nodes[start:end] for n in node.needs}
        if include_output:
            needs.update(self.graph.output_needs)
        return float(self.own[start:end].sum() + sum(self.side.get(n, 0.0) for n in needs))
