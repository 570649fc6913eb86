"""Undo what tracing left in a model's Python state, and report what it changed.

torch.export runs ``forward`` on fake tensors and ``torch.fx.symbolic_trace`` on proxies.
A forward that keeps a value in Python between calls (a rotary table computed at its
first call and cached in a plain object; a cache of the previous step's features) keeps
the traced value, and every later eager call of the model reads it: wrong numbers or a
crash, long after the capture. Parameters, buffers and submodules are export's own
business; this restores the rest, to what it held before: the attributes of the model's
modules that hold a traced value after tracing, and everything in the plain objects,
lists and dicts the modules hold, four levels down, as torch.export does with the
modules' own attributes: the trace was not a call.

Other Python state the trace changed (a step counter an attention processor keeps, a
flag flipped at each call) is also reported: the captured graph runs no Python, so such
state stops changing after the capture while the graph keeps what forward computed from
it at the capture. State set for the first time (an attribute that was absent or None,
a new dict key: a table made at the first call) is not reported. torch.export puts back
the modules' own attributes itself, silently, when it finishes: their changes (a counter
a module keeps on itself) are read by a forward hook on the model, as forward returns.

A method of a module's class memoised with ``functools.lru_cache`` (a rotary
table) keeps what the trace computed in the cache, outside any module: a cache that
computed anything while the model was traced is cleared, and refills at the next call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import is_fake

from asyncfx.errors import PythonStateWarning
from asyncfx.integration import MODULE_REGISTRIES  # export restores parameters and buffers

#: How deep into lists, tuples and dicts a traced value is looked for.
CONTAINER_DEPTH = 2
#: How many levels of plain objects, lists and dicts below a module its Python state is
#: followed (prompt-to-prompt: an attention processor, the controller it holds, the
#: controller's dict of per-layer lists, the lists).
STATE_DEPTH = 4
#: Changes named in the warning; the rest are counted.
CHANGES_SHOWN = 5

#: An attribute's value where it has none.
ABSENT = object()
#: What nn.Module keeps for its own bookkeeping besides the registries (hooks, mostly):
#: not the model's state, and the capture's own forward hook goes in one of them.
MODULE_BOOKKEEPING = frozenset(vars(nn.Module())) - MODULE_REGISTRIES - {"training"}
#: Values with a ``__dict__`` that are not state kept between calls.
NOT_STATE = (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType, types.ModuleType)


@dataclasses.dataclass
class Namespace:
    """A mutable namespace of the model (a module's or a plain object's attributes, a list,
    a dict), where the model holds it, and a copy of its contents before tracing."""

    path: str
    owner: Any
    contents: Any


@contextlib.contextmanager
def restoring_traced_state(model: nn.Module, *, warn: bool = True) -> Iterator[None]:
    """Run a trace of ``model``, then put back the Python state it changed (traced values
    in the modules' attributes, anything in the objects they hold), and warn
    (``PythonStateWarning``; ``warn=False``: silently, for a run that is not the trace)
    about changes other than traced values and first settings.

    Example:
        >>> with restoring_traced_state(model):
        ...     exported = torch.export.export(model, args, kwargs, strict=False)
        >>> model(*args, **kwargs)        # computes as it did before the export
    """
    saved = _snapshot(model)
    caches = _method_caches(model)
    misses = [cache.cache_info().misses for cache in caches]
    at_return: list[str] = []
    hook = model.register_forward_hook(lambda *_: _record(at_return, _module_changes(saved)))
    try:
        yield
    finally:
        hook.remove()
        _restore_traced(saved)  # silently: they were never real values
        found = [change for space in saved for change in changes(space)]
        _restore_objects(saved)
        _clear_caches_filled_since(caches, misses)
    if warn:
        _warn_about_changes(type(model).__name__, list(dict.fromkeys(at_return + found)))


def _method_caches(model: nn.Module) -> list[Any]:
    """The ``functools.lru_cache`` wrappers among the methods of the model's module classes
    (static and class methods included)."""
    caches: dict[int, Any] = {}
    for cls in {type(module) for module in model.modules()}:
        for owner in cls.__mro__:
            for value in vars(owner).values():
                function = getattr(value, "__func__", value)  # under staticmethod / classmethod
                if all(callable(getattr(function, name, None)) for name in ("cache_info", "cache_clear")):
                    caches[id(function)] = function
    return list(caches.values())


def _clear_caches_filled_since(caches: list[Any], misses: list[int]) -> None:
    """Clear the caches that computed something since ``misses`` were counted: what they
    computed while the model was traced are traced values."""
    for cache, before in zip(caches, misses):
        if cache.cache_info().misses != before:
            cache.cache_clear()


def _module_changes(saved: list[Namespace]) -> list[str]:
    """What changed in the modules' own attributes, read before torch.export puts them back."""
    return [change for space in saved if isinstance(space.owner, nn.Module) for change in changes(space)]


def _record(kept: list[str], found: list[str]) -> None:
    kept[:] = found  # the last call's: a trace may run forward more than once


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


def changes(space: Namespace) -> list[str]:
    """What differs in ``space`` from its saved contents, as ``"path (before -> now)"``,
    leaving out what was set for the first time and traced values (put back silently).

    Example:
        >>> counter = types.SimpleNamespace(step=0)
        >>> space = Namespace("processor.counter", counter, dict(vars(counter)))
        >>> counter.step += 1
        >>> changes(space)
        ['processor.counter.step (0 -> 1)']
    """
    if isinstance(space.owner, list):
        changed = _differs(space.contents, space.owner)
        return [f"{space.path} ({_shown(space.contents)} -> {_shown(space.owner)})"] if changed else []
    is_dict = isinstance(space.owner, dict)
    now = space.owner if is_dict else vars(space.owner)
    found = []
    for key, before in space.contents.items():
        name = f"{space.path}[{key!r}]" if is_dict else _joined(space.path, key)
        if key not in now:
            found.append(f"{name} (deleted)")
        elif before is not None and not is_traced(now[key]) and _differs(before, now[key]):
            found.append(f"{name} ({_shown(before)} -> {_shown(now[key])})")
    return found


def _snapshot(model: nn.Module) -> list[Namespace]:
    saved: list[Namespace] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        namespace = _attributes(module)
        saved.append(Namespace(path, module, dict(namespace)))
        for name, value in namespace.items():
            saved.extend(_held(_joined(path, name), value, STATE_DEPTH, seen))
    return saved


def _attributes(owner: Any) -> dict[str, Any]:
    """A module's or a plain object's attributes that are Python state (for a module, not
    its parameters, buffers, submodules or torch's bookkeeping)."""
    if not isinstance(owner, nn.Module):
        return vars(owner)
    left_out = MODULE_REGISTRIES | MODULE_BOOKKEEPING
    return {name: value for name, value in vars(owner).items() if name not in left_out}


def _joined(path: str, name: str) -> str:
    """``name`` under ``path`` (the model itself is the empty path, as in named_modules)."""
    return f"{path}.{name}" if path else name


def _held(path: str, value: Any, depth: int, seen: set[int]) -> list[Namespace]:
    """The mutable namespaces an attribute holds, ``depth`` levels deep: a list's or a
    dict's items, a plain object's attributes, and what those hold (each saved once; a
    submodule is saved as a module of its own)."""
    if depth == 0 or id(value) in seen:
        return []
    if isinstance(value, list):
        contents, items = list(value), [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, dict):
        contents, items = dict(value), [(f"{path}[{key!r}]", item) for key, item in value.items()]
    elif is_plain_object(value):
        contents = dict(vars(value))
        items = [(_joined(path, name), item) for name, item in contents.items()]
    else:
        return []
    seen.add(id(value))
    saved = [Namespace(path, value, contents)]
    for item_path, item in items:
        saved.extend(_held(item_path, item, depth - 1, seen))
    return saved


def is_plain_object(value: Any) -> bool:
    """Whether ``value`` is an object whose attributes are Python state (not a module, a
    tensor, a class, a function or a module of code)."""
    return hasattr(value, "__dict__") and not isinstance(value, NOT_STATE)


def _restore_traced(saved: list[Namespace]) -> None:
    """Put back every traced value, in modules too (symbolic_trace leaves theirs)."""
    for space in saved:
        owner, contents = space.owner, space.contents
        if isinstance(owner, (list, dict)):
            if is_traced(owner):
                _refill(owner, contents)
        else:
            for name, value in list(_attributes(owner).items()):
                if is_traced(value):
                    _put_back(owner, name, contents)


def _restore_objects(saved: list[Namespace]) -> None:
    """Put back whatever else changed in the modules' attributes (torch.export does so
    itself, symbolic_trace does not) and in the plain objects, lists and dicts they hold."""
    for space in saved:
        owner, contents = space.owner, space.contents
        if isinstance(owner, (list, dict)):
            if _differs(contents, owner):
                _refill(owner, contents)
        elif _differs(contents, now := _attributes(owner)):
            for name in now.keys() | contents.keys():
                _put_back(owner, name, contents)


def _refill(container: list | dict, contents: list | dict) -> None:
    if isinstance(container, list):
        container[:] = contents
    else:
        container.clear()
        container.update(contents)


def _put_back(owner: Any, name: str, contents: dict[str, Any]) -> None:
    if name not in contents:
        object.__delattr__(owner, name)  # made by the trace: the next eager call makes it anew
    elif vars(owner).get(name, ABSENT) is not contents[name]:
        object.__setattr__(owner, name, contents[name])


def _differs(before: Any, now: Any) -> bool:
    """Whether a value was replaced by a different one (tensors and other values without a
    plain ``==`` compare by identity)."""
    if before is now:
        return False
    if isinstance(before, list) and isinstance(now, list):
        return len(before) != len(now) or any(map(_differs, before, now))
    if isinstance(before, dict) and isinstance(now, dict):
        return before.keys() != now.keys() or any(_differs(before[key], now[key]) for key in before)
    if isinstance(before, torch.Tensor) or isinstance(now, torch.Tensor):
        return True
    try:
        return bool(before != now)
    except Exception:  # arrays and other values whose == is not a truth value
        return True


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, list) and len(value) > 3:
        return f"a list of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _warn_about_changes(model_class: str, found: list[str]) -> None:
    if not found:
        return
    shown = "; ".join(found[:CHANGES_SHOWN]) + (
        f"; and {len(found) - CHANGES_SHOWN} more" if len(found) > CHANGES_SHOWN else "")
    warnings.warn(f"{model_class}.forward changed the model's Python state while it was captured: {shown}. "
                  "The captured graph runs no Python, so this state will not change at later calls, and "
                  "whatever forward computes from it stays as it was at the capture (a step counter that "
                  "decides what an attention processor does, for instance). Pass such state to the model "
                  "as an input or keep it outside the model, or call the original model where it must "
                  "change.", PythonStateWarning, stacklevel=4)
