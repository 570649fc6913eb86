"""The schedule: what every stage computes at a denoising step, and what it reads.

This is the only place that decides staleness; every executor follows it.

Boundary values carry a *version*: the step whose timestep produced them. At a warm-up
step s (s < warmup) the stages run one after another, each reading the version s its
predecessors just wrote, so the output equals the original model's. After warm-up
all stages of step s start at once and read version s-1, written one step earlier
(paper eq. 5: eps_s = C_{N-1}(...C_1(C_0(x_{s-N+1}, t_{s-N+1}), t_{s-N+2})..., t_s)).
Step and static values are never versioned: each stage recomputes them from the
current call's inputs.

Stride 2 (paper sec. 3.2): after warm-up, steps go in rounds of two, s and s+1. In the
round, stages 0..N-1 compute with t_{s+1} and keep their outputs (version s+1, read by
the next round); one extra device computes the last stage with t_s. Both last-stage
runs read version s-1, and give eps_s and eps_{s+1}; the call for step s+1 returns the
cached eps_{s+1}. A final step without a partner runs as a stride-1 step.

time_shift (paper app. A): after warm-up, each stage computes with the previous
step's timestep instead of the current one.

Forecasting (``forecast=g``, off at 0): a parallel run reads, instead of the newest
version B1 of each boundary value, ``B1 + c * trend * (B1 - B2)`` where B2 is the version
the schedule wrote before B1 (its ``prior``), ``c = g * r`` (its ``lean``) and ``r`` is the
distance in steps from B1 to the step the run computes for, over the distance from B2
to B1: the value the producer would send now, extrapolated from its last two. ``trend``
(0 to 1, computed from the values by the executor) is how much of the change before,
from B3 (the version before B2, ``older``) to B2, the latest change continued per step:
a value that moves on as it did is extrapolated, one that turns back is read as it is,
so a forecast does not amplify an oscillation (its own error coming back) step by
step. Without B3 (the second parallel step after warm-up) the trend is 1. The first
parallel step (round) after warm-up has one version, the last warm-up step's (the
stages may not run before it), and reads it as it is. The store then keeps three
versions (``StepSchedule.keep_from``).
``time_shift`` computes each stage at its inputs' own step, so there is nothing to
forecast (r = 0).

Origins: what a run reads comes from stage 0's run at one step, its ``origin``: the step
itself at a sequential step; at a parallel step, ``k`` steps back for stage ``k`` (each
boundary is one step stale), or the latest sequential step if that is later (where all
stages ran at once on fresh values). A step cache decides each run by its origin, so
that a stage skips a module at the steps whose values it is computing from.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, NamedTuple

from asyncfx.errors import PlanError


#: Default damping of forecast stale values (``forecast=``; 0: off, AsyncDiff's plain reuse).
#: 0.5, from benchmarks/quality.py on both trained digits models: with the trend (the
#: module note) it brings the samples closer to the sequential ones than
#: plain reuse in every setting measured, N from 2 to 4, stride 1 and 2, warm-up 1, 3
#: and 5: the DiT's by 1.8-3.7 dB of PSNR, the UNet's by 3.2-4.9 dB; g = 1 loses on the
#: DiT at stride 2 (benchmarks/RESULTS.md, "Forecasting with the trend").
DEFAULT_FORECAST = 0.5


class Mode(str, enum.Enum):
    SEQUENTIAL = "sequential"   # warm-up: stages in order, fresh values
    PARALLEL = "parallel"       # all runs at once, stale values
    CACHED = "cached"           # second step of a stride-2 round: nothing runs

    def __str__(self) -> str:
        return self.value


class StageRun(NamedTuple):
    """One execution of one stage."""

    stage: int
    timestep: int          # index of the step whose timestep the run computes with
    reads: int             # version of the boundary values it reads
    writes: int | None     # version its boundary outputs are kept as (None: not kept)
    gives: int | None      # step whose noise prediction this run returns (last stage)
    slot: int              # device slot: the stage index, or n_stages for stride 2's extra
    prior: int | None = None  # forecasting: the version before ``reads`` it extrapolates from
    lean: float = 0.0         # forecasting: it reads B1 + lean * (B1 - B2) (see the module note)
    older: int | None = None  # forecasting: the version before ``prior`` (B3), to measure the trend
    origin: int | None = None  # the step whose stage-0 run what it reads comes from (None: stride 2)


class StepSchedule(NamedTuple):
    """What happens when the denoiser is called for ``step``."""

    step: int
    mode: Mode
    runs: tuple[StageRun, ...]
    keep_from: int | None = None  # the oldest boundary version later steps read (None: keep all)
    cache: Any = None             # a step cache's decisions (runtime.step_cache.CacheStep; None: none)


def schedule(step: int, n_stages: int, *, warmup: int, stride: int = 1, time_shift: bool = False,
             total_steps: int | None = None, forecast: float = 0.0,
             sequential: SequentialSteps | None = None) -> StepSchedule:
    """The runs of denoising step ``step`` (0-based) for ``n_stages`` stages; ``forecast``
    is the damping ``g`` of forecast stale values (see the module note; 0: off);
    ``sequential`` places sequential steps after warm-up (cool-down, refresh). A step's
    schedule depends on these alone: it is made once and remembered (``SCHEDULES_KEPT``).

    Example (N=3, warm-up 2: step 5's last stage reads stage 1's step-4 output, which read
    stage 0's step-3 output):
        >>> [ (r.stage, r.timestep, r.reads) for r in schedule(5, 3, warmup=2).runs ]
        [(0, 5, 4), (1, 5, 4), (2, 5, 4)]
    """
    try:
        return _remembered_schedule(step, n_stages, warmup, stride, time_shift, total_steps, forecast,
                                    sequential or SequentialSteps())
    except TypeError:  # a setting that cannot be remembered (a list): refused by name where it can be
        check_settings(n_stages, warmup, stride)
        raise


def _scheduled(step: int, n_stages: int, warmup: int, stride: int, time_shift: bool, total_steps: int | None,
               forecast: float, sequential: SequentialSteps) -> StepSchedule:
    """``schedule``'s result, checked and worked out (``_remembered_schedule`` keeps it: a
    schedule remembered had its settings checked)."""
    _check(step, n_stages, warmup, stride, total_steps)
    steps = _Steps(warmup, stride, total_steps, sequential)
    steps.check()
    plain = _plain_schedule(step, n_stages, steps, time_shift)
    written = [r.writes for r in plain.runs if r.writes is not None]
    if not written:
        return plain
    newest = max(written)
    if not forecast:
        return plain._replace(keep_from=newest)
    kept = _versions_before(steps, newest, 2)
    runs = plain.runs
    if plain.mode is Mode.PARALLEL:  # every run of a parallel step reads the versions before it
        read = _versions_before(steps, step - 1, 2)
        runs = tuple(_forecasting(run, read, forecast) for run in runs)
    return plain._replace(runs=runs, keep_from=min(kept, default=newest))


@dataclasses.dataclass(frozen=True)
class SequentialSteps:
    """Steps after warm-up that run the stages one after another on fresh values:
    ``cooldown``, the last steps of a generation (it needs the number of steps: the
    scheduler's); ``refresh``, one every ``refresh`` steps after warm-up (``refresh - 1``
    parallel steps, then one sequential), after which the stages read fresh values again.

    Example:
        >>> [s for s in range(12) if SequentialSteps(cooldown=1, refresh=4).at(s, 2, 12)]
        [0, 1, 5, 9, 11]
    """

    cooldown: int = 0
    refresh: int = 0

    def __post_init__(self) -> None:
        for name in ("cooldown", "refresh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PlanError(f"{name} must be a whole number of steps >= 0 (0: none), got {value!r}.")
        if self.refresh == 1:
            raise PlanError("refresh=1 would run every step sequentially: give refresh >= 2 (one sequential "
                            "step every `refresh` steps), or 0 for none.")

    def count(self, warmup: int, total_steps: int) -> int:
        """How many of a generation's ``total_steps`` run sequentially (warm-up included)."""
        return sum(self.at(step, warmup, total_steps) for step in range(total_steps))

    def at(self, step: int, warmup: int, total_steps: int | None) -> bool:
        """Whether ``step`` runs sequentially (warm-up included)."""
        if step < warmup:
            return True
        if self.cooldown and total_steps is not None and step >= total_steps - self.cooldown:
            return True
        return bool(self.refresh) and (step - warmup + 1) % self.refresh == 0


