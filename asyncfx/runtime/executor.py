"""Executors run a program's stages as the schedule says. ``SerialExecutor`` is the
reference: one device, one run after another. The executors that run stages at once
time them (``StageTimes``), which is what re-cutting an unbalanced plan reads."""
from __future__ import annotations

import collections
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from asyncfx.errors import AsyncFXError
from asyncfx.program import BatchSplit, Program, StageSpec
from asyncfx.runtime.stage_weights import holds_no_data, placed
from asyncfx.runtime.step_cache import CacheCall, CacheMemory, call_stage
from asyncfx.schedule import Mode, StageRun, StepSchedule
from asyncfx.timing import RunTimer

#: ``inputs_for(timestep_index)``: the graph inputs (by placeholder name) a run with
#: that step's timestep computes with.
InputsFor = Callable[[int], Mapping[str, torch.Tensor]]
#: ``read(name, version)``: a boundary value as the executor keeps it.
Read = Callable[[str, int], torch.Tensor]


class BoundaryStore:
    """Boundary values by version, for one stream of calls. Versions are never
    overwritten: a step writes a new version while others read the previous one."""

    def __init__(self) -> None:
        self._versions: dict[int, dict[str, torch.Tensor]] = {}
        self._groups: dict[int, BoundaryStore] = {}
        self.cache_memory = CacheMemory()  # what a step cache keeps for this stream's stages

    def group(self, group: int) -> "BoundaryStore":
        """The values of batch group ``group`` (each group runs every stage on its share of
        the batch and reads only its own); group 0's are this store's own."""
        return self if group == 0 else self._groups.setdefault(group, BoundaryStore())

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
        for store in self._groups.values():
            store.keep_from(version)


def group_inputs(split: BatchSplit, inputs_for: InputsFor, group: int) -> InputsFor:
    """``inputs_for`` of batch group ``group``: its share of each batched graph input."""
    if split.groups == 1:
        return inputs_for
    return lambda timestep: {name: split.part(name, value, group)
                             for name, value in inputs_for(timestep).items()}


def joined_results(split: BatchSplit, per_group: Sequence[dict[int, tuple[torch.Tensor, ...]]]
                   ) -> dict[int, tuple[torch.Tensor, ...]]:
    """The outputs of the whole batch by step, from each group's."""
    if len(per_group) == 1:
        return per_group[0]
    return {step: split.joined([results[step] for results in per_group]) for step in per_group[0]}


def stage_arguments(program: Program, run: StageRun, inputs_for: InputsFor, read: Read, *,
                    deferred: bool = False, cache: CacheCall | None = None) -> list[torch.Tensor | Forecast]:
    """The arguments of one run of a stage, in its inputs' order: graph inputs from the
    call (with the timestep of the run's step), boundary values of the version the
    schedule says it reads, forecast where it says so (``deferred``: as ``Forecast``s,
    for the thread and stream that compute the run to evaluate with ``resolved``), then
    the step cache's part in the run if there is one (``call_stage`` runs them).

    Example:
        >>> args = stage_arguments(program, run, inputs_for, store.get)
    """
    inputs = inputs_for(run.timestep)
    graph_inputs = program.graph_inputs
    args = [inputs[name] if name in graph_inputs else _stale(name, run, read)
            for name in program.stages[run.stage].inputs]
    args = args if deferred else [resolved(arg) for arg in args]
    return args if cache is None else [*args, cache]


def cache_call(program: Program, plan: StepSchedule, run: StageRun, store: BoundaryStore) -> CacheCall | None:
    """The step cache's part in ``run`` (None without a cache), on the memory of
    ``store`` (the stream's store of the run's batch group)."""
    if plan.cache is None:
        return None
    if program.editor is None:
        raise AsyncFXError("this program was lowered without a StageEditor, so its stages cannot apply a "
                           "step cache: lower it with asyncfx.partitioner.lower().")
    return plan.cache.run(run.stage, run.origin, store.cache_memory, program.editor)


