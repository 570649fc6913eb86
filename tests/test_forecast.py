"""Forecasting stale values: the schedule's tables, the formula on values linear in the
step, the executors' agreement, and the option's errors."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import asyncfx
from asyncfx.errors import PlanError
from asyncfx.schedule import Mode, schedule
from conftest import sample, zoo_captured, zoo_example
from test_runtime import COEFFICIENTS, Chain


def runs(step, n, **kw):
    """(stage, timestep, reads, prior, lean, older) of each run, and what the store keeps from."""
    plan = schedule(step, n, **kw)
    return [(r.stage, r.timestep, r.reads, r.prior, r.lean, r.older) for r in plan.runs], plan.keep_from


def test_forecasting_reads_the_newest_three_versions_with_the_steps_distance():
    # N=2, warm-up 2, stride 1: the first parallel step has one version (the last warm-up
    # step's: the stages may not run before it) and reads it as it is
    assert runs(1, 2, warmup=2, forecast=0.5) == ([(0, 1, 1, None, 0.0, None), (1, 1, 1, None, 0.0, None)], 1)
    assert runs(2, 2, warmup=2, forecast=0.5) == ([(0, 2, 1, None, 0.0, None), (1, 2, 1, None, 0.0, None)], 1)
    #        stage timestep reads prior lean = g * (timestep - reads) / (reads - prior), older
    assert runs(3, 2, warmup=2, forecast=0.5) == ([(0, 3, 2, 1, 0.5, None), (1, 3, 2, 1, 0.5, None)], 1)
    assert runs(4, 2, warmup=2, forecast=0.5) == ([(0, 4, 3, 2, 0.5, 1), (1, 4, 3, 2, 0.5, 1)], 2)
    assert runs(7, 2, warmup=2, forecast=0.5) == ([(0, 7, 6, 5, 0.5, 4), (1, 7, 6, 5, 0.5, 4)], 5)
    # off: the plain schedule, keeping only the newest version
    assert runs(7, 2, warmup=2) == ([(0, 7, 6, None, 0.0, None), (1, 7, 6, None, 0.0, None)], 7)


def test_stride_two_forecasts_over_the_rounds_versions():
    kw = dict(warmup=2, stride=2, total_steps=9, forecast=1.0)
    # first round (steps 2, 3): one version, read as it is
    assert runs(2, 2, **kw) == ([(0, 3, 1, None, 0.0, None), (1, 3, 1, None, 0.0, None),
                                 (1, 2, 1, None, 0.0, None)], 1)
    assert schedule(3, 2, **kw).mode is Mode.CACHED
    # later rounds: versions two steps apart (3 and 1); stages compute the step after the
    # round's (two ahead of version 3), the extra run the round's own (one ahead); from
    # the third round on, the version before those measures the trend
    assert runs(4, 2, **kw) == ([(0, 5, 3, 1, 1.0, None), (1, 5, 3, 1, 1.0, None),
                                 (1, 4, 3, 1, 0.5, None)], 1)
    assert runs(6, 2, **kw) == ([(0, 7, 5, 3, 1.0, 1), (1, 7, 5, 3, 1.0, 1), (1, 6, 5, 3, 0.5, 1)], 3)
    # the last step, without a partner, runs as a stride-1 step one step ahead of version 7
    assert runs(8, 2, **kw)[0] == [(0, 8, 7, 5, 0.5, 3), (1, 8, 7, 5, 0.5, 3)]


def chain(executor: str, forecast: float, stride: int = 1, scheduler=None, **settings):
    x = torch.zeros(1, dtype=torch.float64)
    t = torch.zeros((), dtype=torch.float64)
    plan = asyncfx.compile(Chain(), 3, example_inputs=(x, t), cost="uniform")
    return asyncfx.partition(Chain(), 3, example_inputs=(x, t), plan=plan, warmup=2, stride=stride,
                             executor=executor, scheduler=scheduler, forecast=forecast, **settings)


@pytest.mark.parametrize("executor", ["serial", "local"])
@pytest.mark.parametrize("stride", [1, 2])
def test_undamped_forecast_of_values_linear_in_the_step_is_the_fresh_value(executor, stride):
    """Latent and timestep move linearly with the step, so every boundary does: forecast
    from its last two versions, each is exact, and so is every step's output (stride 2's
    latent of the step ahead included), once every stage reads versions made from exact
    ones (the first parallel step reads one stale version as it is, and each stage passes
    its error on for a step or round); plain reuse is wrong at every parallel step."""
    steps, warmup, stages = 12, 2, 3
    xs = [1000.0 + 7.0 * s for s in range(steps)]
    ts = [60.0 - 5.0 * s for s in range(steps)]
    scheduler = SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64))
    fresh = [x + sum(COEFFICIENTS) * t for x, t in zip(xs, ts)]
    exact_from = warmup + stride * stages
    for forecast in (1.0, 0.0):
        den = chain(executor, forecast, stride, scheduler if stride == 2 else None)
        got = [den(torch.tensor([x], dtype=torch.float64), torch.tensor(t, dtype=torch.float64)).item()
               for x, t in zip(xs, ts)]
        den.close()
        assert got[:warmup] == fresh[:warmup]
        if forecast:
            assert got[exact_from:] == fresh[exact_from:] and got[warmup] != fresh[warmup]
        else:
            assert all(abs(g - f) > 1 for g, f in zip(got[warmup:], fresh[warmup:]))


def test_damped_forecast_reads_the_formula():
    """g = 0.5, N=3, warm-up 2: step 2 reads version 1 as it is; step 3 reads B1 + 0.5 *
    (B1 - B2) of stage k-1's versions 2 and 1; from step 4 on the lean is scaled by the
    trend, how much of the change B3 -> B2 the change B2 -> B1 continued (from 0, turned
    back, to 1, at least as much); the output is what that makes, step by step."""
    xs = [1000.0, 2000.0, 3000.0, 5000.0, 9000.0, 8000.0, 8500.0, 8600.0, 8700.0]
    ts = [50.0 - 3 * s for s in range(len(xs))]
    den = chain("serial", 0.5)
    got = [den(torch.tensor([x], dtype=torch.float64), torch.tensor(t, dtype=torch.float64)).item()
           for x, t in zip(xs, ts)]
    values, trends = {}, set()  # (stage, version) -> what it wrote; the trends read
    for s, (x, t) in enumerate(zip(xs, ts)):
        for k, c in enumerate(COEFFICIENTS):
            if k == 0:
                read = x
            elif s <= 2:
                read = values[(k - 1, s if s < 2 else 1)]
            else:
                b1, b2 = values[(k - 1, s - 1)], values[(k - 1, s - 2)]
                trend = 1.0 if s == 3 else min(max((b1 - b2) / (b2 - values[(k - 1, s - 3)]), 0.0), 1.0)
                trends.add(round(trend, 3))
                read = b1 + 0.5 * trend * (b1 - b2)
            values[(k, s)] = read + c * t
    assert got == pytest.approx([values[(2, s)] for s in range(len(xs))], rel=1e-12)
    assert {0.0, 1.0} < trends and any(0 < trend < 1 for trend in trends)  # every case was read


def test_forecasting_workers_equal_serial():
    _, _, kwargs = zoo_example("sd_unet")
    model = zoo_captured("sd_unet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every worker and the serial run on one thread: bitwise equal
    try:
        serial = sample(asyncfx.partition(model, 3, warmup=2, executor="serial", forecast=0.5), kwargs,
                        "sample")
        plain = sample(asyncfx.partition(model, 3, warmup=2, executor="serial", forecast=0.0), kwargs,
                       "sample")
        den = asyncfx.partition(model, 3, warmup=2, executor="local", forecast=0.5, rebalance=False)
        torch.testing.assert_close(sample(den, kwargs, "sample"), serial, rtol=0, atol=0)
        den.close()
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(serial, plain)


def test_forecasting_is_on_by_default_and_off_with_time_shift():
    assert asyncfx.PartitionOptions().forecast == asyncfx.DEFAULT_FORECAST == 0.5
    assert asyncfx.PartitionOptions(time_shift=True).forecast == 0.0  # nothing to forecast
    assert asyncfx.PartitionOptions(forecast=0).forecast == 0.0      # AsyncDiff's plain reuse


@pytest.mark.parametrize("settings, message", [
    (dict(forecast=1.5), r"forecast must be a number from 0 \(off: stale values are read as they are\) to 1"),
    (dict(forecast="on"), "forecast must be a number"),
    (dict(forecast=True), "forecast must be a number"),
    (dict(forecast=0.5, time_shift=True), "nothing to forecast: pass forecast=0 with time_shift=True"),
])
def test_bad_forecast_settings_are_refused(settings, message):
    with pytest.raises(PlanError, match=message):
        asyncfx.partition(zoo_captured("sd_unet"), 2, **settings)


@pytest.mark.parametrize("executor", ["serial", "local"])
def test_refresh_and_cooldown_steps_compute_fresh_values_and_the_next_steps_read_them(executor):
    """N=3, warm-up 2, refresh 3, cool-down 1 over 9 steps: steps 0, 1, 4, 7 and 8 run
    sequentially (the original model's output); after the refresh at step 4 the stages
    read its fresh versions (the paper's chain restarts from x4)."""
    xs = [1000.0 * (s + 1) for s in range(9)]
    ts = [90.0 - 7 * s for s in range(9)]
    c0, c1, c2 = COEFFICIENTS
    x, t = torch.zeros(1, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    plan = asyncfx.compile(Chain(), 3, example_inputs=(x, t), cost="uniform")
    den = asyncfx.partition(Chain(), 3, example_inputs=(x, t), plan=plan, warmup=2, executor=executor,
                            refresh=3, cooldown=1, forecast=0.0,
                            scheduler=SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64)))
    got = [den(torch.tensor([x], dtype=torch.float64), torch.tensor(t, dtype=torch.float64)).item()
           for x, t in zip(xs, ts)]
    den.close()
    for step in (0, 1, 4, 7, 8):
        assert got[step] == xs[step] + (c0 + c1 + c2) * ts[step]
    assert got[5] == xs[4] + c0 * ts[4] + c1 * ts[4] + c2 * ts[5]
    assert got[6] == xs[4] + c0 * ts[4] + c1 * ts[5] + c2 * ts[6]
    assert got[3] == xs[1] + c0 * ts[1] + c1 * ts[2] + c2 * ts[3]


def test_cooldown_needs_the_scheduler():
    with pytest.raises(asyncfx.SchedulerError, match="cooldown runs the last steps of each generation"):
        asyncfx.partition(zoo_captured("sd_unet"), 2, cooldown=2)
    with pytest.raises(PlanError, match="refresh=1 would run every step sequentially"):
        asyncfx.partition(zoo_captured("sd_unet"), 2, refresh=1)


@pytest.mark.parametrize("executor", ["serial", "local"])
def test_warmup_goes_on_while_the_prediction_changes_more_than_switch_below(executor):
    """Chain's output is x_s + 111 t_s: it changes by 15-26% a step while the latent grows
    by 40% a step, then by under 3%: switch_below=0.1 extends warm-up 2 to steps 0-4 (the
    original model's outputs) and runs the parallel steps from step 5."""
    xs = [1000.0, 1400.0, 1960.0, 2744.0, 2770.0, 2797.0, 2825.0, 2853.0]
    ts = [8.0 - s for s in range(len(xs))]
    den = chain(executor, 0.0, switch_below=0.1)
    got = [den(torch.tensor([x], dtype=torch.float64), torch.tensor(t, dtype=torch.float64)).item()
           for x, t in zip(xs, ts)]
    den.close()
    fresh = [x + sum(COEFFICIENTS) * t for x, t in zip(xs, ts)]
    assert got[:5] == fresh[:5] and all(g != f for g, f in zip(got[5:], fresh[5:]))
    c0, c1, c2 = COEFFICIENTS  # step 5 reads version 4, the last warm-up step's
    assert got[5] == xs[4] + c0 * ts[4] + c1 * ts[4] + c2 * ts[5]
    with pytest.raises(PlanError, match="switch_below must be a number >= 0"):
        asyncfx.partition(zoo_captured("sd_unet"), 2, switch_below=-0.1)
