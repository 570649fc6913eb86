"""Objects that carry tensors between a denoiser's calls, as inputs and outputs of a graph.

Some denoisers take or return plain Python objects that hold tensors: a pipeline may get
a KV cache back from its first call (a reference image's keys and values, layer by
layer) and pass it to every later call. torch.export flattens only
tensors and registered containers (tuples, lists, dicts, dataclasses); an object of any
other class can be neither an input nor an output of the captured graph.
``register_tensor_container(cls)`` registers such a class as a container of its
attributes: the tensors it holds (in lists, dicts or other registered objects) become
inputs of the graph (conditioning: constant over a generation, like a prompt's
embeddings) or outputs, rebuilt into a new object of the class after each call; its
other attributes (numbers, strings, None) are part of the call's structure, baked in
like any non-tensor argument.

Registration is global, as with ``torch.export.register_dataclass``: do it once, before
partitioning.

A call that fills an object it is given (a first call that appends each layer's keys
and values to a cache argument) cannot be a graph, which has no way to write into its
arguments: ``watching_argument_writes`` finds such writes while the call is captured,
and the denoiser runs such calls with the original model. They prepare a generation;
the steps that read the filled cache run as stages.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

from asyncfx.errors import CaptureError
from asyncfx.partitioner.traced_state import is_plain_object

#: Attribute values that are part of an object's structure rather than its contents.
CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)
#: How far below an argument to look for tensors in objects of unregistered classes.
SEARCH_DEPTH = 4


def register_tensor_container(cls: type) -> None:
    """Let objects of ``cls`` be arguments and results of a captured model: the tensors in
    their attributes are flattened into the graph's inputs and outputs. Registering a
    class twice does nothing.

    Example:
        >>> asyncfx.register_tensor_container(KVCache)
        >>> asyncfx.register_tensor_container(KVLayerCache)   # the objects it holds
        >>> pipe.transformer = asyncfx.partition(pipe.transformer, n_devices=2)
    """
    if not isinstance(cls, type) or issubclass(cls, (torch.Tensor, torch.nn.Module)):
        raise TypeError(f"register_tensor_container() takes a plain Python class, got {cls!r}.")
    if cls in pytree.SUPPORTED_NODES:
        return

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[pytree.KeyEntry, Any]], Any]:
        contents, constants = _split_attributes(obj, cls)
        return ([(pytree.GetAttrKey(name), value) for name, value in contents],
                (tuple(name for name, _ in contents), constants))

    def flatten(obj: Any) -> tuple[list[Any], Any]:
        children, context = flatten_with_keys(obj)
        return [value for _, value in children], context

    def unflatten(values: Any, context: Any) -> Any:
        names, constants = context
        obj = cls.__new__(cls)
        vars(obj).update(zip(names, values))
        vars(obj).update(constants)
        return obj

    pytree.register_pytree_node(cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys,
                                serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


def _split_attributes(obj: Any, cls: type) -> tuple[list[tuple[str, Any]], tuple[tuple[str, Any], ...]]:
    """``obj``'s attributes in name order: contents (everything that may hold tensors) and
    constants (numbers, strings, None: part of the structure)."""
    if not hasattr(obj, "__dict__"):
        raise CaptureError(f"{cls.__qualname__} keeps its attributes in __slots__, which "
                           "register_tensor_container() does not read; give it a __dict__ or "
                           "register it with torch.utils._pytree.register_pytree_node.")
    items = sorted(vars(obj).items())
    contents = [(name, value) for name, value in items if not isinstance(value, CONSTANT_TYPES)]
    constants = tuple((name, value) for name, value in items if isinstance(value, CONSTANT_TYPES))
    return contents, constants


def check_objects_are_registered(leaves: list[Any], names: list[str], model_class: str) -> None:
    """Refuse an argument that is an object of an unregistered class holding tensors: it
    cannot be an input of the graph, and baking its tensors in as constants would be wrong
    at the next call. The error names every class to register."""
    for leaf, name in zip(leaves, names):
        if isinstance(leaf, torch.Tensor) or not _holds_tensors(leaf):
            continue
        raise _registration_error(name, leaf, _unregistered(leaf, _holds_tensors), model_class,
                                  "an object holding tensors")


def unregistered_input_error(error: Exception, leaves: list[Any], names: list[str],
                             model_class: str) -> CaptureError | None:
    """A clear error for export's refusal of an argument that is an object of an
    unregistered class holding no tensors yet (a cache the call fills), or None when
    ``error`` is about something else."""
    match = re.search(r"Unsupported input type <class '([\w.]+)'>", str(error))
    for leaf, name in zip(leaves, names):
        if match is not None and any(_qualified(type(item)) == match.group(1)
                                     for item in _nested(leaf, SEARCH_DEPTH)):
            return _registration_error(name, leaf, _unregistered(leaf, lambda item: True), model_class,
                                       "an object of a class torch.export does not know")
    return None


def _unregistered(argument: Any, keep: Callable[[Any], bool]) -> list[type]:
    """The classes of the plain objects in ``argument`` that are not registered, and that
    ``keep`` picks, in name order."""
    found = {type(item).__qualname__: type(item) for item in _nested(argument, SEARCH_DEPTH)
             if is_plain_object(item) and type(item) not in pytree.SUPPORTED_NODES and keep(item)}
    return [cls for _, cls in sorted(found.items())]


def _registration_error(name: str, argument: Any, classes: list[type], model_class: str,
                        what: str) -> CaptureError:
    return CaptureError(
        f"argument {name!r} of {model_class} is a {type(argument).__qualname__}, {what}, which a "
        "captured graph cannot take as an input. If it holds tensors, or the call fills it with "
        "some (a cache), register its class, and those of the objects in it, once before "
        "partitioning: " + "; ".join(f"asyncfx.register_tensor_container({cls.__qualname__})"
                                     for cls in classes)
        + " (from " + ", ".join(sorted({cls.__module__ for cls in classes})) + "). Its tensors "
        "then become inputs of the graph, read as conditioning.")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def unregistered_output_error(error: Exception, model_class: str) -> CaptureError | None:
    """A clear error for export's refusal of an object in the model's output, or None when
    ``error`` is about something else."""
    match = re.search(r"Found <class '([\w.]+)'> in output", str(error))
    if match is None:
        return None
    module, _, name = match.group(1).rpartition(".")
    return CaptureError(
        f"{model_class}.forward returns a {name} (from {module}), an "
        "object that a captured graph cannot return. If it holds tensors (a cache filled by the call), "
        f"register its class once before partitioning: asyncfx.register_tensor_container("
        f"{name}), and the classes of the objects it holds that hold tensors. Its "
        "tensors then become outputs of the graph, put back into a new object after each call.")


def _nested(value: Any, depth: int) -> Iterator[Any]:
    """``value`` and everything it holds through lists, tuples, dicts and plain objects'
    attributes, down to ``depth`` levels."""
    yield value
    if depth <= 0:
        return
    if isinstance(value, (list, tuple)):
        items: Any = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        items = vars(value).values() if is_plain_object(value) else ()
    for item in items:
        yield from _nested(item, depth - 1)


def _holds_tensors(value: Any) -> bool:
    return any(isinstance(item, torch.Tensor) for item in _nested(value, SEARCH_DEPTH))


@contextlib.contextmanager
def watching_argument_writes(model: nn.Module) -> Iterator[list[str]]:
    """Around a trace of ``model``: the list it yields names, once the trace is done, the
    arguments whose contents the call changed (a cache argument to which each layer
    appends the call's keys and values). torch.export hands
    ``forward`` copies of registered objects, so such writes never reach the caller's
    objects, and a captured graph cannot make them; forward hooks see the copies.

    Example:
        >>> with watching_argument_writes(model) as written:
        ...     exported = torch.export.export(model, args, kwargs, strict=False)
        >>> written
        ['kv_caches']
    """
    signature = inspect.signature(model.forward)
    written: list[str] = []
    at_entry: dict[str, tuple[pytree.TreeSpec, list[Any]]] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        at_entry.clear()
        at_entry.update(_argument_contents(signature, args, kwargs))

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        now = _argument_contents(signature, args, kwargs)
        written[:] = [name for name, (spec, leaves) in now.items()
                      if name in at_entry and _changed(at_entry[name], (spec, leaves))]

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield written
    finally:
        for handle in handles:
            handle.remove()


def _argument_contents(signature: inspect.Signature, args: tuple,
                       kwargs: dict) -> dict[str, tuple[pytree.TreeSpec, list[Any]]]:
    """The structure and leaves of each argument that is not a tensor itself (a tensor
    written in place is torch.export's to record)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    contents = {}
    for name, value in bound.items():
        if not isinstance(value, torch.Tensor):
            leaves, spec = pytree.tree_flatten(value)
            contents[name] = (spec, leaves)
    return contents


def _changed(before: tuple[pytree.TreeSpec, list[Any]], now: tuple[pytree.TreeSpec, list[Any]]) -> bool:
    """Whether an argument holds other things than it did: another structure, or another
    object in some place (a tensor replaced)."""
    (spec_before, leaves_before), (spec_now, leaves_now) = before, now
    return spec_before != spec_now or any(a is not b for a, b in zip(leaves_before, leaves_now))
