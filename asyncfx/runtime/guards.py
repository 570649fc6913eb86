"""What a denoiser refuses at a call, before it binds it: torch.compile tracing it, inputs
that want gradients, a second thread calling while a call is under way, and the hooks
diffusers and accelerate put on a model or on the denoiser (``asyncfx.integration``)."""
from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from asyncfx.errors import AsyncFXError
from asyncfx.integration import refuse_hooks_added_since_capture, refuse_offloading


class CompiledDenoiserError(AsyncFXError, RuntimeError):
    """torch.compile was asked to trace an AsyncDenoiser."""


class ConcurrentCallError(AsyncFXError, RuntimeError):
    """A second thread called a denoiser while another thread's call was under way."""


def check_call(proxy: nn.Module, model: nn.Module, module_dicts: Sequence[dict] | None,
               args: tuple, kwargs: dict) -> None:
    """Refuse what the stages cannot run: compile tracing, gradients, offloading hooks on
    the denoiser, hooks on the model's layers since the capture (``module_dicts``: its
    modules' attribute dicts then; None before the first capture, or where none of them
    holds a diffusers hook registry, as the caller's ``hooks_signature`` found)."""
    if torch.compiler.is_compiling():  # torch.compile imported torch._dynamo: disabling is free now
        torch.compiler.disable(_refuse_compile)(model)
    if torch.is_grad_enabled():
        _check_no_input_wants_gradients(model, args, kwargs)
    refuse_offloading(proxy, model)
    if module_dicts is not None:
        refuse_hooks_added_since_capture(model, module_dicts)


class OneCallAtATime:
    """Lets one thread call at a time: a second caller while a call is under way is refused
    at once (waiting would interleave two generations' steps in one set of buffers, and
    the executors' result queues are the calling thread's alone).

    Example:
        >>> calls = OneCallAtATime()
        >>> with calls.enter("UNet2DConditionModel"):
        ...     pass
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: threading.Thread | None = None
        self._held = _Held(self)

    def enter(self, model_class: str) -> _Held:
        if not self._lock.acquire(blocking=False):
            holder = getattr(self._holder, "name", "?")
            raise ConcurrentCallError(
                f"this AsyncDenoiser (of {model_class}) is being called by thread {holder!r}, and "
                f"thread {threading.current_thread().name!r} called it too: one denoiser runs one "
                "generation at a time, since its stages keep each generation's values between steps. "
                "Give each thread its own (asyncfx.partition() again, or copy.copy(denoiser), which "
                "shares the model's weights), or serialise the pipeline calls with a lock.")
        self._holder = threading.current_thread()
        return self._held

    def release(self) -> None:
        self._holder = None
        self._lock.release()


class _Held:
    def __init__(self, calls: OneCallAtATime):
        self.calls = calls

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self.calls.release()


def _refuse_compile(model: nn.Module) -> None:
    """Raised outside the trace (dynamo calls a disabled function eagerly), so that the
    error reaches the caller instead of sending dynamo back to running forward eagerly;
    disabled where it is called, which keeps importing asyncfx from importing dynamo."""
    raise CompiledDenoiserError(
        f"torch.compile() cannot trace an AsyncDenoiser (of {type(model).__name__}): "
        "its stages run on worker threads and devices, replayed as CUDA graphs on GPUs. Call the "
        "denoiser uncompiled (pipe.unet = asyncfx.partition(model, ...), with no torch.compile "
        "or .compile() after it).")


def _check_no_input_wants_gradients(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse inputs that require grad (gradient guidance): the stages run without autograd,
    and each reads the others' outputs from the previous step, so no gradient with respect
    to this call's inputs would reach through them."""
    wanting = [leaf for leaf in pytree.tree_leaves((args, kwargs))
               if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    if wanting:
        raise AsyncFXError(
            f"an input of this AsyncDenoiser (of {type(model).__name__}) requires grad, "
            "but the stages run without autograd: each reads the other stages' outputs from the previous "
            "step, so gradients with respect to this call's inputs cannot flow through them. Call it "
            "under torch.no_grad() with inputs that do not require grad, as pipelines do, or call "
            ".original_model where gradients are needed (e.g. gradient guidance).")
