"""What asyncfx knows of diffusers', accelerate's and torch's conventions, in one place.

Capture reads it once (what a graph cannot stand for is refused), the runtime at every
call (hooks put on since the capture, the names pipelines give their calls, the
sampler's timesteps). Everything here is read through attribute names and duck typing:
asyncfx imports neither diffusers nor accelerate.
"""
from __future__ import annotations

import contextlib
import itertools
import operator
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from asyncfx.errors import AsyncFXError, CaptureError

#: Where nn.Module keeps its parameters, buffers and submodules.
MODULE_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})
#: accelerate's hook on a module (model or sequential CPU offloading, ``device_map``).
ACCELERATE_HOOK = "_hf_hook"
#: diffusers' hook registry on a module (offloading, layerwise casting, caching, layer skipping).
DIFFUSERS_HOOKS = "_diffusers_hook"
#: diffusers' layerwise casting hook (``enable_layerwise_casting``): captured as casts in the graph.
LAYERWISE_CASTING_HOOK = "layerwise_casting"
#: diffusers' step-cache hooks whose policy the stages apply themselves (``runtime.step_cache``):
#: PyramidAttentionBroadcastConfig's and TaylorSeerCacheConfig's on single modules, and
#: MagCacheConfig's and FirstBlockCacheConfig's on the first and the other blocks of a chain.
REUSE_HOOK, TAYLOR_HOOK = "pyramid_attention_broadcast", "taylorseer_cache"
MAG_HEAD_HOOK, MAG_BLOCK_HOOK = "mag_cache_leader_block_hook", "mag_cache_block_hook"
FBC_HEAD_HOOK, FBC_BLOCK_HOOK = "fbc_leader_block_hook", "fbc_block_hook"
#: FasterCacheConfig's, on the model (choosing the calls that halve the guidance batch) and
#: on its attention modules.
FASTER_MODEL_HOOK, FASTER_HOOK = "faster_cache_denoiser", "faster_cache_block"
CHAIN_HOOKS = (MAG_HEAD_HOOK, MAG_BLOCK_HOOK, FBC_HEAD_HOOK, FBC_BLOCK_HOOK)
CACHE_HOOKS = (REUSE_HOOK, TAYLOR_HOOK, FASTER_MODEL_HOOK, FASTER_HOOK, *CHAIN_HOOKS)
#: Hooks a capture passes over: the graph stands for them.
CAPTURED_HOOKS = frozenset({LAYERWISE_CASTING_HOOK, *CACHE_HOOKS})
#: The step caches asyncfx applies, as ``enable_cache()`` takes them.
APPLIED_CACHES = ("PyramidAttentionBroadcastConfig", "TaylorSeerCacheConfig", "MagCacheConfig",
                  "FirstBlockCacheConfig", "FasterCacheConfig")


def diffusers_hook_names(module: Any) -> list[str]:
    """The names of the diffusers hooks on ``module`` itself (none once they are removed).

    Example:
        >>> diffusers_hook_names(torch.nn.Linear(2, 2))
        []
    """
    return list(getattr(module.__dict__.get(DIFFUSERS_HOOKS), "hooks", None) or {})


def any_hook_registry(module_dicts: Sequence[dict]) -> bool:
    """Whether any of these modules' attribute dicts holds a diffusers hook registry (one
    C-level scan: the check every call makes).

    Example:
        >>> any_hook_registry([m.__dict__ for m in unet.modules()])
        False
    """
    return any(map(operator.contains, module_dicts, itertools.repeat(DIFFUSERS_HOOKS)))


def diffusers_hooks(model: nn.Module, module_dicts: Sequence[dict]) -> list[tuple[str, str]]:
    """``(module name, hook name)`` of every diffusers hook on ``model``'s modules, whose
    attribute dicts are ``module_dicts``, but those captures stand for (``CAPTURED_HOOKS``);
    fast when there are none (one C-level scan).

    Example:
        >>> diffusers_hooks(unet, [m.__dict__ for m in unet.modules()])
        []
    """
    if not any_hook_registry(module_dicts):
        return []
    if not any(set(getattr(d[DIFFUSERS_HOOKS], "hooks", None) or ()) - CAPTURED_HOOKS
               for d in module_dicts if DIFFUSERS_HOOKS in d):
        return []  # registries whose hooks were removed, or that captures stand for
    return [(name, hook) for name, module in model.named_modules() for hook in diffusers_hook_names(module)
            if hook not in CAPTURED_HOOKS]


