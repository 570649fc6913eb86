"""A signature of everything about a model that a capture bakes into its graph.

``torch.export`` records the model as it is: which modules and parameters it holds, and,
as constants, every Python value its forward reads (FreeU's factors, a LoRA's scale, the
attention processor objects, the train/eval flag). An edit made afterwards reaches the
graph only by capturing again; ``state_signature`` tells that one was made.

It covers:
- the module tree (names and objects) and its parameters and buffers (objects, how many
  in-place writes each has had, ``Tensor._version``, and their memory): LoRA layers
  loaded, fused or unfused, state dicts loaded, ``.data`` replaced;
- every module's other attributes: plain values (numbers, strings, flags, and lists,
  tuples and dicts of them) by value, tensors by object and version, modules by object,
  hooks by function, and other objects (attention processors) by object and their own
  plain attributes (an IP-Adapter processor's scale).

Values are compared by object where they are not plain, so an attribute a forward
replaces at every call would read as an edit at every generation; the models of the
test zoo (diffusers UNets and transformers) keep the same signature across calls.
In-place writes through ``tensor.data`` bypass the version counter and are not seen as
such; peft merges LoRA weights that way, and its layers' ``merged_adapters`` attribute
is what tells (tensor values are never read: that would mean reading every weight).
"""
from __future__ import annotations

import collections
import enum
from typing import Any

import torch
from torch import nn

#: The module attributes that hold its parameters and buffers.
_TENSORS = frozenset(("_parameters", "_buffers"))
#: Lists, tuples and dicts longer than this are taken by object and length.
_LONGEST = 64
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)
_PLAIN_TYPES = frozenset(_PLAIN[:-1])  # the exact types, looked up first (the common case)
_CONTAINERS = frozenset((list, tuple, set, frozenset, dict, collections.OrderedDict))


def state_signature(model: nn.Module) -> int:
    """A hash of the model's modules, tensors (by object and version) and attributes.

    Example:
        >>> before = state_signature(unet)
        >>> unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        >>> state_signature(unet) == before
        False
    """
    items: list[Any] = []
    append = items.append
    for name, module in model.named_modules(remove_duplicate=False):
        append(name)
        append(id(module))
        for key, value in module.__dict__.items():  # _summary's common cases inlined: this
            kind = type(value)                          # runs for every attribute of every module
            if kind in _PLAIN_TYPES:
                append(key)
                append(value)
            elif key in _TENSORS:
                items.extend(_tensor(t) for t in value.values() if t is not None)
            elif kind in _CONTAINERS and not value or key == "_modules":
                continue  # most of a module's attributes: empty hook dicts
            else:
                append(key)
                append(_summary(value, depth=2))
    return hash(tuple(items))


def _tensor(tensor: torch.Tensor | None) -> tuple:
    """The tensor object, its in-place writes, and its memory (``tensor.data = ...``
    assignments, and conversions of the model made without the denoiser, replace it)."""
    return () if tensor is None else (id(tensor), tensor._version, tensor.data_ptr())


def _summary(value: Any, depth: int) -> Any:
    """A hashable stand-in for ``value`` that changes when it is edited."""
    kind = type(value)
    if kind in _PLAIN_TYPES or isinstance(value, _PLAIN):
        return value
    if kind in _CONTAINERS and not value:
        return kind.__name__
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if isinstance(value, nn.Module) or depth == 0:
        return id(value)
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return _container(value, depth)
    attributes = getattr(value, "__dict__", None)
    if not isinstance(attributes, dict):
        return id(value)
    return id(value), tuple((key, _summary(v, depth - 1)) for key, v in attributes.items())


def _container(value: list | tuple | set | frozenset | dict, depth: int) -> Any:
    """Plain containers by content (sets in a fixed order), long ones by object."""
    if len(value) > _LONGEST:
        return id(value), len(value)
    if isinstance(value, dict):
        return tuple((_summary(k, 0), _summary(v, depth - 1)) for k, v in value.items())
    items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
    return type(value).__name__, tuple(_summary(v, depth - 1) for v in items)
