"""Profile pass: measure every node's time on the device the graph's inputs live on.

Note (GPU time, not host time): timing a CUDA node with a synchronize around it
measures kernel launch overhead, not GPU work; on an H200 that put 82% of a UNet's work
into the last of four stages. On CUDA the host therefore runs ahead and each node is
bracketed by CUDA events on the current stream, read after one synchronize per pass.
On CPU, where work is synchronous, a node's wall time is its cost.

Note (CPU overhead): a GraphModule also spends time between its nodes (fetching weights,
freeing values, Python calls), about 1-2 us a node on a CPU, which per-node timing
misses; for graphs of small ops that is 15-20% of the total. The pass times the whole
graph too and spreads the difference evenly over the compute nodes.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import fx

from asyncfx.passes.meta import COMPUTE_OPS, MEASURED_SECONDS
from asyncfx.timing import median_wall_seconds


def profile_nodes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], *, warmup: int = 2,
                  repeats: int = 5, on_run: Callable[[], None] | None = None) -> dict[str, float]:
    """Run ``gm`` ``warmup + repeats`` times and record each compute node's median time in
    ``node.meta[MEASURED_SECONDS]``. Returns the medians by node name. ``on_run`` is called
    after each run (for progress bars).

    Example:
        >>> seconds = profile_nodes(captured.graph_module, captured.interface.flatten(args, kwargs))
        >>> max(seconds, key=seconds.get)            # the most expensive node
        'convolution_12'
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"profile_nodes needs warmup >= 0 and repeats >= 1, got {warmup}, {repeats}.")
    device = timing_device(inputs)
    timer = _CudaTimer(device) if device.type == "cuda" else _WallTimer()
    samples: dict[fx.Node, list[float]] = {}
    with torch.no_grad():
        for run in range(warmup + repeats):
            _TimedInterpreter(gm, timer).run(*inputs)
            measured = timer.collect()
            if on_run is not None:
                on_run()
            if run >= warmup:
                for node, seconds in measured.items():
                    samples.setdefault(node, []).append(seconds)
    medians = {node: statistics.median(values) for node, values in samples.items()}
    if device.type != "cuda" and medians:
        whole = median_wall_seconds(lambda: gm(*inputs), 0, repeats)
        overhead = max(0.0, whole - sum(medians.values())) / len(medians)
        medians = {node: seconds + overhead for node, seconds in medians.items()}
    for node, seconds in medians.items():
        node.meta[MEASURED_SECONDS] = seconds
    return {node.name: seconds for node, seconds in medians.items()}


def timing_device(inputs: Sequence[Any]) -> torch.device:
    """Where a graph on ``inputs`` computes: the GPU if any input lives there (a timestep
    may stay on the CPU), else the CPU."""
    cuda = [t.device for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda]
    return cuda[0] if cuda else torch.device("cpu")


class _WallTimer:
    def __init__(self) -> None:
        self.times: dict[fx.Node, float] = {}

    def time(self, node: fx.Node, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = call()
        self.times[node] = time.perf_counter() - start
        return result

    def collect(self) -> dict[fx.Node, float]:
        times, self.times = self.times, {}
        return times


class _CudaTimer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: dict[fx.Node, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    def time(self, node: fx.Node, call: Callable[[], Any]) -> Any:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = call()
        end.record()
        self.events[node] = (start, end)
        return result

    def collect(self) -> dict[fx.Node, float]:
        if self.events:  # the last event of the pass, on whatever stream was current
            list(self.events.values())[-1][1].synchronize()
        torch.cuda.synchronize(self.device)
        times = {node: start.elapsed_time(end) / 1e3 for node, (start, end) in self.events.items()}
        self.events = {}
        return times


class _TimedInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, timer: _WallTimer | _CudaTimer):
        super().__init__(gm)
        self.timer = timer

    def run_node(self, node: fx.Node) -> Any:
        if node.op not in COMPUTE_OPS:
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        call = getattr(self, node.op)
        return self.timer.time(node, lambda: call(node.target, args, kwargs))
