"""The StagePlan of a set of cuts: stages, boundary tensors and the predicted costs."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from asyncfx.errors import PlanError
from asyncfx.partitioner.cost_graph import CostGraph
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.search import Cut
from asyncfx.plan import BoundaryTensor, StageInfo, StagePlan


def checked_stage_count(n_devices: Any, graph: CostGraph) -> int:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise PlanError(f"n_devices must be a positive integer, got {n_devices!r}.")
    if n_devices > graph.max_stages:
        raise PlanError(
            f"n_devices={n_devices} is more than the {graph.max_stages} stages {graph.model_class} "
            f"can be cut into at this input size (it has {graph.max_stages} cuttable latent "
            f"nodes); use at most {graph.max_stages} devices.")
    return n_devices


def _share_of_stage_done(own: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    """For each latent node, the share of its stage's own compute done once it is made."""
    share = np.ones(len(own))
    for start, end in zip(bounds, bounds[1:]):
        done = np.cumsum(own[start:end])
        if done[-1] > 0:
            share[start:end] = done / done[-1]
    return share


def plan_from_cuts(model: CostModel, cuts: Sequence[Cut]) -> StagePlan:
    """The StagePlan for cutting the model's latent order before each cut position."""
    graph = model.graph
    positions = [c.position for c in cuts]
    bounds = [0, *positions, len(graph.nodes)]
    prediction = model.predict(positions)
    stage_of = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    last = len(bounds) - 2
    stages, all_weights = [], set()
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        own = graph.nodes[start:end]
        needs = {n for node in own for n in node.needs} | (set(graph.output_needs) if k == last else set())
        weights = graph.stage_weights([*needs, *(n.name for n in own)])
        all_weights |= weights
        stages.append(StageInfo(
            index=k, nodes=[n.name for n in own], first_module=own[0].module,
            last_module=own[-1].module, replicated_nodes=len(needs),
            param_bytes=sum(graph.weights[w] for w in weights),
            estimated_cost=prediction.stage_compute[k],
            cut_reason=cuts[k - 1].reason if k else ""))
    boundaries = []
    made_at = _share_of_stage_done(model.own, bounds)
    for i, node in enumerate(graph.nodes):
        consumers = sorted({last if r == len(graph.nodes) else int(stage_of[r]) for r in node.readers}
                           - {int(stage_of[i])})
        if consumers:
            boundaries.append(BoundaryTensor(
                name=node.name, producer=int(stage_of[i]), consumers=consumers,
                shape=list(node.out_shape), dtype=node.out_dtype, bytes=node.out_bytes,
                module=node.module, made_at=float(made_at[i])))
    return StagePlan(fingerprint=graph.fingerprint, model_class=graph.model_class,
                     inputs=list(graph.inputs), stages=stages, boundaries=boundaries,
                     cost=model.cost, cost_unit=model.unit,
                     total_param_bytes=sum(graph.weights[w] for w in all_weights),
                     link=model.device.name, predicted_round=prediction.round,
                     sequential_cost=model.sequential())
