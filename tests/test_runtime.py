"""partition() and the executors: staleness as scheduled, executor and warm-up
equivalence, streams, weights per worker, and errors."""
from __future__ import annotations

import copy
import gc
import logging
import pickle
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor
from torch import nn

import asyncfx
from asyncfx.api import DeviceError, ModelError
from asyncfx.errors import SchedulerError
from asyncfx.runtime.clock import MAX_CALLS_PER_STEP
from asyncfx.runtime.timesteps import TimestepMap
from conftest import ddim, load_benchmark, on_cuda, sample, streams, zoo_captured, zoo_example

COEFFICIENTS = (1.0, 10.0, 100.0)


class Chain(nn.Module):
    """Three latent additions: stage k adds c_k * t, so an output tells exactly which
    latent and which timesteps the stages combined."""

    def forward(self, x, t):
        h = x
        for c in COEFFICIENTS:
            h = h + t * c
        return h


def chain_denoiser(executor: str, warmup: int, stride: int = 1, scheduler=None, time_shift=False,
                   tokens: int = 0):
    """``tokens``: a latent and a timestep of that many elements (else one, and a scalar);
    stale values read as they are (AsyncDiff's plain reuse, ``forecast=0``)."""
    x = torch.zeros(max(tokens, 1), dtype=torch.float64)
    t = torch.zeros((tokens,) if tokens else (), dtype=torch.float64)
    plan = asyncfx.compile(Chain(), 3, example_inputs=(x, t), cost="uniform")
    assert [len(s.nodes) for s in plan.stages] == [1, 1, 1]
    return asyncfx.partition(Chain(), 3, example_inputs=(x, t), plan=plan, warmup=warmup,
                             stride=stride, executor=executor, scheduler=scheduler,
                             time_shift=time_shift, forecast=0.0)


def expected_stride1(xs, ts, warmup, time_shift=False):
    """eps_s from the definition: warm-up sequential, then every edge one step stale."""
    values = {}  # (stage, version) -> value
    for s, (x, t) in enumerate(zip(xs, ts)):
        tt = ts[s - 1] if (time_shift and s >= warmup) else t
        for k, c in enumerate(COEFFICIENTS):
            previous = x if k == 0 else values[(k - 1, s if s < warmup else s - 1)]
            values[(k, s)] = previous + c * (t if s < warmup else tt)
    return [values[(2, s)] for s in range(len(xs))]


@pytest.mark.parametrize("executor", ["serial", "local"])
@pytest.mark.parametrize("time_shift", [False, True])
def test_staleness_is_what_the_schedule_says(executor, time_shift):
    xs = [1000.0 * (s + 1) for s in range(8)]
    ts = [50.0 - 3 * s for s in range(8)]
    den = chain_denoiser(executor, warmup=2, time_shift=time_shift)
    got = [den(torch.tensor([x], dtype=torch.float64), torch.tensor(t, dtype=torch.float64)).item()
           for x, t in zip(xs, ts)]
    assert got == expected_stride1(xs, ts, warmup=2, time_shift=time_shift)
    if not time_shift:  # the paper's example: eps_5 = C2(C1(C0(x3, t3), t4), t5)
        assert got[5] == xs[3] + 1 * ts[3] + 10 * ts[4] + 100 * ts[5]
    else:  # each stage computes with the previous step's timestep
        assert got[5] == xs[3] + 1 * ts[2] + 10 * ts[3] + 100 * ts[4]
    den.close()


@pytest.mark.parametrize("executor", ["serial", "local"])
def test_stride_two_rounds_compute_two_steps(executor):
    steps = 7
    xs = [1000.0 * (s + 1) for s in range(steps)]
    ts = [60.0 - 5 * s for s in range(steps)]
    scheduler = SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64))
    den = chain_denoiser(executor, warmup=1, stride=2, scheduler=scheduler)
    got = [den(torch.tensor([x], dtype=torch.float64), torch.tensor(t, dtype=torch.float64)).item()
           for x, t in zip(xs, ts)]
    c0, c1, c2 = COEFFICIENTS
    v1 = {0: xs[0] + c0 * ts[0]}          # stage outputs kept, by version
    v2 = {0: v1[0] + c1 * ts[0]}
    assert got[0] == v2[0] + c2 * ts[0]   # warm-up
    # round at step 1: stages 0, 1 with t2 read version 0; the extra device gives eps_1
    assert got[1] == v2[0] + c2 * ts[1] and got[2] == v2[0] + c2 * ts[2]
    v1[2], v2[2] = xs[1] + c0 * ts[2], v1[0] + c1 * ts[2]
    assert got[3] == v2[2] + c2 * ts[3] and got[4] == v2[2] + c2 * ts[4]
    v1[4], v2[4] = xs[3] + c0 * ts[4], v1[2] + c1 * ts[4]
    assert got[5] == v2[4] + c2 * ts[5] and got[6] == v2[4] + c2 * ts[6]
    den.close()


@pytest.mark.parametrize("scale, shift, begin",
                         [(1.0, 0.0, 0), (1e-3, 0.0, 0), (-1e-3, 1.0, 0), (1.0, 0.0, 3)])
def test_stride_two_follows_how_the_calls_timesteps_relate_to_the_scheduler(scale, shift, begin):
    """Flux's pipeline passes t / 1000, Lumina's 1 - t / 1000; image-to-image pipelines
    start at the scheduler's begin index. The timesteps stride 2 computes ahead must
    follow the calls alike."""
    ts = [60.0 - 5 * s for s in range(7)]
    expected = chain_denoiser("serial", warmup=1, stride=2,
                              scheduler=SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64)))
    longer = torch.tensor([90.0, 80.0, 70.0][:begin] + ts, dtype=torch.float64)
    den = chain_denoiser("serial", warmup=1, stride=2,
                         scheduler=SimpleNamespace(timesteps=longer, begin_index=begin or None))
    x = torch.zeros(1, dtype=torch.float64)  # the chain then returns sum_k c_k * (stage k's timestep)
    for t in ts:
        got = den(x, torch.tensor(t * scale + shift, dtype=torch.float64))
        torch.testing.assert_close((got - shift * sum(COEFFICIENTS)) / scale,
                                   expected(x, torch.tensor(t, dtype=torch.float64)), rtol=1e-9, atol=1e-9)


