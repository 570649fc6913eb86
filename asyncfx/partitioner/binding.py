"""Binding: how a call's arguments map to named leaves, and which leaf is the latent,
which the timestep and which the conditioning.

Calls are bound to the model's ``forward`` signature (defaults applied), flattened as
pytrees, and each leaf is named by its argument path (``added_cond_kwargs.time_ids``,
``kv_cache.layers[0].key``). The latent is the argument ``latent=`` names, else the
first of ``LATENT_NAMES``, else the first tensor; the timestep is ``timestep=``, else
the first of ``TIMESTEP_NAMES`` bound to a tensor or a number.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from asyncfx.errors import ArgumentsError, CaptureError
from asyncfx.program import InputRole

#: Argument names taken as the latent when ``latent=`` is not given, in order.
LATENT_NAMES = ("sample", "hidden_states", "x")
#: Argument names taken as the timestep (or noise level) when ``timestep=`` is not given, in order.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")

#: ``latent=``: one argument's name, or several (a model may denoise a video and an audio latent).
LatentOption = str | Sequence[str] | None


@dataclasses.dataclass
class BoundCall:
    """A call bound for capture: its arguments as the binder makes them, their flat leaves
    with names, and the role of each tensor leaf (None for the other leaves)."""

    binder: "Binder"
    args: tuple
    kwargs: dict
    leaves: list[Any]
    in_spec: pytree.TreeSpec
    names: list[str]
    roles: list[InputRole | None]

    @property
    def is_tensor(self) -> list[bool]:
        return [role is not None for role in self.roles]

    @property
    def tensors(self) -> list[tuple[str, InputRole, torch.Tensor]]:
        """``(name, role, tensor)`` of each tensor leaf, in order."""
        return [(name, role, leaf) for name, role, leaf in zip(self.names, self.roles, self.leaves)
                if role is not None]


def bind_call(model: nn.Module, args: tuple, kwargs: dict, latent: LatentOption,
              timestep: str | None) -> BoundCall:
    """Bind an example call of ``model`` and give its tensor leaves their roles.

    Example:
        >>> call = bind_call(unet, (), {"sample": x, "timestep": t, "encoder_hidden_states": e}, None, None)
        >>> [str(role) for _, role, _ in call.tensors]
        ['latent', 'timestep', 'condition']
    """
    model_class = type(model).__name__
    signature = inspect.signature(model.forward)
    binder = Binder(signature, timestep_argument(signature, args, kwargs, latent, timestep, model_class))
    bound_args, bound_kwargs = binder.bind(args, kwargs)
    leaves, in_spec = pytree.tree_flatten((bound_args, bound_kwargs))
    names = binder.leaf_names((bound_args, bound_kwargs))
    is_tensor = [isinstance(v, torch.Tensor) for v in leaves]
    roles = assign_roles(names, is_tensor, latent, binder.timestep_name, model_class)
    return BoundCall(binder, bound_args, bound_kwargs, leaves, in_spec, names, roles)


class Binder:
    """Binds call arguments to the forward signature: defaults applied, scalar timestep
    made a tensor, so that every call flattens to the same pytree as the capture."""

    def __init__(self, signature: inspect.Signature, timestep_name: str | None):
        self.signature = signature
        self.timestep_name = timestep_name
        params = list(signature.parameters.values())
        self._positional = [p.name for p in params if p.kind in (
            p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._var_positional = _variadic(signature, inspect.Parameter.VAR_POSITIONAL) or "args"

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ArgumentsError(f"{exc}: the arguments do not fit forward{self.signature}.") from exc
        bound.apply_defaults()
        value = _arguments_by_name(bound).get(self.timestep_name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # A Python number would be baked into the graph as a constant; diffusers
            # turns it into an int64 / float64 tensor itself, so this changes nothing.
            _set_argument(bound, self.timestep_name, torch.tensor(
                value, dtype=torch.int64 if isinstance(value, int) else torch.float64))
        return tuple(bound.args), dict(bound.kwargs)

    def leaf_names(self, bound: tuple[tuple, dict]) -> list[str]:
        """A readable name for each flat leaf of bound arguments, e.g.
        ``added_cond_kwargs.time_ids`` or ``kv_cache.layers[0].key``."""
        paths, _ = pytree.tree_flatten_with_path(bound)
        return [self._name(path) for path, _ in paths]

    def _name(self, path: tuple) -> str:
        head, key, *rest = path
        if head.idx == 0:  # positional argument
            i = key.idx
            name = (self._positional[i] if i < len(self._positional)
                    else f"{self._var_positional}[{i - len(self._positional)}]")
        else:
            name = str(key.key)
        for part in rest:
            name += f".{part.key}" if isinstance(part, pytree.MappingKey) else pytree.keystr((part,))
        return name


def top_level_name(leaf_name: str) -> str:
    return leaf_name.split(".")[0].split("[")[0]


def latent_arguments(latent: LatentOption) -> tuple[str, ...]:
    """``latent=`` as a tuple of names (empty when not given), or a clear error.

    Example:
        >>> latent_arguments(["hidden_states", "audio_hidden_states"])
        ('hidden_states', 'audio_hidden_states')
    """
    if latent is None:
        return ()
    names: tuple = (latent,) if isinstance(latent, str) else ()
    if isinstance(latent, (list, tuple)):
        names = tuple(latent)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise CaptureError(f"latent={latent!r} must name the noisy-sample argument, or list the names of "
                           "several (e.g. latent=['hidden_states', 'audio_hidden_states']).")
    return names


def assign_roles(names: list[str], is_tensor: list[bool], latent: LatentOption,
                  timestep_name: str | None, model_class: str) -> list[InputRole | None]:
    tensor_names = [n for n, t in zip(names, is_tensor) if t]
    if not tensor_names:
        raise CaptureError(f"{model_class} was called without any tensor argument; pass the "
                           "latent as a tensor in the example inputs.")
    latent_names = _latent_names(tensor_names, latent, model_class)
    if timestep_name in latent_names:
        raise CaptureError(f"{timestep_name!r} of {model_class} cannot be both the latent and the timestep; "
                           "name the latent with latent=.")
    roles: list[InputRole | None] = []
    for name, tensor in zip(names, is_tensor):
        if not tensor:
            roles.append(None)
        elif name in latent_names:
            roles.append(InputRole.LATENT)
        elif name == timestep_name:
            roles.append(InputRole.TIMESTEP)
        else:
            roles.append(InputRole.CONDITION)
    return roles


def _latent_names(tensor_names: list[str], latent: LatentOption, model_class: str) -> list[str]:
    """The tensor leaves that are latents: those of the arguments ``latent`` names (a leaf
    of one, or all of its tensors: a model may take a list with one latent per sample), else
    the first of the usual names, else the first tensor argument.

    Example:
        >>> _latent_names(["x[0]", "x[1]", "t"], None, "Transformer")
        ['x[0]', 'x[1]']
    """
    if latent is not None:
        return [leaf for name in latent_arguments(latent)
                for leaf in _leaves_named(tensor_names, name, model_class)]
    by_name = [n for n in tensor_names if top_level_name(n) in LATENT_NAMES]
    if not by_name:
        return [tensor_names[0]]
    argument = min((top_level_name(n) for n in by_name), key=LATENT_NAMES.index)
    return [n for n in by_name if top_level_name(n) == argument]


def _leaves_named(tensor_names: list[str], name: str, model_class: str) -> list[str]:
    matches = [n for n in tensor_names if n == name] or [n for n in tensor_names if top_level_name(n) == name]
    if not matches:
        raise CaptureError(f"latent={name!r} names no tensor argument of {model_class}; "
                           f"tensor arguments are {tensor_names}.")
    return matches


def _variadic(signature: inspect.Signature, kind: Any) -> str | None:
    """The name of the ``*args`` (``kind=VAR_POSITIONAL``) or ``**kwargs`` parameter."""
    return next((p.name for p in signature.parameters.values() if p.kind is kind), None)


def _arguments_by_name(bound: inspect.BoundArguments) -> dict[str, Any]:
    """The bound arguments by name: those ``**kwargs`` took by their keys, those ``*args``
    took as ``args[i]`` (as the graph inputs are named)."""
    var_positional = _variadic(bound.signature, inspect.Parameter.VAR_POSITIONAL)
    var_keyword = _variadic(bound.signature, inspect.Parameter.VAR_KEYWORD)
    named = {k: v for k, v in bound.arguments.items() if k not in (var_positional, var_keyword)}
    extra = {f"{var_positional}[{i}]": v for i, v in enumerate(bound.arguments.get(var_positional, ()))}
    return {**extra, **bound.arguments.get(var_keyword, {}), **named}


def _set_argument(bound: inspect.BoundArguments, name: str, value: Any) -> None:
    """Replace the argument ``_arguments_by_name`` calls ``name``."""
    var_positional = _variadic(bound.signature, inspect.Parameter.VAR_POSITIONAL)
    index = re.fullmatch(rf"{re.escape(var_positional)}\[(\d+)\]", name) if var_positional else None
    if name in bound.arguments:
        bound.arguments[name] = value
    elif index is not None:
        items = list(bound.arguments[var_positional])
        items[int(index.group(1))] = value
        bound.arguments[var_positional] = tuple(items)
    else:
        var_keyword = _variadic(bound.signature, inspect.Parameter.VAR_KEYWORD)
        bound.arguments[var_keyword] = {**bound.arguments[var_keyword], name: value}


def check_argument_names(model: nn.Module, latent: LatentOption = None,
                         timestep: str | None = None) -> None:
    """Refuse ``latent=`` or ``timestep=`` naming no argument of the model's forward, before
    its first call (a forward that takes ``**kwargs`` may take any name)."""
    signature = inspect.signature(model.forward)
    parameters = signature.parameters
    named = [("latent", name) for name in latent_arguments(latent)] + [("timestep", timestep)]
    if _variadic(signature, inspect.Parameter.VAR_KEYWORD) is not None:
        return
    for option, name in named:
        if name is not None and top_level_name(name) not in parameters:
            raise CaptureError(f"{option}={name!r} names no argument of "
                               f"{type(model).__name__}.forward{signature}.")


def timestep_argument(signature: inspect.Signature, args: tuple, kwargs: dict, latent: LatentOption,
                   timestep: str | None, model_class: str) -> str | None:
    """``timestep`` if given (it must name a tensor or number argument), else the first
    of TIMESTEP_NAMES bound to a tensor or a number (not the latent)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(f"example inputs do not fit {model_class}.forward"
                           f"{signature}: {exc}") from exc
    arguments = _arguments_by_name(bound)
    latents = latent_arguments(latent)
    candidates = [name for name, value in arguments.items() if name not in latents and (
        isinstance(value, torch.Tensor) or isinstance(value, (int, float)) and not isinstance(value, bool))]
    if timestep is None:
        return next((name for name in TIMESTEP_NAMES if name in candidates), None)
    if timestep not in candidates:
        raise CaptureError(f"timestep={timestep!r} names none of the tensor or number arguments of "
                           f"{model_class} that are not the latent: {candidates} (positional "
                           f"arguments are named as in {model_class}.forward{signature}).")
    return timestep


