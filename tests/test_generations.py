"""Where generations begin and who may call: a run stopped early never leaks into the
next one, and a denoiser shared between threads never hangs."""
from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from torch import nn

import asyncfx
from asyncfx.runtime.guards import ConcurrentCallError
from conftest import ddim, zoo_captured, zoo_example

STEPS = 6


def pipeline_run(denoiser, seed: int, steps: int = STEPS, stop_after: int | None = None,
                 scheduler=None) -> torch.Tensor:
    """A DDIM loop as a pipeline makes it: prompt embeddings computed once per run (new
    objects), a latent from ``seed``; ``stop_after`` calls, then it stops (an exception,
    Ctrl-C or an interrupt flag)."""
    _, _, kwargs = zoo_example("sd_unet")
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(steps)
    embeds = kwargs["encoder_hidden_states"].clone()  # the run's text encoder output
    x = torch.randn(kwargs["sample"].shape, generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(scheduler.timesteps):
        if stop_after is not None and i == stop_after:
            return x
        eps = denoiser(sample=x, timestep=t, encoder_hidden_states=embeds).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("warmup, steps", [(1, STEPS), (2, STEPS + 4), (3, STEPS + 4)])
def test_a_run_stopped_after_one_call_does_not_leak_into_the_next(warmup, steps):
    """The next run (another seed; with warm-up 2-3 also another step count) is exactly a
    fresh run, not the continuation of the stopped one."""
    model = zoo_captured("sd_unet")  # captured once for the suite: these tests are about the call clock
    fresh = pipeline_run(asyncfx.partition(model, 2, warmup=warmup, executor="serial"), seed=3, steps=steps)
    den = asyncfx.partition(model, 2, warmup=warmup, executor="serial")
    pipeline_run(den, seed=1)                    # a whole run: the embeddings are kept from step to step
    pipeline_run(den, seed=2, stop_after=1)      # stopped after its first call
    torch.testing.assert_close(pipeline_run(den, seed=3, steps=steps), fresh, rtol=0, atol=0)


@pytest.mark.parametrize("stop_after", [1, 3])
def test_a_scheduler_set_up_again_starts_a_generation_even_first(stop_after):
    """Given the scheduler, a new run is known from its timesteps set up again, even when
    the very first run stopped after one call."""
    model = zoo_captured("sd_unet")
    fresh = pipeline_run(asyncfx.partition(model, 2, warmup=1, executor="serial"), seed=3)
    scheduler = ddim(STEPS)
    den = asyncfx.partition(model, 2, warmup=1, executor="serial", scheduler=scheduler)
    pipeline_run(den, seed=2, stop_after=stop_after, scheduler=scheduler)
    torch.testing.assert_close(pipeline_run(den, seed=3, scheduler=scheduler), fresh, rtol=0, atol=0)


def test_without_any_signal_the_denoiser_warns_once():
    _, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(zoo_captured("sd_unet"), 2, warmup=1, executor="serial")
    with pytest.warns(asyncfx.GenerationWarning, match=r"keep no conditioning tensor from one step to the "
                      r"next.*Pass scheduler=pipe.scheduler to asyncfx.partition\(\), or call reset\(\)"):
        for t in (900, 800, 700):  # new embeddings at every call: nothing tells runs apart
            den(**{**kwargs, "timestep": torch.tensor(t),
                   "encoder_hidden_states": kwargs["encoder_hidden_states"].clone()})


class _Interrupted(Exception):
    pass


def _text_to_image(pipe, how: str) -> None:
    """A text-to-image run stopped after three steps: by an exception from the step
    callback, or by the pipeline's interrupt flag."""
    def stop(pipeline, step, timestep, tensors):
        if step == 2:
            if how == "exception":
                raise _Interrupted
            pipeline._interrupt = True
        return tensors

    try:
        pipe(prompt_embeds=_embeds(0), negative_prompt_embeds=_embeds(1), num_inference_steps=STEPS,
             generator=torch.Generator().manual_seed(0), output_type="np", callback_on_step_end=stop)
    except _Interrupted:
        pass


def _embeds(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed))


