"""The call clock: which generation, step and stream each denoiser call belongs to.

A sampler calls the denoiser once or more per step and never says where it is. The
clock places each call from facts about it alone (its timestep, which capture it fits,
the name the pipeline gives it, tokens of its conditioning and of the sampler's
timesteps): ``advance(state, facts) -> (state, placement)`` is a pure function, so its
rules are pinned by golden tables (``tests/test_clock.py``) that need no model.

Rules, in the order they are applied:

- New generation. A call starts one when the sampler's timesteps were set up again
  (their token changed: ``scheduler.set_timesteps`` makes a new tensor); when its
  timestep moves back against the way the generation's steps went (down for most
  pipelines, up for those that count up); when one timestep was called more often than
  any pipeline calls per step (one-step generations); when it would open the next step
  of a stream whose generation-constant conditioning inputs are all new objects (a
  pipeline computes its prompt embeddings once per run, so new ones mean a new run,
  also one that starts part-way, as image to image does); and, for a model without a
  timestep, when its conditioning values changed. A further call at the timestep of
  the step before, one the pipeline never made at a step, with all generation-constant
  inputs new, is a new run too (the one after a run that stopped after one call). An
  input is generation-constant once
  it was seen to stay the same object from one step to the next (inputs made anew at
  every step, such as residuals of a control network, never are); what was seen is kept across
  generations.
- Steps. A call at another timestep than the previous one opens the next step; calls at
  the same timestep are further calls of the same step (the conditional and
  unconditional passes, a second-order sampler's second evaluation).
- Streams. The calls of one capture with one context name at a step are numbered in
  order; the i-th is stream ``(capture, context, i)``. A stream continues when it was
  called at the previous step, else it starts over (its first calls are warm-up
  steps). Where the pipeline names its calls (``context``), the name keeps the
  conditional and unconditional calls apart even when a step skips one of them.

Only the first call of each context at a step is compared by conditioning identity: a
second call (the unconditional pass) may build its conditioning anew at every step.
Without generation-constant inputs and without the sampler's timesteps, only the
timesteps tell generations apart (the denoiser warns about it once).
"""
from __future__ import annotations

from typing import Hashable, Mapping, NamedTuple

#: Calls with one timestep that are separate streams: most pipelines make one or two per
#: step (conditional and unconditional passes as separate calls), video pipelines that
#: denoise overlapping frame windows one per window. More calls with the same timestep
#: are taken for one-step generations, each a new one (else each would open a stream and
#: keep its buffers for good).
MAX_CALLS_PER_STEP = 16

#: ``(capture, context, index)``: the index-th call with that context name at a step.
StreamKey = tuple[Hashable, "str | None", int]


class CallFacts(NamedTuple):
    """What the clock knows about a call. Tokens are compared with ``==`` only: the
    denoiser gives tokens that are equal for the same tensor object (conditions, the
    sampler's timesteps) or for equal values (``values``)."""

    timestep: float | None                 # the call's timestep; None for a model without one
    capture: Hashable = 0                  # which capture of the model the call fits
    context: str | None = None             # the pipeline's name for the call ("cond", "uncond")
    conditions: tuple[Hashable, ...] = ()  # one token per conditioning input, by identity
    values: Hashable = None                # the conditioning by value (models without a timestep)
    schedule: Hashable = None              # the sampler's timesteps, by identity (None: unknown)


class StreamState(NamedTuple):
    start: int                             # the generation step of its first call
    last: int                              # the generation step of its last call
    conditions: tuple[Hashable, ...] = ()  # the tokens of its last call


class ClockState(NamedTuple):
    """Where the calls are, and what was seen of them. ``ClockState()`` is before any call;
    its mappings are never changed in place (each call makes new ones)."""

    generation: int = -1                   # the current generation's number (-1: none yet)
    step: int = -1                         # the current step of the generation
    timestep: float | None = None          # its timestep
    direction: float | None = None         # +1 or -1: how the timestep moved at the last step
    calls: int = 0                         # calls at the current step, all captures
    values: Hashable = None                # the last call's conditioning values
    schedule: Hashable = None              # the last call's sampler timesteps token
    counts: Mapping[tuple[Hashable, str | None], int] = {}   # calls at this step per (capture, context)
    streams: Mapping[StreamKey, StreamState] = {}
    constant: frozenset[tuple[Hashable, str | None, int]] = frozenset()  # (capture, context, input)
    widths: Mapping[tuple[Hashable, str | None], int] = {}   # most calls per step per (capture, context)


