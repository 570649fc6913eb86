"""The schedule: the paper's examples as tables."""
from __future__ import annotations

import pytest

from asyncfx.schedule import Mode, devices_needed, schedule


def runs(step, n, **kw):
    return [(r.stage, r.timestep, r.reads, r.writes, r.gives, r.slot) for r in schedule(step, n, **kw).runs]


def test_warmup_steps_run_in_order_on_fresh_values():
    plan = schedule(1, 3, warmup=2)
    assert plan.mode is Mode.SEQUENTIAL
    #        stage timestep reads writes gives slot
    assert runs(1, 3, warmup=2) == [(0, 1, 1, 1, None, 0), (1, 1, 1, 1, None, 1), (2, 1, 1, 1, 1, 2)]


def test_first_step_after_warmup_reads_the_warmup_values():
    assert schedule(2, 3, warmup=2).mode is Mode.PARALLEL
    assert runs(2, 3, warmup=2) == [(0, 2, 1, 2, None, 0), (1, 2, 1, 2, None, 1), (2, 2, 1, None, 2, 2)]


def test_paper_chain_n3_w2():
    # eps_5 = C2(C1(C0(x3, t3), t4), t5): step 5's stage 2 reads version 4, made by stage 1
    # at step 4, which read version 3, made by stage 0 at step 3 from x3 and t3.
    chain, version = [], 5
    for stage in (2, 1, 0):
        run = next(r for r in schedule(version, 3, warmup=2).runs if r.stage == stage)
        chain.append((stage, run.timestep))
        version = run.reads
    assert chain == [(2, 5), (1, 4), (0, 3)]


def test_time_shift_uses_the_previous_timestep_after_warmup():
    assert [r.timestep for r in schedule(1, 2, warmup=2, time_shift=True).runs] == [1, 1]
    assert [r.timestep for r in schedule(4, 2, warmup=2, time_shift=True).runs] == [3, 3]


def test_stride_two_rounds():
    # N=2, W=1, 6 steps: rounds at steps 1 and 3; steps 2 and 4 return the cached result.
    assert runs(1, 2, warmup=1, stride=2, total_steps=6) == [
        (0, 2, 0, 2, None, 0), (1, 2, 0, None, 2, 1), (1, 1, 0, None, 1, 2)]
    assert schedule(2, 2, warmup=1, stride=2, total_steps=6).mode is Mode.CACHED
    assert runs(3, 2, warmup=1, stride=2, total_steps=6) == [
        (0, 4, 2, 4, None, 0), (1, 4, 2, None, 4, 1), (1, 3, 2, None, 3, 2)]
    # step 5 starts a round without a partner: a stride-1 step
    assert runs(5, 2, warmup=1, stride=2, total_steps=6) == [(0, 5, 4, 5, None, 0), (1, 5, 4, None, 5, 1)]
    assert devices_needed(2, 2) == 3 and devices_needed(3, 1) == 3


def test_single_stage_needs_no_warmup():
    assert runs(0, 1, warmup=0) == [(0, 0, -1, None, 0, 0)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=0, n_stages=0, warmup=1), "at least one stage"),
    (dict(step=-1, n_stages=2, warmup=1), "step must be >= 0"),
    (dict(step=0, n_stages=2, warmup=0), "warmup must be at least 1"),
    (dict(step=0, n_stages=2, warmup=1, stride=3), "stride must be 1 or 2"),
    (dict(step=0, n_stages=2, warmup=1, stride=2), "stride 2 needs total_steps"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedule(**kwargs)
