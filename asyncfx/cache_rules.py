"""Step-cache rules: for one module of the model, at which calls of a stream it is
computed, and what stands for its outputs at the others.

A rule decides from the call's place in its stream (and, where it says so, the sampler's
timestep then); only ``FirstBlockChange`` decides from values. ``runtime.step_cache``
applies the rules in the stages; ``cache_hooks.step_cache_rules`` reads them from
diffusers' hooks:

- ``ReuseEvery`` (Pyramid Attention Broadcast): computed at every ``period``-th call, and
  outside an open interval of timesteps; otherwise its last computed outputs are reused;
- ``TaylorForecast`` (TaylorSeer): computed at the first calls, then at one call in every
  ``interval``; in between, each output is forecast by a Taylor series of order up to
  ``order`` in the number of calls since it was computed, its terms the finite
  differences between computed calls, kept in ``dtype`` (``zeros``: forecast as zeros, a
  module whose effect is left out between computed calls);
- ``Extrapolate`` (FasterCache's attention, guidance-distilled models): computed every
  ``period``-th call inside a timestep interval, each output extrapolated linearly from
  the last two calls' values otherwise (those values remembered at every call);
- ``SkipChain`` (MagCache, first-block cache): a chain of blocks skipped as a whole, the
  hidden states carried over it by the residual the chain added at its last computed
  call; at calls a ``MagnitudeSchedule`` names, or where the first block's residual
  changed little (``FirstBlockChange``, the one rule that decides from values).

Example:
    >>> [TaylorForecast("proj_out", interval=2, first=2).computes(call) for call in range(6)]
    [True, True, False, True, False, True]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Sequence

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
    remembers_substitutes: ClassVar[bool] = False

    def computes(self, call: int) -> bool:
        return call % self.period == 0 or not _within(self.timesteps, self.timestep)

    def remember(self, memory: dict[str, Any], outputs: Sequence[torch.Tensor], call: int) -> None:
        memory["outputs"], memory["call"] = tuple(outputs), call

    def substitute(self, memory: dict[str, Any], call: int) -> tuple[torch.Tensor, ...]:
        return memory["outputs"]


def _within(timesteps: tuple[float, float], timestep: Callable[[], Any] | None) -> bool:
    low, high = timesteps
    return low < float(timestep() if timestep is not None else 0.0) < high


@dataclasses.dataclass(frozen=True)
class Extrapolate:
    """FasterCache's attention (for a guidance-distilled model): computed at any call whose
    timestep is outside the open interval ``timesteps``, and inside it at calls ``period,
    2*period...``; otherwise each output is its value at the last call plus ``weight()``
    times its change from the call before (the values of those calls, computed or not).
    ``told(memory, call)`` hears of each call remembered (the hooks' own state follows)."""

    module: str
    period: int
    timesteps: tuple[float, float]
    timestep: Callable[[], Any] | None
    weight: Callable[[], float]
    told: Callable[[dict[str, Any], int], None] | None = None  # of each call remembered
    remembers_substitutes: ClassVar[bool] = True

    def computes(self, call: int) -> bool:
        return not _within(self.timesteps, self.timestep) or call > 0 and call % self.period == 0

    def remember(self, memory: dict[str, Any], outputs: Sequence[torch.Tensor], call: int) -> None:
        memory["before"] = memory.get("outputs", tuple(outputs))
        memory["outputs"], memory["call"] = tuple(outputs), call
        if self.told is not None:
            self.told(memory, call)

    def substitute(self, memory: dict[str, Any], call: int) -> tuple[torch.Tensor, ...]:
        weight = self.weight()
        pairs = zip(memory["before"], memory["outputs"])
        return tuple(last + (last - before) * weight for before, last in pairs)


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
    remembers_substitutes: ClassVar[bool] = False

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


@dataclasses.dataclass(frozen=True)
class ChainBlock:
    """A block of a skipped chain: which of its arguments and results (by position; None:
    it returns the tensor itself) carry the hidden states and the encoder's."""

    path: str
    hidden_argument: str = "hidden_states"
    encoder_argument: str = "encoder_hidden_states"
    hidden_result: int | None = None
    encoder_result: int | None = None


@dataclasses.dataclass(frozen=True)
class MagnitudeSchedule:
    """MagCache's choice of calls, from the magnitude ratios of successive residuals
    (``ratios``, one per step of a ``steps``-step generation): a call is skipped while the
    error accumulated since the last computed call (the sum of ``|1 - product of the
    ratios|``) stays within ``threshold`` for at most ``max_skipped`` calls in a row; the
    first ``retained`` steps, and the first call, are always computed. Calls count from 0
    again after ``steps``."""

    ratios: tuple[float, ...]
    threshold: float
    max_skipped: int
    retained: int
    steps: int

    def computes(self, call: int) -> bool:
        product, skipped, error, computed = 1.0, 0, 0.0, False
        for step in range(call % self.steps + 1):
            decision = True
            if step >= self.retained:
                product *= self.ratios[step] if step < len(self.ratios) else 1.0
                skipped, error = skipped + 1, error + abs(1.0 - product)
                if computed and error <= self.threshold and skipped <= self.max_skipped:
                    decision = False
                else:
                    product, skipped, error = 1.0, 0, 0.0
            computed = computed or decision
        return decision


@dataclasses.dataclass(frozen=True)
class FirstBlockChange:
    """First-block cache's choice: a call computes the rest of the chain when the residual
    of its first block (what the block added to the hidden states) changed, relative to
    the residual at the last computed call, by more than ``threshold`` in mean absolute
    value; the first call always computes."""

    threshold: float

    def computes(self, residual: torch.Tensor, before: torch.Tensor | None) -> bool:
        if before is None:
            return True
        change = (residual - before).abs().mean() / before.abs().mean()
        return float(change) > self.threshold


@dataclasses.dataclass(frozen=True)
class SkipChain:
    """A chain of blocks skipped as a whole at some calls: from ``blocks[skipped_from]`` on,
    the hidden states leave the chain as they entered it plus what the chain added to them
    at its last computed call (its residual); the encoder's leave as they entered, plus
    their own residual where ``encoder_residual``. ``policy`` chooses the calls: from the
    call alone (``MagnitudeSchedule``: MagCache, which skips from the first block) or from
    the first block's residual (``FirstBlockChange``: first-block cache, which always
    computes the first block and skips from the second)."""

    blocks: tuple[ChainBlock, ...]
    policy: MagnitudeSchedule | FirstBlockChange
    skipped_from: int = 0
    encoder_residual: bool = False

    @property
    def module(self) -> str:
        """The chain's name in decisions and logs: its first and last skipped block."""
        return f"{self.blocks[self.skipped_from].path}..{self.blocks[-1].path}"

    @property
    def decided_by_values(self) -> bool:
        return isinstance(self.policy, FirstBlockChange)

    def computes(self, call: int) -> bool | None:
        """The decision for ``call`` where the call alone makes it; None where the first
        block's residual does (``runtime.chain_skip`` decides then)."""
        return None if self.decided_by_values else self.policy.computes(call)


Rule = ReuseEvery | TaylorForecast | Extrapolate | SkipChain
