"""diffusers' step caches compose with partitioning: the stages apply the cache's policy
themselves, each to the cached modules it computes, on values it keeps itself.

diffusers' ``test_pyramid_attention_broadcast_inference``, ``..._layers``,
``test_taylorseer_cache_inference``, ``test_first_block_cache_inference``,
``test_mag_cache_inference`` and ``test_faster_cache_inference`` run on FluxPipeline; here
the same configurations run on a tiny FluxPipeline, partitioned, against the
unpartitioned pipeline with the cache enabled."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                       PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

import asyncfx
from asyncfx.errors import AsyncFXError, CaptureError, PlanError
from asyncfx.cache_hooks import chained_blocks, step_cache_rules
from asyncfx.partitioner.cuts import cut_positions, latent_order
from asyncfx.passes.substitute import SUBSTITUTED_PREFIX, module_outputs, substituting
from asyncfx.zoo import tiny
from test_pipelines import flux_pipeline, one_thread

STEPS = 8


def pab(pipe) -> PyramidAttentionBroadcastConfig:
    """diffusers' test configuration (its identifiers match both kinds of Flux block)."""
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        spatial_attention_block_identifiers=["transformer_blocks"],
        current_timestep_callback=lambda: pipe.current_timestep)


def taylorseer_lite(pipe) -> TaylorSeerCacheConfig:
    """diffusers' test configuration (blocks left out, the output projection forecast),
    its intervals scaled to 8 steps."""
    return TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1,
                                 taylor_factors_dtype=torch.bfloat16, use_lite_mode=True)


def taylorseer_attention(pipe) -> TaylorSeerCacheConfig:
    """Every attention module forecast to second order, its terms in float32, the last step
    computed."""
    return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=3, disable_cache_after_step=7,
                                 max_order=2, taylor_factors_dtype=torch.float32)


def faster_cache(pipe) -> FasterCacheConfig:
    """diffusers' Flux test configuration (guidance-distilled: attention extrapolated)."""
    return FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
        unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True, current_timestep_callback=lambda: pipe.current_timestep)


CONFIGS = {"pab": pab, "taylorseer_lite": taylorseer_lite, "taylorseer_attention": taylorseer_attention,
           "faster_cache": faster_cache}


def magcache(pipe) -> MagCacheConfig:
    """Flux's magnitude ratios over 8 steps, at a threshold that skips steps."""
    return MagCacheConfig(threshold=0.5, num_inference_steps=STEPS, mag_ratios=FLUX_MAG_RATIOS)


def first_block(pipe) -> FirstBlockCacheConfig:
    """diffusers' test threshold."""
    return FirstBlockCacheConfig(threshold=0.8)


CHAINS = {"magcache": magcache, "first_block": first_block}


def sample(pipe, inputs: dict) -> np.ndarray:
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                **inputs).images


def cached_modules(model) -> dict[str, object]:
    """The modules diffusers hooked for the cache, with their hooks."""
    return {name: hook for name, module in model.named_modules()
            for key, hook in getattr(module.__dict__.get("_diffusers_hook"), "hooks", {}).items()
            if key in ("pyramid_attention_broadcast", "taylorseer_cache", "faster_cache_block")}


def skipped_at(call: int, hook, timesteps: list[float]) -> bool:
    """Whether the configuration says the hooked module is not computed at ``call``."""
    if hasattr(hook, "weight_callback"):  # FasterCache's: computed at call 0 only out of its range
        low, high = hook.timestep_skip_range
        return low < timesteps[call] < high and (call == 0 or call % hook.block_skip_range != 0)
    if hasattr(hook, "block_skip_range"):
        low, high = hook.timestep_skip_range
        return call % hook.block_skip_range != 0 and low < timesteps[call] < high
    first, interval, last = hook.disable_cache_before_step, hook.cache_interval, hook.disable_cache_after_step
    return call >= first and (call - first - 1) % interval != 0 and (last is None or call < last)


def substitutions(denoiser) -> list[tuple[int, int, tuple[str, ...]]]:
    (stream,) = denoiser.captures()[0].streams.values()
    return stream.store.cache_memory.log