class Placement(NamedTuple):
    """Where a call belongs."""

    generation: int
    step: int                              # the generation's step
    stream: StreamKey
    stream_step: int                       # the stream's own step (0: it starts, warm-up first)
    new_generation: str | None = None      # why this call starts a generation, if it does
    kept_conditions: int | None = None     # conditions that are the objects of the stream's last call


def advance(state: ClockState, facts: CallFacts) -> tuple[ClockState, Placement]:
    """Place a call: the new state and where the call belongs.

    Example:
        >>> state, first = advance(ClockState(), CallFacts(timestep=999.0))
        >>> state, second = advance(state, CallFacts(timestep=979.0))
        >>> first.step, second.step, second.stream_step
        (0, 1, 1)
    """
    why = _new_generation(state, facts)
    if why is not None:
        state = ClockState(generation=state.generation + 1, constant=state.constant, widths=state.widths)
    step, timestep, direction, calls, counts = _at_step(state, facts)
    group = (facts.capture, facts.context)
    index = counts.get(group, 0)
    key: StreamKey = (facts.capture, facts.context, index)
    stream = state.streams.get(key)
    kept, constant = None, state.constant
    if stream is not None and stream.last == step - 1:
        same = [i for i, (a, b) in enumerate(zip(stream.conditions, facts.conditions)) if a == b]
        kept, start = len(same), stream.start
        if index == 0 and any((*group, i) not in constant for i in same):
            constant = constant | {(*group, i) for i in same}
    else:
        start = step
    widths = state.widths
    if index + 1 > widths.get(group, 1):
        widths = {**widths, group: index + 1}
    state = ClockState(state.generation, step, timestep, direction, calls + 1, facts.values, facts.schedule,
                       {**counts, group: index + 1},
                       {**state.streams, key: StreamState(start, step, facts.conditions)}, constant, widths)
    return state, Placement(state.generation, step, key, step - start, why, kept)


def _new_generation(state: ClockState, facts: CallFacts) -> str | None:
    """Why the call starts a new generation, or None."""
    if state.step < 0:
        return "the first call" if state.generation < 0 else "reset() was called"
    if facts.schedule is not None and state.schedule is not None and facts.schedule != state.schedule:
        return "the sampler's timesteps were set up again"
    t = facts.timestep
    if t is None:
        return "new conditioning values" if facts.values != state.values else None
    same_step = t == state.timestep
    if same_step and state.calls >= MAX_CALLS_PER_STEP:
        return "more calls at one timestep than a step makes"
    if not same_step and state.direction is not None and (t - state.timestep) * state.direction < 0:
        return "the timestep moved back"
    if _conditions_replaced(state, facts, same_step):
        return "new conditioning objects"
    return None


def _conditions_replaced(state: ClockState, facts: CallFacts, same_step: bool) -> bool:
    """Whether the call's generation-constant conditioning inputs are all new objects,
    where that tells a new run: compared with the first stream of its context, for the
    first call of the context at a step (that stream's next step), and for a further
    call at the same timestep that the pipeline never made before (the first call of a
    run that repeats the timestep a stopped run was called at)."""
    group = (facts.capture, facts.context)
    constant = [i for capture, context, i in state.constant if (capture, context) == group]
    stream = state.streams.get((*group, 0))
    if stream is None or not constant:
        return False
    at = state.step if same_step else state.step + 1
    index = state.counts.get(group, 0) if same_step else 0
    if index == 0 and stream.last != at - 1:
        return False
    if index > 0 and (index < state.widths.get(group, 1) or stream.last != at):
        return False
    return not any(stream.conditions[i] == facts.conditions[i] for i in constant
                   if i < min(len(stream.conditions), len(facts.conditions)))


def _at_step(state: ClockState, facts: CallFacts) -> tuple[int, float | None, float | None, int,
                                                           Mapping[tuple[Hashable, str | None], int]]:
    """``(step, timestep, direction, calls, counts)`` at the call's step: the current
    step's for another call at its timestep, else the next one's."""
    t = facts.timestep
    if t is not None and t == state.timestep:
        return state.step, t, state.direction, state.calls, state.counts
    direction = state.direction
    if t is not None and state.timestep is not None:
        direction = 1.0 if t > state.timestep else -1.0
    return state.step + 1, t, direction, 0, {}


def reset(state: ClockState) -> ClockState:
    """The state after ``AsyncDenoiser.reset()``: the next call starts a generation (what
    was seen of the inputs is kept)."""
    return ClockState(generation=state.generation, constant=state.constant)
