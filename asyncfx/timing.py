"""Timing a callable on the device it computes on: wall clock on CPUs, CUDA events on a
GPU, where a stage is captured as a CUDA graph first (eager stages are launch-bound, so
their wall time measures the host, not the GPU)."""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch


def median_seconds(run: Callable[[], object], what: str, cuda: bool, warmup: int, repeats: int) -> float:
    """Median seconds of ``run``: replays of its CUDA graph between events on a GPU (eager,
    with a warning, where it cannot be captured), wall-clock seconds on a CPU."""
    if cuda:
        return median_cuda_seconds(_cuda_graph_or_eager(run, what), warmup, repeats)
    return median_wall_seconds(run, warmup, repeats)


def median_wall_seconds(run: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall-clock seconds of ``run`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def median_cuda_seconds(run: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of ``run`` on the current CUDA stream, between CUDA events."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def _cuda_graph_or_eager(run: Callable[[], object], what: str) -> Callable[[], object]:
    try:
        stream = _capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # warm up allocations outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        return graph.replay
    except Exception as exc:  # capture fails on CPU syncs, dynamic allocations, ...
        warnings.warn(f"{what} cannot be captured as a CUDA graph ({type(exc).__name__}: "
                      f"{exc}); timing it eagerly, which includes launch overhead.", stacklevel=3)
        return run


def _capture_stream() -> torch.cuda.Stream:
    """Where to capture: the current stream, so that the graph's kernels belong to its
    context (an SM partition's green context), unless it is the default stream, which
    cannot capture; then a new stream of the whole GPU."""
    current = torch.cuda.current_stream()
    return current if current != torch.cuda.default_stream(current.device) else torch.cuda.Stream()


class RunTimer:
    """The time of one run on ``device``, taken around it and read after it: wall clock on
    a CPU, CUDA events on the current stream on a GPU (read without waiting for the GPU
    until ``seconds()``).

    Example:
        >>> with RunTimer(torch.device("cpu")) as timer:
        ...     _ = torch.ones(4) * 2
        >>> timer.seconds() >= 0
        True
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._start: float | torch.cuda.Event = 0.0
        self._end: float | torch.cuda.Event = 0.0

    def __enter__(self) -> "RunTimer":
        self._start = self._mark()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = self._mark()

    def _mark(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> float:
        if not self.cuda:
            return self._end - self._start
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3