def partitioned_runs(pipe, inputs: dict) -> tuple[dict, dict]:
    """The pipeline's samples with its transformer partitioned in 2 stages, at warm-up
    covering every step (local executor) and at warm-up 2 (serial and local), and what the
    stages substituted in each, by ``(warmup, executor)``."""
    model, runs, logs = pipe.transformer, {}, {}
    for warmup, executor in ((STEPS, "local"), (2, "serial"), (2, "local")):
        denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=warmup, executor=executor,
                                     release_weights=False, progress=False)
        pipe.transformer = denoiser
        try:
            runs[warmup, executor] = sample(pipe, inputs)
            logs[warmup, executor] = sorted(substitutions(denoiser))
        finally:
            denoiser.close()
            pipe.transformer = model
    return runs, logs


@pytest.fixture(scope="module")
def flux():
    pipe, inputs = flux_pipeline()
    with one_thread():
        plain = sample(pipe, inputs)
    return pipe, inputs, plain


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_cached_pipeline_equals_its_unpartitioned_run_and_skips_what_the_config_says(flux, name):
    """Warm-up covering every step: exactly the pipeline with the cache; fewer: the serial
    and local executors agree, and each stage substituted each cached module it computes
    at the calls the configuration names: those whose values it computes from, one step
    back for the second stage after warm-up."""
    pipe, inputs, plain = flux
    model = pipe.transformer
    model.enable_cache(CONFIGS[name](pipe))
    hooks = cached_modules(model)
    try:
        with one_thread():
            cached = sample(pipe, inputs)
            runs, logs = partitioned_runs(pipe, inputs)
    finally:
        pipe.transformer = model
        model.disable_cache()
    assert not np.array_equal(cached, plain)  # the cache skipped work
    np.testing.assert_array_equal(runs[STEPS, "local"], cached)
    np.testing.assert_array_equal(runs[2, "local"], runs[2, "serial"])
    assert not np.array_equal(runs[2, "local"], cached) and np.isfinite(runs[2, "local"]).all()
    assert logs[2, "local"] == logs[2, "serial"]
    timesteps = [float(t) for t in pipe.scheduler.timesteps]  # as the last run set them
    sequential = logs[STEPS, "local"]  # (origin, stage, modules): at warm-up, the call itself
    assert [(origin, stage) for origin, stage, _ in sequential] == [
        (c, k) for c in range(STEPS) for k in range(2)]
    for call in range(STEPS):
        skipped = {m for c, _, modules in sequential if c == call for m in modules}
        assert skipped == {m for m, hook in hooks.items() if skipped_at(call, hook, timesteps)}, call
    log = logs[2, "local"]  # after 2 warm-up steps the second stage computes from the step before
    assert sorted((stage, origin) for origin, stage, _ in log) == sorted(
        [(0, c) for c in range(STEPS)] + [(1, c) for c in (0, 1, *range(1, STEPS - 1))])
    holds = {(stage, m) for _, stage, modules in sequential for m in modules}
    for origin, stage, modules in log:  # a stage substitutes a module at every call skipping it
        assert set(modules) == {m for k, m in holds if k == stage and skipped_at(origin, hooks[m], timesteps)}


def test_faster_cache_hooks_keep_their_state_while_the_stages_run(flux):
    """diffusers' ``test_faster_cache_state`` on the partitioned pipeline: at the end of
    each step every hooked attention module's state holds its last two outputs and the
    calls counted (the stages keep the memory, the hooks' state follows it), and the
    pipeline's reset at its end clears them."""
    pipe, inputs, _ = flux
    model = pipe.transformer
    model.enable_cache(faster_cache(pipe))
    hooks, root = cached_modules(model), model._diffusers_hook.get_hook("faster_cache_denoiser")
    checked = []

    def check(_, i, t, kwargs):
        assert root.state.iteration == i + 1
        for name, hook in hooks.items():
            assert hook.state.cache is not None and len(hook.state.cache) == 2, name
            assert hook.state.iteration == i + 1, name
        checked.append(i)
        return {}

    denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=4, release_weights=False, progress=False)
    try:
        pipe.transformer = denoiser
        with one_thread():
            pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np",
                 callback_on_step_end=check, **inputs)
        assert checked == [0, 1, 2, 3] and len(hooks) == 3  # one attention module per block
        assert root.state.iteration == 0  # reset by the pipeline, through the denoiser
        assert all(hook.state.iteration == 0 and hook.state.cache is None for hook in hooks.values())
    finally:
        pipe.transformer = model
        denoiser.close()
        model.disable_cache()


