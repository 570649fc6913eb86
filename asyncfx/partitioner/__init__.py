"""Turning a model into a stage plan: capture, cost estimate, cuts, StagePlan, split."""
from asyncfx.partitioner.capture import Captured, GraphInput, InputRole, capture
from asyncfx.partitioner.compile import compile
from asyncfx.partitioner.plan import BoundaryTensor, PlanInput, StageInfo, StagePlan
from asyncfx.partitioner.staged import StagedModel, split

__all__ = ["BoundaryTensor", "Captured", "GraphInput", "InputRole", "PlanInput", "StageInfo",
           "StagePlan", "StagedModel", "capture", "compile", "split"]