def check_no_step_cache(model: nn.Module) -> None:
    """Refuse a model whose step cache (diffusers' ``enable_cache``) asyncfx does not apply
    (one of a later diffusers). Its hooks decide what to skip, and a captured graph
    computes what the capture's call computed (FasterCache that halves the guidance batch
    is refused where its rules are read, ``cache_hooks.step_cache_rules``)."""
    if getattr(model, "is_cache_enabled", False) is True:
        config = type(getattr(model, "_cache_config", None)).__name__
        if config not in APPLIED_CACHES:
            raise CaptureError(
                f"{type(model).__name__} has step caching enabled with {config}, which asyncfx cannot apply "
                f"to its stages yet (it applies {_listed(APPLIED_CACHES, 'and')}): call "
                "model.disable_cache() before partitioning, or enable one of those.")


def _listed(names: Sequence[str], conjunction: str) -> str:
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


def check_no_forward_wrappers(model: nn.Module) -> None:
    """Refuse hooks that wrap a module's forward to move or convert its weights, or to
    choose what to compute, at each call: accelerate's (``_hf_hook``: model or sequential
    CPU offloading, ``device_map``) and diffusers' hook registries (``_diffusers_hook``:
    group offloading, layerwise casting, caching, layer skipping). A captured graph keeps
    the weights where the stages are and computes what the capture's call computed."""
    for name, module in model.named_modules():
        accelerate = getattr(module, ACCELERATE_HOOK, None)
        wrappers = [f"accelerate's {type(accelerate).__name__}"] if accelerate is not None else []
        wrappers += [f"diffusers' {hook!r} hook" for hook in diffusers_hook_names(module)
                     if hook not in CAPTURED_HOOKS]  # the graph stands for these
        if wrappers:
            where = f"{type(model).__name__}.{name}" if name else type(model).__name__
            raise CaptureError(
                f"{where} has {', '.join(wrappers)} wrapping its forward: such hooks move or convert "
                "weights, or choose what to compute, at each call, which a captured graph cannot do "
                "(asyncfx puts each stage's weights on its device itself). Remove them before "
                "partitioning: no enable_model_cpu_offload() or group offloading (pipe.remove_all_hooks() "
                f"undoes model offloading), no step cache but {_listed(APPLIED_CACHES, 'or')}.")


@contextlib.contextmanager
def layerwise_casts_in_graph(model: nn.Module) -> Iterator[None]:
    """While a model with diffusers' layerwise casting is traced: each cast layer's weights
    in the storage dtype read through a parametrization that casts them to the compute
    dtype (``torch.nn.utils.parametrize``), so the graph holds the small weights and casts
    them per layer as the hooks do; the hooks' own casts (``module.to()`` before and after
    each call, which a trace cannot follow) are passed over through the mutable references
    diffusers keeps for its hook chain. Everything is put back afterwards; the graph's
    weights get the model's names back from ``passes.parametrized_names``.

    Example:
        >>> unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        >>> with layerwise_casts_in_graph(unet):
        ...     exported = torch.export.export(unet, args, kwargs, strict=False)
    """
    from torch.nn.utils import parametrize

    hooks, cast = [], []
    for module in model.modules():
        registry = module.__dict__.get(DIFFUSERS_HOOKS)
        hook = registry.get_hook(LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is None:
            continue
        hooks.append((hook.fn_ref, hook.fn_ref.pre_forward, hook.fn_ref.post_forward))
        for name, tensor in list(module.named_parameters(recurse=False)):
            if tensor.dtype == hook.storage_dtype:
                cast.append((module, name, _CastTo(hook.compute_dtype)))
    try:
        for reference, _, _ in hooks:
            reference.pre_forward, reference.post_forward = _unchanged_inputs, _unchanged_output
        for module, name, to_compute in cast:
            parametrize.register_parametrization(module, name, to_compute, unsafe=True)
        yield
    finally:
        for module, name, _ in reversed(cast):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        for reference, pre_forward, post_forward in hooks:
            reference.pre_forward, reference.post_forward = pre_forward, post_forward


@contextlib.contextmanager
def step_caches_passed_over(model: nn.Module) -> Iterator[None]:
    """While a model with a step cache asyncfx applies is traced: each cached module's
    own forward runs instead of the cache hook's (through the mutable reference
    diffusers keeps for its hook chain), so the graph computes every module, and the
    hooks' state is left as it was. Put back afterwards.

    Example:
        >>> with step_caches_passed_over(transformer):
        ...     exported = torch.export.export(transformer, args, kwargs, strict=False)
    """
    passed = []
    for module in model.modules():
        registry = module.__dict__.get(DIFFUSERS_HOOKS)
        for name in CACHE_HOOKS:
            hook = registry.get_hook(name) if registry is not None else None
            if hook is not None and hook.fn_ref.original_forward is not None:
                passed.append((hook.fn_ref, hook.fn_ref.forward))
    try:
        for reference, _ in passed:
            reference.forward = reference.original_forward
        yield
    finally:
        for reference, forward in passed:
            reference.forward = forward


def hooks_signature(module_dicts: Sequence[dict]) -> tuple:
    """What tells one set of diffusers hooks on a model's modules (attribute dicts
    ``module_dicts``) from another: each registry's hook objects; () for none, fast then.

    Example:
        >>> hooks_signature([m.__dict__ for m in unet.modules()])
        ()
    """
    if not any_hook_registry(module_dicts):
        return ()
    return tuple((index, tuple(map(id, getattr(d[DIFFUSERS_HOOKS], "hooks", {}).values())))
                 for index, d in enumerate(module_dicts) if DIFFUSERS_HOOKS in d)


class _CastTo(nn.Module):
    """A weight stored in one dtype, read in another."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def _unchanged_inputs(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    return args, kwargs


def _unchanged_output(module: nn.Module, output: Any) -> Any:
    return output


def refuse_offloading(proxy: nn.Module, model: nn.Module) -> None:
    """Refuse accelerate's hook on the denoiser itself (``pipe.enable_model_cpu_offload()``
    after partitioning): it moves the whole denoiser to the execution device before each
    call and back after the next component's, and each move would convert the model and
    capture it again."""
    hook = proxy.__dict__.get(ACCELERATE_HOOK)
    if hook is None:
        return
    raise AsyncFXError(
        f"this AsyncDenoiser (of {type(model).__name__}) is wrapped by accelerate's {type(hook).__name__} "
        "(pipe.enable_model_cpu_offload() or enable_sequential_cpu_offload()), which moves it between "
        "devices around every call; asyncfx keeps each stage on its own device. Call "
        "pipe.remove_all_hooks(), and move the rest of the pipeline to its device with pipe.to(...).")


def refuse_hooks_added_since_capture(model: nn.Module, module_dicts: Sequence[dict]) -> None:
    """Refuse diffusers hooks put on the model's layers after the capture (capture refuses
    those there before): step caches asyncfx does not apply (``enable_cache()``), and the
    guiders of modular pipelines that skip layers, which add them around single calls.
    The graph would compute every layer as captured. One C-level scan of the modules' attribute dicts."""
    hooked = diffusers_hooks(model, module_dicts)
    if not hooked:
        return
    name, hook = hooked[0]
    raise AsyncFXError(
        f"{type(model).__name__}.{name} has diffusers' {hook!r} hook (one of {len(hooked)} on its "
        "layers), put there after the capture: the captured stages cannot apply it, and would "
        f"compute every layer as captured. Step caches other than {_listed(APPLIED_CACHES, 'and')} "
        "(model.enable_cache()) and the guiders of modular pipelines that skip layers "
        "(SkipLayerGuidance, PerturbedAttentionGuidance, "
        "SmoothedEnergyGuidance, around single calls) put such hooks there: call "
        "model.disable_cache(), use a guider without them (ClassifierFreeGuidance) or a pipeline "
        "that takes layer skipping as an argument (StableDiffusion3Pipeline's skip_guidance_layers), "
        "or call .original_model.")


