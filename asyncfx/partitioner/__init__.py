"""Turning a model into a stage plan: capture, cost estimate, cuts, StagePlan, split."""
from asyncfx.partitioner.capture import Captured, GraphInput, InputRole, capture
from asyncfx.partitioner.compile import compile, compile_profile
from asyncfx.partitioner.containers import register_tensor_container
from asyncfx.partitioner.device import PRESETS, DeviceSpec
from asyncfx.partitioner.plan import BoundaryTensor, PlanInput, StageInfo, StagePlan
from asyncfx.partitioner.profile import Profile, profile
from asyncfx.partitioner.simulate import Simulation, simulate
from asyncfx.partitioner.staged import StagedModel, split

__all__ = ["PRESETS", "BoundaryTensor", "Captured", "DeviceSpec", "GraphInput", "InputRole",
           "PlanInput", "Profile", "Simulation", "StageInfo", "StagePlan", "StagedModel", "capture",
           "compile", "compile_profile", "profile", "register_tensor_container", "simulate", "split"]
