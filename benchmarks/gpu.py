"""Speedup of asyncfx on one GPU split into SM partitions (emulated devices), in one run.

    python benchmarks/gpu.py [--models sd21,sdxl] [--steps 50] [--warmup 3]
                             [--write benchmarks/RESULTS.md]
    python benchmarks/gpu.py --dry-run --steps 6 --warmup 2     # CPU: checks the script itself

For each model (SD2.1-shaped UNet at 768x768 and SDXL-shaped UNet at 1024x1024, random
weights, float16, a classifier-free-guidance batch of 2) it measures:

- sequential eager and sequential CUDA-graph step times on the whole GPU (the graph is
  the fair baseline: eager diffusers is launch-bound);
- for N=2 and N=4 with stride 1, and N=3 with stride 2 (4 partitions): the plan
  (cost="measure", refined by stage times measured on one partition of the size the
  stages will run on), each stage replayed alone on one partition, all stages replayed
  at once each on its own partition without the runtime, the whole model replayed on
  one partition of the same size (the baseline), the same with every partition running
  the whole model at once (the busy baseline: each emulated device gets its share of the
  memory bandwidth and L2, as the stages do), the round time of
  asyncfx.partition(devices="sm-partitions:P"), and a 50-step DDIM generation with
  warm-up 3 against the same generation on the baseline partition;
- the simulator's prediction from the stage times measured all at once (as they run in
  the emulation), to compare with the measured generation;
- correctness: the latent the asyncfx generation made against the serial executor's
  with the same plan, schedule and staleness (what remains is the kernels' rounding);
- overhead: round time minus the slowest stage alone, and the part of it that is the
  runtime's (round time minus all stages at once) rather than the partitions'
  contention for memory; and the CPU time of a round in the calling thread (the
  runtime's host work there: binding, scheduling, dispatch, collection).

Partitions share memory bandwidth and L2, so every multi-partition number is an
emulation of separate devices and is labelled so. With --dry-run the same code runs on
CPU worker threads with tiny models: the numbers mean nothing, the script is exercised.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch

import asyncfx
from asyncfx.partitioner.device import GPU_HOST_SECONDS_PER_CALL, DeviceSpec
from asyncfx.timing import median_cuda_seconds, median_wall_seconds
from asyncfx.partitioner.simulate import simulate
from asyncfx.runtime.cuda_graphs import GraphedStage
from asyncfx.runtime.green import sm_partitions
from asyncfx.zoo import tiny

#: (stages, stride): stride 2 needs one more device than stages.
CONFIGS = ((2, 1), (4, 1), (3, 2))
#: Stages on partitions of one GPU exchange boundaries through its own memory; the host's
#: time at each call is the GPU presets' (measured by this script on an H200 machine).
SAME_GPU = DeviceSpec("same GPU", flops_per_s=1e15, bytes_per_s=3e12, link_bytes_per_s=1e12,
                      link_latency_s=5e-6, host_seconds_per_call=GPU_HOST_SECONDS_PER_CALL)
MODELS = {
    "sd21": ("SD2.1-shaped UNet, 768x768 (latent 96), fp16, batch 2", lambda: tiny.sd21_unet(2, 96)),
    "sdxl": ("SDXL-shaped UNet, 1024x1024 (latent 128), fp16, batch 2", lambda: tiny.sdxl_base_unet(2, 128)),
}
DRY_MODELS = {
    "sd21": ("tiny SD-shaped UNet (dry run)", lambda: tiny.sd_unet(2, 16)),
    "sdxl": ("tiny SDXL-shaped UNet (dry run)", tiny.sdxl_unet),
}


class Rig:
    """Where stages run: SM partitions of one GPU, or, in a dry run, CPU worker threads."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.device = torch.device("cuda:0" if cuda else "cpu")
        self.name = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 0

    def devices(self, slots: int) -> Any:
        return f"sm-partitions:{slots}" if self.cuda else ["cpu"] * slots

    def partition_streams(self, slots: int) -> tuple[list[Any], int]:
        """A stream on each of ``slots`` equal partitions, and their SM count."""
        if not self.cuda:
            return [None] * slots, 0
        parts = sm_partitions(slots, self.device)
        return [p.stream for p in parts], parts[0].sm_count

    def on(self, stream: Any) -> Any:
        """A context that makes ``stream`` current (nothing to do on CPU)."""
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def whole_gpu_stream(self) -> Any:
        return torch.cuda.Stream(self.device) if self.cuda else None

    def median(self, run: Callable[[], Any], stream: Any, warmup: int = 3, repeats: int = 20) -> float:
        """Median seconds of ``run`` on ``stream`` (CUDA events), or wall time on CPU."""
        if not self.cuda:
            return median_wall_seconds(run, warmup, repeats)
        with torch.cuda.stream(stream):
            return median_cuda_seconds(run, warmup, repeats)

    def graphed(self, module: Any, stream: Any, name: str) -> Callable[[Sequence[torch.Tensor]], Any]:
        """``module`` replayed as a CUDA graph on ``stream`` (called plainly on CPU)."""
        if not self.cuda:
            return lambda args: module(*args)
        return GraphedStage(module, name=name, stream=stream)

    def mark(self) -> Any:
        """A point in time on the current stream (a CUDA event), or the wall clock on CPU."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds_between(self, begin: Any, end: Any) -> float:
        """Seconds between two marks (after a sync on CUDA)."""
        return begin.elapsed_time(end) / 1e3 if self.cuda else end - begin

    def sync(self, streams: Sequence[Any] = ()) -> None:
        """Wait for the GPU: ``streams`` one by one (partition streams belong to green
        contexts, so this does not lean on what a device-wide sync covers), then the device."""
        if self.cuda:
            for stream in streams:
                stream.synchronize()
            torch.cuda.synchronize(self.device)


@dataclasses.dataclass
class Row:
    model: str
    config: str
    partitions: str
    baseline_step_ms: float     # whole model on one partition of the same size (CUDA graph)
    busy_baseline_ms: float     # the same while every partition runs the whole model
    slowest_stage_ms: float     # slowest stage alone on one partition
    concurrent_ms: float        # every stage replayed at once on its partition, no runtime
    balance: float              # max/mean of the stages on a partition
    round_ms: float             # one asyncfx round (two steps with stride 2)
    round_speedup: float        # baseline steps per round / round
    e2e_s: float
    baseline_e2e_s: float
    ideal: float
    predicted_speedup: float
    overhead: float             # (round - slowest stage) / round
    runtime: float              # (round - concurrent) / round: the part that is not contention
    host_ms: float              # CPU time of a round in the calling thread (the runtime's host work)
    serial_error: float         # |asyncfx - serial executor| / |serial executor|, generated latents

    @property
    def e2e_speedup(self) -> float:
        return self.baseline_e2e_s / self.e2e_s

    @property
    def busy_round_speedup(self) -> float:
        return self.round_speedup * self.busy_baseline_ms / self.baseline_step_ms

    def markdown(self) -> str:
        error = self.predicted_speedup / self.e2e_speedup - 1
        return (f"| {self.model} | {self.config} | {self.partitions} | {self.baseline_step_ms:.2f} | "
                f"{self.slowest_stage_ms:.2f} | {self.concurrent_ms:.2f} | {self.balance:.3f} | "
                f"{self.round_ms:.2f} | "
                f"{self.round_speedup:.2f}x | {self.busy_baseline_ms:.2f} | {self.busy_round_speedup:.2f}x | "
                f"{self.e2e_s:.3f} / {self.baseline_e2e_s:.3f} | "
                f"{self.e2e_speedup:.2f}x | {self.ideal:.2f}x ({self.e2e_speedup / self.ideal:.0%}) | "
                f"{self.predicted_speedup:.2f}x ({error:+.0%}) | {self.overhead:.1%} ({self.runtime:.1%}) | "
                f"{self.host_ms:.2f} | {self.serial_error:.1e} |")


class Report:
    """Prints results as they arrive and appends them to a markdown file at once, so a run
    cut short (a time limit, a crash in a later configuration) keeps every row it measured."""

    def __init__(self, path: str | None):
        self.path = path

    def add(self, *lines: str) -> None:
        text = "\n".join(lines)
        print(text, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text + "\n")


def header(steps: int) -> str:
    return ("| model | config | partitions | baseline step ms | slowest stage ms | all stages at once ms | "
            f"balance | round ms | round speedup | busy baseline ms | round speedup (busy) | "
            f"{steps}-step s (asyncfx / baseline) | speedup | "
            "ideal (fraction) | simulator (error) | overhead (runtime alone) | host ms per round | "
            "error vs serial |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def build(rig: Rig, factory: Callable[[], Any], dtype: torch.dtype) -> tuple[Any, dict]:
    """The model and its example keyword arguments on the rig's device and dtype."""
    with torch.device(rig.device):
        model, _, kwargs = factory()
    model = model.to(rig.device, dtype)

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            return value.to(rig.device, dtype if value.is_floating_point() else value.dtype)
        return value

    return model, move(kwargs)


