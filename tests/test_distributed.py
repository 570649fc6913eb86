"""The distributed executor with real gloo process groups, spawned by the test."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import time
from multiprocessing import forkserver
from unittest import mock

import torch
import torch.multiprocessing as mp

import asyncfx
from asyncfx.zoo.tiny import ZOO
from conftest import ddim, mispriced_example, sample, with_step_cache, zoo_captured, zoo_example
from distributed_worker import LATENT, run, run_scenarios

STEPS = 10


def start_ranks(function, args: tuple, world: int) -> None:
    """``world`` rank processes running ``function(rank, *args)``, forked from a server
    process that imported torch, diffusers and the worker module once (each spawned
    interpreter would import them again); fresh processes all the same, with no state of
    this one."""
    mp.set_forkserver_preload(["distributed_worker"])
    with worker_importable():  # the server starts at the first call and keeps running
        forkserver.ensure_running()
    mp.start_processes(function, args=args, nprocs=world, start_method="forkserver", join=True)


def worker_importable() -> contextlib.AbstractContextManager:
    """Interpreters started inside find this folder's modules: Python 3.11's forkserver
    does not take the parent's ``sys.path``, and would skip preloading a module it cannot
    import (each rank would then import it, with torch and diffusers, on its own)."""
    path = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return mock.patch.dict(os.environ, {"PYTHONPATH": path})


def spawn(tmp_path, world: int, model_name: str, dying_rank=None, timeout_s=60.0, stride=1,
          guided_at=()) -> float:
    init_file = tmp_path / "init"
    start = time.perf_counter()
    start_ranks(run, (world, str(init_file), str(tmp_path), model_name, STEPS, dying_rank, timeout_s, stride,
                      guided_at), world)
    return time.perf_counter() - start


def serial_result(model_name: str, world: int, stride: int = 1, guided_at=(),
                  plan: asyncfx.StagePlan | None = None, forecast: float = 0.0,
                  groups: int = 1) -> torch.Tensor:
    """The serial executor's sample, with the plan given (and the warm-up the worker uses
    with it), else with the compiled one (computed once per setting: scenarios share them);
    ``groups``: batch groups of ``world / groups`` ranks each."""
    if plan is None:
        return _compiled_serial_result(model_name, world, stride, guided_at, forecast, groups).clone()
    return _serial_result(model_name, world, stride, guided_at, plan, forecast, groups)


@functools.cache
def _compiled_serial_result(model_name: str, world: int, stride: int, guided_at: tuple[int, ...],
                            forecast: float, groups: int) -> torch.Tensor:
    return _serial_result(model_name, world, stride, guided_at, None, forecast, groups)


def _serial_result(model_name: str, world: int, stride: int, guided_at: tuple[int, ...],
                   plan: asyncfx.StagePlan | None, forecast: float, groups: int) -> torch.Tensor:
    if model_name == "mispriced":
        model, kwargs = mispriced_example()
    else:
        whole, _, kwargs = zoo_example(model_name)
        model = zoo_captured(model_name) if groups == 1 else whole  # groups capture the model again
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stages = world // groups - (stride - 1)
    try:
        denoiser = asyncfx.partition(model, groups * stages, layout=f"{groups}x{stages}",
                                     warmup=2 if plan is None else 3, executor="serial", stride=stride,
                                     plan=plan, scheduler=ddim(STEPS) if stride == 2 else None,
                                     forecast=forecast)
        return sample(denoiser, kwargs, LATENT[model_name], steps=STEPS, guided_at=guided_at)
    finally:
        torch.set_num_threads(threads)


@functools.cache
def serial_with_step_cache(model_name: str, world: int, cache: str) -> tuple[torch.Tensor, list]:
    """The serial executor's sample of the model with a step cache, and what its stages
    substituted at each call: ``(call, stage, modules)``."""
    model, _, kwargs = ZOO[model_name]()  # its own: the hooks must not reach the shared zoo model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        denoiser = asyncfx.partition(with_step_cache(model, cache), world, layout=f"1x{world}", warmup=2,
                                     executor="serial", forecast=0.0)
        result = sample(denoiser, kwargs, LATENT[model_name], steps=STEPS)
        (stream,) = denoiser.captures()[0].streams.values()
        return result, stream.store.cache_memory.log
    finally:
        torch.set_num_threads(threads)


#: Steps with a second (unconditional) call: a second stream of calls that skips step 5
#: and so warms up again at step 6, while the first stream's messages are in flight.
GUIDED_BUT_5 = tuple(i for i in range(STEPS) if i != 5)


#: ``(model, world, stride, guided_at, rebalance, source, forecast)``; one re-cuts a plan the
#: FLOP estimate mispriced, from the stage times gathered from every rank, after each rank
#: released the weights its first stage did not read (the re-cut stages get theirs from
#: the other rank). ``source``: partition a capture ("captured"), the model itself, whose
#: weights that other ranks' stages read are released ("model"), or the model built on
#: the meta device, each rank loading its stage's weights from the files
#: ``save_pretrained`` wrote ("meta"). ``forecast``: the damping of forecast stale values
#: (0: off, AsyncDiff's plain reuse), whose three versions of each boundary a rank keeps
#: across its messages. ``groups``: batch groups of ``world / groups`` ranks, each running the
#: stages on its half of the classifier-free-guidance batch. A ninth item names a step cache
#: (``with_step_cache``): each rank applies it to its own stage.
SCENARIOS = [("sd_unet", 4, 1, (), False, "model", 0.5, 2), ("sd_unet", 3, 1, (), False, "model", 0.0, 1),
             ("sd_unet", 3, 1, (), False, "meta", 0.5, 1),
             ("sd3_transformer", 4, 1, (), False, "meta", 0.5, 2),
             ("sd_unet", 3, 2, (), False, "model", 0.5, 1),
             ("sd_unet", 2, 1, GUIDED_BUT_5, False, "captured", 0.5, 1),
             ("mispriced", 2, 1, (), True, "model", 0.0, 1), ("mispriced", 2, 1, (), False, "refill", 0.0, 1),
             ("sd_unet", 2, 1, (), False, "model", 0.0, 1, "reuse"),
             ("sd3_transformer", 2, 1, (), False, "model", 0.0, 1, "forecast"),
             ("flux_transformer", 2, 1, (), False, "model", 0.0, 1, "chain"),
             ("flux_transformer", 2, 1, (), False, "model", 0.0, 1, "first block"),
             ("flux_transformer", 2, 1, (), False, "model", 0.0, 1, "extrapolate")]


def test_distributed_ranks_equal_serial(tmp_path):
    """Every scenario on one set of rank processes (started once: each builds the zoo
    models once), each scenario with a process group of its own; each rank's two
    generations equal the serial executor's."""
    for model_name in {scenario[0] for scenario in SCENARIOS if scenario[5] == "meta"}:
        zoo_example(model_name)[0].save_pretrained(tmp_path / "weights" / model_name)
    start_ranks(run_scenarios, (str(tmp_path), SCENARIOS, STEPS), max(scenario[1] for scenario in SCENARIOS))
    for index, scenario in enumerate(SCENARIOS):
        if scenario[5] == "refill":
            check_refill(tmp_path / str(index))
        else:
            check_scenario(tmp_path / str(index), *scenario)