class TimestepTwice(nn.Module):
    """Reads the timestep under two names (LTX-2's pipeline passes ``sigma=timestep``):
    each stage adds ``(timestep - sigma) * c``, zero wherever both move together."""

    def forward(self, x, timestep, sigma):
        h = x
        for c in COEFFICIENTS:
            h = h + (timestep - sigma) * c
        return h


@pytest.mark.parametrize("stride, time_shift", [(2, False), (1, True)])
def test_a_copy_of_the_timestep_under_another_name_moves_with_it(stride, time_shift):
    ts = [60.0 - 5 * s for s in range(7)]
    scheduler = SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64))
    x = torch.zeros(1, dtype=torch.float64)
    example = (x, torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    den = asyncfx.partition(TimestepTwice(), 3, example_inputs=example, warmup=1, stride=stride,
                            time_shift=time_shift, scheduler=scheduler, executor="serial", cost="uniform")
    assert [r for r in den.interface.roles] == ["latent", "timestep", "condition"]
    for t in ts:
        timestep = torch.tensor(t, dtype=torch.float64)
        assert den(x, timestep, timestep.clone()).item() == 0.0  # each stage saw both at one value


def test_stride_two_finds_where_a_model_starts_in_the_schedule_from_the_scheduler_step_index():
    """Wan 2.2 samples the first steps with one expert and the rest with another: the
    second one's first call is part-way through the scheduler's timesteps, which it
    counts in ``step_index`` (None until its first step)."""
    ts = [60.0, 58.0, 53.0, 45.0, 34.0, 20.0, 3.0, 1.0]  # not evenly spaced: a wrong index shows
    scheduler = SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64), step_index=None)
    experts = [chain_denoiser("serial", warmup=1, stride=2, scheduler=scheduler) for _ in range(2)]
    alone = chain_denoiser("serial", warmup=1, stride=2,  # the second expert's steps as a whole generation
                           scheduler=SimpleNamespace(timesteps=torch.tensor(ts[3:], dtype=torch.float64)))
    x = torch.zeros(1, dtype=torch.float64)
    for step, t in enumerate(ts):
        t = torch.tensor(t, dtype=torch.float64)
        got = experts[step >= 3](x, t)
        if step >= 3:
            torch.testing.assert_close(got, alone(x, t), rtol=0, atol=0)
        scheduler.step_index = step + 1  # as scheduler.step() counts
    assert [s.times.scheduler_index for expert in experts for s in streams(expert)] == [0, 3]


def test_a_timestep_per_token_moves_on_only_where_it_is_at_the_step():
    """Wan 2.2's image-to-video pipeline passes a timestep per token: 0 for the
    conditioning frame's, the step's timestep for the others. The generation follows the
    step's timestep, and stride 2's next step keeps the conditioning tokens at 0."""
    ts = [60.0, 58.0, 53.0, 45.0, 34.0, 20.0, 3.0]
    scheduler = SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64))
    for stride in (1, 2):
        per_token = chain_denoiser("serial", warmup=1, stride=stride, scheduler=scheduler, tokens=2)
        scalar = chain_denoiser("serial", warmup=1, stride=stride, scheduler=scheduler)
        for step, t in enumerate(ts):
            x = torch.tensor([0.0, 1000.0 * (step + 1)], dtype=torch.float64)
            got = per_token(x, torch.tensor([0.0, t], dtype=torch.float64))
            assert got[0] == 0  # a stage given the next timestep at the conditioning token would add it
            assert got[1] == scalar(x[1:], torch.tensor(t, dtype=torch.float64)), (stride, step)
        assert streams(per_token)[0].step == len(ts)  # one generation
    moving = chain_denoiser("serial", warmup=1, stride=2, scheduler=scheduler, tokens=2)
    moving(torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, ts[0]], dtype=torch.float64))
    with pytest.raises(SchedulerError, match=r"step 1 of the scheduler's timesteps changed the others too; "
                                             r"use stride=1"):
        moving(torch.zeros(2, dtype=torch.float64), torch.tensor([2.0, ts[1]], dtype=torch.float64))


@pytest.mark.parametrize("counts_steps", [False, True])
def test_stride_two_follows_a_scheduler_that_lists_a_timestep_twice_in_a_row(counts_steps):
    """PNDM (Stable Diffusion 1.5's default) lists its second timestep twice, Heun every
    one after the first: the second call at a timestep is another stream, and each stream
    walks the scheduler's timesteps listed once."""
    listed = [60.0, 55.0, 55.0, 50.0, 50.0, 41.0, 41.0, 30.0, 30.0]  # Heun's pattern, uneven steps
    scheduler = SimpleNamespace(timesteps=torch.tensor(listed, dtype=torch.float64), step_index=None)
    den = chain_denoiser("serial", warmup=1, stride=2, scheduler=scheduler)
    distinct = torch.tensor([60.0, 55.0, 50.0, 41.0, 30.0], dtype=torch.float64)
    predictor, corrector = (chain_denoiser("serial", warmup=1, stride=2,
                                           scheduler=SimpleNamespace(timesteps=ts))
                            for ts in (distinct, distinct[1:]))
    for index, t in enumerate(listed):
        second = index > 0 and t == listed[index - 1]
        x, t = torch.full((1,), 100.0 * index, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
        torch.testing.assert_close(den(x, t), (corrector if second else predictor)(x, t), rtol=0, atol=0)
        if counts_steps:
            scheduler.step_index = index + 1  # as Heun's step() counts every call
    assert [(s.start, s.times.scheduler_index) for s in streams(den)] == [(0, 0), (1, 1)]


def test_timestep_map_fits_two_calls_and_checks_a_guess_made_from_one():
    line = TimestepMap()
    assert line.observe(1000.0, 1.0) and line.observe(800.0, 0.8)  # Flux: t / 1000
    assert line.predict(600.0) == pytest.approx(0.6) and line.observe(600.0, 0.6)
    assert not line.observe(400.0, 0.5)
    lumina = TimestepMap()  # 1 - t / 1000, seen once before a timestep had to be guessed
    assert lumina.observe(900.0, 0.1)
    assert lumina.predict(800.0) == pytest.approx(800 / 9000)  # through that call and zero
    assert not lumina.observe(800.0, 0.2)  # the guess was wrong: the caller must say so
    ts = [60.0, 55.0, 50.0]
    scheduler = SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64))
    den = asyncfx.partition(Chain(), 1, stride=2, warmup=0, scheduler=scheduler, executor="serial")
    x = torch.zeros(1, dtype=torch.float64)
    den(x, torch.tensor(1 - ts[0] / 1000, dtype=torch.float64))  # the round guesses step 1's timestep
    with pytest.raises(SchedulerError, match="with warmup=0 the first round had to guess"):
        den(x, torch.tensor(1 - ts[1] / 1000, dtype=torch.float64))


