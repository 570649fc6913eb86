"""Replaying a stage as a CUDA graph.

Eager diffusers models are launch-bound on fast GPUs (the design notes measured 2x on an
H200), and one Python thread launching kernels for several devices serialises them. A
``GraphedStage`` runs its module eagerly for a few calls (allocator and library warm-up),
then captures one call into a CUDA graph with static input and output buffers and from
then on copies the inputs in, replays the graph and hands out copies of the outputs.
The copies matter: the executor keeps boundary tensors of step s while step s + 1 runs,
so a replay must not overwrite what a consumer still reads.

A module that cannot be captured (a host synchronisation, a data-dependent shape) keeps
running eagerly, with one warning that names the reason.

Note (one capture at a time): ``torch.cuda.graph`` synchronises the device and empties
the caching allocator's cache before it captures; emptying it while another thread's
capture is under way is not something the allocator supports (it syncs and frees the
events of every stream). Stages whose workers capture at the same step therefore share
a ``capture_lock``; replays and eager calls on other threads go on while one stage
captures (``capture_error_mode="thread_local"``).
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from asyncfx.errors import AsyncFXError

#: Eager calls before capture: the first call allocates and picks kernels, the second
#: runs as every later call will.
EAGER_CALLS_BEFORE_CAPTURE = 2


class GraphedStage:
    """``module`` called through a CUDA graph once warmed up.

    Example:
        >>> stage = GraphedStage(module, name="stage 1", stream=torch.cuda.Stream())
        >>> outputs = stage([x, t])        # eager twice, then captured, then replayed
        >>> stage.graphed
        True
    """

    def __init__(self, module: nn.Module, *, name: str, stream: torch.cuda.Stream,
                 eager_calls: int = EAGER_CALLS_BEFORE_CAPTURE, capture_lock: Any = None):
        self.module, self.name, self.stream = module, name, stream
        self.eager_calls = eager_calls
        self.capture_lock = capture_lock or threading.Lock()
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None
        self._static_inputs: list[torch.Tensor] = []
        self._static_outputs: tuple[torch.Tensor, ...] = ()

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def __call__(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Outputs of the module on ``args``, computed on ``self.stream`` (the caller is
        inside ``torch.cuda.stream(self.stream)``)."""
        self.calls += 1
        if self.graph is None and self.failure is None and self.calls > self.eager_calls:
            with self.capture_lock:
                self._capture(args)
        if self.graph is None:
            return tuple(self.module(*args))
        # one call for every input: the host work of a replay is what the workers of a
        # round serialise on (they share the interpreter lock), so it is kept short
        torch._foreach_copy_(self._static_inputs, list(args), non_blocking=True)
        self.graph.replay()
        return tuple(out.clone() for out in self._static_outputs)

    def _capture(self, args: Sequence[torch.Tensor]) -> None:
        static_inputs = [a.clone() for a in args]
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other workers keep launching and allocating while this one captures
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                static_outputs = tuple(self.module(*static_inputs))
        except Exception as exc:  # host syncs, data-dependent shapes, unsupported ops
            self.failure = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            warnings.warn(f"{self.name} cannot be captured as a CUDA graph ({self.failure}); it runs "
                          "eagerly, which adds kernel-launch overhead (pass cuda_graphs=False to "
                          "silence this).", stacklevel=4)
            torch.cuda.synchronize(self.stream.device)
            return
        self.graph, self._static_inputs, self._static_outputs = graph, static_inputs, static_outputs


def check_cuda_graphs_option(cuda_graphs: Any) -> bool | None:
    """``cuda_graphs`` must be None (on where the stage runs on CUDA), True or False."""
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise AsyncFXError(f"cuda_graphs must be True, False or None (CUDA graphs on CUDA devices), "
                           f"got {cuda_graphs!r}.")
    return cuda_graphs