@dataclasses.dataclass
class Generation:
    seconds: float                  # the whole generation
    calls: list[float]              # wall seconds of each denoiser call
    host: list[float]               # CPU seconds of each call in the calling thread
    latent: torch.Tensor            # the generated latent


def generation(rig: Rig, denoiser: Callable[..., Any], kwargs: dict, steps: int,
               scheduler: Any) -> Generation:
    """One DDIM generation calling ``denoiser`` like a pipeline, timed as a whole and by call."""
    scheduler.set_timesteps(steps)
    x = kwargs["sample"].clone()
    calls, host = [], []
    rig.sync()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        timestep = torch.full_like(kwargs["timestep"], int(t))
        call_start, host_start = time.perf_counter(), time.thread_time()
        eps = denoiser(**{**kwargs, "sample": x, "timestep": timestep}).sample
        calls.append(time.perf_counter() - call_start)
        host.append(time.thread_time() - host_start)
        x = scheduler.step(eps, t, x).prev_sample
    rig.sync()
    return Generation(time.perf_counter() - start, calls, host, x)


def round_seconds(calls: Sequence[float], warmup: int, stride: int) -> float:
    """Median time of a parallel round from the per-call times (a round is ``stride`` calls)."""
    parallel = list(calls[warmup:])
    rounds = [sum(parallel[i:i + stride]) for i in range(0, len(parallel) - stride + 1, stride)]
    return statistics.median(rounds)


