"""Exceptions raised by asyncfx. Every message names the cause and what to do about it."""
from __future__ import annotations


class AsyncFXError(Exception):
    """Base class of every error asyncfx raises on purpose."""


class CaptureError(AsyncFXError):
    """The model could not be captured as a torch.fx graph."""


class PlanError(AsyncFXError, ValueError):
    """A stage plan cannot be made, or does not fit the graph it is applied to."""


class OutputError(AsyncFXError, OSError):
    """An output file (a plan, a profile, a figure) cannot be written where it was asked for."""


class InputMismatchError(AsyncFXError, ValueError):
    """A call's inputs differ from the inputs the graph was captured with."""


class OutputShapeError(AsyncFXError, RuntimeError):
    """An output whose size depends on tensor values has another shape than at capture."""


class ArgumentsError(InputMismatchError):
    """A call's arguments do not bind to the model's forward (missing or unknown ones):
    a mistake in the call, not new shapes that a new capture would fit."""


class PythonStateWarning(UserWarning):
    """Tracing ``forward`` changed Python state that later calls of the captured graph will
    not change (a step counter an attention processor keeps)."""


class SchedulerError(AsyncFXError, ValueError):
    """Stride 2 needs the sampler's timesteps and did not get them, or the calls do not
    follow them."""


class DeviceError(AsyncFXError, ValueError):
    """The devices asked for do not exist here."""


class GenerationWarning(UserWarning):
    """Nothing but the timesteps tells a denoiser's generations apart."""


class WeightsError(AsyncFXError, ValueError):
    """A model's weight files cannot be read, or do not hold the tensors a stage needs."""


class WeightsReleasedError(AsyncFXError, RuntimeError):
    """The original model's weights were released after its stages were built, or it was
    built without any, and something needed them."""
