"""asyncfx: spread one diffusion sampling run over several devices, for any denoiser.

    captured = asyncfx.capture(model, args, kwargs)     # torch.export -> classified fx graph
    plan = asyncfx.compile(captured, n_devices=4)       # StagePlan: balanced stages
    staged = asyncfx.split(captured, plan)              # one GraphModule per stage
"""
from asyncfx.errors import AsyncFXError, CaptureError, InputMismatchError, PlanError
from asyncfx.partitioner import (BoundaryTensor, Captured, GraphInput, InputRole, StagedModel,
                                 StagePlan, capture, compile, split)
from asyncfx.passes.meta import ValueClass

__version__ = "0.1.0"

__all__ = ["AsyncFXError", "BoundaryTensor", "CaptureError", "Captured", "GraphInput",
           "InputMismatchError", "InputRole", "PlanError", "StagePlan", "StagedModel",
           "ValueClass", "capture", "compile", "split"]
