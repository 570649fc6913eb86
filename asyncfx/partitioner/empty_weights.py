"""Capturing a model built without weights (its tensors on the meta device).

``torch.export`` traces on fake tensors: it needs each weight's shape, dtype and device,
never its values. A model built on the meta device (``accelerate.init_empty_weights()``,
``torch.device("meta")``) has the shapes and dtypes but not the device, and a trace that
mixes meta weights with inputs elsewhere fails. While it is traced, its meta tensors are
fake tensors on the inputs' device, in the fake mode the example inputs are made in;
afterwards the model gets its meta tensors back, and so does the captured graph, whose
stages later load their weights from the model's files (``asyncfx.weights``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from asyncfx.errors import CaptureError
from asyncfx.module_tensors import put_tensor, tensor_at


def meta_tensor_names(model: nn.Module) -> list[str]:
    """The model's parameters and buffers on the meta device, by name.

    Example:
        >>> with accelerate.init_empty_weights():
        ...     unet = UNet2DConditionModel.from_config(config)
        >>> meta_tensor_names(unet)[:1]
        ['conv_in.weight']
    """
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if tensor.is_meta]


@contextlib.contextmanager
def fake_weights(model: nn.Module, args: tuple, kwargs: dict) -> Iterator[tuple[tuple, dict]]:
    """Around a trace: the model's meta tensors are fake tensors on the device of the
    inputs, and the inputs fake tensors of the same mode; yields the arguments to trace
    with (``args``/``kwargs`` themselves for a model with its weights).

    Example:
        >>> with fake_weights(model, args, kwargs) as (args, kwargs):
        ...     exported = torch.export.export(model, args, kwargs, strict=False)
        >>> graph_module = with_meta_weights(exported.module(), model)
    """
    names = meta_tensor_names(model)
    if not names:
        yield args, kwargs
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = _inputs_device((args, kwargs))
    originals = {name: tensor_at(model, name) for name in names}
    try:
        for name, tensor in originals.items():
            with mode:
                fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
            put_tensor(model, name, nn.Parameter(fake, requires_grad=False)
                       if isinstance(tensor, nn.Parameter) else fake)
        yield pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
    finally:
        for name, tensor in originals.items():
            put_tensor(model, name, tensor)


def with_meta_weights(graph_module: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """The traced module with the model's meta tensors where the trace left fake ones."""
    for target in dict.fromkeys(n.target for n in graph_module.graph.nodes if n.op == "get_attr"):
        value = tensor_at(graph_module, target)
        if not (isinstance(value, torch.Tensor) and is_fake(value)):
            continue
        original = _model_tensor(model, target)
        if original is None or not original.is_meta:
            raise CaptureError(
                f"the graph of {type(model).__name__} reads {target!r}, a tensor made while tracing from "
                "weights without data (on the meta device), which no file can provide. Build the model so "
                "that such tensors are buffers of the model (accelerate.init_empty_weights() keeps buffers "
                "real), or build it with its weights.")
        put_tensor(graph_module, target, original)
    return graph_module


def _model_tensor(model: nn.Module, target: str) -> torch.Tensor | None:
    try:
        value = tensor_at(model, target)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _inputs_device(inputs: Any) -> torch.device:
    devices = {t.device for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and not t.is_meta}
    if len(devices) > 1:
        raise CaptureError(f"the example inputs are on several devices ({', '.join(map(str, devices))}); a "
                           "model built without weights is captured on the device of its inputs: put them "
                           "on one.")
    return devices.pop() if devices else torch.device("cpu")