def check_refill(tmp_path) -> None:
    """A re-cut after the weights were released: the weights a rank's new stage reads and it
    released came intact from the other rank, and each keeps only its stage's weights."""
    errors = {p.name: p.read_text() for p in tmp_path.glob("error*.txt")}
    assert not errors, errors
    facts = [json.loads((tmp_path / f"facts{rank}.json").read_text()) for rank in range(2)]
    early, late = facts[0]["stage bytes"]
    assert late[0] > early[0] and late[1] < early[1]  # the late cut gives rank 0 most of the weights
    assert [f["held first"] for f in facts] == early and [f["held last"] for f in facts] == late
    assert facts[0]["received"] == late[0] - early[0] and facts[1]["received"] == 0
    assert all(f["intact"] for f in facts)


def check_scenario(tmp_path, model_name: str, world: int, stride: int, guided_at: tuple[int, ...],
                   rebalance: bool, source: str, forecast: float, groups: int,
                   cache: str | None = None) -> None:
    errors = {p.name: p.read_text() for p in tmp_path.glob("error*.txt")}
    assert not errors, (model_name, world, stride, guided_at, source, errors)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    plans = [asyncfx.StagePlan.from_dict(json.loads(p)) for p in results[0][1]]
    cuts = [[[stage.nodes for stage in plan.stages] for plan in
             (asyncfx.StagePlan.from_dict(json.loads(p)) for p in r[1])] for r in results]
    assert all(c == cuts[0] for c in cuts)  # every rank ran the cuts rank 0 chose (its times are its own)
    if rebalance:  # re-cut in the first generation, from every rank's stage times
        assert any(note.startswith("re-cut 1:") for note in plans[0].notes), plans[0].notes
        expected = [serial_result(model_name, world, stride, guided_at, plan, forecast, groups)
                    for plan in plans]
    elif cache:  # the ranks, each substituting in its own stage, took the serial executor's steps
        expected, substituted = serial_with_step_cache(model_name, world, cache)
        expected = [expected] * 2
        assert any(modules for _, _, modules in substituted)
        for rank in range(world):  # one log per generation
            logs = json.loads((tmp_path / f"facts{rank}.json").read_text())["substituted"]
            own = [entry for entry in substituted if entry[1] == rank]
            as_tuples = [[(call, stage, tuple(modules)) for call, stage, modules in log] for log in logs]
            assert as_tuples == [own] * 2
    else:
        expected = [serial_result(model_name, world, stride, guided_at, forecast=forecast, groups=groups)] * 2
    if forecast:  # forecasting changed the samples
        plain = serial_result(model_name, world, stride, guided_at, groups=groups)
        assert not torch.equal(expected[0], plain)
    assert all(plan.groups == groups for plan in plans)
    for samples, _ in results:  # every rank's sampler took the same steps, in both generations
        for got, want in zip(samples, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    facts = [json.loads((tmp_path / f"facts{rank}.json").read_text()) for rank in range(world)]
    slots = world // groups  # each group's ranks hold the same stages
    stages = slots - (stride - 1)  # stride 2: the extra rank holds the last stage too
    own = [plans[-1].stages[min(rank % slots, stages - 1)].param_bytes for rank in range(world)]
    assert [f["held"] for f in facts] == own
    if source == "model":  # the original model keeps only what the rank's stage reads, and says so
        assert [f["model holds"] for f in facts] == own
        for f, final in zip(facts, own):  # a rank whose stage grew got the new weights from the other
            if rebalance and final > f["first stage bytes"]:
                assert f["received"] > 0, facts
        model_class = {"mispriced": "Mispriced", "sd_unet": "UNet2DConditionModel",
                       "sd3_transformer": "SD3Transformer2DModel",
                       "flux_transformer": "FluxTransformer2DModel"}[model_name]
        for refused in (f["refused"] for f in facts):
            assert refused["call"].startswith(f"WeightsReleasedError: {model_class} had its weights that "
                                              "no stage of this process reads released"), refused
            assert "release_weights=False" in refused["call"]
            assert refused["convert"].startswith(f"WeightsReleasedError: {model_class} had its weights")
            assert "cannot be converted" in refused["convert"]
            assert refused["other shapes"].startswith(
                "WeightsReleasedError: capturing again (the call differs from the capture")
    if source == "meta":  # each rank read its stage's parameters from the files, and no others
        assert [f["loaded"] + f["stage buffers"] for f in facts] == own
        assert all(f["loaded"] > 0 for f in facts)


def test_a_rank_that_exits_makes_the_others_fail_clearly(tmp_path):
    elapsed = spawn(tmp_path, 2, "sd_unet", dying_rank=1, timeout_s=20.0)
    message = (tmp_path / "error0.txt").read_text()
    assert message.startswith("PeerError: rank 0:") and "did rank 1 exit or hang?" in message
    assert elapsed < 60


def test_send_hooks_fire_right_after_each_boundary_is_made():
    from asyncfx.runtime.hooks import with_send_hooks

    model, _, kwargs = zoo_example("sd_unet")
    captured = asyncfx.capture(model, (), kwargs)
    staged = asyncfx.split(captured, asyncfx.compile(captured, 3))
    stage, outputs = staged.stages[0], staged.stage_outputs[0]
    seen = []
    hooked = with_send_hooks(stage, outputs, lambda name, value: seen.append((name, value.clone())))
    args = staged.stage_arguments(captured.interface.flatten((), kwargs))[0]
    got = hooked(*args)
    assert [name for name, _ in seen] == outputs
    for (_, value), expected, out in zip(seen, stage(*args), got):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    nodes = list(hooked.graph.nodes)
    for name in outputs:  # the hook is the very next node after the producer
        producer = next(i for i, n in enumerate(nodes) if n.name == name)
        assert nodes[producer + 1].target == "asyncfx_send_hook"
    assert sum(n.target == "asyncfx_send_hook" for n in stage.graph.nodes) == 0  # the original is untouched
    assert dict(hooked.named_parameters()).keys() == dict(stage.named_parameters()).keys()
