"""Re-cutting a compiled plan from the stage times the runtime measures."""
from __future__ import annotations

import logging

import pytest
import torch

import asyncfx
from asyncfx.partitioner.compile import compile_with_costs
from asyncfx.partitioner.rebalance import MAX_RECUTS, Rebalancer, balance
from asyncfx.partitioner.refine import plan_positions
from asyncfx.runtime.executor import MeasuredStages, StageTimes
from conftest import mispriced_example, sample

STEPS = 8


@pytest.fixture(scope="module")
def mispriced():
    model, kwargs = mispriced_example()
    return model, kwargs, asyncfx.capture(model, (), kwargs)


def run_generations(den, kwargs, count: int) -> list[tuple[torch.Tensor, asyncfx.StagePlan]]:
    """Each generation's sample and the plan it ran with (re-cuts happen at a generation's
    last warm-up step, so the plan after it is the one its parallel steps used)."""
    torch.set_num_threads(1)
    return [(sample(den, kwargs, "sample", steps=STEPS), den.plan) for _ in range(count)]


def serial(model, kwargs, plan: asyncfx.StagePlan) -> torch.Tensor:
    den = asyncfx.partition(model, plan.n_stages, plan=plan, executor="serial", warmup=3)
    return sample(den, kwargs, "sample", steps=STEPS)


def test_a_mispriced_plan_is_recut_at_the_first_generation_logged_and_exact(mispriced, caplog):
    model, kwargs, _ = mispriced
    compiled = asyncfx.compile(model, 2, example_inputs=((), kwargs))
    den = asyncfx.partition(model, 2, warmup=3, devices=["cpu", "cpu"], rebalance=True)
    with caplog.at_level(logging.INFO, logger="asyncfx.partitioner.rebalance"):
        generations = run_generations(den, kwargs, 2)
    den.close()
    recuts = [r.getMessage() for r in caplog.records if "re-cut 1:" in r.getMessage()]
    assert len(recuts) == 1 and "(one after another)" in recuts[0], caplog.text  # in the first generation
    assert "max/mean" in recuts[0] and "predicted" in recuts[0]
    first_plan = generations[0][1]
    assert first_plan is not compiled and first_plan.notes[-1].startswith("re-cut")
    # the sorting half was priced cheap, so the re-cut moves work into the first stage
    assert plan_positions(first_plan)[0] > plan_positions(compiled)[0]
    for got, plan in generations:
        torch.testing.assert_close(got, serial(model, kwargs, plan), rtol=0, atol=0)


def test_a_plan_under_a_step_cache_is_not_recut(caplog):
    """A step cache's memory lives in the stages, and the stages run from the first step:
    a re-cut at the last warm-up step would start it afresh in the middle of the
    generation. The mispriced plan, re-cut without a cache (above), stays as compiled,
    and the workers sample what the serial executor samples with the same cache."""
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    config = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, max_order=1,
                                   taylor_factors_dtype=torch.float32, cache_identifiers=[r"first\.\d+"])
    results = {}
    for executor in ("local", "serial"):
        model, kwargs = mispriced_example()
        apply_taylorseer_cache(model, config)
        den = asyncfx.partition(model, 2, layout="1x2", warmup=STEPS, executor=executor, rebalance=True)
        with caplog.at_level(logging.INFO, logger="asyncfx.partitioner.rebalance"):
            results[executor] = run_generations(den, kwargs, 1)[0]
        den.close()
    assert "re-cut" not in caplog.text and not any("re-cut" in note for note in results["local"][1].notes)
    torch.testing.assert_close(results["local"][0], results["serial"][0], rtol=0, atol=0)


def test_a_given_plan_is_never_recut(mispriced, caplog):
    model, kwargs, captured = mispriced
    plan = asyncfx.compile(captured, 2)
    given = asyncfx.partition(captured, 2, plan=plan, warmup=3, devices=["cpu", "cpu"], rebalance=True)
    switched_off = asyncfx.partition(captured, 2, rebalance=False, warmup=3, devices=["cpu", "cpu"])
    with caplog.at_level(logging.INFO, logger="asyncfx.partitioner.rebalance"):
        for den in (given, switched_off):
            run_generations(den, kwargs, 2)
            assert plan_positions(den.plan) == plan_positions(plan)
            den.close()
    assert given.plan is plan and not caplog.records and not plan.notes


