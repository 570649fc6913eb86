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
"""
from __future__ import annotations

import enum
import functools
from typing import NamedTuple

from asyncfx.errors import PlanError


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


class StepSchedule(NamedTuple):
    """What happens when the denoiser is called for ``step``."""

    step: int
    mode: Mode
    runs: tuple[StageRun, ...]


def schedule(step: int, n_stages: int, *, warmup: int, stride: int = 1, time_shift: bool = False,
             total_steps: int | None = None) -> StepSchedule:
    """The runs of denoising step ``step`` (0-based) for ``n_stages`` stages.

    Example (N=3, warm-up 2: step 5's last stage reads stage 1's step-4 output, which read
    stage 0's step-3 output):
        >>> [ (r.stage, r.timestep, r.reads) for r in schedule(5, 3, warmup=2).runs ]
        [(0, 5, 4), (1, 5, 4), (2, 5, 4)]
    """
    _check(step, n_stages, warmup, stride, total_steps)
    last = n_stages - 1
    if step < warmup:
        return StepSchedule(step, Mode.SEQUENTIAL, tuple(
            StageRun(k, step, step, step, step if k == last else None, k) for k in range(n_stages)))
    shift = 1 if time_shift else 0
    if stride == 1 or (total_steps is not None and step + 1 >= total_steps and _round_start(step, warmup)):
        return StepSchedule(step, Mode.PARALLEL, tuple(
            StageRun(k, step - shift, step - 1, None if k == last else step,
                     step if k == last else None, k) for k in range(n_stages)))
    if not _round_start(step, warmup):
        return StepSchedule(step, Mode.CACHED, ())
    later = step + 1
    runs = [StageRun(k, later - shift, step - 1, None if k == last else later,
                     later if k == last else None, k) for k in range(n_stages)]
    runs.append(StageRun(last, step - shift, step - 1, None, step, n_stages))
    return StepSchedule(step, Mode.PARALLEL, tuple(runs))


def _round_start(step: int, warmup: int) -> bool:
    return (step - warmup) % 2 == 0


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


@functools.lru_cache(maxsize=64)
def _settings_checked(n_stages: int, warmup: int, stride: int) -> None:
    """``check_settings``, remembered for the settings a denoiser schedules every step with."""
    check_settings(n_stages, warmup, stride)


def _check(step: int, n_stages: int, warmup: int, stride: int, total_steps: int | None) -> None:
    try:
        _settings_checked(n_stages, warmup, stride)
    except TypeError:  # settings that cannot be remembered (a list): checked, and named, anyway
        check_settings(n_stages, warmup, stride)
    if step < 0:
        raise PlanError(f"step must be >= 0, got {step}.")
    if stride == 2 and total_steps is None:
        raise PlanError("stride 2 needs total_steps: rounds compute the next step's timestep.")
