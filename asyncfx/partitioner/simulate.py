"""Predict end-to-end sampling latency on N real devices from a plan alone.

The plan knows each stage's time (measured, or predicted in seconds), the bytes every
boundary tensor carries and who reads it, and the whole model's time on one device. A
link model (``DeviceSpec``) prices the transfers. One generation of ``steps`` steps is:

- ``warmup`` sequential steps of the whole model on one device (and those placed after
  it: cool-down, refresh);
- ``ceil((steps - warmup) / stride)`` parallel rounds. In a round every stage runs once
  on its own device and sends each boundary tensor it made to each stage that reads it
  (one after another on its copy stream); then the noise prediction is broadcast so
  every device can take the scheduler step. With transfers overlapped, each tensor is
  sent the moment its stage makes it, as both multi-device executors do (``made_at``,
  the share of the stage's compute done by then, comes from the compiler's cost model),
  and a round lasts until the slowest stage ends or the last send arrives: its readers
  need it when the next round starts. Without overlap a stage's sends follow its compute.
  Each call then leaves the devices waiting for the host for ``host_seconds`` (the
  runtime collects the step's outputs, the sampler steps, the next call is dispatched):
  once per round with stride 1, twice with stride 2.
- Forecasting (``forecast``): each stage reads three versions of every boundary value it
  receives, measures their trend and writes the extrapolation, ``FORECAST_PASSES`` times
  its bytes through memory at the device's bandwidth, before it starts.

Stride 2 runs two steps per round on N + 1 devices (AsyncDiff's stride batching).

With batch groups (a plan laid out ``GxN``) the plan's times are one group's, and G
groups run at once on their own devices, warm-up steps included; every group's share of
the noise prediction is broadcast. The baseline is the whole batch on one device: the
plan's ``whole_batch_cost`` (scaled like the group's where stages were measured), or,
without it, G times the group's step, which overstates it.
"""
from __future__ import annotations

import dataclasses
import math

from asyncfx.errors import PlanError
from asyncfx.partitioner.device import DeviceSpec, device_spec
from asyncfx.partitioner.lower import dtype_named
from asyncfx.plan import StagePlan
from asyncfx.schedule import (DEFAULT_FORECAST, Mode, SequentialSteps, check_forecast, check_settings,
                              devices_needed, schedule)


#: Passes over a boundary value's bytes to forecast it (``executor.resolved``): two
#: differences of versions (read two, write one each), the trend's two dot products
#: (read three) and the extrapolation (read two, write one).
FORECAST_PASSES = 12


