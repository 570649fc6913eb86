"""What the original model can still do once a denoiser runs it in stages.

A conversion (``.to()`` and the like) is probed before it is made (``would_change``).
A model built without weights (on the meta device) or whose weights the denoiser
released (see the denoiser's note on weights) computes nothing: calling it raises a
clear error (``RefuseCalls``, a forward pre-hook), and neither converting it nor
capturing it again is possible.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

from asyncfx.errors import WeightsReleasedError
from asyncfx.runtime.stage_weights import held_bytes, release_unheld, without_data

logger = logging.getLogger(__name__)


def would_change(tensors: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``fn`` (a conversion of ``nn.Module._apply``) changes the dtype, device or
    layout of a model's ``tensors``, probed on its first floating-point tensor (conversions
    to another dtype leave integer tensors alone), its first other tensor and its first
    4-d one (``memory_format=torch.channels_last`` changes only those).

    Example:
        >>> would_change(list(unet.parameters()), lambda t: t.to(torch.float16))
        True
    """
    probes = [next((t for t in tensors if t.is_floating_point()), None),
              next((t for t in tensors if not t.is_floating_point()), None),
              next((t for t in tensors if t.dim() == 4), None)]
    for tensor in (t for t in probes if t is not None):
        converted = fn(tensor)
        if _layout(converted) != _layout(tensor):
            return True
    return False


def _layout(tensor: torch.Tensor) -> tuple:
    return tensor.dtype, tensor.device, tensor.stride()


#: Why a model computes nothing any more (``AsyncDenoiser._without_weights``).
BUILT_WITHOUT = "was built without weights (on the meta device)"
RELEASED = ("had its weights that no stage of this process reads released once its plan was final "
            "(asyncfx.partition's release_weights, on by default)")


def why_without_weights(model: nn.Module) -> str | None:
    """BUILT_WITHOUT, RELEASED, or None where the model holds all its weights."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        return BUILT_WITHOUT
    return RELEASED if any(without_data(t) for t in tensors) else None


def release(model: nn.Module, read: Sequence[nn.Module], held: Sequence[nn.Module], *,
            refuse_calls: bool = True) -> int:
    """Release the model's weights that ``read`` modules read and no ``held`` module holds
    (``stage_weights.release_unheld``); the model then refuses calls (``refuse_calls``:
    from now on; False where it already does). The bytes freed.

    Example:
        >>> release(unet, [s.module for s in program.stages], executor.modules())
        1923441664
    """
    freed = release_unheld(model, read, held)
    if not freed:
        return 0
    if refuse_calls:
        model.register_forward_pre_hook(RefuseCalls(type(model).__name__))
    logger.info("released %.1f MB of %s's weights that no stage of this process holds; it keeps %.1f MB",
                freed / 2**20, type(model).__name__, held_bytes(held) / 2**20)
    return freed


class RefuseCalls:
    """A forward pre-hook for a model whose weights were released: calling it is an error."""

    def __init__(self, model_class: str):
        self.model_class = model_class

    def __call__(self, module: nn.Module, args: tuple) -> None:
        raise WeightsReleasedError(
            f"{self.model_class} {RELEASED}: only the partitioned denoiser computes with them. Call the "
            "denoiser asyncfx.partition() returned, or partition with release_weights=False to keep the "
            "original model whole.")


def refuse_conversion(model: nn.Module, why: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raise unless ``fn`` leaves a model without its weights (``why``) as it is, probed on
    the tensors it still holds (none: it cannot be probed, and is refused)."""
    with_data = [t for t in [*model.parameters(), *model.buffers()] if not without_data(t)]
    if with_data and not would_change(with_data, fn):
        return
    raise WeightsReleasedError(
        f"{type(model).__name__} {why}, so it cannot be converted (.to(), .half() and the like, pipe.to() "
        "included); its stages run on the devices partition() chose, in the dtype of the model. Convert the "
        "model before partitioning it (or build it in that dtype).")


def no_new_captures(model_class: str) -> str:
    """Why a model whose weights were released cannot be captured again."""
    return (f"{model_class} {RELEASED}, and new stages would need them. Pass release_weights=False to "
            "asyncfx.partition() to keep them for calls with other shapes and edited or converted models; "
            "or build the model on the meta device and pass weights=<its saved directory>, whose stages "
            "load their weights from the files at every capture.")