@dataclasses.dataclass(frozen=True)
class _Steps:
    """Which steps of a generation are sequential, and what each writes."""

    warmup: int
    stride: int
    total: int | None
    placed: SequentialSteps

    def check(self) -> None:
        if self.placed.cooldown and self.total is None:
            raise PlanError("cooldown places sequential steps at the end of a generation, so the schedule "
                            "needs its number of steps: pass scheduler=pipe.scheduler to "
                            "asyncfx.partition().")

    def sequential(self, step: int) -> bool:
        return self.placed.at(step, self.warmup, self.total)

    def last_sequential(self, step: int) -> int:
        """The latest sequential step at or before ``step`` (-1: none): the step itself, or
        the latest refresh, or the last warm-up step (cool-down steps come after it)."""
        if self.sequential(step):
            return step
        refresh, last = self.placed.refresh, self.warmup - 1
        refreshes = (step - self.warmup + 1) // refresh if refresh else 0
        return max(last, self.warmup + refreshes * refresh - 1) if refreshes else last

    def round_start(self, step: int) -> bool:
        """Stride 2: whether parallel ``step`` starts a round (rounds start right after a
        sequential step and every other step from there)."""
        return (step - self.last_sequential(step) - 1) % 2 == 0

    def paired(self, step: int) -> bool:
        """Stride 2: whether the round at ``step`` computes ``step + 1`` too (a parallel
        step of the generation), else it runs as a stride-1 step."""
        after = step + 1
        return not (self.total is not None and after >= self.total) and not self.sequential(after)

    def written(self, version: int) -> bool:
        """Whether a step writes ``version``: every step its own, except a stride-2 round,
        which writes its partner's (the step after)."""
        return not (self.stride == 2 and not self.sequential(version) and self.round_start(version)
                    and self.paired(version))

    def written_before(self, version: int) -> int | None:
        """The version written before ``version`` that a forecast may extrapolate from:
        none before the latest sequential step at or before ``version`` (fresh values
        after stale ones, or the first warm-up steps, which may run the original model
        and write none)."""
        floor = self.last_sequential(version)
        before = version - 1
        while before > floor and not self.written(before):
            before -= 1  # a sequential step writes its own version: the search stops at the floor
        return before if floor < version and before >= 0 else None


