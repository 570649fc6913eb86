"""The latency simulator on a hand-made plan, and `asyncfx simulate`."""
from __future__ import annotations

import math

import pytest

from asyncfx.app.cli import main
from asyncfx.errors import PlanError
from asyncfx.partitioner.device import DeviceSpec
from asyncfx.partitioner.simulate import simulate
from asyncfx import compile
from conftest import zoo_example
from plans import hand_plan

# 1 GB/s and 1 ms per transfer: a boundary of B bytes costs 1 ms + B ns.
SLOW = DeviceSpec("slow", flops_per_s=1e12, bytes_per_s=1e11, link_bytes_per_s=1e9, link_latency_s=1e-3)


def test_round_times_with_and_without_overlap():
    sim = simulate(hand_plan(), link=SLOW, steps=50, warmup=3)
    # stage 0 sends skip twice (2 x 17 ms) and a once (2 ms); stage 1 sends b (3 ms)
    assert sim.send_seconds == pytest.approx([0.036, 0.003, 0.0])
    assert sim.broadcast_seconds == pytest.approx(1e-3 + 1024e-9)
    # a leaves at 5 ms and arrives at 7 ms, while stage 0 computes; skip is made at its end
    # (10 ms) and takes 2 x 17 ms: stage 0's sends are done at 44 ms, 2 ms before 10 + 36 ms
    assert sim.round_overlapped == pytest.approx(0.044 + sim.broadcast_seconds)
    assert sim.round_serial == pytest.approx(0.010 + 0.036 + sim.broadcast_seconds)
    assert sim.sequential_step == pytest.approx(0.027)                             # measured whole model
    assert sim.total(True) == pytest.approx(3 * 0.027 + 47 * sim.round_overlapped)
    assert sim.speedup(False) < sim.speedup(True) < sim.ideal_speedup


def test_batch_groups_run_at_once_against_the_whole_batch_on_one_device():
    plan = hand_plan()
    plan.groups, plan.whole_batch_cost = 2, 1.5 * plan.sequential_cost  # half a batch: 2/3 of the time
    sim = simulate(plan, link=SLOW, steps=50, warmup=3)
    alone = simulate(hand_plan(), link=SLOW, steps=50, warmup=3)
    assert sim.devices == 2 * alone.devices and sim.groups == 2
    assert sim.broadcast_seconds == pytest.approx(2 * alone.broadcast_seconds)  # each group's share
    assert sim.sequential_total == pytest.approx(50 * 1.5 * alone.sequential_step)
    assert sim.total(True) == pytest.approx(3 * alone.sequential_step + 47 * sim.round_overlapped)
    assert sim.ideal_speedup == pytest.approx(2 * 50 / (3 + 47 / 3))  # three stages in each group
    assert "3 stages in each of 2 batch groups on 6 devices" in sim.summary()
    plan.whole_batch_cost = 0.0  # unknown: priced as the groups one after another
    assert simulate(plan, link=SLOW).sequential_total == pytest.approx(2 * alone.sequential_total)


def test_a_tensor_made_at_its_stages_end_is_sent_after_it():
    plan = hand_plan()
    for boundary in plan.boundaries:
        boundary.made_at = 1.0  # every send after the compute: the same as without overlap
    sim = simulate(plan, link=SLOW, steps=50, warmup=3)
    assert sim.round_overlapped == pytest.approx(sim.round_serial)


def test_compiled_plans_say_when_each_boundary_is_made():
    model, args, kwargs = zoo_example("sd_unet")
    plan = compile(model, 3, example_inputs=(args, kwargs))
    for boundary in plan.boundaries:
        nodes = plan.stages[boundary.producer].nodes
        assert 0.0 < boundary.made_at <= 1.0
        assert (boundary.made_at == 1.0) == (boundary.name == nodes[-1])
    for stage in plan.stages:  # made later in the stage: a larger share
        made = [(stage.nodes.index(b.name), b.made_at) for b in plan.boundaries if b.producer == stage.index]
        assert [share for _, share in sorted(made)] == sorted(share for _, share in made)
    sim = simulate(plan, link="pcie4")
    assert max(*sim.stage_seconds, *sim.send_seconds) <= sim.round_overlapped - sim.broadcast_seconds
    assert sim.round_overlapped <= sim.round_serial


