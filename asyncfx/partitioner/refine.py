"""Refinement: time each stage as a whole, correct the node costs, search again.

Per-node times miss what only shows when a stage runs as one piece (caches, operator
fusion on a GPU, launch gaps that CUDA graphs remove). Each round scales the cost of
every node of stage k by measured_k / predicted_k, searches again, and keeps the plan
whose slowest measured stage is fastest; it stops when that stops improving or the
cuts stop moving.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.examples import split_example_inputs
from asyncfx.partitioner.make_plan import plan_from_cuts
from asyncfx.partitioner.search import search_cuts
from asyncfx.partitioner.staged import StagedModel, split
from asyncfx.passes.profile import timing_device
from asyncfx.plan import StagePlan
from asyncfx.timing import median_seconds


def refine(captured: Captured, model: CostModel, plan: StagePlan, flat_inputs: Sequence[torch.Tensor],
           *, rounds: int = 5, repeats: int = 5) -> StagePlan:
    """The best plan found in up to ``rounds`` measure-and-search rounds, with its
    stages' measured times filled in and the history in ``plan.notes``."""
    best, best_slowest, history = plan, float("inf"), []
    for round_index in range(rounds):
        measured = time_stages(split(captured, plan), flat_inputs, repeats=repeats)
        for stage, seconds in zip(plan.stages, measured):
            stage.measured_seconds = seconds
        history.append(f"round {round_index}: slowest stage {max(measured) * 1e3:.3f} ms, "
                       f"max/mean {max(measured) / np.mean(measured):.3f}")
        if max(measured) >= best_slowest:
            break
        best, best_slowest = plan, max(measured)
        model = model.rescaled(corrected_scale(model, plan_positions(plan), measured))
        cuts = search_cuts(model, plan.n_stages)
        if [c.position for c in cuts] == plan_positions(plan):
            break
        plan = plan_from_cuts(model, cuts)
    best.notes.append("refinement by measured stage times: " + "; ".join(history))
    best.measured_sequential = time_whole(captured, flat_inputs, repeats=repeats)
    return best


def measure_stages(captured: Captured, plan: StagePlan, example_inputs: object, *,
                   repeats: int = 5) -> StagePlan:
    """Fill in ``plan``'s measured stage times and whole-model time, timed on the
    example inputs' device (CUDA graphs on GPUs), and return it.

    Example:
        >>> naive = measure_stages(captured, asyncfx.compile(captured, 4, cost="uniform"), (args, kwargs))
        >>> [s.measured_seconds for s in naive.stages]
    """
    args, kwargs = split_example_inputs(example_inputs)
    flat_inputs = captured.interface.flatten(args, kwargs)
    measured = time_stages(split(captured, plan), flat_inputs, repeats=repeats)
    for stage, seconds in zip(plan.stages, measured):
        stage.measured_seconds = seconds
    plan.measured_sequential = time_whole(captured, flat_inputs, repeats=repeats)
    return plan


def corrected_scale(model: CostModel, positions: Sequence[int], measured: Sequence[float]) -> np.ndarray:
    """Per-node factors that make each stage's own nodes (of the cut before ``positions``)
    account for what was measured beyond its replicated step/static nodes (whose cost is
    shared, so left as is)."""
    bounds = [0, *positions, len(model.graph.nodes)]
    predicted = model.predict(positions).stage_compute
    factors = []
    for estimate, seconds, start, end in zip(predicted, measured, bounds, bounds[1:]):
        own = float(model.own[start:end].sum())
        replicated = estimate - own
        factors.append(np.full(end - start, max(seconds - replicated, 0.1 * own) / max(own, 1e-12)))
    return np.concatenate(factors)


def plan_positions(plan: StagePlan) -> list[int]:
    """Where ``plan`` cuts the latent nodes: the position of each stage's first node after the first."""
    return [int(p) for p in np.cumsum([len(s.nodes) for s in plan.stages])[:-1]]


def time_stages(staged: StagedModel, flat_inputs: Sequence[torch.Tensor], *, warmup: int = 2,
                repeats: int = 5) -> list[float]:
    """Median seconds of each stage module run alone on its real inputs.

    On CUDA each stage is captured as a CUDA graph and its replays are timed with events
    (eager stages are launch-bound), all on the current stream: under
    ``torch.cuda.stream(partition.stream)`` the times are those of an SM partition. A stage
    that cannot be captured is timed eagerly, with a warning that names the reason.
    """
    with torch.no_grad():
        stage_args = staged.stage_arguments(flat_inputs)
        timings = []
        for index, (stage, args) in enumerate(zip(staged.stages, stage_args)):
            run = lambda stage=stage, args=args: stage(*args)  # noqa: E731
            timings.append(median_seconds(run, f"stage {index}", _on_cuda(args), warmup, repeats))
    return timings


def time_whole(captured: Captured, flat_inputs: Sequence[torch.Tensor], *, warmup: int = 2,
               repeats: int = 5) -> float:
    """Median seconds of the whole captured graph on one device, timed like a stage."""
    with torch.no_grad():
        run = lambda: captured.graph_module(*flat_inputs)  # noqa: E731
        return median_seconds(run, "the whole model", _on_cuda(flat_inputs), warmup, repeats)


def _on_cuda(tensors: Sequence[torch.Tensor]) -> bool:
    return timing_device(tensors).type == "cuda"