def test_stride_two_refuses_calls_that_do_not_follow_its_scheduler():
    ts = [60.0 - 5 * s for s in range(6)]
    other = SimpleNamespace(timesteps=torch.tensor([61.0, 54.0, 40.0, 39.0, 20.0, 1.0], dtype=torch.float64))
    den = chain_denoiser("serial", warmup=1, stride=2, scheduler=other)
    x = torch.ones(1, dtype=torch.float64)
    den(x, torch.tensor(ts[0], dtype=torch.float64))
    den(x, torch.tensor(ts[1], dtype=torch.float64))  # two calls fit passed = 5/7 scheduled + 16.43
    with pytest.raises(SchedulerError, match=r"call at step 2 of the scheduler's timesteps got timestep 50 "
                                             r"but they give 45 .*pass scheduler=pipe.scheduler"):
        den(x, torch.tensor(ts[2], dtype=torch.float64))
    short = chain_denoiser("serial", warmup=1, stride=2,
                           scheduler=SimpleNamespace(timesteps=torch.tensor(ts[:2], dtype=torch.float64)))
    short(x, torch.tensor(ts[0], dtype=torch.float64))
    short(x, torch.tensor(ts[1], dtype=torch.float64))
    with pytest.raises(SchedulerError, match=r"would be step 2 of the scheduler's timesteps but it lists "
                                             r"only 2"):
        short(x, torch.tensor(ts[2], dtype=torch.float64))


@pytest.mark.parametrize("name, latent", [("sd_unet", "sample"), ("sd3_transformer", "hidden_states")])
def test_local_workers_equal_serial(name, latent):
    _, _, kwargs = zoo_example(name)
    model = zoo_captured(name)  # captured once for the suite: this test is about the executors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every worker and the serial run on one thread: bitwise equal
    try:
        for n in (2, 3):
            serial = sample(asyncfx.partition(model, n, layout=f"1x{n}", warmup=2, executor="serial"), kwargs,
                            latent)
            den = asyncfx.partition(model, n, layout=f"1x{n}", warmup=2, executor="local")
            torch.testing.assert_close(sample(den, kwargs, latent), serial, rtol=0, atol=0)
            den.close()
    finally:
        torch.set_num_threads(threads)
    # with the machine's threads the summation order differs: equal to float32 rounding
    den = asyncfx.partition(model, 2, layout="1x2", warmup=2, executor="local")
    serial = sample(asyncfx.partition(model, 2, layout="1x2", warmup=2, executor="serial"), kwargs, latent)
    torch.testing.assert_close(sample(den, kwargs, latent), serial, rtol=1e-4, atol=1e-4)
    den.close()


