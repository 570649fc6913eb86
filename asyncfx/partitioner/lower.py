"""lower(): a capture and a StagePlan become the Program the runtime runs."""
from __future__ import annotations

import torch

from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.staged import split
from asyncfx.passes.meta import VALUE
from asyncfx.passes.substitute import StageSubstitution
from asyncfx.plan import StagePlan
from asyncfx.program import BatchSplit, BoundarySpec, Program, StageSpec, TensorSpec, WeightSource


def lower(captured: Captured, plan: StagePlan, weights: WeightSource | None = None,
          groups: BatchSplit = BatchSplit()) -> Program:
    """The program of ``plan``'s stages of ``captured``: stage modules, boundary and output
    specs, and how calls bind (refused with a PlanError when the plan is for another graph);
    ``weights``: where stages of a model built without weights load theirs from; ``groups``:
    the batch groups, each running every stage (``captured`` is then one group's).

    Example:
        >>> program = lower(captured, asyncfx.compile(captured, 2))
        >>> program.n_stages, [b.producer for b in program.boundaries][:1]
        (2, [0])
    """
    staged = split(captured, plan)
    stages = tuple(StageSpec(module, tuple(inputs), tuple(outputs)) for module, inputs, outputs
                   in zip(staged.stages, staged.stage_inputs, staged.stage_outputs))
    values = {node.name: node.meta.get(VALUE) for node in captured.graph.nodes}
    boundaries = tuple(BoundarySpec(b.name, b.producer, tuple(b.consumers),
                                    TensorSpec(tuple(b.shape), dtype_named(b.dtype),
                                               _strides(values.get(b.name))))
                       for b in plan.boundaries)
    return Program(captured.call, stages, boundaries, plan, weights, groups, StageSubstitution())


def _strides(value: object) -> tuple[int, ...] | None:
    """The strides a boundary is made with, where they are known and not contiguous."""
    if not isinstance(value, torch.Tensor) or value.is_contiguous():
        return None
    strides = value.stride()
    return tuple(strides) if all(isinstance(s, int) for s in strides) else None


def dtype_named(name: str) -> torch.dtype:
    """``"torch.float16"`` (as plans write dtypes) -> ``torch.float16``."""
    return getattr(torch, name.removeprefix("torch."))
