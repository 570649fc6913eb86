"""A module's tensors by dotted name (``"down_blocks.0.conv.weight"``), as a state dict and
a graph's ``get_attr`` nodes name them: read, and put back as they were registered."""
from __future__ import annotations

import torch
from torch import nn


def tensor_at(module: nn.Module, target: str) -> object:
    """The attribute ``target`` names (a parameter, buffer, constant or anything else).

    Example:
        >>> tensor_at(unet, "conv_in.weight") is unet.conv_in.weight
        True
    """
    owner, _, leaf = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def put_tensor(module: nn.Module, target: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` where ``target`` is, as a parameter (not trained), a buffer or a plain
    attribute, as what it replaces was.

    Example:
        >>> put_tensor(stage, "conv_in.weight", loaded)
        >>> isinstance(stage.conv_in.weight, torch.nn.Parameter)
        True
    """
    owner_name, _, leaf = target.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(
            tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)