def runs_of_the_last_block(model) -> tuple[list[bool], list]:
    """Per call of ``model``, whether its last single block computed (torch hooks on the
    model and on that block's output projection), and the hooks."""
    ran: list[bool] = []
    hooks = [model.register_forward_pre_hook(lambda *_: ran.append(False)),
             model.single_transformer_blocks[-1].proj_out.register_forward_hook(
                 lambda *_: ran.__setitem__(-1, True))]
    return ran, hooks


@pytest.mark.parametrize("name", list(CHAINS))
def test_a_chain_skipping_cache_equals_its_unpartitioned_run_and_skips_where_the_model_does(flux, name):
    """MagCache and the first-block cache skip the chain of transformer blocks as a whole:
    each stage its own blocks, the hidden states carried by the residual of its part.
    Warm-up covering every step: the pipeline with the cache (the parts' residuals add up
    to the chain's, equal up to rounding), skipping the chain at the very calls the
    unpartitioned model does; fewer: serial = local, and every stage follows the decision
    of its run's origin (MagCache's the config's schedule; the first-block cache's made by
    the stage of the first block from the values there)."""
    pipe, inputs, plain = flux
    model = pipe.transformer
    model.enable_cache(CHAINS[name](pipe))
    (rule,) = step_cache_rules(model)
    try:
        with one_thread():
            ran, hooks = runs_of_the_last_block(model)
            cached = sample(pipe, inputs)
            for hook in hooks:
                hook.remove()
            runs, logs = partitioned_runs(pipe, inputs)
    finally:
        pipe.transformer = model
        model.disable_cache()
    assert ran[0] and not all(ran) and not np.array_equal(cached, plain)
    np.testing.assert_allclose(runs[STEPS, "local"], cached, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(runs[2, "local"], runs[2, "serial"])
    assert logs[2, "local"] == logs[2, "serial"] and np.isfinite(runs[2, "local"]).all()
    chain = {block.path for block in rule.blocks[rule.skipped_from:]}
    sequential = logs[STEPS, "local"]
    for call in range(STEPS):
        skipped = {m for c, _, modules in sequential if c == call for m in modules}
        assert skipped == (set() if ran[call] else chain), call
    holds = {stage: set(modules) for _, stage, modules in sequential if modules}
    decisions: dict[int, set[bool]] = {}
    for origin, stage, modules in logs[2, "local"]:
        if stage in holds:
            assert set(modules) in (set(), holds[stage])
            decisions.setdefault(origin, set()).add(not modules)
    checked = decisions if name == "magcache" else (0, 1)  # the schedule; the warm-up steps' values
    assert all(decisions[origin] == {ran[origin]} for origin in checked), (decisions, ran)


def test_cuts_never_split_a_block_a_chain_skipping_cache_skips():
    model, _, kwargs = tiny.flux_transformer()
    free = cut_positions(latent_order(asyncfx.capture(model, (), kwargs).graph))
    model.enable_cache(magcache(None))
    order = latent_order(asyncfx.capture(model, (), kwargs).graph)
    kept = cut_positions(order)
    assert set(kept) < set(free)
    for block in chained_blocks(model):
        inside = [i for i, node in enumerate(order) if any(
            path == block for path, _ in (node.meta.get("nn_module_stack") or {}).values())]
        assert not any(inside[0] < p <= inside[-1] for p in kept)
        assert any(inside[0] < p <= inside[-1] for p in free)


def test_a_cache_enabled_after_partitioning_applies_from_the_next_call(flux):
    pipe, inputs, plain = flux
    model = pipe.transformer
    try:
        with one_thread():
            model.enable_cache(pab(pipe))
            cached = sample(pipe, inputs)
            model.disable_cache()
            denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=STEPS, executor="serial",
                                         release_weights=False, progress=False)
            pipe.transformer = denoiser
            without = sample(pipe, inputs)
            denoiser.enable_cache(pab(pipe))  # on the denoiser, as a pipeline's code would
            with_cache = sample(pipe, inputs)
            denoiser.disable_cache()
            again = sample(pipe, inputs)
    finally:
        pipe.transformer = model
        if model.is_cache_enabled:
            model.disable_cache()
    np.testing.assert_array_equal(without, plain)
    np.testing.assert_array_equal(with_cache, cached)
    np.testing.assert_array_equal(again, plain)


