"""asyncfx: spread one diffusion sampling run over several devices, for any denoiser.

    denoiser = asyncfx.partition(model, n_devices=4)   # called exactly like model

or step by step:

    captured = asyncfx.capture(model, args, kwargs)     # torch.export -> classified fx graph
    plan = asyncfx.compile(captured, n_devices=4)       # StagePlan: balanced stages
    staged = asyncfx.split(captured, plan)              # one GraphModule per stage
"""
from asyncfx.errors import (ArgumentsError, AsyncFXError, CaptureError, DeviceError, GenerationWarning,
                            InputMismatchError, OutputError, OutputShapeError, PlanError, PythonStateWarning,
                            SchedulerError, WeightsError, WeightsReleasedError)
from asyncfx.partitioner import (PRESETS, Captured, DeviceSpec, Profile, StagedModel, capture, compile,
                                 compile_profile, profile, register_tensor_container, split)
from asyncfx.passes.meta import ValueClass
from asyncfx.plan import BoundaryTensor, StagePlan
from asyncfx.program import GraphInput, InputRole, Layout, Program
from asyncfx import zoo  # noqa: F401  (asyncfx.zoo.tiny, asyncfx.zoo.digits)
from asyncfx.api import ModelError, partition
from asyncfx.weights import WeightFiles
from asyncfx.options import DEFAULT_WARMUP, PartitionOptions
from asyncfx.schedule import DEFAULT_FORECAST
from asyncfx.runtime.denoiser import AsyncDenoiser

__version__ = "0.1.0"

__all__ = ["PRESETS", "ArgumentsError", "AsyncFXError", "BoundaryTensor", "CaptureError", "Captured",
           "DeviceError", "DeviceSpec", "GenerationWarning", "GraphInput", "InputMismatchError", "InputRole",
           "Layout", "OutputError", "OutputShapeError", "PartitionOptions", "PlanError", "Profile", "Program",
           "PythonStateWarning",
           "SchedulerError", "StagePlan", "StagedModel", "ValueClass", "AsyncDenoiser", "DEFAULT_WARMUP",
           "DEFAULT_FORECAST", "ModelError", "WeightFiles", "WeightsError", "WeightsReleasedError",
           "capture", "compile", "compile_profile", "partition", "profile", "register_tensor_container",
           "split"]