def test_workers_compute_under_the_callers_autocast():
    model, _, kwargs = zoo_example("sd_unet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each local worker: the same summation order, bitwise results
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # thread-local: workers do not inherit it
            expected = sample(model, kwargs, "sample", steps=4)
            warm = sample(asyncfx.partition(model, 2, layout="1x2", warmup=4), kwargs, "sample", steps=4)
            reference = asyncfx.partition(model, 2, layout="1x2", warmup=2, executor="serial")
            serial = sample(reference, kwargs, "sample", steps=4)
            local = sample(asyncfx.partition(model, 2, layout="1x2", warmup=2), kwargs, "sample", steps=4)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(warm, expected, rtol=0, atol=0)  # warm-up only: the original run
    torch.testing.assert_close(local, serial, rtol=0, atol=0)   # stale steps: as the reference executor


@pytest.mark.parametrize("executor", ["serial", "local"])
def test_warmup_covering_every_step_is_the_original_run(executor):
    model, _, kwargs = zoo_example("sd_unet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each local worker: the same summation order, bitwise results
    try:
        expected = sample(model, kwargs, "sample")
        den = asyncfx.partition(zoo_captured("sd_unet"), 3, warmup=10, executor=executor)
        got = sample(den, kwargs, "sample")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    den.close()


def test_two_calls_per_step_are_two_independent_streams():
    model, _, kwargs = zoo_example("sd_unet")
    negative = {**kwargs, "encoder_hidden_states": torch.zeros_like(kwargs["encoder_hidden_states"])}
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(6)
    captured = zoo_captured("sd_unet")  # captured once for the suite: this test is about streams
    both = asyncfx.partition(captured, 2, warmup=2, executor="serial")
    alone = [asyncfx.partition(captured, 2, warmup=2, executor="serial") for _ in range(2)]
    x = kwargs["sample"].clone()
    for t in scheduler.timesteps:
        for i, conditioning in enumerate((kwargs, negative)):
            call = {**conditioning, "sample": x, "timestep": t}
            torch.testing.assert_close(both(**call).sample, alone[i](**call).sample, rtol=0, atol=0)
        x = x * 0.9


def test_new_generation_and_reset_restart_the_warmup():
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(zoo_captured("sd_unet"), 2, warmup=1, executor="serial")
    first = sample(den, kwargs, "sample", steps=4)
    second = sample(den, kwargs, "sample", steps=4)   # timestep goes up: new generation
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    den(**{**kwargs, "timestep": torch.tensor(500)})
    den.reset()
    assert torch.equal(den(**kwargs).sample, model(**kwargs).sample)  # step 0 again: exact


def test_conditioning_that_changes_every_step_keeps_the_generation_going():
    model, _, kwargs = zoo_example("sd_unet")  # like ControlNet residuals, made anew each step
    den = asyncfx.partition(zoo_captured("sd_unet"), 2, warmup=1, executor="serial")
    for step, t in enumerate((900, 800, 700, 600)):
        call = {**kwargs, "timestep": torch.tensor(t),
                "encoder_hidden_states": kwargs["encoder_hidden_states"] * (1 + 0.1 * step)}
        got, fresh = den(**call).sample, model(**call).sample
        assert torch.equal(got, fresh) == (step == 0)  # step 0 warms up; later steps read stale values


class Untimed(nn.Module):
    """A denoiser without a timestep input."""

    def forward(self, x, cond):
        h = x + cond
        h = h * 2
        h = h + cond
        return h * 3


def test_without_a_timestep_new_conditioning_is_a_new_generation():
    model, den = Untimed(), asyncfx.partition(Untimed(), 2, warmup=1, executor="serial")
    x, cond = torch.randn(1, 4), torch.randn(1, 4)
    assert torch.equal(den(x, cond), model(x, cond))       # step 0: warm-up
    assert not torch.equal(den(x * 2, cond), model(x * 2, cond))  # step 1: stale
    other = torch.randn(1, 4)
    assert torch.equal(den(x * 3, other), model(x * 3, other))    # new conditioning: step 0 again


class NoiseLevelChain(nn.Module):
    """An EDM-style denoiser whose timestep is called ``noise``: ``x + 1 * noise + 10 * noise``."""

    def forward(self, x, noise, cond):
        h = x + noise[:, None]
        h = h + cond
        return h + 10 * noise[:, None]


def test_a_timestep_under_another_name_is_warned_about_and_can_be_named():
    x, cond = torch.zeros(2, 4), torch.zeros(2, 4)
    noise = [torch.full((2,), s) for s in (80.0, 40.0, 20.0, 10.0, 5.0)]
    unnamed = asyncfx.partition(NoiseLevelChain(), 2, layout="1x2", warmup=1, executor="serial")
    with pytest.warns(UserWarning, match=r"input 'noise' of NoiseLevelChain changed at each of the last 3 "
                                         r"calls.*no speedup.*pass timestep='noise' to asyncfx.partition"):
        for level in noise:  # each call is a new generation: run as the original model
            assert torch.equal(unnamed(x, level, cond), NoiseLevelChain()(x, level, cond))
    named = asyncfx.partition(NoiseLevelChain(), 2, layout="1x2", warmup=1, executor="serial",
                              timestep="noise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [named(x, level, cond)[0, 0].item() for level in noise]
    assert got[0] == 80 + 10 * 80 and got[1] != 40 + 10 * 40  # a generation: step 1 reads step 0's values


def test_conditioning_that_changes_at_every_call_is_not_taken_for_a_timestep():
    model = Untimed()  # one-step generations, each with its own prompt: no warning
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            x, cond = torch.randn(2, 4), torch.randn(2, 4)
            assert torch.equal(den(x, cond), model(x, cond))


def test_timesteps_that_count_up_are_one_generation_until_they_move_back():
    model, _, kwargs = zoo_example("sd_unet")  # Lumina's pipelines pass 1 - t / 1000
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    for generation in range(2):
        for step, t in enumerate((0.1, 0.3, 0.5, 0.7)):
            call = {**kwargs, "timestep": torch.tensor(t)}
            assert torch.equal(den(**call).sample, model(**call).sample) == (step == 0), (generation, step)


def test_one_step_generations_do_not_pile_up_streams():
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(zoo_captured("sd_unet"), 2, warmup=1, executor="serial")
    for _ in range(3 * MAX_CALLS_PER_STEP):  # SD-Turbo: one call at t=999 per image
        assert torch.equal(den(**kwargs).sample, model(**kwargs).sample)
        assert len(streams(den)) <= MAX_CALLS_PER_STEP


def test_an_edit_between_one_step_generations_takes_effect_at_the_next_image():
    model, kwargs = own_sd_unet()
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    for image in range(4):  # SD-Turbo: one call at t=999 per image, the stages run it
        if image == 2:
            model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        assert torch.equal(den(**kwargs).sample, model(**kwargs).sample), image


def own_sd_unet():
    """A copy of the zoo's SD UNet to edit or convert (the zoo's is shared with other tests)."""
    model, _, kwargs = zoo_example("sd_unet")
    return copy.deepcopy(model), kwargs


class LowRank(nn.Module):
    """A LoRA-like wrapper: the base layer plus a low-rank update with new parameters."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, 2, bias=False)
        self.up = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_editing_the_model_after_partitioning_takes_effect_at_the_next_generation(caplog):
    caplog.set_level(logging.INFO, logger="asyncfx")
    model, kwargs = own_sd_unet()
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    sample(den, kwargs, "sample", steps=3)
    captured = den.interface
    sample(den, kwargs, "sample", steps=3)
    assert den.interface is captured  # nothing edited: no new capture
    with torch.no_grad():
        model.conv_in.weight.mul_(2)  # a fused LoRA: weights written in place
    assert torch.equal(den(**kwargs).sample, model(**kwargs).sample)  # a new generation's warm-up step
    assert den.interface is not captured
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("capturing")]
    assert reasons == ["capturing UNet2DConditionModel: its first call",
                       "capturing UNet2DConditionModel: the model was edited since its capture (modules, "
                       "tensors or attributes: a LoRA, new weights, FreeU, attention processors...)"]
    attention = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attention.to_q = LowRank(attention.to_q)  # a LoRA loaded: new modules and parameters
    den(**{**kwargs, "timestep": torch.tensor(500)})  # still the same generation: no check
    assert torch.equal(den(**kwargs).sample, model(**kwargs).sample)


#: What users do to pipe.unet between two images, made in this order; FreeU comes last, as
#: each capture after it rewrites its in-place writes (``passes.functionalise``), the
#: slowest kind of capture.
EDITS_BETWEEN_GENERATIONS = {
    "LoRA re-weighted": lambda unet: unet.set_adapters(["style"], weights=[0.3]),
    "attention processors": lambda unet: unet.set_attn_processor(AttnProcessor()),
    "LoRA disabled": lambda unet: unet.disable_lora(),
    "LoRA enabled": lambda unet: unet.enable_lora(),
    "LoRA fused": lambda unet: unet.fuse_lora(lora_scale=0.7),  # peft writes weight.data
    "FreeU": lambda unet: unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
}


def test_model_edits_between_generations_take_effect():
    """Each edit, made between two generations of one denoiser (one after another on one
    model), takes effect at the next generation: its stages, which compute the last of
    the generation's steps (warm-up covering every step: the model's own values), sample
    exactly what the edited model samples, and not what they sampled before."""
    from peft import LoraConfig

    model, kwargs = own_sd_unet()
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False),
                      adapter_name="style")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=3, executor="serial")
    before = sample(den, kwargs, "sample", steps=3)
    for edit, make in EDITS_BETWEEN_GENERATIONS.items():
        make(model)
        captured = den.interface
        after = sample(den, kwargs, "sample", steps=3)
        assert den.interface is not captured and den.executor is not None, edit  # its stages ran
        torch.testing.assert_close(after, sample(model, kwargs, "sample", steps=3), rtol=0, atol=0,
                                   msg=lambda m: f"{edit}: {m}")
        assert not torch.equal(after, before), edit
        before = after


def test_inputs_that_want_gradients_are_refused_before_anything_runs():
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    wants_grad = {**kwargs, "sample": kwargs["sample"].clone().requires_grad_()}
    with torch.enable_grad(), pytest.raises(asyncfx.AsyncFXError, match=r"requires grad, but the stages run "
                                            r"without autograd.*torch.no_grad\(\).*\.original_model"):
        den(**wants_grad)
    assert den.interface is None  # nothing captured, no step counted
    with torch.no_grad():  # as pipelines call it
        torch.testing.assert_close(den(**wants_grad).sample, model(**kwargs).sample, rtol=0, atol=0)


def test_offloading_hooks_put_on_the_denoiser_are_refused_at_its_call():
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    offloaded, _ = cpu_offload_with_hook(den, execution_device="cpu")  # what enable_model_cpu_offload() does
    with pytest.raises(asyncfx.AsyncFXError, match=r"wrapped by accelerate's CpuOffload.*remove_all_hooks"):
        offloaded(**kwargs)
    remove_hook_from_module(offloaded)  # what pipe.remove_all_hooks() does
    torch.testing.assert_close(den(**kwargs).sample, model(**kwargs).sample, rtol=0, atol=0)


def test_layer_hooks_added_after_the_capture_are_refused_at_the_next_call():
    """What a modular pipeline's SkipLayerGuidance does around its third call of a step:
    apply_layer_skip(), the call, remove_hook(). The graph cannot skip the layers."""
    from diffusers.hooks import HookRegistry, LayerSkipConfig, apply_layer_skip

    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    den(**kwargs)  # captured
    blocks = "mid_block.attentions.0.transformer_blocks"
    apply_layer_skip(den, LayerSkipConfig(indices=[0], fqn=blocks, skip_attention=True, skip_ff=True))
    later = {**kwargs, "timestep": torch.tensor(500)}
    with pytest.raises(asyncfx.AsyncFXError, match=rf"UNet2DConditionModel.{blocks}.0 has diffusers' "
                                                   r"'layer_skip_hook' hook.*ClassifierFreeGuidance"):
        den(**later)
    assert den._clock.step == 0  # refused before the call counted
    HookRegistry.check_if_exists_or_initialize(den).remove_hook("layer_skip_hook", recurse=True)
    reference = asyncfx.partition(zoo_captured("sd_unet"), 2, layout="1x2", warmup=1, executor="serial")
    reference(**kwargs)
    torch.testing.assert_close(den(**later).sample, reference(**later).sample, rtol=0, atol=0)


def test_alternating_captures_each_keep_their_generation_going():
    model, _, kwargs = zoo_example("sd_unet")  # SD3's skip-layer guidance: an extra batch-1 call
    single = {**kwargs, "sample": kwargs["sample"][:1],
              "encoder_hidden_states": kwargs["encoder_hidden_states"][:1]}
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    alone = [asyncfx.partition(source, 2, layout="1x2", warmup=1, executor="serial")
             for source in (zoo_captured("sd_unet"), model)]  # the whole batch's captured once for the suite
    captures = set()
    for step, t in enumerate((900, 800, 700, 600)):
        for kind, call in enumerate((kwargs, single)):
            call = {**call, "timestep": torch.tensor(t), "sample": call["sample"] * (1 - 0.1 * step)}
            got = den(**call).sample
            torch.testing.assert_close(got, alone[kind](**call).sample, rtol=0, atol=0)
            assert torch.equal(got, model(**call).sample) == (step == 0)  # stale after warm-up
            captures.add(id(den.interface))
    assert len(captures) == 2
    local = asyncfx.partition(model, 2, warmup=1)
    for call in (kwargs, single):
        local(**call)  # step 0 is the last warm-up step: each capture gets its executor
    executors = [local.executor, local.captures()[1].executor]
    local.close()  # both captures' workers stop
    assert not any(worker.is_alive() for executor in executors for worker in executor._workers)


class _Notes:
    """What a forward fills: one entry per call."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []


class FillsItsArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, t, notes):
        h = torch.tanh(self.first(x))
        notes.seen.append(h.mean())
        return x + self.second(h) * t


def test_calls_that_fill_an_argument_at_every_step_run_the_model_and_are_warned_about():
    asyncfx.register_tensor_container(_Notes)
    model, x = FillsItsArgument().eval(), torch.randn(2, 4)
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    notes, expected = _Notes(), _Notes()
    with torch.no_grad():
        for step, t in enumerate((900.0, 800.0, 700.0)):
            call = (x * (1 - 0.1 * step), torch.tensor(t))
            if step == 1:
                with pytest.warns(UserWarning, match=r"FillsItsArgument writes into 'notes' at calls at "
                                  r"timestep 900 and then 800: such calls run the original model"):
                    got = den(*call, notes)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # once only
                    got = den(*call, notes)
            torch.testing.assert_close(got, model(*call, expected), rtol=0, atol=0)  # never stale
    assert den.interface.written_arguments == ("notes",) and den.executor is None  # no stages built
    assert len(notes.seen) == 3  # the caller's object got every write
    torch.testing.assert_close(torch.stack(notes.seen), torch.stack(expected.seen), rtol=0, atol=0)


def test_a_capture_not_called_at_the_previous_step_warms_up_again():
    model, _, kwargs = zoo_example("sd_unet")  # e.g. guidance switched off for a few steps
    single = {**kwargs, "sample": kwargs["sample"][:1],
              "encoder_hidden_states": kwargs["encoder_hidden_states"][:1]}
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    calls = (kwargs, kwargs, single, kwargs, kwargs)
    for step, (t, call) in enumerate(zip((900, 800, 700, 600, 500), calls)):
        call = {**call, "timestep": torch.tensor(t)}
        # steps 0 and 3 start a stream of the batch-2 capture, step 2 one of the batch-1 capture
        assert torch.equal(den(**call).sample, model(**call).sample) == (step in (0, 2, 3)), step


def test_stride_two_follows_the_scheduler_for_a_capture_that_starts_mid_generation():
    ts = [100.0 - s * s for s in range(8)]  # guidance switched off from step 4 on: other shapes
    scheduler = SimpleNamespace(timesteps=torch.tensor(ts, dtype=torch.float64))
    den = asyncfx.partition(Chain(), 3, warmup=1, stride=2, scheduler=scheduler, executor="serial",
                            cost="uniform")
    later = asyncfx.partition(Chain(), 3, warmup=1, stride=2, executor="serial", cost="uniform",
                              scheduler=SimpleNamespace(timesteps=scheduler.timesteps, begin_index=4))
    for step, t in enumerate(ts):
        x = torch.full((1 if step < 4 else 2,), 1000.0 * (step + 1), dtype=torch.float64)
        got = den(x, torch.tensor(t, dtype=torch.float64))
        if step >= 4:
            assert got.shape == (2,)
            torch.testing.assert_close(got, later(x, torch.tensor(t, dtype=torch.float64)), rtol=0, atol=0)


def test_shape_change_mid_generation_recaptures(caplog):
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    for t in (900, 800, 700):
        den(**{**kwargs, "timestep": torch.tensor(t)})
    bigger = {**kwargs, "sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor(600)}
    with caplog.at_level(logging.INFO, logger="asyncfx.runtime.captures"):
        torch.testing.assert_close(den(**bigger).sample, model(**bigger).sample, rtol=0, atol=0)
    assert caplog.messages[0].startswith("capturing UNet2DConditionModel: the call differs from the capture: "
                                         "input 'sample' of UNet2DConditionModel is float32[2, 4, 16, 16]")


def test_a_call_with_missing_arguments_is_an_error_that_keeps_the_generation():
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    untouched = asyncfx.partition(zoo_captured("sd_unet"), 2, layout="1x2", warmup=1, executor="serial")
    calls = [{**kwargs, "timestep": torch.tensor(t)} for t in (900, 800, 700)]
    torch.testing.assert_close(den(**calls[0]).sample, untouched(**calls[0]).sample, rtol=0, atol=0)
    interface, executor = den.interface, den.executor
    with pytest.raises(asyncfx.ArgumentsError, match="missing a required argument: 'encoder_hidden_states'"):
        den(kwargs["sample"], torch.tensor(800))
    assert den.interface is interface and den.executor is executor  # nothing recaptured
    for call in calls[1:]:  # the generation goes on as if the bad call never happened
        torch.testing.assert_close(den(**call).sample, untouched(**call).sample, rtol=0, atol=0)


class NarrowChain(Chain):
    def forward(self, x, t):
        if x.shape[-1] > 4:
            raise ValueError("this model takes inputs at most 4 wide")
        return super().forward(x, t)


def test_a_recapture_that_fails_keeps_the_current_build():
    den, untouched = (asyncfx.partition(NarrowChain(), 2, warmup=1, executor="serial") for _ in range(2))
    x, t = torch.ones(1, 4), torch.tensor(3.0)
    torch.testing.assert_close(den(x, t), untouched(x, t), rtol=0, atol=0)
    interface, executor = den.interface, den.executor
    with pytest.raises(asyncfx.CaptureError, match="at most 4 wide"):
        den(torch.ones(1, 8), t)
    assert den.interface is interface and den.executor is executor
    later = torch.tensor(2.0)  # the generation goes on
    torch.testing.assert_close(den(x * 2, later), untouched(x * 2, later), rtol=0, atol=0)


def test_closing_stops_the_workers_and_the_next_call_starts_new_ones_from_the_same_plan():
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1)
    reference = asyncfx.partition(zoo_captured("sd_unet"), 2, layout="1x2", warmup=1, executor="serial")
    calls = [{**kwargs, "timestep": torch.tensor(t)} for t in (900, 800, 700, 600)]
    got = [den(**call).sample for call in calls[:2]]
    closed, plan = den.executor, den.plan
    den.close()
    assert den.executor is None and not any(worker.is_alive() for worker in closed._workers)
    with pytest.raises(asyncfx.AsyncFXError, match="executor was closed"):  # not a wait for dead workers
        closed.step(None, None, None)
    got += [den(**call).sample for call in calls[2:]]  # the generation goes on, on new workers
    assert den.plan is plan and den.executor is not None
    for value, call in zip(got, calls):
        torch.testing.assert_close(value, reference(**call).sample, rtol=1e-4, atol=1e-4)
    den.close()


def test_workers_stop_when_the_denoiser_is_garbage_collected():
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, warmup=1)
    den(**kwargs)  # the last warm-up step starts the workers
    workers = list(den.executor._workers)
    del den
    gc.collect()
    assert not any(worker.is_alive() for worker in workers)


