"""Executors run the stage programs as the schedule says. ``SerialExecutor`` is the
reference: one device, one run after another."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from asyncfx.runtime.schedule import Mode, StageRun, StepSchedule

#: ``inputs_for(timestep_index)``: the graph inputs (by placeholder name) a run with
#: that step's timestep computes with.
InputsFor = Callable[[int], Mapping[str, torch.Tensor]]


@dataclasses.dataclass
class StageProgram:
    """What an executor needs of one stage: its module and the names of its inputs
    (graph inputs or boundary tensors) and of the boundary tensors it returns."""

    module: nn.Module
    inputs: list[str]
    outputs: list[str]


class BoundaryStore:
    """Boundary values by version, for one stream of calls. Versions are never
    overwritten: a step writes a new version while others read the previous one."""

    def __init__(self) -> None:
        self._versions: dict[int, dict[str, torch.Tensor]] = {}

    def get(self, name: str, version: int) -> torch.Tensor:
        try:
            return self._versions[version][name]
        except KeyError:
            raise RuntimeError(f"boundary tensor {name!r} of version {version} was never written; "
                               "the schedule and the executor disagree (a bug: please report)."
                               ) from None

    def put(self, version: int, values: Mapping[str, torch.Tensor]) -> None:
        self._versions.setdefault(version, {}).update(values)

    def has(self, name: str, version: int) -> bool:
        return name in self._versions.get(version, {})

    def keep_from(self, version: int) -> None:
        """Forget versions older than ``version``."""
        for old in [v for v in self._versions if v < version]:
            del self._versions[old]


class Executor:
    """Runs one step's schedule; returns the flat outputs of the last stage by step."""

    def __init__(self, programs: Sequence[StageProgram], graph_inputs: set[str]):
        self.programs = list(programs)
        self.graph_inputs = graph_inputs

    def step(self, plan: StepSchedule, inputs_for: InputsFor,
             store: BoundaryStore) -> dict[int, tuple[torch.Tensor, ...]]:
        raise NotImplementedError

    def arguments(self, run: StageRun, inputs_for: InputsFor, store: BoundaryStore) -> list[torch.Tensor]:
        inputs = inputs_for(run.timestep)
        return [inputs[name] if name in self.graph_inputs else store.get(name, run.reads)
                for name in self.programs[run.stage].inputs]

    def record(self, run: StageRun, outputs: Sequence[torch.Tensor], store: BoundaryStore,
               results: dict[int, tuple[torch.Tensor, ...]]) -> None:
        if run.writes is not None:
            store.put(run.writes, dict(zip(self.programs[run.stage].outputs, outputs)))
        if run.gives is not None:
            results[run.gives] = tuple(outputs)

    @staticmethod
    def finish(plan: StepSchedule, store: BoundaryStore) -> None:
        written = [r.writes for r in plan.runs if r.writes is not None]
        if written:
            store.keep_from(max(written))

    def close(self) -> None:
        """Release workers and devices (nothing to do for in-process executors)."""


class SerialExecutor(Executor):
    """Every run on the calling thread, in schedule order: the reference semantics.

    Example:
        >>> executor = SerialExecutor(programs, {"sample", "timestep"})
        >>> outputs = executor.step(schedule(0, 2, warmup=1), inputs_for, BoundaryStore())
    """

    def step(self, plan: StepSchedule, inputs_for: InputsFor,
             store: BoundaryStore) -> dict[int, tuple[torch.Tensor, ...]]:
        results: dict[int, tuple[torch.Tensor, ...]] = {}
        with torch.no_grad():
            for run in plan.runs:
                outputs = self.programs[run.stage].module(*self.arguments(run, inputs_for, store))
                self.record(run, outputs, store, results)
        if plan.mode is not Mode.CACHED:
            self.finish(plan, store)
        return results
