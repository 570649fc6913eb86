"""Example inputs as users give them (a tuple, a dict, ``(args, kwargs)``, a tensor), and
the capture they make."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asyncfx.errors import CaptureError
from asyncfx.partitioner.binding import LatentOption
from asyncfx.partitioner.capture import capture
from asyncfx.partitioner.captured import Captured


def as_captured(model_or_captured: nn.Module, example_inputs: Any, latent: LatentOption = None,
                timestep: str | None = None) -> Captured:
    if isinstance(model_or_captured, Captured):
        return model_or_captured
    if example_inputs is None:
        raise CaptureError(
            f"compile() got a {type(model_or_captured).__name__} without example inputs; pass "
            "example_inputs=(args, kwargs) for one denoiser call, or a Captured from "
            "asyncfx.capture().")
    args, kwargs = split_example_inputs(example_inputs)
    return capture(model_or_captured, args, kwargs, latent=latent, timestep=timestep)


def split_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a tuple of args, a dict of kwargs, a pair, or one tensor."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(f"example_inputs must be a tuple, a dict or (args, kwargs), got "
                       f"{type(example_inputs).__name__}.")