def test_fast_link_is_compute_bound_and_ideal_formula():
    fast = DeviceSpec("fast", 1e12, 1e11, link_bytes_per_s=1e15, link_latency_s=0.0)
    sim = simulate(hand_plan(), link=fast, steps=50, warmup=3, forecast=0.0)  # no forecasting passes
    assert sim.round_overlapped == pytest.approx(0.012, rel=1e-6)   # the slowest stage
    assert sim.ideal_speedup == pytest.approx(50 / (3 + 47 / 3))
    assert sim.speedup() == pytest.approx(50 * 0.027 / (3 * 0.027 + 47 * sim.round_overlapped))


def test_stride_two_runs_two_steps_per_round_on_one_more_device():
    fast = DeviceSpec("fast", 1e12, 1e11, link_bytes_per_s=1e15, link_latency_s=0.0)
    sim = simulate(hand_plan(), link=fast, steps=50, warmup=3, stride=2)
    assert (sim.devices, sim.rounds) == (4, math.ceil(47 / 2))
    assert sim.ideal_speedup == pytest.approx(50 / (3 + 47 / 6))


def test_predicted_times_scale_the_whole_model_by_the_measurements():
    plan = hand_plan()
    plan.measured_sequential = None
    plan.stages[0].measured_seconds = 0.020   # stages measured 40 ms against 30 ms predicted
    sim = simulate(plan, forecast=0.0)
    assert sim.source == "measured"
    assert sim.sequential_step == pytest.approx(0.028 * 0.040 / 0.030)
    unmeasured = simulate(hand_plan(measured=False), forecast=0.0)
    assert unmeasured.source == "predicted from measured node times"  # the hand plan's cost is "measure"
    assert unmeasured.stage_seconds == pytest.approx([0.010, 0.012, 0.008])


@pytest.mark.parametrize("stride", [1, 2])
def test_the_hosts_time_at_each_call_lengthens_every_round(stride):
    """The runtime waits for every stage at each call, then the host collects, the sampler
    steps and the next call is dispatched: the devices idle for that long once per call."""
    fast = DeviceSpec("fast", 1e12, 1e11, link_bytes_per_s=1e15, link_latency_s=0.0)
    busy_host = DeviceSpec("busy host", 1e12, 1e11, link_bytes_per_s=1e15, link_latency_s=0.0,
                           host_seconds_per_call=1e-3)
    free, slow = (simulate(hand_plan(), link=spec, steps=50, warmup=3, stride=stride)
                  for spec in (fast, busy_host))
    assert slow.round_overlapped - free.round_overlapped == pytest.approx(stride * 1e-3)
    assert slow.round_serial - free.round_serial == pytest.approx(stride * 1e-3)
    assert slow.total() - free.total() == pytest.approx(slow.rounds * stride * 1e-3)
    no_host = simulate(hand_plan(), link=busy_host, stride=stride, host_seconds=0.0)
    assert no_host.total() == pytest.approx(free.total())
    assert "host time per call: 1.000 ms" in slow.summary()


def test_presets_charge_the_measured_host_time_and_it_can_be_set():
    from asyncfx.partitioner.device import GPU_HOST_SECONDS_PER_CALL, PRESETS

    gpu_links = ("nvlink", "pcie4")
    assert {PRESETS[name].host_seconds_per_call for name in gpu_links} == {GPU_HOST_SECONDS_PER_CALL}
    assert simulate(hand_plan(), link="nvlink").host_seconds == GPU_HOST_SECONDS_PER_CALL
    assert simulate(hand_plan(), link="nvlink", host_seconds=2e-3).host_seconds == 2e-3
    for bad in (-1e-3, float("nan"), float("inf"), "1 ms"):
        with pytest.raises(PlanError, match="host_seconds must be a finite number of seconds"):
            simulate(hand_plan(), host_seconds=bad)