def run_model(rig: Rig, name: str, label: str, factory: Callable[[], Any], options: argparse.Namespace,
              dtype: torch.dtype, report: Report) -> None:
    from diffusers import DDIMScheduler

    with torch.no_grad():
        model, kwargs = build(rig, factory, dtype)
        rig.sync()  # the inputs' copies to the GPU ran on the default stream; timing uses others
        captured = asyncfx.capture(model, (), kwargs)
        flat = captured.interface.flatten((), kwargs)
        whole = rig.whole_gpu_stream()
        eager_s = rig.median(lambda: model(**kwargs), whole)
        graph = rig.graphed(captured.graph_module, whole, "the whole model")
        graph_s = rig.median(lambda: graph(flat), whole)
        parameters = sum(p.numel() for p in model.parameters()) / 1e9
        report.add("", f"{label} ({parameters:.2f}B parameters): sequential step on the whole GPU, "
                   f"eager {eager_s * 1e3:.2f} ms, CUDA graph {graph_s * 1e3:.2f} ms.")
        profile = asyncfx.profile(captured, ((), kwargs))  # once; every plan starts from it
        report.add("", header(options.steps))
        for n, stride in CONFIGS:
            row = run_config(rig, name, captured, profile, kwargs, flat, n, stride, options, DDIMScheduler)
            report.add(row.markdown())


