"""Step-cache rules: for one module of the model, at which calls of a stream it is
computed, and what stands for its outputs at the others.

A rule decides from the call's place in its stream (and, where it says so, the sampler's
timestep then), never from values. ``runtime.step_cache`` applies the rules in the stages;
``integration.step_cache_rules`` reads them from diffusers' hooks:

- ``ReuseEvery`` (Pyramid Attention Broadcast): computed at every ``period``-th call, and
  outside an open interval of timesteps; otherwise its last computed outputs are reused;
- ``TaylorForecast`` (TaylorSeer): computed at the first calls, then at one call in every
  ``interval``; in between, each output is forecast by a Taylor series of order up to
  ``order`` in the number of calls since it was computed, its terms the finite
  differences between computed calls, kept in ``dtype`` (``zeros``: forecast as zeros, a
  module whose effect is left out between computed calls).

Example:
    >>> [TaylorForecast("proj_out", interval=2, first=2).computes(call) for call in range(6)]
    [True, True, False, True, False, True]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class ReuseEvery:
    """Computed at calls ``0, period, 2*period...`` of a stream, and at any call whose
    timestep (``timestep()``) is outside the open interval ``timesteps``; otherwise its
    last outputs stand for it."""

    module: str
    period: int
    timesteps: tuple[float, float] = (-math.inf, math.inf)
    timestep: Callable[[], Any] | None = None

    def computes(self, call: int) -> bool:
        if call % self.period == 0:
            return True
        low, high = self.timesteps
        return not low < float(self.timestep() if self.timestep is not None else 0.0) < high

    def remember(self, memory: dict[str, Any], outputs: Sequence[torch.Tensor], call: int) -> None:
        memory["outputs"], memory["call"] = tuple(outputs), call

    def substitute(self, memory: dict[str, Any], call: int) -> tuple[torch.Tensor, ...]:
        return memory["outputs"]


@dataclasses.dataclass(frozen=True)
class TaylorForecast:
    """Computed at calls before ``first``, at ``first + 1 + k*interval`` and from ``last``
    on (None: never); forecast in between (see the module note)."""

    module: str
    interval: int
    first: int = 0
    last: int | None = None
    order: int = 1
    dtype: torch.dtype | None = None
    zeros: bool = False

    def computes(self, call: int) -> bool:
        return (call < self.first or (call - self.first - 1) % self.interval == 0
                or self.last is not None and call >= self.last)

    def remember(self, memory: dict[str, Any], outputs: Sequence[torch.Tensor], call: int) -> None:
        before, terms = memory.get("call"), memory.get("terms", ())
        memory["call"], memory["dtypes"] = call, tuple(o.dtype for o in outputs)
        if self.zeros:
            memory["shapes"], memory["device"] = tuple(o.shape for o in outputs), outputs[0].device
            return
        memory["terms"] = tuple(self._terms(output, terms[i] if i < len(terms) else (), before, call)
                                for i, output in enumerate(outputs))

    def _terms(self, output: torch.Tensor, previous: Sequence[torch.Tensor], before: int | None,
               call: int) -> tuple[torch.Tensor, ...]:
        """The value and its finite differences per call up to ``order``, from the
        terms kept at the call ``before``."""
        terms = [output]
        for j in range(self.order if before is not None else 0):
            if j >= len(previous) or previous[j].shape != terms[j].shape:
                break
            terms.append((terms[j] - previous[j].to(output.dtype)) / (call - before))
        return tuple(t.to(self.dtype) if self.dtype is not None else t for t in terms)

    def substitute(self, memory: dict[str, Any], call: int) -> tuple[torch.Tensor, ...]:
        dtypes = memory["dtypes"]
        if self.zeros:
            return tuple(torch.zeros(shape, dtype=dtype, device=memory["device"])
                         for shape, dtype in zip(memory["shapes"], dtypes))
        ahead = call - memory["call"]
        forecast = []
        for terms, dtype in zip(memory["terms"], dtypes):
            value = torch.zeros_like(terms[0], dtype=dtype)
            for order, term in enumerate(terms):
                value = value + term.to(dtype) * (ahead ** order / math.factorial(order))
            forecast.append(value)
        return tuple(forecast)


Rule = ReuseEvery | TaylorForecast