class Forecast(NamedTuple):
    """A stale boundary value read forecast: ``newest + lean * trend * (newest - prior)``,
    where ``trend`` (0 to 1) is how much of the change before (``prior - older``, ``spacing``
    times as many steps) the latest change continued; 1 without ``older``."""

    prior: torch.Tensor
    newest: torch.Tensor
    lean: float
    older: torch.Tensor | None = None
    spacing: float = 1.0

    def to(self, device: torch.device, non_blocking: bool = False) -> "Forecast":
        moved = [None if t is None else t.to(device, non_blocking=non_blocking)
                 for t in (self.prior, self.newest, self.older)]
        return Forecast(moved[0], moved[1], self.lean, moved[2], self.spacing)


def resolved(arg: torch.Tensor | Forecast) -> torch.Tensor:
    """A stage argument's value (a ``Forecast`` evaluated here, on the current stream)."""
    if not isinstance(arg, Forecast):
        return arg
    if arg.older is None:
        return torch.lerp(arg.prior, arg.newest, 1.0 + arg.lean)
    weight = 1.0 + arg.lean * trend(arg.newest, arg.prior, arg.older, arg.spacing)
    return torch.lerp(arg.prior, arg.newest, weight.to(arg.newest.dtype))


def trend(newest: torch.Tensor, prior: torch.Tensor, older: torch.Tensor, spacing: float) -> torch.Tensor:
    """How much of the change from ``older`` to ``prior`` the change to ``newest`` continued,
    per step, from 0 (none, or turned back) to 1 (all: a value moving linearly), as a
    tensor on their device (no synchronisation): the projection of the latest change on
    the one before, over ``spacing`` (the latest change's steps over the one before's).

    Example:
        >>> trend(torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([1.0]), 1.0)
        tensor(1.)
    """
    exact = torch.promote_types(newest.dtype, torch.float32)
    latest, before = (newest - prior).flatten().to(exact), (prior - older).flatten().to(exact)
    size = torch.dot(before, before)
    ratio = torch.dot(latest, before) / torch.where(size > 0, size, 1.0)
    return (ratio / spacing).clamp(0.0, 1.0)


def _stale(name: str, run: StageRun, read: Read) -> torch.Tensor | Forecast:
    """A boundary value as the run reads it: the version it reads, or where it forecasts
    (``run.prior``) that version and the one before, to extrapolate from."""
    newest = read(name, run.reads)
    if run.prior is None or not newest.is_floating_point():
        return newest
    if run.older is None:
        return Forecast(read(name, run.prior), newest, run.lean)
    spacing = (run.reads - run.prior) / (run.prior - run.older)
    return Forecast(read(name, run.prior), newest, run.lean, read(name, run.older), spacing)


class MeasuredStages(NamedTuple):
    """The seconds of each stage's fastest run (interruptions only ever add time), and
    whether they ran all at once (a parallel step) or one after another (warm-up steps)."""

    seconds: list[float]
    parallel: bool


#: Runs of each stage kept until they are taken: the latest ones (the times of a denoiser
#: whose plan is never re-cut are never taken).
KEPT_RUNS = 16


class StageTimes:
    """The times of each stage's latest runs (``KEPT_RUNS``) since they were last taken,
    kept apart by how the stages ran. A stage's first run (allocations, kernel choice) is
    not kept, nor a run timed as ``None`` (one that captured a CUDA graph).

    Example:
        >>> times = StageTimes(2)
        >>> for seconds in (0.5, 0.02, 0.03):
        ...     times.record(0, seconds, parallel=True)
        ...     times.record(1, seconds * 2, parallel=True)
        >>> times.take()
        MeasuredStages(seconds=[0.02, 0.04], parallel=True)
    """

    def __init__(self, n_stages: int):
        self._warm: set[int] = set()
        self._runs: dict[bool, list[collections.deque[RunTimer | float]]] = {
            parallel: [collections.deque(maxlen=KEPT_RUNS) for _ in range(n_stages)]
            for parallel in (False, True)}

    def record(self, stage: int, timer: RunTimer | float | None, *, parallel: bool) -> None:
        if timer is None:
            return
        if stage not in self._warm:
            self._warm.add(stage)
            return
        self._runs[parallel][stage].append(timer)

    def take(self, stages: Sequence[int] | None = None) -> MeasuredStages | None:
        """The fastest runs of ``stages`` (default: all): the parallel runs' if each of them
        made one, else the warm-up runs' if each made one, else None; forgets them all."""
        taken = None
        for parallel in (True, False):
            runs = self._runs[parallel] if stages is None else [self._runs[parallel][k] for k in stages]
            if taken is None and all(runs):
                taken = MeasuredStages([min(map(_seconds, r)) for r in runs], parallel)
            for r in runs:
                r.clear()
        return taken