def _image_to_image(pipe) -> np.ndarray:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    return pipe(prompt_embeds=_embeds(2), negative_prompt_embeds=_embeds(3), image=image, strength=0.6,
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@pytest.mark.parametrize("how", ["exception", "interrupt flag"])
def test_image_to_image_after_an_interrupted_text_to_image_run_is_a_fresh_run(how):
    from test_pipelines import sd_pipeline

    unet, _, _ = zoo_example("sd_unet")
    fresh_pipe = StableDiffusionImg2ImgPipeline(**sd_pipeline(unet).components)
    fresh_pipe.unet = asyncfx.partition(unet, 2, layout="1x2", warmup=1, executor="serial")
    expected = _image_to_image(fresh_pipe)
    pipe = sd_pipeline(unet)
    pipe.unet = asyncfx.partition(unet, 2, layout="1x2", warmup=1, executor="serial")
    _text_to_image(pipe, how)
    pipe._interrupt = False
    again = _image_to_image(StableDiffusionImg2ImgPipeline(**pipe.components))
    np.testing.assert_array_equal(again, expected)


#: Whether ``Gate`` calls wait, and the events they wait with (kept outside the model, whose
#: attributes are its state: a change of them is an edit, captured again).
GATE = {"closed": False, "entered": threading.Event(), "opened": threading.Event()}


class Gate(nn.Module):
    """``2 (x + t)``; while ``GATE["closed"]``, its call waits until ``GATE["opened"]`` is set."""

    def forward(self, x, t):
        if GATE["closed"]:
            GATE["entered"].set()
            GATE["opened"].wait(timeout=30)
        h = x + t
        return h * 2


def test_a_second_thread_calling_while_a_call_is_under_way_is_refused_at_once():
    # not re-cut: its stages would be built at step 0 to be timed, and the second call runs the model
    den = asyncfx.partition(Gate(), 2, layout="1x2", warmup=3, devices=["cpu", "cpu"], rebalance=False)
    x = torch.ones(2)
    torch.testing.assert_close(den(x, torch.tensor(5.0)), (x + 5) * 2)  # captured; warm-up runs the model
    GATE["closed"] = True
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(den, x, torch.tensor(4.0))
            assert GATE["entered"].wait(timeout=30)
            with pytest.raises(ConcurrentCallError, match=r"is being called by thread .* one denoiser runs "
                               r"one generation at a time.*Give each thread its own"):
                den(x, torch.tensor(4.0))
            GATE["opened"].set()
            torch.testing.assert_close(first.result(timeout=30), (x + 4) * 2)
    finally:
        GATE["closed"] = False
    torch.testing.assert_close(den(x, torch.tensor(3.0)), (x + 3) * 2)  # the generation goes on: warm-up
    den.close()


def test_a_denoiser_shared_by_a_thread_pool_never_hangs():
    """Calls from many threads at once each finish or are refused; none waits for good."""
    model, _, kwargs = zoo_example("sd_unet")
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, devices=["cpu", "cpu"])
    outcomes = []

    def call(t: int) -> None:
        try:
            den(**{**kwargs, "timestep": torch.tensor(t)})
            outcomes.append("ran")
        except ConcurrentCallError:
            outcomes.append("refused")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, t) for t in range(900, 100, -50)]
        concurrent.futures.wait(futures, timeout=120)
    assert all(f.done() for f in futures) and len(outcomes) == len(futures) and "ran" in outcomes
    den.close()


def test_calls_named_by_the_pipeline_keep_their_streams_in_any_order():
    """A pipeline that names its conditional and unconditional calls (diffusers'
    ``cache_context``) may make them in any order: each name is a stream of its own, so
    the results are those of the calls made in one order."""
    _, _, kwargs = zoo_example("sd_unet")
    uncond = {**kwargs, "encoder_hidden_states": torch.zeros_like(kwargs["encoder_hidden_states"])}
    named, ordered = (asyncfx.partition(zoo_captured("sd_unet"), 2, warmup=1, executor="serial")
                      for _ in range(2))
    for step, t in enumerate((900, 800, 700, 600)):
        calls = {"cond": {**kwargs, "timestep": torch.tensor(t)},
                 "uncond": {**uncond, "timestep": torch.tensor(t)}}
        expected = {name: ordered(**call).sample for name, call in calls.items()}
        for name in (("uncond", "cond") if step % 2 else ("cond", "uncond")):
            with named.cache_context(name):
                torch.testing.assert_close(named(**calls[name]).sample, expected[name], rtol=0, atol=0)
    assert [key[1] for key in named.captures()[0].streams] == ["cond", "uncond"]
    assert named.call_context is None