def _plain_schedule(step: int, n_stages: int, steps: _Steps, time_shift: bool) -> StepSchedule:
    """The schedule without forecasting: each run reads the newest version."""
    last = n_stages - 1
    if steps.sequential(step):
        return StepSchedule(step, Mode.SEQUENTIAL, tuple(
            StageRun(k, step, step, step, step if k == last else None, k, origin=step)
            for k in range(n_stages)))
    shift = 1 if time_shift else 0
    if steps.stride == 1 or steps.round_start(step) and not steps.paired(step):
        floor = steps.last_sequential(step)  # stage k reads what stage 0 made k steps ago, or then
        return StepSchedule(step, Mode.PARALLEL, tuple(
            StageRun(k, step - shift, step - 1, None if k == last else step,
                     step if k == last else None, k, origin=max(step - k, floor)) for k in range(n_stages)))
    if not steps.round_start(step):
        return StepSchedule(step, Mode.CACHED, ())
    later = step + 1
    runs = [StageRun(k, later - shift, step - 1, None if k == last else later,
                     later if k == last else None, k) for k in range(n_stages)]
    runs.append(StageRun(last, step - shift, step - 1, None, step, n_stages))
    return StepSchedule(step, Mode.PARALLEL, tuple(runs))


def _versions_before(steps: _Steps, version: int, count: int) -> list[int]:
    """Up to ``count`` versions a forecast from ``version`` extrapolates from, newest first."""
    found: list[int] = []
    while len(found) < count and (version := steps.written_before(version)) is not None:
        found.append(version)
    return found


def _forecasting(run: StageRun, before: list[int], gain: float) -> StageRun:
    """A parallel run reading the forecast of its stale values from the versions ``before``
    the one it reads (see the module note)."""
    if not before:
        return run
    prior, older = before[0], before[1] if len(before) > 1 else None
    lean = gain * (run.timestep - run.reads) / (run.reads - prior)
    return run._replace(prior=prior, lean=lean, older=older)


def check_forecast(forecast: float) -> float:
    """``forecast`` as a float: a number from 0 (off) to 1 (undamped extrapolation).

    Example:
        >>> check_forecast(0.5)
        0.5
    """
    if isinstance(forecast, bool) or not isinstance(forecast, (int, float)) or not 0 <= forecast <= 1:
        raise PlanError(f"forecast must be a number from 0 (off: stale values are read as they are) to 1 "
                        f"(extrapolated undamped from their last two versions), got {forecast!r}.")
    return float(forecast)


def devices_needed(n_stages: int, stride: int) -> int:
    """Device slots a schedule uses: one per stage, plus one for stride 2's extra run."""
    return n_stages + (1 if stride == 2 else 0)


def check_settings(n_stages: int, warmup: int, stride: int) -> None:
    """Raise PlanError (a ValueError) unless the schedule can run with these settings:
    at least one stage, stride 1 or 2, and warm-up steps (an integer, at least 1 with
    several stages: the last warm-up step fills the boundary buffers the first parallel
    step reads). ``partition()``, ``simulate()`` and ``schedule()`` all check this.

    Example:
        >>> check_settings(4, warmup=3, stride=2)
    """
    if n_stages < 1:
        raise PlanError(f"schedule needs at least one stage, got {n_stages}.")
    if stride not in (1, 2) or isinstance(stride, bool):
        raise PlanError(f"stride must be 1 or 2, got {stride!r}.")
    least = 1 if n_stages > 1 else 0
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < least:
        raise PlanError(f"warmup must be an integer >= {least} with {n_stages} stage(s), got {warmup!r}: "
                        + ("the last warm-up step fills the boundary buffers the first parallel step "
                           "reads, so warmup must be at least 1 with several stages." if least else
                           "the number of warm-up steps."))


#: Schedules remembered: a schedule depends on its step and settings alone, and a denoiser
#: asks for the same steps in every generation (a few streams of up to a few hundred steps).
#: Typed: ``True`` is not remembered as the ``1`` it equals, so a bool setting is refused.
SCHEDULES_KEPT = 4096
_remembered_schedule = functools.lru_cache(maxsize=SCHEDULES_KEPT, typed=True)(_scheduled)


def _check(step: int, n_stages: int, warmup: int, stride: int, total_steps: int | None) -> None:
    check_settings(n_stages, warmup, stride)
    if step < 0:
        raise PlanError(f"step must be >= 0, got {step}.")
    if stride == 2 and total_steps is None:
        raise PlanError("stride 2 needs total_steps: rounds compute the next step's timestep.")