def run_config(rig: Rig, name: str, captured: asyncfx.Captured, profile: asyncfx.Profile, kwargs: dict,
               flat: list[torch.Tensor], n: int, stride: int, options: argparse.Namespace,
               scheduler_class: Any) -> Row:
    slots = n + (1 if stride == 2 else 0)
    streams, sms = rig.partition_streams(slots)
    stream = streams[0]
    with rig.on(stream):  # refinement balances the stages as they will run: on one partition
        plan = asyncfx.compile(captured, n, example_inputs=((), kwargs), cost="measure", profile=profile,
                               refine_rounds=options.refine_rounds, link="nvlink")
    baseline = rig.graphed(captured.graph_module, stream, "the whole model on one partition")
    baseline_s = rig.median(lambda: baseline(flat), stream)
    busy = all_stages_at_once(rig, [captured.graph_module], [flat], streams)
    staged = asyncfx.split(captured, plan)
    stage_args = staged.stage_arguments(flat)
    stage_s = []
    for k, (module, args) in enumerate(zip(staged.stages, stage_args)):
        stage = rig.graphed(module, stream, f"stage {k} on one partition")
        stage_s.append(rig.median(lambda stage=stage, args=args: stage(args), stream))
    concurrent = all_stages_at_once(rig, staged.stages, stage_args, streams)
    on_partitions = copy.deepcopy(plan)  # the simulator sees the stages as they run: all at once
    for info, seconds in zip(on_partitions.stages, concurrent.stage_seconds):
        info.measured_seconds = seconds
    on_partitions.measured_sequential = baseline_s
    predicted = simulate(on_partitions, link=SAME_GPU, steps=options.steps, warmup=options.warmup,
                         stride=stride)

    scheduler = scheduler_class(num_train_timesteps=1000, clip_sample=False)
    denoiser = asyncfx.partition(captured, n, plan=plan, devices=rig.devices(slots), warmup=options.warmup,
                                 stride=stride, scheduler=scheduler)
    try:
        generation(rig, denoiser, kwargs, options.steps, scheduler)  # captures the stage graphs
        denoiser.reset()
        timed = generation(rig, denoiser, kwargs, options.steps, scheduler)
    finally:
        denoiser.close()
    serial = asyncfx.partition(captured, n, plan=plan, executor="serial", warmup=options.warmup,
                               stride=stride, scheduler=scheduler)
    reference = generation(rig, serial, kwargs, options.steps, scheduler).latent
    baseline_model = _BaselineDenoiser(baseline, captured)
    baseline_e2e_s = generation(rig, baseline_model, kwargs, options.steps, scheduler).seconds
    round_s = round_seconds(timed.calls, options.warmup, stride)
    partitions = f"{slots} x {sms} SMs (emulated)" if rig.cuda else f"{slots} CPU workers"
    return Row(model=name, config=f"N={n}, stride {stride}", partitions=partitions,
               baseline_step_ms=baseline_s * 1e3, busy_baseline_ms=busy.stage_seconds[0] * 1e3,
               slowest_stage_ms=max(stage_s) * 1e3,
               balance=max(stage_s) / statistics.mean(stage_s), round_ms=round_s * 1e3,
               round_speedup=stride * baseline_s / round_s, e2e_s=timed.seconds,
               baseline_e2e_s=baseline_e2e_s,
               ideal=predicted.ideal_speedup, predicted_speedup=predicted.speedup(),
               overhead=(round_s - max(stage_s)) / round_s, concurrent_ms=concurrent.round_seconds * 1e3,
               runtime=(round_s - concurrent.round_seconds) / round_s,
               host_ms=round_seconds(timed.host, options.warmup, stride) * 1e3,
               serial_error=relative_error(timed.latent, reference))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """|got - expected| / |expected| (Frobenius norms, in float64)."""
    got, expected = got.double(), expected.double()
    return float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected))


