"""asyncfx: spread one diffusion sampling run over several devices, for any denoiser.

    captured = asyncfx.capture(model, args, kwargs)     # torch.export -> classified fx graph
    plan = asyncfx.compile(captured, n_devices=4)       # StagePlan: balanced stages
    staged = asyncfx.split(captured, plan)              # one GraphModule per stage
"""
from asyncfx.errors import (ArgumentsError, AsyncFXError, CaptureError, InputMismatchError, OutputShapeError,
                            PlanError, PythonStateWarning)
from asyncfx.partitioner import (PRESETS, BoundaryTensor, Captured, DeviceSpec, GraphInput,
                                 InputRole, Profile, StagedModel, StagePlan, capture, compile,
                                 compile_profile, profile, register_tensor_container, split)
from asyncfx.passes.meta import ValueClass
from asyncfx import zoo  # noqa: F401  (asyncfx.zoo.tiny, asyncfx.zoo.digits)
from asyncfx.api import DEFAULT_WARMUP, partition
from asyncfx.runtime.denoiser import AsyncDenoiser

__version__ = "0.1.0"

__all__ = ["PRESETS", "ArgumentsError", "AsyncFXError", "BoundaryTensor", "CaptureError", "Captured",
           "DeviceSpec", "GraphInput", "InputMismatchError", "InputRole", "OutputShapeError", "PlanError",
           "Profile", "PythonStateWarning", "StagePlan", "StagedModel", "ValueClass", "AsyncDenoiser",
           "DEFAULT_WARMUP", "capture", "compile", "compile_profile", "partition", "profile",
           "register_tensor_container", "split"]
