"""split(): the stage modules of a plan, chained with fresh values (no staleness)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx, nn

from asyncfx.errors import PlanError
from asyncfx.partitioner.captured import CallInterface, Captured
from asyncfx.partitioner.cuts import latent_order
from asyncfx.plan import StagePlan
from asyncfx.passes.split import StageGraph, split_stages


class StagedModel(nn.Module):
    """A model cut into stage GraphModules, called exactly like the model.

    ``stages[k]`` takes the inputs named ``stage_inputs[k]`` (graph inputs and boundary
    tensors of earlier stages) and returns the boundaries named ``stage_outputs[k]``;
    the last stage returns the model's output. Each stage holds only the weights its
    nodes use.

    Example:
        >>> staged = asyncfx.split(captured, plan)
        >>> len(staged.stages) == plan.n_stages
        True
        >>> out = staged(*args, **kwargs)            # equals model(*args, **kwargs)
    """

    def __init__(self, stages: list[StageGraph], interface: CallInterface, plan: StagePlan):
        super().__init__()
        self.stages = nn.ModuleList(s.module for s in stages)
        self.stage_inputs = [s.inputs for s in stages]
        self.stage_outputs = [s.outputs for s in stages]
        self.interface = interface
        self.plan = plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _, result = self._run(self.interface.flatten(args, kwargs))
        return self.interface.unflatten(result)

    def stage_arguments(self, flat_inputs: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """The arguments each stage receives when the chain runs on fresh values."""
        arguments, _ = self._run(flat_inputs)
        return arguments

    def _run(self, flat_inputs: Sequence[torch.Tensor]) -> tuple[list[tuple[torch.Tensor, ...]], Any]:
        values = {i.placeholder: v for i, v in zip(self.interface.inputs, flat_inputs)}
        arguments, result = [], ()
        for stage, inputs, outputs in zip(self.stages, self.stage_inputs, self.stage_outputs):
            stage_args = tuple(values[name] for name in inputs)
            arguments.append(stage_args)
            result = stage(*stage_args)
            values.update(zip(outputs, result))
        return arguments, result


def split(captured: Captured, plan: StagePlan) -> StagedModel:
    """Build the stage modules that ``plan`` describes for ``captured``.

    Example:
        >>> captured = asyncfx.capture(model, args, kwargs)
        >>> staged = asyncfx.split(captured, asyncfx.compile(captured, 4))
    """
    if not isinstance(captured, Captured):
        raise PlanError(f"split() needs a Captured (from asyncfx.capture), got "
                        f"{type(captured).__name__}.")
    check_plan(captured, plan)
    return StagedModel(split_stages(captured.graph_module, _assignment(captured.graph, plan)),
                       captured.interface, plan)


def check_plan(captured: Captured, plan: StagePlan) -> None:
    """Raise PlanError unless ``plan`` was compiled for this graph: the same fingerprint
    (model, input shapes and dtypes, input roles, torch version) and the graph's latent
    nodes listed in order (a hand-edited plan may have moved or renamed one).

    Example:
        >>> check_plan(asyncfx.capture(model, args, kwargs), asyncfx.StagePlan.load("plan.json"))
    """
    if plan.fingerprint != captured.fingerprint:
        raise PlanError(
            f"the plan was compiled for another graph (plan fingerprint {plan.fingerprint}, "
            f"{plan.model_class}, inputs {', '.join(i.describe() for i in plan.inputs)}; this graph "
            f"{captured.fingerprint}, "
            f"{captured.model_class}, inputs {', '.join(i.describe() for i in captured.inputs)}): the "
            "model, its input shapes or dtypes, which inputs are the latent and the timestep "
            "(latent=, timestep=), or the torch version differ. Compile a new plan for this model "
            "and inputs with asyncfx.compile().")
    _assignment(captured.graph, plan)


def _assignment(graph: fx.Graph, plan: StagePlan) -> list[list[fx.Node]]:
    order = latent_order(graph)
    names = [name for stage in plan.stages for name in stage.nodes]
    expected = [n.name for n in order]
    if names != expected:
        at = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b),
                  min(len(names), len(expected)))
        listed = repr(names[at]) if at < len(names) else "nothing more"
        wanted = repr(expected[at]) if at < len(expected) else "no node"
        raise PlanError(f"the plan's stages do not list the graph's {len(expected)} latent nodes in order: "
                        f"at position {at} they list {listed} where the graph has {wanted} (a plan edited by "
                        "hand, or made for another model); compile the plan again with asyncfx.compile().")
    by_name = {n.name: n for n in order}
    return [[by_name[name] for name in stage.nodes] for stage in plan.stages]