def test_faster_cache_halving_the_guidance_batch_and_hooks_put_on_after_the_capture_are_refused():
    """FasterCache on a model that is not guidance-distilled calls it with half the batch
    at the calls it skips: refused at partition() and, enabled later, at the call; a hook
    asyncfx applies no policy for (layer skipping), put on after the capture, is refused
    at the call, naming the caches that compose."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
        unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
        current_timestep_callback=lambda: 500)
    model, _, kwargs = tiny.flux_transformer()
    model.enable_cache(config)
    with pytest.raises(CaptureError, match=r"FasterCacheConfig\(is_guidance_distilled=False\)") as refused:
        asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial", progress=False)
    assert "model.disable_cache()" in str(refused.value)
    model.disable_cache()
    plain = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial", progress=False)
    plain(**kwargs)  # captured without it
    model.enable_cache(config)
    with pytest.raises(CaptureError, match="is_guidance_distilled=False"), model.cache_context("cond"):
        plain(**kwargs)
    model.disable_cache()
    apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn="transformer_blocks"))
    with pytest.raises(AsyncFXError, match="put there after the capture") as refused:
        plain(**kwargs)
    assert ("PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig, MagCacheConfig, FirstBlockCacheConfig "
            "and FasterCacheConfig") in str(refused.value)


def test_a_chain_skipping_cache_enabled_after_the_capture_is_refused_until_disabled():
    """The capture records the calls of a chain's blocks only where the cache is on the
    model then: enabled in the middle of a generation, the next call says so (at the next
    generation the model is captured again, with the cache), and once it is disabled the
    denoiser computes the model again."""
    model, _, kwargs = tiny.flux_transformer()
    den = asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial", progress=False)
    at = [{**kwargs, "timestep": torch.full_like(kwargs["timestep"], t)} for t in (0.9, 0.8, 0.6)]
    den(**at[0])
    den(**at[1])  # captured without the cache, and the stages ran
    model.enable_cache(first_block(None))
    with pytest.raises(PlanError, match="enabled after the model was captured") as refused:
        den(**at[2])
    assert "before the first call" in str(refused.value)
    model.disable_cache()
    torch.testing.assert_close(den(**at[0]).sample, model(**at[0]).sample, rtol=0, atol=0)


def test_magcache_calibration_is_refused_at_partition():
    """MagCache's calibration run computes every block to print its ratios at the last
    step: it belongs on the model itself."""
    model, _, _ = tiny.flux_transformer()
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    with pytest.raises(CaptureError, match=r"calibrate=True\), which measures") as refused:
        asyncfx.partition(model, 2, layout="1x2", warmup=1, executor="serial", progress=False)
    assert "mag_ratios=" in str(refused.value)


def test_a_first_block_cache_with_batch_groups_is_refused():
    from diffusers.hooks import apply_first_block_cache

    model, _, kwargs = tiny.dit_transformer()  # its transformer_blocks: a chain diffusers knows
    apply_first_block_cache(model, first_block(None))
    denoiser = asyncfx.partition(model, 2, layout="2x1", warmup=1, executor="serial", progress=False)
    with pytest.raises(PlanError, match="layout='1xN'") as refused:
        denoiser(**kwargs)
    assert "decides from the whole batch's values" in str(refused.value)


def test_a_step_cache_with_stride_2_is_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, _, kwargs = tiny.flux_transformer()
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    settings = dict(layout="1x2", warmup=1, stride=2, executor="serial", scheduler=scheduler, progress=False)
    model.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
    with pytest.raises(PlanError, match="stride=2") as refused:  # at partition()
        asyncfx.partition(model, 2, **settings)
    assert "Partition with stride=1" in str(refused.value) and "disable_cache()" in str(refused.value)
    model.disable_cache()
    denoiser = asyncfx.partition(model, 2, **settings)
    model.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
    with pytest.raises(PlanError, match="stride=2"), model.cache_context("cond"):  # at the call
        denoiser(**kwargs)


def test_a_stage_given_a_modules_outputs_computes_what_it_computes_without_that_module():
    model, _, kwargs = tiny.flux_transformer()
    captured = asyncfx.capture(model, (), kwargs)
    graph = captured.graph_module
    flat = captured.interface.flatten((), kwargs)
    module = "single_transformer_blocks.0.attn"
    outputs = module_outputs(graph, module)
    assert outputs and module_outputs(graph, "no.such.module") == ()
    reference, made = substituting(graph, [], outputs)(*flat)
    variant = substituting(graph, outputs, [])
    result, kept = variant(*flat, *made)
    assert kept == ()
    for got, want in zip(result, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    placeholders = [n.name for n in variant.graph.nodes if n.op == "placeholder"]
    assert placeholders[-len(outputs):] == [SUBSTITUTED_PREFIX + name for name in outputs]
    computed = {n.name for n in variant.graph.nodes if n.op == "call_function"}
    inside = {n.name for n in graph.graph.nodes if any(p == module for p, _ in
                                                        (n.meta.get("nn_module_stack") or {}).values())}
    assert not computed & inside  # the module's own nodes are gone
    zeros = [torch.zeros_like(value) for value in made]
    changed, _ = variant(*flat, *zeros)
    assert not torch.equal(changed[0], reference[0])  # the substituted values are what it reads


def test_batch_groups_each_keep_their_own_cache_memory():
    """Layout 2x1 (the guidance batch split over two workers): each group substitutes its
    own half's attention outputs; at warm-up covering every step each half is the model's
    with the cache run on that half alone, bit for bit, and after warm-up the local
    executor equals the serial one."""
    from diffusers.hooks import HookRegistry

    from conftest import sample, with_step_cache

    model, _, kwargs = tiny.sd_unet()
    with_step_cache(model, "reuse")
    halves = [{name: value[i:i + 1] if value.dim() and len(value) == 2 else value
               for name, value in kwargs.items()} for i in range(2)]
    with one_thread():
        cached = []
        for half in halves:
            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
            cached.append(sample(model, half, "sample", steps=6))
        runs = {}
        for warmup, executor in ((6, "serial"), (2, "serial"), (2, "local")):
            denoiser = asyncfx.partition(model, 2, layout="2x1", warmup=warmup, executor=executor,
                                         release_weights=False, progress=False)
            runs[warmup, executor] = sample(denoiser, kwargs, "sample", steps=6)
            (stream,) = denoiser.captures()[0].streams.values()
            groups = [stream.store.group(g).cache_memory for g in range(2)]
            denoiser.close()
    torch.testing.assert_close(runs[6, "serial"], torch.cat(cached), rtol=0, atol=0)
    torch.testing.assert_close(runs[2, "local"], runs[2, "serial"], rtol=0, atol=0)
    first, second = groups  # the local run's: the same decisions, each group on its own half
    assert first.log and sorted(first.log) == sorted(second.log)
    assert any(modules for _, _, modules in first.log) and first.kept.keys() == second.kept.keys()
    for key, kept in first.kept.items():
        assert not torch.equal(kept["outputs"][0], second.kept[key]["outputs"][0])


def test_a_chain_skipping_cache_on_a_model_writing_in_place_is_refused_naming_both():
    """torch's rewrite of in-place writes (``passes.functionalise``) drops the block calls
    a chain cache needs recorded: the capture says so, with the ways out."""
    from diffusers.hooks import apply_mag_cache
    from diffusers.models.attention import BasicTransformerBlock

    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList(BasicTransformerBlock(8, 2, 4) for _ in range(2))

        def forward(self, hidden_states, timestep):
            hidden_states = hidden_states * timestep
            hidden_states[:, 0] = 0.0  # a slice assignment: an in-place write to an intermediate
            for block in self.transformer_blocks:
                hidden_states = block(hidden_states)
            return hidden_states

    model = InPlace().eval()
    apply_mag_cache(model, magcache(None))
    with pytest.raises(CaptureError, match="writes to intermediate values in place") as refused:
        asyncfx.capture(model, (), {"hidden_states": torch.randn(1, 4, 8), "timestep": torch.tensor(0.5)})
    assert "transformer_blocks.0" in str(refused.value) and "model.disable_cache()" in str(refused.value)
