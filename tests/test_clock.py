"""The call clock's golden tables: where each call of a sampling loop belongs, from facts
about the calls alone (no model). Each row is a call: its facts, then the expected
(generation, step, stream, stream step); a row that starts a generation also says why."""
from __future__ import annotations

import pytest

from asyncfx.runtime.clock import MAX_CALLS_PER_STEP, CallFacts, ClockState, advance, reset


def place(calls: list[CallFacts], state: ClockState | None = None) -> list[tuple]:
    """``(generation, step, (capture, context, index), stream_step)`` of each call, with
    the reason when the call starts a generation (after the first call's)."""
    state = state or ClockState()
    rows = []
    for facts in calls:
        state, at = advance(state, facts)
        row = (at.generation, at.step, at.stream, at.stream_step)
        rows.append(row + (at.new_generation,) if at.new_generation not in (None, "the first call") else row)
    return rows


def t(value: float, capture: object = 0, context: str | None = None, conditions: tuple = (),
      schedule: object = None) -> CallFacts:
    return CallFacts(timestep=value, capture=capture, context=context, conditions=conditions,
                     schedule=schedule)


def test_one_call_per_step():
    assert place([t(999), t(979), t(959)]) == [
        (0, 0, (0, None, 0), 0),
        (0, 1, (0, None, 0), 1),
        (0, 2, (0, None, 0), 2)]


def test_two_calls_per_step_are_two_streams():
    assert place([t(999), t(999), t(979), t(979)]) == [
        (0, 0, (0, None, 0), 0), (0, 0, (0, None, 1), 0),
        (0, 1, (0, None, 0), 1), (0, 1, (0, None, 1), 1)]


def test_a_timestep_repeated_by_the_scheduler_is_a_second_stream():
    """Heun's sampler evaluates each timestep but the first twice in a row."""
    assert place([t(999), t(979), t(979), t(959), t(959)]) == [
        (0, 0, (0, None, 0), 0),
        (0, 1, (0, None, 0), 1), (0, 1, (0, None, 1), 0),
        (0, 2, (0, None, 0), 2), (0, 2, (0, None, 1), 1)]


def test_timesteps_counting_up_are_one_generation_until_they_move_back():
    assert place([t(0.1), t(0.3), t(0.5), t(0.2), t(0.4)]) == [
        (0, 0, (0, None, 0), 0), (0, 1, (0, None, 0), 1), (0, 2, (0, None, 0), 2),
        (1, 0, (0, None, 0), 0, "the timestep moved back"), (1, 1, (0, None, 0), 1)]


def test_a_timestep_moving_back_starts_a_new_generation():
    assert place([t(999), t(979), t(999), t(979)]) == [
        (0, 0, (0, None, 0), 0), (0, 1, (0, None, 0), 1),
        (1, 0, (0, None, 0), 0, "the timestep moved back"), (1, 1, (0, None, 0), 1)]


def test_a_stream_that_missed_a_step_starts_over():
    """The unconditional pass at steps 0, 1 and 3 only (guidance off at step 2)."""
    assert place([t(999), t(999), t(979), t(979), t(959), t(939), t(939)]) == [
        (0, 0, (0, None, 0), 0), (0, 0, (0, None, 1), 0),
        (0, 1, (0, None, 0), 1), (0, 1, (0, None, 1), 1),
        (0, 2, (0, None, 0), 2),
        (0, 3, (0, None, 0), 3), (0, 3, (0, None, 1), 0)]


def test_named_contexts_are_the_streams():
    """A pipeline that names its calls keeps them apart by name, in any order, also when
    a step skips one of them."""
    assert place([t(999, context="cond"), t(999, context="uncond"),
                  t(979, context="uncond"), t(979, context="cond"),
                  t(959, context="cond"),
                  t(939, context="uncond"), t(939, context="cond")]) == [
        (0, 0, (0, "cond", 0), 0), (0, 0, (0, "uncond", 0), 0),
        (0, 1, (0, "uncond", 0), 1), (0, 1, (0, "cond", 0), 1),
        (0, 2, (0, "cond", 0), 2),
        (0, 3, (0, "uncond", 0), 0), (0, 3, (0, "cond", 0), 3)]


def test_alternating_captures_each_keep_their_streams():
    """Two kinds of call (two captures) at every step, and a third kind at one step."""
    calls = [t(999, "a"), t(999, "b"), t(979, "a"), t(979, "b"), t(979, "c"), t(959, "a"), t(959, "b")]
    assert place(calls) == [
        (0, 0, ("a", None, 0), 0), (0, 0, ("b", None, 0), 0),
        (0, 1, ("a", None, 0), 1), (0, 1, ("b", None, 0), 1), (0, 1, ("c", None, 0), 0),
        (0, 2, ("a", None, 0), 2), (0, 2, ("b", None, 0), 2)]


def test_more_calls_at_one_timestep_than_a_step_makes_are_one_step_generations():
    rows = place([t(999)] * (MAX_CALLS_PER_STEP + 2))
    assert [row[:2] for row in rows] == [(0, 0)] * MAX_CALLS_PER_STEP + [(1, 0), (1, 0)]
    assert rows[MAX_CALLS_PER_STEP][4] == "more calls at one timestep than a step makes"