def test_the_finalizer_waits_for_the_workers_to_end():
    """At interpreter exit the same finalizer stops the workers of an executor nobody
    closed; a worker thread still ending while the process tears down aborted it."""
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, warmup=1)
    den(**kwargs)
    executor = den.executor
    executor._stop()  # what weakref.finalize calls, at garbage collection or at exit
    assert not any(worker.is_alive() for worker in executor._workers)


def test_each_worker_holds_only_its_stage_weights():
    model, _, kwargs = zoo_example("sdxl_unet")
    den = asyncfx.partition(model, 3, example_inputs=kwargs, executor="local")
    held = [sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            for m in den.executor.slot_modules()]
    assert held == [s.param_bytes for s in den.plan.stages]
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert max(held) < total and sum(held) < 1.2 * total
    den.close()


class LookupDenoiser(nn.Module):
    """Stage 1 looks up an embedding by label: a bad label fails inside that stage."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.labels = nn.Embedding(3, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x, t, label):
        h = torch.tanh(self.inp(x)) * t
        return self.out(h + self.labels(label))


def test_stage_exception_reaches_the_caller_with_the_stage_named():
    x, t, good = torch.randn(2, 4), torch.tensor(1.0), torch.tensor([0, 2])
    den = asyncfx.partition(LookupDenoiser(), 2, example_inputs=(x, t, good), warmup=1,
                            executor="local", cost="uniform")
    assert len(den.plan.stages[0].nodes) >= 1
    den(x, t, good)
    start = time.perf_counter()
    with pytest.raises(IndexError) as info:
        den(x, t, torch.tensor([0, 7]))
    assert time.perf_counter() - start < 1.0
    assert any("raised in stage 1" in note for note in info.value.__notes__)
    den.reset()
    torch.testing.assert_close(den(x, t, good), LookupDenoiser.forward(den.original_model, x, t, good))
    den.close()


def test_errors_for_devices_stride_and_options():
    model, _, kwargs = zoo_example("sd_unet")
    if torch.cuda.device_count() < 2:
        with pytest.raises(DeviceError, match=r"asked for cuda:\d.* but this machine has"):
            asyncfx.partition(model, 2, devices=["cuda:0", "cuda:1"])
    with pytest.raises(SchedulerError, match="stride=2 .* pass scheduler=pipe.scheduler"):
        asyncfx.partition(model, 2, stride=2)
    with pytest.raises(DeviceError, match="3 devices are needed .* devices lists 2; list 3"):
        asyncfx.partition(model, 2, stride=2, scheduler=DDIMScheduler(), devices=["cpu", "cpu"])
    with pytest.raises(asyncfx.PlanError, match="warmup must be an integer >= 1"):
        asyncfx.partition(model, 2, warmup=0)
    with pytest.raises(asyncfx.PlanError, match="executor='mpi' is not known"):
        asyncfx.partition(model, 2, executor="mpi")
    # checked at partition(), not at the last warm-up step where the stages are built
    with pytest.raises(asyncfx.PlanError, match="cost='fast' is not known"):
        asyncfx.partition(model, 2, cost="fast")
    with pytest.raises(asyncfx.PlanError, match="unknown link/device 'infiniband'"):
        asyncfx.partition(model, 2, link="infiniband")
    with pytest.raises(DeviceError, match="devices lists 'tpu', which is not a torch device"):
        asyncfx.partition(model, 2, devices=["tpu", "cpu"])


def test_partition_takes_a_denoiser_module():
    model, _, _ = zoo_example("sd_unet")
    pipeline = SimpleNamespace(unet=model)  # a diffusers pipeline is not an nn.Module either
    with pytest.raises(ModelError, match="takes the denoiser, an nn.Module, got SimpleNamespace.*pipe.unet"):
        asyncfx.partition(pipeline, 2)
    with pytest.raises(ModelError, match="already partitioned .* original_model"):
        asyncfx.partition(asyncfx.partition(model, 2), 2)


def test_argument_names_are_checked_before_the_first_call():
    with pytest.raises(asyncfx.CaptureError, match=r"timestep='sigma' names no argument of "
                                                   r"NoiseLevelChain.forward\(x, noise, cond\)"):
        asyncfx.partition(NoiseLevelChain(), 2, timestep="sigma")
    with pytest.raises(asyncfx.CaptureError, match="latent='sample' names no argument of Untimed"):
        asyncfx.partition(Untimed(), 2, latent="sample")
    asyncfx.partition(zoo_example("sd_unet")[0], 2, latent="sample", timestep="timestep", executor="serial")
    asyncfx.partition(PositionalWrapper(), 2, timestep="args[1]")  # checked when called


class PositionalWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Untimed()

    def forward(self, *args):
        return self.inner(*args)


def test_attributes_come_from_the_original_model():
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=3, rebalance=False)  # built at the last warm-up
    assert den.config is model.config and den.dtype == model.dtype and den.device == model.device
    assert den.plan is None and den.interface is None  # captured lazily
    assert repr(den) == ("AsyncDenoiser(UNet2DConditionModel, n_devices=2, layout=1x2, warmup=3, stride=1: "
                         "not captured yet (at the first call))")
    assert repr(asyncfx.partition(model, 2)).startswith(
        "AsyncDenoiser(UNet2DConditionModel, n_devices=2, layout chosen at the first call, warmup=3")
    out = den(**kwargs)
    assert repr(den).endswith(": captured; stages built at the last warm-up step)")
    assert type(out) is type(model(**kwargs))
    assert den.interface is not None and den.plan is None  # compiled at the last warm-up step
    torch.testing.assert_close(out.sample, model(**kwargs).sample, rtol=0, atol=0)
    den(**{**kwargs, "timestep": torch.tensor(900)})
    assert den.plan is None
    den(**{**kwargs, "timestep": torch.tensor(800)})
    assert den.plan is not None and den.plan.n_stages == 2
    assert repr(den).endswith(": running on LocalExecutor on cpu, cpu)")
    den.close()


def test_attributes_set_through_the_denoiser_are_the_models():
    model, kwargs = own_sd_unet()
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    sample(den, kwargs, "sample", steps=2)
    before = model(**kwargs).sample
    den.conv_act = nn.Identity()  # an attribute the model has (unload_ip_adapter() sets encoder_hid_proj)
    assert isinstance(model.conv_act, nn.Identity) and "conv_act" not in vars(den)
    den.note, den.warmup = "kept", 2  # a new attribute, and one of the denoiser's options
    assert (den.note, den.warmup) == ("kept", 2)
    assert not hasattr(model, "note") and not hasattr(model, "warmup")
    expected = model(**kwargs).sample
    assert not torch.equal(expected, before)
    torch.testing.assert_close(den(**kwargs).sample, expected, rtol=0, atol=0)  # captured again


def test_modules_parameters_and_mode_are_the_original_models():
    model = copy.deepcopy(zoo_example("sd_unet")[0])
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    assert [(n, id(m)) for n, m in den.named_modules()] == [(n, id(m)) for n, m in model.named_modules()]
    assert [id(p) for p in den.parameters()] == [id(p) for p in model.parameters()]
    assert [id(m) for m in den.children()] == [id(m) for m in model.children()]
    visited = []
    assert den.apply(visited.append) is den  # children first, as nn.Module.apply
    assert sorted(map(id, visited)) == sorted(map(id, model.modules()))
    state, original = den.state_dict(), model.state_dict()
    assert list(state) == list(original)
    assert all(state[key] is original[key] or state[key].data_ptr() == original[key].data_ptr()
               for key in state)
    assert den.train() is den and model.training and all(m.training for m in model.modules())
    den.eval()
    assert not den.training and not any(m.training for m in model.modules())


def test_weights_loaded_through_the_denoiser_are_the_models_at_the_next_generation():
    model, kwargs = own_sd_unet()
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    sample(den, kwargs, "sample", steps=3)
    new_weights = {key: value * 1.5 if value.is_floating_point() else value
                   for key, value in den.state_dict().items()}
    den.load_state_dict(new_weights)
    assert torch.equal(model.conv_in.weight, new_weights["conv_in.weight"])
    assert torch.equal(den(**kwargs).sample, model(**kwargs).sample)  # the new generation's stages
    with pytest.raises(RuntimeError, match="Missing key"):
        den.load_state_dict({"conv_in.weight": new_weights["conv_in.weight"]})


def test_a_deep_copy_is_a_denoiser_of_a_copy_of_the_model_built_anew():
    model, kwargs = own_sd_unet()
    scheduler = ddim(3)
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, stride=2, scheduler=scheduler)  # worker threads
    sample(den, kwargs, "sample", steps=3)
    calls = []
    den.register_forward_hook(lambda *_: calls.append(1))
    twin = copy.deepcopy(den)
    assert twin.original_model is not model and twin.interface is None and twin.executor is None
    assert (twin.n_stages, twin.warmup, twin.stride) == (2, 1, 2) and twin.scheduler is not scheduler
    with torch.no_grad():
        twin.original_model.conv_in.weight.mul_(2)  # the copy's own weights, not the original's
    got = twin(**kwargs).sample  # warm-up step 0 runs the stages in order: the copy's model exactly
    assert torch.equal(got, twin.original_model(**kwargs).sample) and len(calls) == 1
    assert torch.equal(den(**kwargs).sample, model(**kwargs).sample)  # the original is untouched
    assert not torch.equal(got, model(**kwargs).sample)
    with pytest.raises(TypeError, match=r"cannot be pickled .* Save the model \(.original_model"):
        pickle.dumps(den)
    shallow = copy.copy(den)
    assert shallow.original_model is model and shallow.interface is None and shallow.scheduler is scheduler
    den.close(), twin.close()


def test_converting_the_denoiser_converts_the_model_and_captures_it_again():
    model, kwargs = own_sd_unet()
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial")
    sample(den, kwargs, "sample", steps=3)
    executor = den.executor
    assert den.to("cpu") is den and den.executor is executor  # nothing to convert: stages kept
    den.to(memory_format=torch.channels_last)  # a layout for the convolutions: captured again
    assert den.executor is None and model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    sample(den, kwargs, "sample", steps=3)
    den.to(torch.float64)
    assert den.executor is None and den.plan is None
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    double = {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}
    got = sample(den, double, "sample", steps=4)
    assert got.dtype == torch.float64
    assert {b.dtype for b in den.plan.boundaries} == {"torch.float64"}
    fresh = asyncfx.partition(copy.deepcopy(model), 2, layout="1x2", warmup=1, executor="serial")
    torch.testing.assert_close(got, sample(fresh, double, "sample", steps=4), rtol=0, atol=0)


def test_a_denoiser_partitioned_from_a_captured_graph_refuses_to_convert():
    captured = zoo_captured("sd_unet")
    den = asyncfx.partition(captured, 2, executor="serial")
    with pytest.raises(asyncfx.AsyncFXError, match="convert the model first, then capture"):
        den.half()
    assert {p.dtype for p in captured.parameters()} == {torch.float32}
    assert den.to("cpu", torch.float32) is den  # nothing to convert


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_local_executor_on_cuda_streams_matches_serial():
    model, _, kwargs = zoo_example("sd_unet")
    n = max(2, min(torch.cuda.device_count(), 3))
    devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]
    model = copy.deepcopy(model).cuda()
    den = asyncfx.partition(model, n, warmup=2, devices=devices)
    cuda_kwargs = on_cuda(kwargs)
    got = sample(den, cuda_kwargs, "sample")
    expected = sample(asyncfx.partition(model, n, warmup=2, executor="serial"), cuda_kwargs, "sample")
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # the same kernels on the GPU
    den.close()


def test_runtime_overhead_benchmark_reports_every_executor(capsys):
    benchmark = load_benchmark("runtime_overhead")
    assert benchmark.main(["--calls", "6", "--stages", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("model alone:")
    assert [line.split(":")[0] for line in lines[2:]] == [
        "N=2, serial executor", "N=2, local  executor", "edit check, SD2.1-shaped UNet (709 modules)",
        "hook check, SD2.1-shaped UNet", "edit check, SDXL-shaped UNet (1930 modules)",
        "hook check, SDXL-shaped UNet"]
    assert all("us CPU in the calling thread" in line for line in lines[1:4])
    assert all(" ms a generation; parameters alone " in line for line in lines[4::2])
    assert all(line.endswith(" us a call") for line in lines[5::2])
    with pytest.raises(SystemExit):
        benchmark.main(["--stages", "two"])
