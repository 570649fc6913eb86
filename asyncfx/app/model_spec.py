"""Build ``(model, args, kwargs)`` from a command-line MODEL spec.

A spec is either ``package.module:function`` (the function returns ``(model, args,
kwargs)`` and may take ``batch``, ``height``, ``width`` or ``size`` keywords), or a local
diffusers model directory (``config.json`` names the class, ``from_pretrained`` loads it,
and example inputs are made from the forward signature and the config).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
from typing import Any, Callable

import torch
from torch import nn

from asyncfx.errors import AsyncFXError

Example = tuple[nn.Module, tuple, dict]
TEXT_TOKENS = 77  # prompt length of CLIP/T5 encoders in SD pipelines


class ModelSpecError(AsyncFXError):
    """A MODEL spec that names nothing loadable."""


def load_model(spec: str, *, batch: int | None = None, height: int | None = None,
               width: int | None = None, dtype: str | None = None, device: str = "cpu") -> Example:
    """The model and example inputs a spec names, on ``device`` in ``dtype``.

    Example:
        >>> model, args, kwargs = load_model("asyncfx.zoo.tiny:sd_unet", batch=1)
    """
    if os.path.isdir(spec):
        model, args, kwargs = _from_directory(spec, batch or 2, height, width)
    elif ":" in spec:
        model, args, kwargs = _from_function(spec, batch, height, width)
    else:
        raise ModelSpecError(f"MODEL {spec!r} is neither a directory nor package.module:function.")
    return _to(model.eval(), args, kwargs, dtype, device)


def _from_function(spec: str, batch: int | None, height: int | None, width: int | None) -> Example:
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"cannot load {spec!r}: {exc}") from exc
    keywords = _size_keywords(function, batch, height, width, spec)
    try:
        result = function(**keywords)
    except Exception as exc:
        raise ModelSpecError(f"{spec}({keywords}) failed: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], nn.Module)):
        raise ModelSpecError(f"{spec} must return (model, args, kwargs), got {type(result).__name__}.")
    model, args, kwargs = result
    return model, tuple(args), dict(kwargs)


def _size_keywords(function: Callable, batch: int | None, height: int | None, width: int | None,
                   spec: str) -> dict[str, int]:
    if not callable(function):
        raise ModelSpecError(f"{spec} is not a function.")
    accepted = inspect.signature(function).parameters
    wanted: dict[str, int] = {}
    if batch is not None:
        wanted["batch"] = batch
    if height is not None or width is not None:
        if "height" in accepted or "width" in accepted:
            wanted.update({k: v for k, v in (("height", height), ("width", width)) if v is not None})
        elif height == width or None in (height, width):
            wanted["size"] = height if height is not None else width
        else:
            raise ModelSpecError(f"{spec} takes one size; pass equal --height and --width.")
    missing = [k for k in wanted if k not in accepted]
    if missing:
        raise ModelSpecError(f"{spec} does not take {missing}; drop those options.")
    return wanted


def _from_directory(path: str, batch: int, height: int | None, width: int | None) -> Example:
    model_class = model_class_of(path)
    try:
        model = model_class.from_pretrained(path)
    except Exception as exc:
        raise ModelSpecError(f"cannot load {model_class.__name__} from {path!r}: {type(exc).__name__}: "
                             f"{exc}") from exc
    return model, (), example_kwargs(model, batch, height, width)


def model_class_of(path: str) -> type:
    """The diffusers class a model directory's ``config.json`` names.

    Example:
        >>> model_class_of("unet_dir").__name__
        'UNet2DConditionModel'
    """
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            class_name = json.load(f)["_class_name"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ModelSpecError(f"{path!r} is not a diffusers model directory (no readable "
                             f"config.json with _class_name): {exc}") from exc
    import diffusers

    model_class = getattr(diffusers, class_name, None)
    if model_class is None:
        raise ModelSpecError(f"diffusers has no class {class_name!r} (from {config_path}).")
    return model_class


def example_kwargs(model: nn.Module, batch: int, height: int | None, width: int | None) -> dict[str, Any]:
    """Example inputs for a diffusers denoiser, from its forward's argument names and config,
    shaped as diffusers' pipelines call it: UNets (latent ``sample``) get one timestep,
    transformers (``hidden_states``) one per batch element; a transformer that takes
    ``img_ids`` gets its latent packed into 2x2-patch tokens."""
    config = dict(model.config)
    size = config.get("sample_size") or 64
    size = size if isinstance(size, int) else size[0]
    height, width = height or size, width or size
    text_dim = config.get("cross_attention_dim") or config.get("joint_attention_dim")
    text_dim = text_dim[0] if isinstance(text_dim, (list, tuple)) else text_dim
    arguments = inspect.signature(model.forward).parameters
    tokens = (height // 2) * (width // 2)  # packed latents: one token per 2x2 patch
    makers: dict[str, Callable[[], Any]] = {
        "timestep": (lambda: torch.tensor(999)) if "sample" in arguments else
                    (lambda: torch.full((batch,), 999.0)),
        "encoder_hidden_states": lambda: torch.randn(batch, TEXT_TOKENS, text_dim),
        "pooled_projections": lambda: torch.randn(batch, config["pooled_projection_dim"]),
        "class_labels": lambda: torch.zeros(batch, dtype=torch.long),
        "added_time_ids": lambda: torch.zeros(batch, 3),
        "img_ids": lambda: torch.zeros(tokens, 3),
        "txt_ids": lambda: torch.zeros(TEXT_TOKENS, 3),
    }
    if config.get("guidance_embeds"):
        makers["guidance"] = lambda: torch.full((batch,), 3.5)
    frames = config.get("num_frames")
    if "img_ids" in arguments:
        latent_shape: tuple[int, ...] = (batch, tokens, config["in_channels"])
    elif frames:
        latent_shape = (batch, frames, config["in_channels"], height, width)
    else:
        latent_shape = (batch, config["in_channels"], height, width)
    makers["sample"] = makers["hidden_states"] = lambda: torch.randn(latent_shape)
    if config.get("addition_embed_type") == "text_time":
        time_dim = 6 * config["addition_time_embed_dim"]
        makers["added_cond_kwargs"] = lambda: {
            "text_embeds": torch.randn(batch, config["projection_class_embeddings_input_dim"] - time_dim),
            "time_ids": torch.tensor([[height * 8.0, width * 8.0, 0.0, 0.0, height * 8.0, width * 8.0]]
                                     * batch)}
    kwargs = {}
    for name, parameter in arguments.items():
        if name in makers:
            kwargs[name] = makers[name]()
        elif parameter.default is inspect.Parameter.empty and parameter.kind not in (
                parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ModelSpecError(
                f"cannot make an example for {type(model).__name__}'s required argument {name!r} "
                "from its config; write a package.module:function that returns "
                "(model, args, kwargs) and pass that as MODEL.")
    return kwargs


def _to(model: nn.Module, args: tuple, kwargs: dict, dtype: str | None, device: str) -> Example:
    torch_dtype = None
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ModelSpecError(f"--dtype {dtype!r} is not a floating-point torch dtype "
                                 "(float32, float16, bfloat16).")
    try:
        model = model.to(device) if torch_dtype is None else model.to(device=device, dtype=torch_dtype)
    except (RuntimeError, AssertionError) as exc:
        raise ModelSpecError(f"cannot move the model to {device!r}: {exc}") from exc

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if torch_dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=torch_dtype)
        return value.to(device)

    return model, torch.utils._pytree.tree_map(move, args), torch.utils._pytree.tree_map(move, kwargs)