@dataclasses.dataclass
class Concurrent:
    """Every stage replayed at once on its own partition, without the runtime."""

    round_seconds: float            # median wall time of a round
    stage_seconds: list[float]      # median time of each stage during those rounds


def all_stages_at_once(rig: Rig, stages: Sequence[Any], stage_args: Sequence[Sequence[torch.Tensor]],
                       streams: Sequence[Any], warmup: int = 3, repeats: int = 20) -> Concurrent:
    """Replay every stage at once, each on its own partition (with stride 2 the last stage
    on the extra one too), launched from one thread: rounds with the partitions'
    contention for memory bandwidth and L2 but without the runtime, and each stage's time
    under that contention (the longer of its two runs with stride 2). Given one module, every
    partition replays it: the busy baseline."""
    stage_of_slot = [min(slot, len(stages) - 1) for slot in range(len(streams))]
    jobs = [(rig.graphed(stages[k], stream, f"stage {k} on partition {slot}"), stage_args[k], stream)
            for slot, (k, stream) in enumerate(zip(stage_of_slot, streams))]
    rounds, per_stage = [], [[] for _ in stages]
    for repeat in range(warmup + repeats):
        rig.sync(streams)
        start, marks = time.perf_counter(), []
        for run, args, stream in jobs:
            with rig.on(stream):
                begin = rig.mark()
                run(args)
                marks.append((begin, rig.mark()))
        rig.sync(streams)
        if repeat >= warmup:
            rounds.append(time.perf_counter() - start)
            seconds = [rig.seconds_between(*pair) for pair in marks]
            for k in range(len(stages)):
                per_stage[k].append(max(s for stage, s in zip(stage_of_slot, seconds) if stage == k))
    return Concurrent(statistics.median(rounds), [statistics.median(s) for s in per_stage])


class _BaselineDenoiser:
    """The whole captured model replayed on one partition, called like the model."""

    def __init__(self, graphed: Callable[[Sequence[torch.Tensor]], Any], captured: asyncfx.Captured):
        self.graphed, self.captured = graphed, captured

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stream = getattr(self.graphed, "stream", None)
        flat = self.captured.interface.flatten(args, kwargs)
        if stream is None:
            return self.captured.interface.unflatten(list(self.graphed(flat)))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = list(self.graphed(flat))
        torch.cuda.current_stream().wait_stream(stream)
        return self.captured.interface.unflatten(outputs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd21,sdxl")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--refine-rounds", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU workers")
    parser.add_argument("--write", help="append the tables to this markdown file")
    options = parser.parse_args(argv)
    if not options.dry_run and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; run it on a GPU, or pass --dry-run to check the script "
              "on CPU.", file=sys.stderr)
        return 2
    rig = Rig(cuda=not options.dry_run)
    table = MODELS if rig.cuda else DRY_MODELS
    dtype = torch.float16 if rig.cuda else torch.float32
    unknown = set(options.models.split(",")) - set(table)
    if unknown:
        print(f"gpu.py: unknown models {sorted(unknown)}; choose from {sorted(table)}.", file=sys.stderr)
        return 2
    report = Report(options.write)
    report.add(f"\n## GPU: emulated devices on {rig.name} (`python benchmarks/gpu.py`)\n\n"
               f"{rig.name}, torch {torch.__version__}, {options.steps} DDIM steps, warm-up "
               f"{options.warmup}. Multi-partition rows are emulated devices (disjoint SM groups of one "
               "GPU sharing its memory bandwidth); the baseline is the whole model as a CUDA graph on "
               "one partition of the same size.")
    for name in options.models.split(","):
        label, factory = table[name]
        run_model(rig, name, label, factory, options, dtype, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
