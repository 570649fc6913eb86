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


def table(n, total, **kw):
    """Each step's mode and, per run, (stage, timestep, reads[, prior]) as the schedule says."""
    rows = []
    for step in range(total):
        plan = schedule(step, n, total_steps=total, **kw)
        rows.append((str(plan.mode)[0], [(r.stage, r.timestep, r.reads) + ((r.prior,) if r.prior is not None
                                                                            else ()) for r in plan.runs]))
    return rows


def test_cooldown_runs_the_last_steps_on_fresh_values():
    from asyncfx.schedule import SequentialSteps

    got = table(2, 6, warmup=2, sequential=SequentialSteps(cooldown=2))
    assert got == [("s", [(0, 0, 0), (1, 0, 0)]), ("s", [(0, 1, 1), (1, 1, 1)]),
                   ("p", [(0, 2, 1), (1, 2, 1)]), ("p", [(0, 3, 2), (1, 3, 2)]),
                   ("s", [(0, 4, 4), (1, 4, 4)]), ("s", [(0, 5, 5), (1, 5, 5)])]


def test_refresh_makes_every_kth_step_after_warmup_sequential():
    from asyncfx.schedule import SequentialSteps

    # N=2, warm-up 1, refresh 3: two parallel steps, then a sequential one; after it the
    # stages read its fresh version, and a forecast starts over from it
    got = table(2, 8, warmup=1, sequential=SequentialSteps(refresh=3), forecast=0.5)
    assert got == [("s", [(0, 0, 0), (1, 0, 0)]),
                   ("p", [(0, 1, 0), (1, 1, 0)]), ("p", [(0, 2, 1, 0), (1, 2, 1, 0)]),
                   ("s", [(0, 3, 3), (1, 3, 3)]),
                   ("p", [(0, 4, 3), (1, 4, 3)]), ("p", [(0, 5, 4, 3), (1, 5, 4, 3)]),
                   ("s", [(0, 6, 6), (1, 6, 6)]), ("p", [(0, 7, 6), (1, 7, 6)])]


def test_stride_two_rounds_start_again_after_each_sequential_step():
    from asyncfx.schedule import SequentialSteps

    # N=2, warm-up 1, refresh 4 over 10 steps: rounds (1, 2), then step 3 alone (its
    # partner, step 4, is sequential), rounds (5, 6), 7 alone, step 8 sequential, 9 alone
    got = table(2, 10, warmup=1, stride=2, sequential=SequentialSteps(refresh=4), forecast=1.0)
    assert [mode for mode, _ in got] == ["s", "p", "c", "p", "s", "p", "c", "p", "s", "p"]
    assert got[1][1] == [(0, 2, 0), (1, 2, 0), (1, 1, 0)]
    assert got[3][1] == [(0, 3, 2, 0), (1, 3, 2, 0)]       # one step ahead of version 2, two after 0
    assert got[5][1] == [(0, 6, 4), (1, 6, 4), (1, 5, 4)]  # version 4 is fresh: read as it is
    assert got[7][1] == [(0, 7, 6, 4), (1, 7, 6, 4)]
    assert schedule(7, 2, warmup=1, stride=2, total_steps=10, forecast=1.0,
                    sequential=SequentialSteps(refresh=4)).runs[0].lean == 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(cooldown=-1), "cooldown must be a whole number of steps >= 0"),
    (dict(refresh=1.5), "refresh must be a whole number"),
    (dict(refresh=1), "refresh=1 would run every step sequentially"),
])
def test_bad_sequential_steps(kwargs, message):
    from asyncfx.schedule import SequentialSteps

    with pytest.raises(ValueError, match=message):
        SequentialSteps(**kwargs)
    if "cooldown" not in kwargs:
        return
    with pytest.raises(ValueError, match="cooldown places sequential steps at the end"):
        schedule(3, 2, warmup=1, sequential=SequentialSteps(cooldown=2))


def test_a_run_reads_what_stage_0_made_k_steps_back_or_at_the_latest_sequential_step():
    """The origin: stage k at a parallel step computes from what entered stage 0 k steps
    earlier (paper eq. 5), never from before the latest step that ran on fresh values."""
    from asyncfx.schedule import SequentialSteps

    refreshed = SequentialSteps(refresh=4)
    origins = {step: [run.origin for run in schedule(step, 3, warmup=2, sequential=refreshed).runs]
               for step in range(9)}
    assert origins == {0: [0, 0, 0], 1: [1, 1, 1], 2: [2, 1, 1], 3: [3, 2, 1], 4: [4, 3, 2], 5: [5, 5, 5],
                       6: [6, 5, 5], 7: [7, 6, 5], 8: [8, 7, 6]}
    assert all(run.origin is None for run in schedule(3, 2, warmup=1, stride=2, total_steps=8).runs)


def test_a_steps_schedule_is_made_once_for_its_settings():
    forecast = schedule(7, 3, warmup=2, forecast=0.5)
    assert schedule(7, 3, warmup=2, forecast=0.5) is forecast  # remembered: denoisers ask at every call
    plain = schedule(7, 3, warmup=2)
    assert plain is not forecast and plain == schedule(7, 3, warmup=2)
    assert [r.prior for r in forecast.runs] == [5, 5, 5] and [r.prior for r in plain.runs] == [None] * 3


@pytest.mark.parametrize("kwargs, message", [(dict(warmup=True), "warmup must be an integer"),
                                             (dict(warmup=1, stride=True), "stride must be 1 or 2"),
                                             (dict(warmup=[1]), "warmup must be an integer")])
def test_a_setting_equal_to_a_remembered_one_is_still_checked(kwargs, message):
    schedule(3, 2, warmup=1)  # remembered: True equals 1, and is refused all the same
    with pytest.raises(ValueError, match=message):
        schedule(3, 2, **kwargs)
