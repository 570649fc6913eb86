"""The step-cache rules (``asyncfx.cache_rules``) of diffusers' step-cache hooks on a model,
each with its hook's own settings, and the blocks whose calls a capture records for them.

Read through attribute names and duck typing, as ``asyncfx.integration`` reads diffusers'
other conventions (whose hook names this module uses): asyncfx imports no diffusers.

Example:
    >>> transformer.enable_cache(MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS))
    >>> step_cache_rules(transformer)[0].module
    'transformer_blocks.0..single_transformer_blocks.37'
"""
from __future__ import annotations

import functools
from typing import Any

from torch import nn

from asyncfx.cache_rules import (ChainBlock, Extrapolate, FirstBlockChange, MagnitudeSchedule, ReuseEvery,
                                 Rule, SkipChain, TaylorForecast)
from asyncfx.errors import CaptureError
from asyncfx.integration import (CHAIN_HOOKS, DIFFUSERS_HOOKS, FASTER_HOOK, FASTER_MODEL_HOOK,
                                 FBC_HEAD_HOOK, MAG_HEAD_HOOK, REUSE_HOOK, TAYLOR_HOOK, diffusers_hook_names)


def step_cache_rules(model: nn.Module) -> list[Rule]:
    """The rules (``runtime.step_cache``) of the step-cache hooks on ``model``'s modules:
    PyramidAttentionBroadcastConfig's reuse, TaylorSeerCacheConfig's forecast and
    FasterCacheConfig's extrapolation per module, MagCacheConfig's and
    FirstBlockCacheConfig's skipped chain of blocks, each with its hooks' own settings; []
    for none.

    Example:
        >>> transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=3))
        >>> step_cache_rules(transformer)[0].interval
        3
    """
    rules: list[Rule] = []
    chain: list[tuple[str, dict]] = []
    model_hooks = getattr(model.__dict__.get(DIFFUSERS_HOOKS), "hooks", None) or {}
    if FASTER_MODEL_HOOK in model_hooks:
        _check_distilled(type(model).__name__, model_hooks[FASTER_MODEL_HOOK])
    for name, module in model.named_modules():
        hooks = getattr(module.__dict__.get(DIFFUSERS_HOOKS), "hooks", None) or {}
        if any(hook in hooks for hook in CHAIN_HOOKS):
            chain.append((name, hooks))
        rules += _module_rules(name, module, hooks, model_hooks.get(FASTER_MODEL_HOOK))
    return rules + ([_skip_chain(type(model).__name__, chain)] if chain else [])


def _module_rules(name: str, module: nn.Module, hooks: dict, faster_model_hook: Any) -> list[Rule]:
    """The rules of the hooks on one module that caches it alone."""
    rules: list[Rule] = []
    if REUSE_HOOK in hooks:
        hook = hooks[REUSE_HOOK]
        rules.append(ReuseEvery(name, hook.block_skip_range, tuple(hook.timestep_skip_range),
                                hook.current_timestep_callback))
    if FASTER_HOOK in hooks:
        hook = hooks[FASTER_HOOK]
        rules.append(Extrapolate(name, hook.block_skip_range, tuple(hook.timestep_skip_range),
                                 hook.current_timestep_callback,
                                 functools.partial(hook.weight_callback, module),
                                 functools.partial(_faster_cache_state, hook, faster_model_hook)))
    if TAYLOR_HOOK in hooks:
        hook = hooks[TAYLOR_HOOK]
        state = getattr(hook.state_manager, "_init_kwargs", {})
        rules.append(TaylorForecast(name, hook.cache_interval, hook.disable_cache_before_step,
                                    hook.disable_cache_after_step, state.get("max_order", 1),
                                    hook.taylor_factors_dtype, bool(state.get("is_inactive", False))))
    return rules


def _faster_cache_state(hook: Any, model_hook: Any, memory: dict, call: int) -> None:
    """FasterCache's hooks' own state as the stage keeping a module's memory has it: the
    calls counted, and the module's outputs at the last two calls (that stage's tensors,
    not copies), as diffusers' hooks keep them while they run the model themselves."""
    before, outputs = (values[0] if len(values) == 1 else values
                       for values in (memory["before"], memory["outputs"]))
    hook.state.iteration = call + 1
    hook.state.cache = [before, outputs]
    if model_hook is not None:
        model_hook.state.iteration = call + 1


def _check_distilled(model_class: str, hook: Any) -> None:
    """FasterCache on a model that computes guidance in its batch halves the batch at the
    calls it skips the unconditional half: another call than the one captured."""
    if not hook.is_guidance_distilled:
        raise CaptureError(f"{model_class} has FasterCacheConfig(is_guidance_distilled=False), which calls "
                           "the model with half of the guidance batch at the calls it skips the "
                           "unconditional half, and approximates that half from the other: a call of another "
                           "batch than the captured one. asyncfx applies FasterCache to guidance-distilled "
                           "models (is_guidance_distilled=True); use PyramidAttentionBroadcastConfig for "
                           "this model, or call model.disable_cache().")


def chained_blocks(model: nn.Module) -> tuple[str, ...]:
    """The blocks a chain-skipping step cache (MagCache, first-block cache) hooked, first
    to last; their calls are recorded in a capture (``passes.block_calls``).

    Example:
        >>> transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        >>> chained_blocks(transformer)[:2]
        ('transformer_blocks.0', 'transformer_blocks.1')
    """
    return tuple(name for name, module in model.named_modules()
                 if any(hook in diffusers_hook_names(module) for hook in CHAIN_HOOKS))


def _skip_chain(model_class: str, chain: list[tuple[str, dict]]) -> SkipChain:
    """The rule of a MagCache's or first-block cache's hooks on the blocks of ``chain``."""
    blocks = tuple(_chain_block(name, hooks) for name, hooks in chain)
    first = chain[0][1]
    if FBC_HEAD_HOOK in first:
        return SkipChain(blocks, FirstBlockChange(float(first[FBC_HEAD_HOOK].threshold)), skipped_from=1,
                         encoder_residual=True)
    config = first[MAG_HEAD_HOOK].config
    if config.calibrate:
        raise CaptureError(f"{model_class} has MagCacheConfig(calibrate=True), which measures the magnitude "
                           "ratios by computing every block and printing them at the last step: calibrate "
                           "on the model before partitioning it, then enable MagCacheConfig(mag_ratios=<the "
                           "printed ratios>).")
    steps = int(config.num_inference_steps)
    return SkipChain(blocks, MagnitudeSchedule(
        tuple(float(r) for r in config.mag_ratios), float(config.threshold), int(config.max_skip_steps),
        int(config.retention_ratio * steps + 0.5), steps))


def _chain_block(name: str, hooks: dict) -> ChainBlock:
    metadata = next(hooks[h] for h in CHAIN_HOOKS if h in hooks)._metadata
    return ChainBlock(name, metadata.hidden_states_argument_name,
                      getattr(metadata, "encoder_hidden_states_argument_name", "encoder_hidden_states"),
                      metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index)