@dataclasses.dataclass
class Simulation:
    """Predicted times of one generation, in seconds."""

    n_stages: int
    devices: int
    link: str
    steps: int
    warmup: int
    stride: int
    stage_seconds: list[float]
    send_seconds: list[float]       # per stage: its boundary sends, one after another
    sends_done: list[float]         # per stage: when its last send arrives, sent as made
    broadcast_seconds: float        # the noise prediction to every device, once per round
    host_seconds: float             # the host's time at each call while the devices wait
    sequential_step: float          # the whole model on one device
    round_overlapped: float
    round_serial: float
    source: str                     # where the stage times came from
    forecast_seconds: list[float] = dataclasses.field(default_factory=list)  # per stage, in stage_seconds
    sequential_steps: SequentialSteps = SequentialSteps()  # placed after warm-up (cool-down, refresh)
    groups: int = 1                 # batch groups, each on its own devices
    whole_step: float | None = None  # the whole batch on one device (None: the sequential step)

    @property
    def rounds(self) -> int:
        """Parallel rounds of the generation, as the runtime's schedule makes them."""
        return parallel_rounds(self.steps, self.n_stages, self.warmup, self.stride, self.sequential_steps)

    @property
    def sequential_count(self) -> int:
        """Steps of the generation run sequentially: warm-up, cool-down and refreshes."""
        return self.sequential_steps.count(self.warmup, self.steps)

    @property
    def sequential_total(self) -> float:
        """The whole batch, every step on one device."""
        return self.steps * (self.sequential_step if self.whole_step is None else self.whole_step)

    def total(self, overlap: bool = True) -> float:
        """Seconds for the whole generation (warm-up included)."""
        round_seconds = self.round_overlapped if overlap else self.round_serial
        return self.sequential_count * self.sequential_step + self.rounds * round_seconds

    def speedup(self, overlap: bool = True) -> float:
        return self.sequential_total / self.total(overlap)

    @property
    def ideal_speedup(self) -> float:
        """T / ((S + (T - S) / (N * stride)) / G) with S sequential steps: perfect balance,
        free transfers, a group's share of the batch taking its share of the time."""
        sequential = self.sequential_count
        parallel = (self.steps - sequential) / (self.n_stages * self.stride)
        return self.groups * self.steps / (sequential + parallel)

    def _placed(self) -> str:
        """The sequential steps placed after warm-up, as the summary says them."""
        placed = self.sequential_steps
        if not (placed.cooldown or placed.refresh):
            return ""
        parts = ([f"cool-down {placed.cooldown}"] if placed.cooldown else []) + (
            [f"refresh every {placed.refresh}"] if placed.refresh else [])
        return f", {', '.join(parts)} ({self.sequential_count} sequential steps)"

    def summary(self) -> str:
        def ms(seconds: float) -> str:
            return f"{seconds * 1e3:.3f} ms"

        groups = f" in each of {self.groups} batch groups" if self.groups > 1 else ""
        lines = [f"{self.n_stages} stages{groups} on {self.devices} devices over {self.link}, "
                 f"{self.steps} steps, warm-up {self.warmup}, stride {self.stride}{self._placed()}",
                 f"stage times ({self.source}): " + ", ".join(ms(s) for s in self.stage_seconds)
                 + (" (forecasting: " + ", ".join(ms(s) for s in self.forecast_seconds) + " of them)"
                    if self.forecast_seconds else ""),
                 "boundary sends per stage: " + ", ".join(ms(s) for s in self.send_seconds),
                 f"noise-prediction broadcast per round: {ms(self.broadcast_seconds)}; host time per "
                 f"call: {ms(self.host_seconds)}",
                 f"sequential step {ms(self.sequential_step)}; round {ms(self.round_overlapped)} with "
                 f"transfers overlapped, {ms(self.round_serial)} without",
                 f"generation: sequential {self.sequential_total:.3f} s; asyncfx "
                 f"{self.total(True):.3f} s overlapped ({self.speedup(True):.2f}x), "
                 f"{self.total(False):.3f} s without overlap ({self.speedup(False):.2f}x); "
                 f"ideal {self.ideal_speedup:.2f}x ({self.speedup(True) / self.ideal_speedup:.0%} of it)",
                 f"how far to trust it: {trust(self.source, self.link)}"]
        return "\n".join(lines)


def simulate(plan: StagePlan, *, link: str | DeviceSpec | None = None, steps: int = 50,
             warmup: int = 3, stride: int = 1, host_seconds: float | None = None,
             forecast: float = DEFAULT_FORECAST, sequential: SequentialSteps | None = None) -> Simulation:
    """Predicted latency of a generation with ``plan`` on N devices joined by ``link``
    (default: the link the plan was compiled for), the host taking ``host_seconds`` at
    each call (default: the link preset's ``host_seconds_per_call``), forecasting stale
    values with damping ``forecast`` (0: off; default: ``partition()``'s) as
    ``partition(forecast=...)`` does, with the ``sequential`` steps placed after warm-up
    (``partition(cooldown=, refresh=)``).

    Example:
        >>> sim = simulate(StagePlan.load("plan.json"), link="pcie4", steps=50, warmup=3)
        >>> print(sim.summary()); sim.speedup(overlap=True)
    """
    _check_schedule(steps, plan.n_stages, warmup, stride)
    spec = device_spec(link if link is not None else plan.link)
    host = spec.host_seconds_per_call if host_seconds is None else _check_host_seconds(host_seconds)
    stage_seconds, whole_model, source = stage_times(plan)
    forecasting = [FORECAST_PASSES * plan.bytes_into(k) / spec.bytes_per_s for k in range(plan.n_stages)
                   ] if check_forecast(forecast) else []
    stage_seconds = [s + f for s, f in zip(stage_seconds, forecasting or [0.0] * plan.n_stages)]
    sends = [0.0] * plan.n_stages
    for boundary in plan.boundaries:
        sends[boundary.producer] += len(boundary.consumers) * spec.transfer_seconds(boundary.bytes)
    several = plan.n_stages > 1 or plan.groups > 1
    broadcast = plan.groups * spec.transfer_seconds(_latent_bytes(plan)) if several else 0.0
    sent = sends_done(plan, stage_seconds, spec)
    return Simulation(
        n_stages=plan.n_stages, devices=plan.groups * devices_needed(plan.n_stages, stride), link=spec.name,
        steps=steps, warmup=warmup, stride=stride, stage_seconds=stage_seconds, send_seconds=sends,
        sends_done=sent,
        broadcast_seconds=broadcast, host_seconds=host, sequential_step=whole_model,
        round_overlapped=max(*stage_seconds, *sent) + broadcast + stride * host,
        round_serial=max(c + s for c, s in zip(stage_seconds, sends)) + broadcast + stride * host,
        source=source, forecast_seconds=forecasting, sequential_steps=sequential or SequentialSteps(),
        groups=plan.groups, whole_step=_whole_step(plan, whole_model) if plan.groups > 1 else None)


