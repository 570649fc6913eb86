"""Shared fixtures: the tiny model zoo, captured once per test session."""
from __future__ import annotations

import functools
import gc
import importlib.util
import os
import pathlib
import sys
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from diffusers import DDIMScheduler

import asyncfx
from asyncfx.passes.meta import VALUE_CLASS, ValueClass
from asyncfx.zoo.tiny import ZOO


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist every core runs a worker: each computes on one thread, and the
    processes tests start do too, or their thread pools would fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Collected: what the imports made stays for the session (``collect_garbage_less_often``)."""
    collect_garbage_less_often()


def collect_garbage_less_often() -> None:
    """Python's full garbage collections walk every object a process holds (torch's,
    diffusers' and the captures tests share) and, at the default thresholds, run every few
    seconds of capturing: about a tenth of a worker's time. The objects made so far are
    moved out of their reach (``gc.freeze``), and they run at every 100th collection of
    the middle generation rather than every 10th; young collections, which free most of
    the graphs a test drops, run about as often as before.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(2000, 10, 100)


def load_benchmark(name: str) -> Any:
    """The module of ``benchmarks/<name>.py`` (benchmarks are scripts, not a package: they
    import their helpers from their own folder, as when run)."""
    folder = pathlib.Path(__file__).parent.parent / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def zoo_example(name: str):
    """``(model, args, kwargs)`` for a zoo model, built once."""
    return ZOO[name]()


@functools.lru_cache(maxsize=None)
def zoo_captured(name: str) -> asyncfx.Captured:
    model, args, kwargs = zoo_example(name)
    return asyncfx.capture(model, args, kwargs)


def streams(denoiser: asyncfx.AsyncDenoiser) -> list:
    """The streams of calls of a denoiser's current capture, in the order they started."""
    return list(denoiser.captures()[0].streams.values())


def on_cuda(inputs: Any) -> Any:
    """Example inputs (any nesting of args and kwargs) with every tensor moved to the GPU."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.cuda(), inputs)


def leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tuple, dataclass or tensor), in order."""
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def assert_same_output(got: Any, expected: Any) -> None:
    """Same output type and bitwise-equal tensors."""
    assert type(got) is type(expected)
    got_leaves, expected_leaves = leaves(got), leaves(expected)
    assert len(got_leaves) == len(expected_leaves)
    for g, e in zip(got_leaves, expected_leaves):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def check_boundaries(captured: asyncfx.Captured, plan: asyncfx.StagePlan,
                     staged: asyncfx.StagedModel) -> None:
    """Boundaries are exactly the latent values one stage makes and a later one reads."""
    graph_inputs = {i.placeholder for i in captured.inputs}
    nodes = {n.name: n for n in captured.graph.nodes}
    listed = {b.name: b for b in plan.boundaries}
    assert len(listed) == len(plan.boundaries), "a boundary is listed twice"
    for boundary in plan.boundaries:
        assert nodes[boundary.name].meta[VALUE_CLASS] is ValueClass.LATENT
        assert boundary.name in plan.stages[boundary.producer].nodes
        assert boundary.consumers and min(boundary.consumers) > boundary.producer
        assert boundary.name in staged.stage_outputs[boundary.producer]
        for k in boundary.consumers:
            assert boundary.name in staged.stage_inputs[k], (boundary.name, k)
    for k, inputs in enumerate(staged.stage_inputs):
        for name in set(inputs) - graph_inputs:
            assert k in listed[name].consumers, f"stage {k} reads {name} without being listed"


class Mispriced(torch.nn.Module):
    """A denoiser the FLOP/byte estimate misprices on CPUs both ways: the first half holds
    twice the Linear layers of the second and reshapes their outputs (views, priced by
    their bytes, free to run); the second sorts its activations after each layer (the
    bytes of a linear, milliseconds on a CPU). The estimated balanced cut runs unbalanced."""

    def __init__(self, width: int = 256, layers: int = 4):
        super().__init__()
        self.first = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2 * layers))
        self.second = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
        x = sample
        for layer in self.first:
            x = layer(x) + timestep / 1000
            for _ in range(4):  # views: priced by their bytes, free to run
                x = x.view(-1, x.shape[-1] // 2).view(x.shape)
        for layer in self.second:
            x = layer(x)
            x = x + torch.sort(x.flatten()).values.view_as(x) * 1e-3
        return (x,)


def mispriced_example() -> tuple[Mispriced, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return Mispriced().eval(), {"sample": torch.randn(128, 256), "timestep": torch.tensor(999.0)}


def with_step_cache(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """``model`` with one of diffusers' step caches applied to it (``apply_*``: the zoo's
    models have no ``enable_cache``): "reuse", Pyramid Attention Broadcast on every
    attention module, every other step (its timestep always in range); "forecast",
    TaylorSeer on the attention of transformer blocks, to second order; "chain", MagCache
    with Flux's ratios over 10 steps, none retained, skipping often; "first block", the
    first-block cache; "extrapolate", FasterCache on a guidance-distilled model, every
    other step's attention extrapolated."""
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig, apply_faster_cache,
                                 apply_first_block_cache, apply_mag_cache, apply_pyramid_attention_broadcast,
                                 apply_taylorseer_cache)
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    if kind == "extrapolate":
        apply_faster_cache(model, FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
            current_timestep_callback=lambda: 500))
    elif kind == "first block":
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.6))
    elif kind == "chain":
        apply_mag_cache(model, MagCacheConfig(threshold=0.5, retention_ratio=0.0, num_inference_steps=10,
                                              mag_ratios=FLUX_MAG_RATIOS))
    elif kind == "reuse":
        apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500))
    else:
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=3,
                                                            max_order=2, taylor_factors_dtype=torch.float32))
    return model


def ddim(steps: int) -> DDIMScheduler:
    """The scheduler ``sample`` steps with (stride 2 needs it before the loop starts)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


def sample(denoiser, model_kwargs, latent_name, steps=10, guided_at=()):
    """A DDIM loop calling ``denoiser`` like a pipeline does. At the steps listed in
    ``guided_at`` a second call, without text conditioning, adds classifier-free guidance
    (as pipelines that make the two passes separate calls do)."""
    scheduler = ddim(steps)
    x = model_kwargs[latent_name].clone()
    for i, t in enumerate(scheduler.timesteps):
        timestep = torch.full_like(model_kwargs["timestep"], t.item())  # the example's shape
        call = {**model_kwargs, latent_name: x, "timestep": timestep}
        eps = _noise(denoiser(**call))
        if i in guided_at:
            unconditional = _noise(denoiser(**{**call, "encoder_hidden_states":
                                               torch.zeros_like(call["encoder_hidden_states"])}))
            eps = unconditional + 2.0 * (eps - unconditional)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _noise(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