# -- the sampler ------------------------------------------------------------------------
def scheduler_timesteps(scheduler: Any) -> torch.Tensor | None:
    """The timesteps a diffusers scheduler lists once ``set_timesteps`` ran (None before)."""
    timesteps = scheduled_timesteps(scheduler)
    return None if timesteps is None else torch.as_tensor(timesteps)


def scheduled_timesteps(scheduler: Any) -> Any:
    """The object a scheduler keeps its timesteps in, as it is (None before ``set_timesteps``):
    ``set_timesteps`` replaces it, so a new one means the scheduler was set up again."""
    return getattr(scheduler, "timesteps", None)


def scheduler_steps_taken(scheduler: Any) -> int | None:
    """The steps the scheduler took in this generation (``step_index``; None before its
    first ``step()``, or for a scheduler that does not count)."""
    taken = getattr(scheduler, "step_index", None)
    return None if taken is None else int(taken)


def scheduler_begin_index(scheduler: Any) -> int:
    """Where the pipeline starts among the scheduler's timesteps (``begin_index``: image to
    image starts part-way), 0 if it does not say."""
    return getattr(scheduler, "begin_index", None) or 0


# -- the names pipelines give their calls ---------------------------------------------------
class NamedCalls:
    """``cache_context(name)``: diffusers pipelines that make the conditional and the
    unconditional pass separate calls name each (``with pipe.transformer.cache_context(
    "cond"): ...``). A proxy of the model with this mixin keeps the name for its call
    clock. (The model's own context only informs diffusers' cache hooks, which asyncfx
    refuses, so it is not entered: entering it would put a hook registry on the model.)

    Example:
        >>> with pipe.transformer.cache_context("uncond"):
        ...     pipe.transformer.call_context
        'uncond'
    """

    call_context: str | None = None

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        outer = self.__dict__.get("call_context")
        self.__dict__["call_context"] = name
        try:
            yield
        finally:
            self.__dict__["call_context"] = outer
