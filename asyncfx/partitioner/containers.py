"""Objects that carry tensors between a denoiser's calls, as inputs and outputs of a graph.

Some denoisers take or return plain Python objects that hold tensors: Flux.2 Klein's KV
pipeline gets a ``Flux2KVCache`` back from its first call (the reference image's keys and
values, layer by layer) and passes it to every later call. torch.export flattens only
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
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree

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
        >>> from diffusers.models.transformers.transformer_flux2 import Flux2KVCache, Flux2KVLayerCache
        >>> asyncfx.register_tensor_container(Flux2KVCache)
        >>> asyncfx.register_tensor_container(Flux2KVLayerCache)   # the objects it holds
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
        unregistered = [item for item in _nested(leaf, SEARCH_DEPTH) if is_plain_object(item)
                        and type(item) not in pytree.SUPPORTED_NODES and _holds_tensors(item)]
        classes = sorted({type(item).__qualname__: type(item) for item in unregistered}.items())
        raise CaptureError(
            f"argument {name!r} of {model_class} is a {type(leaf).__qualname__}, an object holding "
            "tensors, which a captured graph cannot take as an input. Register its class, and those "
            "of the objects in it that hold tensors, once before partitioning: "
            + "; ".join(f"asyncfx.register_tensor_container({qualname})" for qualname, _ in classes)
            + " (from " + ", ".join(sorted({cls.__module__ for _, cls in classes})) + "). Its tensors "
            "then become inputs of the graph, read as conditioning.")


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
