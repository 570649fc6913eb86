"""Undo what tracing left in a model's Python state.

torch.export runs ``forward`` on fake tensors and ``torch.fx.symbolic_trace`` on proxies.
A forward that keeps a value in Python between calls (Z-Image's rotary table, computed
at its first call and cached in a plain object; a cache of the previous step's
features) keeps the traced value, and every later eager call of the model reads it:
wrong numbers or a crash, long after the capture. Parameters, buffers and submodules are
export's own business; this restores the rest: every attribute of the model's modules,
of the plain objects they hold, and the items of their lists and dicts, that holds a
traced value after tracing, to what it held before.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import is_fake

#: nn.Module's own registries: export restores parameters and buffers itself.
MODULE_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})
#: How deep into lists, tuples and dicts a traced value is looked for.
CONTAINER_DEPTH = 2

#: Values with a ``__dict__`` that are not state kept between calls.
NOT_STATE = (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType, types.ModuleType)

#: A namespace (an object's ``__dict__``, or a list or dict it holds) and its saved contents.
Saved = list[tuple[Any, Any]]


@contextlib.contextmanager
def restoring_traced_state(model: nn.Module) -> Iterator[None]:
    """Run a trace of ``model`` and then put back every Python attribute it left holding a
    traced value.

    Example:
        >>> with restoring_traced_state(model):
        ...     exported = torch.export.export(model, args, kwargs, strict=False)
        >>> model(*args, **kwargs)        # computes as it did before the export
    """
    saved = _snapshot(model)
    try:
        yield
    finally:
        _restore_traced(saved)


def is_traced(value: Any, depth: int = CONTAINER_DEPTH) -> bool:
    """Whether ``value`` is, or holds, a fake tensor or an fx proxy.

    Example:
        >>> is_traced([torch.ones(2)])
        False
    """
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, torch.Tensor):
        return is_fake(value)
    if depth > 0 and isinstance(value, (list, tuple)):
        return any(is_traced(item, depth - 1) for item in value)
    if depth > 0 and isinstance(value, dict):
        return any(is_traced(item, depth - 1) for item in value.values())
    return False


def _snapshot(model: nn.Module) -> Saved:
    saved: Saved = []
    for module in model.modules():
        namespace = {k: v for k, v in vars(module).items() if k not in MODULE_REGISTRIES}
        saved.append((module, dict(namespace)))
        for value in namespace.values():
            saved.extend(_held(value))
    return saved


def _held(value: Any) -> Saved:
    """The mutable namespaces a module attribute holds: a plain object's attributes, a
    list's or a dict's items (a submodule is saved as a module of its own)."""
    if isinstance(value, list):
        return [(value, list(value))]
    if isinstance(value, dict):
        return [(value, dict(value))]
    if _is_plain_object(value):
        return [(value, dict(vars(value)))]
    return []


def _is_plain_object(value: Any) -> bool:
    return hasattr(value, "__dict__") and not isinstance(value, NOT_STATE)


def _restore_traced(saved: Saved) -> None:
    for owner, contents in saved:
        if isinstance(owner, list):
            if is_traced(owner):
                owner[:] = contents
        elif isinstance(owner, dict):
            if is_traced(owner):
                owner.clear()
                owner.update(contents)
        else:
            _restore_attributes(owner, contents)


def _restore_attributes(owner: Any, contents: dict[str, Any]) -> None:
    for name, value in list(vars(owner).items()):
        if name in MODULE_REGISTRIES or not is_traced(value):
            continue
        if name in contents:
            object.__setattr__(owner, name, contents[name])
        else:
            object.__delattr__(owner, name)  # made by the trace: the next eager call makes it anew
