"""The timesteps stages compute with when it is not the call's own: stride 2 and time shift.

Stride 2 computes the next step ahead, so it needs the sampler's next timestep before
the pipeline passes it; ``time_shift`` feeds a stage the previous call's timestep. Both
live here, per stream of calls (:class:`StreamTimesteps`).

Note (timesteps): a call is at its timestep tensor's element farthest from zero (one per
sample, or one per token: a pipeline may give a conditioning frame's tokens 0). Stride
2 finds where each stream's first call is among the scheduler's timesteps (listed once
each): at the scheduler's own step index where it keeps one (a model that takes over
part-way, as a second expert does, starts there), else at its begin index plus the
stream's start. A conditioning input equal to the timestep at the call (a pipeline
that passes ``sigma=timestep``) is the timestep under another name, and moves with it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import torch

from asyncfx.errors import SchedulerError
from asyncfx.integration import scheduler_begin_index, scheduler_steps_taken, scheduler_timesteps
from asyncfx.program import CallSpec, InputRole
from asyncfx.runtime.executor import InputsFor

#: A timestep tensor with more elements than this (one per token) is reduced on its device.
MANY_TIMESTEPS = 64

SCHEDULER_FIX = ("stride=2 computes the next step's timestep from the scheduler, so it must be the "
                 "scheduler the pipeline samples with: pass scheduler=pipe.scheduler to "
                 "asyncfx.partition() (again after replacing pipe.scheduler).")


@dataclasses.dataclass
class TimestepMap:
    """How the timesteps a pipeline passes relate to its scheduler's (stride 2 computes
    the next one ahead): ``passed = a * scheduled + b``, fitted from the first two calls
    of a stream. Most pipelines pass the scheduler's (a = 1, b = 0); flow-matching ones
    often pass t / 1000, or 1 - t / 1000.

    Example:
        >>> line = TimestepMap()
        >>> line.observe(1000.0, 1.0), line.observe(800.0, 0.8)
        (True, True)
        >>> round(line.predict(600.0), 6)
        0.6
    """

    points: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (scheduled, passed)
    guessed: bool = False  # a timestep was predicted before two calls were seen

    def line(self) -> tuple[float, float]:
        """``(a, b)``: the fit through two calls, else through one call and zero."""
        if len(self.points) == 2:
            (s0, p0), (s1, p1) = self.points
            a = (p1 - p0) / (s1 - s0)
            return a, p0 - a * s0
        if self.points and self.points[0][0] != 0:
            return self.points[0][1] / self.points[0][0], 0.0
        return 1.0, 0.0

    def predict(self, scheduled: float) -> float:
        self.guessed |= len(self.points) < 2
        a, b = self.line()
        return a * scheduled + b

    def observe(self, scheduled: float, passed: float) -> bool:
        """Record a call; False if it contradicts the fit (or a guess already used)."""
        if len(self.points) < 2 and not self.guessed:
            if not self.points or self.points[0][0] != scheduled:
                self.points.append((scheduled, passed))
            return True
        a, b = self.line()
        return math.isclose(passed, a * scheduled + b, rel_tol=1e-3, abs_tol=1e-6)


@dataclasses.dataclass
class StreamTimesteps:
    """The timesteps of one stream of calls: what each of its steps was called with, and
    for stride 2 the scheduler's timesteps from its first call on."""

    calls: dict[int, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    inputs: dict[int, Mapping[str, torch.Tensor]] = dataclasses.field(default_factory=dict)  # by step
    at: float | None = None           # the value of the latest call's timestep
    scheduler_index: int | None = None  # stride 2: its first call's place in the scheduler's timesteps
    scheduled: list[float] | None = None  # stride 2: their values from there on
    line: TimestepMap = dataclasses.field(default_factory=TimestepMap)

    def record(self, step: int, timestep: torch.Tensor | None, value: float | None,
               inputs: Mapping[str, torch.Tensor] | None = None) -> None:
        """The call at ``step``: its timestep tensor and value, and its graph inputs (the
        previous call's latent is what stride 2's forecast latent extrapolates from)."""
        self.calls[step] = timestep
        self.inputs[step] = inputs or {}
        self.at = value
        for old in [s for s in self.calls if s < step - 1]:
            del self.calls[old], self.inputs[old]  # time shift and forecasts read one step back

    def sampler_timesteps(self, scheduler: Any, start: int) -> list[float]:
        """The scheduler's distinct timesteps from the stream's first call on (``start``: its
        first call's generation step), read at that call. A timestep listed twice in a row
        (a second-order sampler's correction, a multistep sampler's first steps) is listed
        once: its second call is another stream (see the call clock)."""
        if self.scheduled is None:
            timesteps = scheduler_timesteps(scheduler)
            if timesteps is None:
                raise SchedulerError("stride=2 and cooldown need the sampler's timesteps: pass "
                                     "scheduler=pipe.scheduler to asyncfx.partition() (after set_timesteps, "
                                     "its .timesteps list the steps).")
            distinct, place = _distinct(timesteps.flatten().tolist())
            self.scheduler_index = _scheduler_index(scheduler, place, start)
            self.scheduled = distinct[self.scheduler_index:]
        return self.scheduled

    def total_steps(self, scheduler: Any, start: int, step: int, *, check: bool) -> int:
        """The stream's steps from its first call on, from the scheduler (stride 2, cool-down),
        after checking with stride 2 (``check``) that the call at ``step`` follows it."""
        scheduled = self.sampler_timesteps(scheduler, start)
        if check:
            self.check(step, scheduled)
        return len(scheduled)

    def check(self, step: int, timesteps: Sequence[float]) -> None:
        """Stride 2 takes the next step's timestep from the scheduler, so the calls must
        follow it: each call's timestep is ``a * timesteps[step] + b`` (``TimestepMap``)."""
        given = self.at
        if given is None:
            return  # the model takes no timestep
        index = self.scheduler_index + step  # among the scheduler's distinct timesteps
        previous = self.calls.get(step - 1)
        if previous is not None and previous.numel() > 1 and not torch.equal(
                _other_levels(previous), _other_levels(self.calls[step])):
            raise SchedulerError(
                f"stride=2 computes the next step with a timestep tensor whose elements at this step's "
                f"timestep move to the next one and whose others stay (a conditioning frame's kept at 0), "
                f"but the call at step {index} of the scheduler's timesteps changed the others too; use "
                "stride=1 for this pipeline.")
        if step >= len(timesteps):
            raise SchedulerError(f"this call would be step {index} of the scheduler's timesteps but it lists "
                                 f"only {self.scheduler_index + len(timesteps)}; {SCHEDULER_FIX}")
        scheduled = float(timesteps[step])
        if not self.line.observe(scheduled, given):
            a, b = self.line.line()
            guess = (" (with warmup=0 the first round had to guess the next timestep from one call; "
                     "warmup >= 1 fits it from two)" if len(self.line.points) < 2 else "")
            raise SchedulerError(f"the call at step {index} of the scheduler's timesteps got timestep "
                                 f"{given:g} but they give {a * scheduled + b:g} "
                                 f"({a:g} x {scheduled:g} + {b:g}, as the earlier calls did){guess}; "
                                 f"{SCHEDULER_FIX}")

    def moved(self, given: torch.Tensor, index: int) -> torch.Tensor:
        """The call's timestep tensor moved to step ``index``'s: an earlier call's (time
        shift), else the scheduler's (stride 2), only where it is at the call's timestep."""
        if index in self.calls:
            return self.calls[index]
        predicted = torch.full_like(given, self.line.predict(self.scheduled[index]))
        return torch.where(given == self.at, predicted, given)


def inputs_for(named: Mapping[str, torch.Tensor], call: CallSpec, times: StreamTimesteps,
               step: int, moves: bool, forecast: float = 0.0) -> InputsFor:
    """The graph inputs a run computes with, by the step whose timestep it uses: the
    call's own at ``step``; at another step (``moves``: stride 2, time shift) the timestep
    moved there, and the conditioning inputs that are the timestep under another name.
    With ``forecast`` (the schedule's damping ``g``), a later step's latents (stride 2's
    next step, whose latent the sampler has not made yet) are extrapolated from this
    call's and the previous call's: ``x + g * (index - step) * (x - x_previous)``."""
    if not moves or call.timestep is None:
        return lambda index: named
    timestep = named[call.timestep]
    copies = [name for name in call.conditions if same_values(named[name], timestep)]
    ahead = _latents_ahead(named, call, times.inputs.get(step - 1, {}), forecast)

    made: dict[int, Mapping[str, torch.Tensor]] = {}  # by step: every run at a step reads the same

    def moved_inputs(index: int) -> Mapping[str, torch.Tensor]:
        if index == step:
            return named
        if index not in made:
            moved = times.moved(timestep, index)
            made[index] = {**named, **ahead(index - step),
                           **{name: moved for name in (call.timestep, *copies)}}
        return made[index]
    return moved_inputs


def _latents_ahead(named: Mapping[str, torch.Tensor], call: CallSpec, previous: Mapping[str, torch.Tensor],
                   forecast: float) -> Callable[[int], dict[str, torch.Tensor]]:
    """``steps -> {latent: forecast}``: each latent extrapolated ``steps`` steps ahead from
    the previous call's (none without forecasting, before a previous call, or backwards)."""
    latents = [i.placeholder for i in call.inputs if i.role is InputRole.LATENT and i.placeholder in previous]
    if not forecast or not latents:
        return lambda steps: {}
    return lambda steps: {} if steps <= 0 else {
        name: torch.lerp(previous[name], named[name], 1.0 + forecast * steps) for name in latents}


def timestep_value(timestep: torch.Tensor) -> float:
    """The timestep a call is at: its timestep tensor's element farthest from zero (a
    pipeline may pass one per token, 0 for a conditioning frame's).

    Example:
        >>> timestep_value(torch.tensor([0.0, 0.0, 937.5, 937.5]))
        937.5
    """
    count = timestep.numel()
    if count == 1:
        return float(timestep.item())
    flat = timestep.detach().flatten()
    if count <= MANY_TIMESTEPS:  # one per sample: a single copy to the host, as item() makes
        return float(max(flat.tolist(), key=abs))
    return float(flat[flat.abs().argmax()].item())


def _scheduler_index(scheduler: Any, place: list[int], start: int) -> int:
    """Where a stream starting now is among the scheduler's distinct timesteps (``place``
    maps the index of each listed one there): the scheduler's own step index where it
    keeps one (it counts the steps taken in this generation, also those another model
    made), else its begin index (image-to-image pipelines start part-way) plus the
    stream's start in this generation."""
    if not place:
        return 0  # no timesteps at all: the call's check says so
    taken = scheduler_steps_taken(scheduler)  # None until the first step() call
    if taken is not None:
        return place[min(taken, len(place) - 1)]
    return place[min(scheduler_begin_index(scheduler), len(place) - 1)] + start


def _distinct(timesteps: list[float]) -> tuple[list[float], list[int]]:
    """The timesteps with each run of equal ones listed once, and for each listed timestep
    its place among them.

    Example:
        >>> _distinct([901.0, 801.0, 801.0, 701.0])  # a timestep listed twice in a row
        ([901.0, 801.0, 701.0], [0, 1, 1, 2])
    """
    distinct: list[float] = []
    place: list[int] = []
    for t in timesteps:
        if not distinct or t != distinct[-1]:
            distinct.append(t)
        place.append(len(distinct) - 1)
    return distinct, place


def _other_levels(timestep: torch.Tensor) -> torch.Tensor:
    """The timestep tensor with its elements at the call's timestep zeroed."""
    return torch.where(timestep == timestep_value(timestep), torch.zeros_like(timestep), timestep)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same object, or of one shape, dtype and device with equal values."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                      and torch.equal(a, b))