def test_new_objects_for_generation_constant_conditioning_start_a_generation():
    """The prompt embeddings stay the same object from step to step, so new ones at the
    next step's call mean a new pipeline run, also one that goes on downwards (image to
    image after a text-to-image run that stopped at step 2)."""
    embeds, other = ("e1",), ("e2",)
    assert place([t(999, conditions=embeds), t(979, conditions=embeds), t(959, conditions=embeds),
                  t(700, conditions=other), t(650, conditions=other)]) == [
        (0, 0, (0, None, 0), 0), (0, 1, (0, None, 0), 1), (0, 2, (0, None, 0), 2),
        (1, 0, (0, None, 0), 0, "new conditioning objects"), (1, 1, (0, None, 0), 1)]


def test_a_run_stopped_after_one_call_is_not_continued():
    """Once seen that the embeddings are kept, a run that repeats the timestep where a
    stopped run was called, with new embeddings, is a new run from its first call (the
    pipeline never made two calls at a step)."""
    first, stopped, next_run = ("e1",), ("e2",), ("e3",)
    rows = place([t(999, conditions=first), t(979, conditions=first),
                  t(999, conditions=stopped),
                  t(999, conditions=next_run), t(979, conditions=next_run), t(959, conditions=next_run)])
    assert rows == [
        (0, 0, (0, None, 0), 0), (0, 1, (0, None, 0), 1),
        (1, 0, (0, None, 0), 0, "the timestep moved back"),
        (2, 0, (0, None, 0), 0, "new conditioning objects"), (2, 1, (0, None, 0), 1), (2, 2, (0, None, 0), 2)]


def test_a_second_call_the_pipeline_makes_at_every_step_is_a_stream_not_a_run():
    """Where a pipeline makes the unconditional pass as a second call at every step, a
    second call with other objects is that pass (Heun's second call keeps the objects)."""
    rows = place([t(999, conditions=("pos",)), t(999, conditions=("neg",)),
                  t(979, conditions=("pos",)), t(979, conditions=("neg",)),
                  t(979, conditions=("pos",))])
    assert [row[:4] for row in rows] == [
        (0, 0, (0, None, 0), 0), (0, 0, (0, None, 1), 0),
        (0, 1, (0, None, 0), 1), (0, 1, (0, None, 1), 1), (0, 1, (0, None, 2), 0)]


def test_conditioning_made_anew_at_every_step_is_not_a_new_generation():
    """ControlNet residuals are new every step beside kept embeddings; a model whose only
    conditioning is made anew every step keeps its generation too."""
    assert [row[:2] for row in place([t(999, conditions=("e", "r1")), t(979, conditions=("e", "r2")),
                                      t(959, conditions=("e", "r3"))])] == [(0, 0), (0, 1), (0, 2)]
    assert [row[:2] for row in place([t(999, conditions=("r1",)), t(979, conditions=("r2",)),
                                      t(959, conditions=("r3",))])] == [(0, 0), (0, 1), (0, 2)]


def test_the_unconditional_call_may_make_its_conditioning_anew():
    """Only the first call of each context at a step is compared by identity."""
    rows = place([t(999, conditions=("pos",)), t(999, conditions=("zeros0",)),
                  t(979, conditions=("pos",)), t(979, conditions=("zeros1",)),
                  t(959, conditions=("pos",)), t(959, conditions=("zeros2",))])
    assert [row[:4] for row in rows] == [
        (0, 0, (0, None, 0), 0), (0, 0, (0, None, 1), 0),
        (0, 1, (0, None, 0), 1), (0, 1, (0, None, 1), 1),
        (0, 2, (0, None, 0), 2), (0, 2, (0, None, 1), 2)]


def test_the_samplers_timesteps_set_up_again_start_a_generation():
    assert place([t(999, schedule="s1"), t(979, schedule="s1"), t(959, schedule="s2")]) == [
        (0, 0, (0, None, 0), 0), (0, 1, (0, None, 0), 1),
        (1, 0, (0, None, 0), 0, "the sampler's timesteps were set up again")]


def test_without_a_timestep_new_conditioning_values_start_a_generation():
    calls = [CallFacts(None, values=v) for v in ("v1", "v1", "v1", "v2")]
    assert place(calls) == [
        (0, 0, (0, None, 0), 0), (0, 1, (0, None, 0), 1), (0, 2, (0, None, 0), 2),
        (1, 0, (0, None, 0), 0, "new conditioning values")]


def test_reset_starts_a_generation_and_keeps_what_was_seen():
    state = ClockState()
    for facts in (t(999, conditions=("e",)), t(979, conditions=("e",))):
        state, _ = advance(state, facts)
    state = reset(state)
    assert place([t(959, conditions=("e",))], state) == [(1, 0, (0, None, 0), 0, "reset() was called")]
    assert reset(state).constant == {(0, None, 0)}


@pytest.mark.parametrize("kept, expected", [(("e",), 1), (("other",), 0)])
def test_a_placement_counts_the_conditioning_kept_since_the_streams_last_call(kept, expected):
    state, _ = advance(ClockState(), t(999, conditions=("e",)))
    _, at = advance(state, t(979, conditions=kept))
    assert at.kept_conditions == expected
