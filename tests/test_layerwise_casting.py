"""diffusers' layerwise casting composes with partitioning: the casts are captured into the
graph, each stage holds its weights in the storage dtype, and the stages compute what the
model with casting computes (diffusers' ``test_layerwise_casting_inference``, on tiny
pipelines of the same kinds, checked against the unpartitioned pipeline)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import asyncfx
from asyncfx.zoo import tiny
from test_pipelines import (STEPS, animatediff_pipeline, controlnet_pipeline, images, one_thread,
                            sd3_pipeline, sdxl_pipeline)

STORAGE, COMPUTE = torch.float8_e4m3fn, torch.float32


def _named(build, attribute: str):
    """A pipeline builder of tests/test_pipelines.py, with the attribute its denoiser is at."""
    def make():
        pipe, inputs = build()
        return pipe, attribute, inputs
    return make


def pixart_pipeline():
    """PixArt-alpha without its T5 text encoder: called with the prompt embeddings and masks."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    from test_model_families import pixart

    transformer, _, _ = pixart()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny.vae(), transformer=transformer,
                               scheduler=DDIMScheduler(num_train_timesteps=1000))
    generator, mask = torch.Generator().manual_seed(3), torch.ones(1, 8, dtype=torch.long)
    return pipe, dict(prompt_embeds=torch.randn(1, 8, 32, generator=generator), prompt_attention_mask=mask,
                      negative_prompt_embeds=torch.randn(1, 8, 32, generator=generator),
                      negative_prompt_attention_mask=mask, negative_prompt=None, height=16, width=16,
                      use_resolution_binning=False)


#: diffusers' test_layerwise_casting_inference runs on these pipelines; ControlNet's is
#: Stable Diffusion's with the control residuals as inputs.
PIPELINES = {"sdxl": _named(sdxl_pipeline, "unet"), "sd3": _named(sd3_pipeline, "transformer"),
             "pixart": _named(pixart_pipeline, "transformer"),
             "controlnet": _named(controlnet_pipeline, "unet"),
             "animatediff": _named(animatediff_pipeline, "unet")}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_a_pipeline_with_layerwise_casting_equals_its_unpartitioned_run(name):
    """Warm-up covering every step: exactly the pipeline with casting; fewer: the serial
    and local executors agree, and the stale steps ran."""
    pipe, attribute, embeds = PIPELINES[name]()
    model = getattr(pipe, attribute)
    model.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    with one_thread():
        original = images(pipe, **embeds)
        runs = {}
        for warmup, executor in ((STEPS, "local"), (2, "serial"), (2, "local")):
            denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=warmup, executor=executor,
                                         release_weights=False, progress=False)
            setattr(pipe, attribute, denoiser)
            runs[warmup, executor] = images(pipe, **embeds)
            denoiser.close()
            setattr(pipe, attribute, model)
    np.testing.assert_array_equal(runs[STEPS, "local"], original)
    np.testing.assert_array_equal(runs[2, "local"], runs[2, "serial"])
    assert not np.array_equal(runs[2, "local"], original) and np.isfinite(runs[2, "local"]).all()


def test_each_stage_holds_its_cast_layers_weights_in_the_storage_dtype():
    model, _, kwargs = tiny.sd_unet()
    compute_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    stored = {name: p for name, p in model.named_parameters()}
    denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial", release_weights=False,
                                 example_inputs=((), kwargs), progress=False)
    plan, program = denoiser.plan, denoiser.captures()[0].program
    at_rest = sum(p.numel() * p.element_size() for p in stored.values())
    assert plan.total_param_bytes == at_rest < compute_bytes / 2  # most weights are one byte, not four
    for stage, module in zip(plan.stages, (spec.module for spec in program.stages)):
        held = dict(module.named_parameters())
        assert stage.param_bytes == sum(p.numel() * p.element_size() for p in held.values())
        assert held and all(p.dtype == stored[name].dtype for name, p in held.items())
        assert any(p.dtype == STORAGE for p in held.values())
    casts = [n for n in program.stages[0].module.graph.nodes
             if n.op == "call_function" and n.args and getattr(n.args[0], "op", "") == "get_attr"]
    assert casts  # each cast layer reads its stored weight through a cast node
    with torch.no_grad():  # and the model itself still casts with its hooks, as before
        expected = model(**kwargs).sample
        torch.testing.assert_close(denoiser(**kwargs).sample, expected, rtol=0, atol=0)
    assert {p.dtype for p in model.parameters()} == {STORAGE, COMPUTE}


def test_casting_enabled_after_partitioning_takes_effect_at_the_next_generation():
    model, _, kwargs = tiny.sd_unet()
    denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial", release_weights=False,
                                 progress=False)

    def generation(partitioned):
        with torch.no_grad():
            return [partitioned(**{**kwargs, "timestep": torch.tensor(t)}).sample for t in (900, 800, 700)]

    before = generation(denoiser)
    model.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)  # an edit: captured again
    after = generation(denoiser)
    fresh = generation(asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial",
                                         release_weights=False, progress=False))
    for got, expected in zip(after, fresh):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(after[-1], before[-1])
