"""Layouts of batch groups x stages: every executor runs them with the same numbers, each
sample gets the numbers of its own batch, and ``layout=None`` chooses one and says why."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

import asyncfx
from asyncfx.program import Layout
from asyncfx.zoo import tiny
from tests.conftest import leaves, zoo_example

TIMESTEPS = (900, 800, 700, 600, 500)


@pytest.fixture(autouse=True)
def one_thread():
    """The serial executor on one thread sums like each single-threaded local worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def halves(kwargs: dict, batch: int = 2) -> list[dict]:
    """Each sample's own call: every tensor whose first dimension is the batch, cut."""
    return [{k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v
             for k, v in kwargs.items()} for i in range(batch)]


def sample_run(denoiser, kwargs: dict, timestep_name: str = "timestep") -> list[torch.Tensor]:
    """The denoiser's first output at each of TIMESTEPS (two warm-up steps, then stale ones)."""
    outputs = []
    for t in TIMESTEPS:
        given = kwargs[timestep_name]
        value = torch.full_like(given, t) if isinstance(given, torch.Tensor) else t
        outputs.append(leaves(denoiser(**{**kwargs, timestep_name: value}))[0])
    return outputs


def test_two_groups_of_one_stage_give_each_sample_the_numbers_of_its_own_batch():
    model, _, kwargs = zoo_example("sd_unet")
    denoiser = asyncfx.partition(model, 2, layout="2x1", warmup=2)
    with torch.no_grad():
        got = sample_run(denoiser, kwargs)
        for t, output in zip(TIMESTEPS, got):
            own = torch.cat([model(**{**half, "timestep": torch.tensor(t)}).sample
                             for half in halves(kwargs)])
            torch.testing.assert_close(output, own, rtol=0, atol=0)
            whole = model(**{**kwargs, "timestep": torch.tensor(t)}).sample
            torch.testing.assert_close(output, whole)  # kernels sum otherwise by batch size, by 1e-6
    assert denoiser.layout == Layout(2, 1) and denoiser.plan.layout == "2x1"
    assert "layout 2x1: 2 batch groups of 1 stage(s)" in denoiser.plan.summary()
    denoiser.close()


@pytest.mark.parametrize("name, timestep", [("sd_unet", "timestep"), ("dit_transformer", "timestep")])
def test_two_groups_of_two_stages_equal_the_two_stage_run_of_each_half_in_every_executor(name, timestep):
    model, _, kwargs = zoo_example(name)
    runs = {}
    for executor in ("serial", "local"):
        denoiser = asyncfx.partition(model, 4, layout="2x2", executor=executor, warmup=2, rebalance=False)
        with torch.no_grad():
            runs[executor] = sample_run(denoiser, kwargs, timestep)
        assert denoiser.program.n_groups == 2 and denoiser.program.n_stages == 2
        plan = denoiser.plan
        denoiser.close()
    for local, serial in zip(runs["local"], runs["serial"]):
        torch.testing.assert_close(local, serial, rtol=0, atol=0)
    half_call = halves(kwargs)
    captured = asyncfx.capture(model, (), half_call[0])  # both halves have its shapes
    half_plan = asyncfx.compile(captured, 2)
    assert [s.nodes for s in half_plan.stages] == [s.nodes for s in plan.stages]
    parts = []
    for half in half_call:
        denoiser = asyncfx.partition(captured, 2, layout="1x2", plan=half_plan, executor="serial", warmup=2)
        with torch.no_grad():
            parts.append(sample_run(denoiser, half, timestep))
    for grouped, first, second in zip(runs["serial"], *parts):
        torch.testing.assert_close(grouped, torch.cat([first, second]), rtol=0, atol=0)


def xl_pipeline() -> tuple[StableDiffusionXLPipeline, dict]:
    unet, _, _ = tiny.sdxl_unet()
    pipe = StableDiffusionXLPipeline(vae=tiny.vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet,
                                     scheduler=DDIMScheduler(num_train_timesteps=1000))
    generator = torch.Generator().manual_seed(2)
    return pipe, dict(prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                      negative_prompt_embeds=torch.randn(1, 4, 8, generator=generator),
                      pooled_prompt_embeds=torch.randn(1, 8, generator=generator),
                      negative_pooled_prompt_embeds=torch.randn(1, 8, generator=generator))


def sd_pipeline() -> tuple:
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 4, 8, generator=generator)
    return tiny.sd_pipeline(), dict(prompt_embeds=embeds, negative_prompt_embeds=torch.randn_like(embeds))


@pytest.mark.parametrize("make", [sd_pipeline, xl_pipeline], ids=["sd", "sdxl"])
def test_pipelines_on_four_workers_pick_a_layout_and_equal_the_serial_executor(make):
    pipe, kwargs = make()
    unet = pipe.unet
    images, layout = {}, None
    for executor in ("local", "serial"):  # the serial reference with the layout the local run chose
        pipe.unet = asyncfx.partition(unet, n_devices=4, layout=layout, executor=executor, warmup=2,
                                      rebalance=False)
        out = pipe(num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np",
                   **kwargs)
        images[executor] = np.asarray(out.images)
        if layout is None:  # chosen from the predicted speed of each candidate, and the plan says why
            layout = str(pipe.unet.layout)
            why = next(note for note in pipe.unet.plan.notes if note.startswith("layout "))
            assert why.startswith(f"layout {layout} chosen: predicted speedup over one device at 50 steps")
            assert "1x4" in why and "2x2" in why and layout in repr(pipe.unet)
        assert str(pipe.unet.layout) == layout
        pipe.unet.close()
    np.testing.assert_array_equal(images["local"], images["serial"])


def test_stride_two_runs_in_every_group_on_three_slots_each():
    from tests.conftest import ddim, sample

    model, _, kwargs = zoo_example("sd_unet")
    latents = {}
    for executor in ("serial", "local"):
        denoiser = asyncfx.partition(model, 4, layout="2x2", stride=2, scheduler=ddim(8), warmup=2,
                                     executor=executor, rebalance=False)
        with torch.no_grad():
            latents[executor] = sample(denoiser, kwargs, "sample", steps=8)
        if executor == "local":
            assert len(denoiser.executor.devices) == 6  # two groups of two stages and stride 2's extra slot
        denoiser.close()
    torch.testing.assert_close(latents["local"], latents["serial"], rtol=0, atol=0)