def _whole_step(plan: StagePlan, group_step: float) -> float:
    """The whole batch on one device, from the group's step (see the module note)."""
    if not plan.whole_batch_cost:
        return plan.groups * group_step
    return plan.whole_batch_cost * group_step / plan.sequential_cost if plan.sequential_cost else 0.0


def sends_done(plan: StagePlan, stage_seconds: list[float], spec: DeviceSpec) -> list[float]:
    """When each stage's last send arrives, from the round's start: each boundary tensor
    leaves when its stage makes it, after the sends queued before it on its copy stream."""
    done = [0.0] * plan.n_stages
    for boundary in sorted(plan.boundaries, key=lambda b: b.made_at):
        k = boundary.producer
        start = max(done[k], boundary.made_at * stage_seconds[k])
        done[k] = start + len(boundary.consumers) * spec.transfer_seconds(boundary.bytes)
    return done


def stage_times(plan: StagePlan) -> tuple[list[float], float, str]:
    """Stage seconds, whole-model seconds on one device, and where they came from:
    measured where the plan has measurements, else the plan's predictions in seconds."""
    measured = [s.measured_seconds for s in plan.stages]
    if plan.measured_sequential is None and plan.sequential_cost <= 0:
        raise PlanError("the plan has no whole-model time (written by an older asyncfx); compile it again.")
    if all(m is not None for m in measured):
        predicted_total = sum(s.estimated_cost for s in plan.stages) or 1.0
        sequential = plan.measured_sequential
        if sequential is None:  # scale the predicted whole model by how the stages measured
            sequential = plan.sequential_cost * sum(measured) / predicted_total
        return [float(m) for m in measured], float(sequential), "measured"
    if plan.cost_unit != "seconds":
        raise PlanError(f"the plan's stage costs are in {plan.cost_unit}, not seconds, and it has no "
                        "measured stage times; compile with cost='flops' or cost='measure', or fill "
                        "the times with asyncfx.partitioner.refine.measure_stages().")
    kind = "predicted from measured node times" if plan.cost == "measure" else "estimated from FLOPs"
    return [s.estimated_cost for s in plan.stages], plan.sequential_cost, kind


def trust(source: str, link: str) -> str:
    """How far stage times of this ``source`` (``stage_times``) can be trusted, from what
    benchmarks/partition_quality.py and benchmarks/cost_estimate.py measured."""
    if source == "measured":
        return "the stage modules were timed as a whole: only the transfers and the host are modelled"
    if source.startswith("predicted"):
        return ("node times measured one by one and summed: stages within 2-6% of their measured times on "
                "a UNet of real size, up to 60% off on millisecond-sized models; compile with cost='measure' "
                "to time whole stages")
    return (f"FLOPs and bytes priced by the {link} roofline, nothing measured: a node's time can be "
            "2-8x off, so the speedup is a guide, not a figure; profile the model (asyncfx profile) and "
            "compile from the profile to trust it")


def _latent_bytes(plan: StagePlan) -> int:
    latents = [i for i in plan.inputs if i.role == "latent"]  # one, or one per sample
    if not latents:
        raise PlanError("the plan names no latent input, so the noise prediction's size is unknown; "
                        "compile it again.")
    return sum(math.prod(latent.shape) * dtype_named(latent.dtype).itemsize for latent in latents)


def _check_host_seconds(host_seconds: float) -> float:
    if (isinstance(host_seconds, bool) or not isinstance(host_seconds, (int, float)) or not host_seconds >= 0
            or math.isinf(host_seconds)):
        raise PlanError(f"host_seconds must be a finite number of seconds, 0 or more; got {host_seconds!r}.")
    return float(host_seconds)


def _check_schedule(steps: int, n_stages: int, warmup: int, stride: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PlanError(f"steps must be at least 1, got {steps!r}.")
    check_settings(n_stages, warmup, stride)


def parallel_rounds(steps: int, n_stages: int, warmup: int, stride: int,
                    sequential: SequentialSteps | None = None) -> int:
    """How many of a generation's ``steps`` calls run the stages in parallel (a round of
    stride 2 serves two calls), from the schedule every executor follows."""
    return sum(schedule(step, n_stages, warmup=warmup, stride=stride, total_steps=steps,
                        sequential=sequential).mode is Mode.PARALLEL for step in range(steps))