def test_a_plan_to_recut_is_built_two_steps_before_the_last_warmup_step(mispriced):
    model, kwargs, captured = mispriced
    for rebalance, built in ((True, "stages built at warm-up step 1 (timed before the last, to re-cut)"),
                             (False, "stages built at the last warm-up step")):
        den = asyncfx.partition(captured, 2, warmup=4, executor="serial", rebalance=rebalance)
        den(**kwargs)
        assert repr(den).endswith(f": captured; {built})") and den.executor is None
        den(**{**kwargs, "timestep": torch.tensor(900.0)})
        assert (den.executor is not None) == rebalance  # built at step 1 only to re-cut


def test_rebalance_must_be_a_bool():
    with pytest.raises(asyncfx.PlanError, match=r"rebalance must be True or False, got 'no'"):
        asyncfx.partition(torch.nn.Linear(2, 2), 2, rebalance="no")


def test_the_rebalancer_moves_cuts_towards_the_slow_stage_and_goes_back_when_worse(mispriced):
    _, _, captured = mispriced
    compiled = compile_with_costs(captured, 2)
    rebalancer = Rebalancer(compiled.model, compiled.plan)
    assert rebalancer.observe([0.010, 0.0102], parallel=False) is None  # balanced: kept
    assert rebalancer.observe([0.0001, 0.0005], parallel=False) is None  # too little to gain
    assert not rebalancer.finished  # measured one stage after another: the parallel steps may differ
    better = rebalancer.observe([0.002, 0.020], parallel=True)
    assert better is not None and rebalancer.plan is better and rebalancer.recuts == 1
    assert plan_positions(better)[0] > plan_positions(compiled.plan)[0]
    assert compiled.plan.stages[1].measured_seconds == 0.020
    # the new plan measures slower than the first did: back to the first, and done
    assert rebalancer.observe([0.030, 0.021], parallel=True) is compiled.plan
    assert rebalancer.finished and rebalancer.observe([0.002, 0.020], parallel=True) is None
    assert compiled.plan.notes[-1].startswith("back to an earlier plan")


def test_the_rebalancer_stops_after_max_recuts(mispriced):
    _, _, captured = mispriced
    compiled = compile_with_costs(captured, 2)
    rebalancer = Rebalancer(compiled.model, compiled.plan)
    for round_index in range(MAX_RECUTS + 2):
        slow = 0.050 - 0.001 * round_index  # each plan a little faster, yet never balanced
        seconds = [0.005, slow] if round_index % 2 == 0 else [slow, 0.005]
        rebalancer.observe(seconds, parallel=True)
    assert rebalancer.recuts <= MAX_RECUTS and rebalancer.finished


def test_a_plan_measured_balanced_at_parallel_steps_is_final(mispriced):
    _, _, captured = mispriced
    compiled = compile_with_costs(captured, 2)
    rebalancer = Rebalancer(compiled.model, compiled.plan)
    assert rebalancer.observe([0.010, 0.0102], parallel=True) is None and rebalancer.finished
    assert rebalancer.observe([0.002, 0.020], parallel=True) is None  # final: weights may be gone


def test_stage_times_drop_first_runs_keep_the_fastest_and_prefer_parallel_ones():
    times = StageTimes(2)
    assert times.take() is None
    for seconds in (9.0, 0.2, 0.4):
        times.record(0, seconds, parallel=False)
        times.record(1, None, parallel=False)  # a run that captured a CUDA graph
    times.record(1, 5.0, parallel=False)  # stage 1's first timed run: cold
    times.record(1, 0.6, parallel=False)
    assert times.take() == MeasuredStages([0.2, 0.6], False)
    assert times.take() is None  # taken: forgotten
    for stage in (0, 1):
        times.record(stage, 0.1 * (stage + 1), parallel=True)
        times.record(stage, 0.9, parallel=False)
    assert times.take() == MeasuredStages([0.1, 0.2], True)
    assert balance([3.0, 1.0]) == 1.5


def test_stage_times_keep_only_the_latest_runs_until_taken():
    from asyncfx.runtime.executor import KEPT_RUNS

    times = StageTimes(1)
    for index in range(3 * KEPT_RUNS + 1):  # never taken, as with a plan that is never re-cut
        times.record(0, 0.001 * (index + 1), parallel=True)
    assert times.take() == MeasuredStages([0.001 * (2 * KEPT_RUNS + 2)], True)
