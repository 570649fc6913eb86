"""PartitionOptions: every option of ``asyncfx.partition()``, checked once, frozen.

Each option is checked here, when ``partition()`` is called, so a bad one is a clear
error before any model runs; the parts of asyncfx that use an option take it checked.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch

from asyncfx.errors import PlanError, SchedulerError
from asyncfx.partitioner.binding import LatentOption
from asyncfx.partitioner.cost_model import check_cost
from asyncfx.partitioner.device import DeviceSpec, device_spec
from asyncfx.plan import StagePlan
from asyncfx.program import Layout, WeightSource, planned_layout
from asyncfx.runtime.cuda_graphs import check_cuda_graphs_option
from asyncfx.schedule import DEFAULT_FORECAST, SequentialSteps, check_forecast, check_settings, devices_needed
from asyncfx.weights import WeightFiles, WeightsError

#: Default warm-up steps, chosen from benchmarks/quality.py on the trained default model:
#: with 3-4 stages staleness compounds, and three warm-up steps recover most of the
#: fidelity nine would (N=4: SSIM 0.865 at W=1, 0.913 at W=3, 0.945 at W=9) for 4-9% of
#: the ideal speedup at 50 steps; class accuracy stays at the sequential level throughout.
DEFAULT_WARMUP = 3
EXECUTORS = ("local", "serial", "distributed")


@dataclasses.dataclass(frozen=True)
class PartitionOptions:
    """The options of :func:`asyncfx.partition` (see there), checked when made; ``plan``
    may be given as a path and is loaded.

    Example:
        >>> PartitionOptions(n_devices=4, stride=2, scheduler=pipe.scheduler).slots
        5
    """

    n_devices: int = 2
    layout: str | Layout | None = None
    devices: Sequence[str | torch.device] | str | None = None
    warmup: int = DEFAULT_WARMUP
    stride: int = 1
    executor: str = "local"
    plan: StagePlan | str | os.PathLike | None = None
    scheduler: Any = None
    time_shift: bool = False
    forecast: float | None = None
    cooldown: int = 0
    refresh: int = 0
    switch_below: float = 0.0
    cost: str = "flops"
    link: str | DeviceSpec = "cpu"
    latent: LatentOption = None
    timestep: str | None = None
    cuda_graphs: bool | None = None
    rebalance: bool = True
    release_weights: bool | None = None
    weights: str | os.PathLike | WeightSource | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for flag in ("rebalance", "time_shift", "progress"):
            if not isinstance(getattr(self, flag), bool):
                raise PlanError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        if self.release_weights is not None and not isinstance(self.release_weights, bool):
            raise PlanError(f"release_weights must be True, False or None, got {self.release_weights!r}.")
        if isinstance(self.weights, (str, os.PathLike)):
            object.__setattr__(self, "weights", WeightFiles(self.weights))
        elif self.weights is not None and not callable(getattr(self.weights, "load", None)):
            raise WeightsError(f"weights must be a path (a saved model directory or a .safetensors file) or "
                               f"an object with a load() method, got {type(self.weights).__name__}.")
        if isinstance(self.n_devices, bool) or not isinstance(self.n_devices, int) or self.n_devices < 1:
            raise PlanError(f"n_devices must be a positive integer, got {self.n_devices!r}.")
        check_settings(self.n_devices, self.warmup, self.stride)
        object.__setattr__(self, "layout", self._checked_layout())
        object.__setattr__(self, "forecast", check_forecast(self.forecast) if self.forecast is not None
                           else 0.0 if self.time_shift else DEFAULT_FORECAST)  # nothing to forecast
        self.sequential  # checks cooldown and refresh
        if isinstance(self.switch_below, bool) or not isinstance(self.switch_below, (int, float)) or not (
                0 <= self.switch_below < float("inf")):
            raise PlanError(f"switch_below must be a number >= 0 (0: off), the relative change of the noise "
                            f"prediction between steps below which warm-up ends, got {self.switch_below!r}.")
        if self.cooldown and self.scheduler is None:
            raise SchedulerError("cooldown runs the last steps of each generation sequentially and needs the "
                                 "sampler's number of steps: pass scheduler=pipe.scheduler.")
        if self.forecast and self.time_shift:
            raise PlanError("time_shift=True computes each stage at the step of the values it reads, so "
                            "there is nothing to forecast: pass forecast=0 with time_shift=True, or drop "
                            "time_shift.")
        if self.executor not in EXECUTORS:
            raise PlanError(f"executor={self.executor!r} is not known; use one of {list(EXECUTORS)}.")
        if self.stride == 2 and self.scheduler is None:
            raise SchedulerError("stride=2 computes the next step's timestep ahead of time and needs the "
                                 "sampler's schedule: pass scheduler=pipe.scheduler.")
        check_cost(self.cost)
        device_spec(self.link)
        check_cuda_graphs_option(self.cuda_graphs)
        if isinstance(self.plan, (str, os.PathLike)):
            object.__setattr__(self, "plan", StagePlan.load(self.plan))
        if self.plan is not None:
            self._check_plan_layout()

    def _checked_layout(self) -> Layout | None:
        """``layout`` as a Layout, checked against the devices (None: chosen at capture;
        with stride 2, stages only)."""
        layout = self.layout
        if layout is None:
            return Layout(1, self.n_devices) if self.stride == 2 or self.executor == "distributed" else None
        if not isinstance(layout, Layout):
            try:
                layout = Layout.parse(layout)
            except ValueError as exc:
                raise PlanError(f"layout={self.layout!r}: {exc}.") from None
        if layout.devices != self.n_devices:
            raise PlanError(f"layout {layout} runs {layout.groups} batch group(s) of {layout.stages} "
                            f"stage(s), {layout.devices} devices, but n_devices={self.n_devices}; pass "
                            f"n_devices={layout.devices} or a layout whose G x N is {self.n_devices}.")
        return layout

    def _check_plan_layout(self) -> None:
        planned = planned_layout(self.plan)
        if planned.devices != self.n_devices:
            raise PlanError(f"the plan has {self.plan.n_stages} stages in {self.plan.groups} batch group(s) "
                            f"(layout {planned}) but n_devices={self.n_devices}; pass n_devices="
                            f"{planned.devices} or compile a plan for {self.n_devices}.")
        if self.layout is not None and self.layout != planned:
            raise PlanError(f"the plan is laid out {planned} but layout={str(self.layout)!r}; drop layout= "
                            "(the plan's is used) or compile a plan for that layout.")

    @property
    def sequential(self) -> SequentialSteps:
        """The sequential steps placed after warm-up (``cooldown``, ``refresh``)."""
        return SequentialSteps(cooldown=self.cooldown, refresh=self.refresh)

    @property
    def known_layout(self) -> Layout | None:
        """The layout given, or the plan's (None: chosen at the first call)."""
        return self.layout or (planned_layout(self.plan) if self.plan is not None else None)

    @property
    def slots(self) -> int:
        """Device slots the schedule uses: one per stage of each batch group, plus one a
        group for stride 2 (a layout chosen at capture uses ``n_devices``)."""
        layout = self.known_layout
        if layout is None:
            return self.n_devices
        return layout.groups * devices_needed(layout.stages, self.stride)