def test_node_count_plans_need_measurements():
    plan = hand_plan(measured=False)
    plan.cost_unit = "nodes"
    with pytest.raises(PlanError, match="cost='flops' or cost='measure'"):
        simulate(plan)


def test_forecasting_charges_each_stage_twelve_passes_over_what_it_receives(tmp_path, capsys):
    plain, forecast = (simulate(hand_plan(), link=SLOW, forecast=g) for g in (0.0, 0.5))
    plan = hand_plan()
    passes = [12 * plan.bytes_into(k) / SLOW.bytes_per_s for k in range(plan.n_stages)]
    assert forecast.forecast_seconds == pytest.approx(passes) and passes[1] > 0 and not plain.forecast_seconds
    assert forecast.stage_seconds == pytest.approx([s + f for s, f in zip(plain.stage_seconds, passes)])
    assert "(forecasting: " in forecast.summary() and "forecasting" not in plain.summary()
    assert "keeps three versions of each: twice as many bytes again per stage" in plan.summary()
    path = tmp_path / "plan.json"
    plan.save(path)
    assert main(["simulate", str(path), "--forecast", "0.5"]) == 0
    assert "(forecasting: " in capsys.readouterr().out
    assert main(["simulate", str(path), "--refresh", "5", "--cooldown", "1"]) == 0
    assert "cool-down 1, refresh every 5 (" in capsys.readouterr().out
    assert main(["simulate", str(path), "--forecast", "2"]) == 2
    assert "forecast must be a number from 0" in capsys.readouterr().err


def test_sequential_steps_after_warmup_cost_a_whole_model_step_each():
    from asyncfx.schedule import SequentialSteps

    base = simulate(hand_plan(), link=SLOW, steps=50, warmup=3)
    placed = simulate(hand_plan(), link=SLOW, steps=50, warmup=3,
                      sequential=SequentialSteps(cooldown=2, refresh=10))
    # refreshes at steps 12, 22, 32, 42; cool-down at 48 and 49
    assert (base.sequential_count, placed.sequential_count) == (3, 9) and placed.rounds == 41
    assert placed.total() == pytest.approx(9 * placed.sequential_step + 41 * placed.round_overlapped)
    assert placed.ideal_speedup < base.ideal_speedup
    assert "cool-down 2, refresh every 10 (9 sequential steps)" in placed.summary()


@pytest.mark.parametrize("kwargs, match", [({"stride": 3}, "stride must be 1 or 2"),
                                           ({"warmup": 0}, "at least 1")])
def test_bad_schedules(kwargs, match):
    with pytest.raises(PlanError, match=match):
        simulate(hand_plan(), **kwargs)


def test_cli_simulate(tmp_path, capsys):
    path = tmp_path / "plan.json"
    hand_plan().save(path)
    assert main(["simulate", str(path), "--link", "pcie4", "--steps", "20", "--warmup", "2"]) == 0
    out = capsys.readouterr().out
    sim = simulate(hand_plan(), link="pcie4", steps=20, warmup=2)
    assert f"({sim.speedup(True):.2f}x)" in out and "3 stages on 3 devices over pcie4, 20 steps" in out
    assert main(["simulate", str(path), "--link", "pcie4", "--host-ms", "3"]) == 0
    assert "host time per call: 3.000 ms" in capsys.readouterr().out
    assert main(["simulate", str(path), "--host-ms", "-1"]) == 2
    assert "host_seconds must be a finite number" in capsys.readouterr().err


def test_cli_simulate_missing_plan(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_plans_without_a_whole_model_time_must_be_compiled_again():
    plan = hand_plan()
    plan.measured_sequential, plan.sequential_cost = None, 0.0   # as an older asyncfx wrote it
    with pytest.raises(PlanError, match="no whole-model time .* compile it again"):
        simulate(plan)