def _seconds(timer: RunTimer | float) -> float:
    return timer if isinstance(timer, float) else timer.seconds()


class Executor:
    """Runs one step's schedule; returns the flat outputs of the last stage by step."""

    #: Whether an executor of this kind for a new program finds the weights its process
    #: released elsewhere (so they may be released before the plan is final).
    refills_weights = False

    def __init__(self, program: Program):
        self.program = program
        self.times = StageTimes(program.n_stages)

    def measured(self) -> MeasuredStages | None:
        """The stages' times since the last call (see ``StageTimes.take``)."""
        return self.times.take()

    def stage(self, slot: int) -> StageSpec:
        return self.program.stage_in_slot(slot)

    def modules(self) -> list[nn.Module]:
        """The stage modules this executor computes with (what this process must keep)."""
        raise NotImplementedError

    def step(self, plan: StepSchedule, inputs_for: InputsFor,
             store: BoundaryStore) -> dict[int, tuple[torch.Tensor, ...]]:
        raise NotImplementedError

    def record(self, run: StageRun, outputs: Sequence[torch.Tensor], store: BoundaryStore,
               results: dict[int, tuple[torch.Tensor, ...]]) -> None:
        if run.writes is not None:
            store.put(run.writes, dict(zip(self.program.stages[run.stage].outputs, outputs)))
        if run.gives is not None:
            results[run.gives] = tuple(outputs)

    @staticmethod
    def finish(plan: StepSchedule, store: BoundaryStore) -> None:
        if plan.keep_from is not None:
            store.keep_from(plan.keep_from)

    def close(self) -> None:
        """Release workers and devices (nothing to do for in-process executors)."""


class SerialExecutor(Executor):
    """Every run on the calling thread, in schedule order (batch group after batch group):
    the reference semantics.

    ``device``: where stages without weights of their own are loaded (default: the CPU);
    stages with weights run where those are. Its stages run one after another on one
    thread, so their balance decides nothing: it times nothing, and ``measured()`` is
    None (no re-cut).

    Example:
        >>> executor = SerialExecutor(program)
        >>> outputs = executor.step(schedule(0, 2, warmup=1), inputs_for, BoundaryStore())
    """

    def __init__(self, program: Program, device: torch.device | None = None):
        super().__init__(program)
        self._modules = [placed(s.module, device if holds_no_data(s.module) else None, program.weights)
                         for s in program.stages]

    def modules(self) -> list[nn.Module]:
        return list(self._modules)

    def step(self, plan: StepSchedule, inputs_for: InputsFor,
             store: BoundaryStore) -> dict[int, tuple[torch.Tensor, ...]]:
        split = self.program.split
        per_group: list[dict[int, tuple[torch.Tensor, ...]]] = []
        with torch.no_grad():
            for group in range(split.groups):
                results: dict[int, tuple[torch.Tensor, ...]] = {}
                inputs, own = group_inputs(split, inputs_for, group), store.group(group)
                for run in plan.runs:
                    args = stage_arguments(self.program, run, inputs, own.get,
                                           cache=cache_call(self.program, plan, run, own))
                    outputs = call_stage(self._modules[run.stage], args)
                    self.record(run, outputs, own, results)
                per_group.append(results)
        if plan.mode is not Mode.CACHED:
            self.finish(plan, store)
        return joined_results(split, per_group)
