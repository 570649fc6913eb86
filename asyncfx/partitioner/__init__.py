"""The compiler: a model captured, priced, cut into stages (a StagePlan) and lowered to
the Program the runtime runs."""
from asyncfx.partitioner.capture import capture
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.compile import compile, compile_profile
from asyncfx.partitioner.containers import register_tensor_container
from asyncfx.partitioner.device import PRESETS, DeviceSpec
from asyncfx.partitioner.lower import lower
from asyncfx.partitioner.profile import Profile, profile
from asyncfx.partitioner.simulate import Simulation, simulate
from asyncfx.partitioner.staged import StagedModel, split

__all__ = ["PRESETS", "Captured", "DeviceSpec", "Profile", "Simulation", "StagedModel", "capture", "compile",
           "compile_profile", "lower", "profile", "register_tensor_container", "simulate", "split"]
