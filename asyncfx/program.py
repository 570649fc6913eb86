"""The program: what the compiler hands the runtime, and all the runtime knows of a model.

The partitioner lowers a capture and a :class:`~asyncfx.plan.StagePlan` to a
:class:`Program` (``asyncfx.partitioner.lower``); the runtime runs programs and never
looks at graphs, plans or captures otherwise. Both sides import this module and
neither owns it. A program is frozen: its stage modules, the call's inputs with their
roles, the boundary tensors between stages, the outputs, and how a call's arguments
become the graph's flat inputs and the flat outputs the model's own output type.

The runtime captures lazily (at a model's first call) and builds the stages late (at
the last warm-up step), so it asks the compiler in two steps, through the two
protocols at the end: :class:`Frontend` captures a call and gives a :class:`Lowering`,
whose ``call`` spec binds calls at once and whose ``lower()`` makes the program.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from asyncfx.plan import StagePlan


class InputRole(str, enum.Enum):
    """What an input of the denoiser is to a sampler."""

    LATENT = "latent"        # the noisy sample x_s, new every step
    TIMESTEP = "timestep"    # t_s, new every step
    CONDITION = "condition"  # constant over a generation: text embeddings, labels, ids

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """One tensor input of a captured graph, in placeholder order."""

    name: str                 # argument path, e.g. "added_cond_kwargs.text_embeds"
    placeholder: str          # its placeholder in captured and stage graphs
    role: InputRole
    shape: tuple[int, ...]
    dtype: str                # e.g. "torch.float32"

    def describe(self) -> str:
        return f"{self.name} ({self.role}, {self.dtype.removeprefix('torch.')}{list(self.shape)})"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of a tensor a program moves (a boundary or an output), and the
    strides its producer makes it with (None: contiguous). Messages carry contiguous
    values; ``laid_out`` gives a received one the producer's strides back, so that its
    readers compute exactly as they do on the producer's own tensor (kernels differ by
    layout in their last bits)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...] | None = None

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def laid_out(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (contiguous, as received) with the producer's strides."""
        if self.stride is None or tensor.stride() == self.stride:
            return tensor
        laid_out = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=tensor.device)
        return laid_out.copy_(tensor)


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """How a call of the model binds to the graph and how its output is rebuilt.

    ``flatten(args, kwargs)`` checks a call against the capture and returns the graph's
    flat inputs (raising ``InputMismatchError`` for other shapes, ``ArgumentsError`` for
    arguments that do not bind); ``unflatten(values)`` rebuilds the model's output.
    ``written_arguments`` names arguments the call writes into (a cache it fills), which
    no graph can do: such calls run the original model.

    Example:
        >>> spec = captured.call
        >>> flat = spec.flatten(args, kwargs)
        >>> dict(zip(spec.names, flat))[spec.latent] is kwargs["sample"]
        True
    """

    model_class: str
    inputs: tuple[GraphInput, ...]
    outputs: tuple[TensorSpec, ...]
    flatten: Callable[[tuple, dict], list[torch.Tensor]]
    unflatten: Callable[[Sequence[Any]], Any]
    written_arguments: tuple[str, ...] = ()

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """The placeholder of each flat input."""
        return tuple(i.placeholder for i in self.inputs)

    @functools.cached_property
    def roles(self) -> list[InputRole]:
        """The role of each flat input."""
        return [i.role for i in self.inputs]

    @functools.cached_property
    def latent(self) -> str:
        """The placeholder of the latent (the first, where there are several)."""
        return next(i.placeholder for i in self.inputs if i.role is InputRole.LATENT)

    @functools.cached_property
    def timestep(self) -> str | None:
        return next((i.placeholder for i in self.inputs if i.role is InputRole.TIMESTEP), None)

    @functools.cached_property
    def conditions(self) -> tuple[str, ...]:
        return tuple(i.placeholder for i in self.inputs if i.role is InputRole.CONDITION)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage: its module, what it reads (graph-input placeholders and boundary
    names, in argument order) and what it returns (boundary names; the last stage
    returns the model's flat outputs)."""

    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BoundarySpec:
    """A latent value one stage makes and later stages read, one step stale."""

    name: str
    producer: int
    consumers: tuple[int, ...]
    tensor: TensorSpec


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a model's devices are laid out: ``groups`` batch groups, each running the same
    chain of ``stages`` stages on its share of the batch. Written ``"GxN"``.

    Example:
        >>> Layout.parse("2x2"), Layout(1, 4).devices
        (Layout(groups=2, stages=2), 4)
    """

    groups: int
    stages: int

    def __str__(self) -> str:
        return f"{self.groups}x{self.stages}"

    @property
    def devices(self) -> int:
        return self.groups * self.stages

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """``"GxN"`` (G batch groups x N stages) as a Layout; ValueError for anything else."""
        groups, x, stages = str(text).strip().lower().partition("x")
        if not x or not groups.isdigit() or not stages.isdigit() or int(groups) < 1 or int(stages) < 1:
            raise ValueError(f"a layout is written 'GxN', G batch groups times N stages, e.g. '2x2' or "
                             f"'1x4', got {text!r}")
        return cls(int(groups), int(stages))


def planned_layout(plan: StagePlan) -> Layout:
    """The layout a plan was compiled for."""
    return Layout(plan.groups, plan.n_stages)


@dataclasses.dataclass(frozen=True)
class BatchSplit:
    """How a call's batch splits over the groups: the graph inputs whose first dimension is
    the batch (``batched``) go to the groups in equal consecutive parts; the others go
    whole to each. The outputs are the groups' outputs joined along their first dimension.

    Example:
        >>> split = BatchSplit(2, frozenset({"sample"}))
        >>> split.part("sample", torch.zeros(4, 3), 1).shape
        torch.Size([2, 3])
    """

    groups: int = 1
    batched: frozenset[str] = frozenset()

    def part(self, name: str, value: torch.Tensor, group: int) -> torch.Tensor:
        if self.groups == 1 or name not in self.batched:
            return value
        size = value.shape[0] // self.groups
        return value.narrow(0, group * size, size)

    def joined(self, parts: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
        """The outputs of the whole batch from each group's (in group order)."""
        if len(parts) == 1:
            return tuple(parts[0])
        return tuple(torch.cat([p[i] for p in parts]) if isinstance(parts[0][i], torch.Tensor)
                     else parts[0][i] for i in range(len(parts[0])))


@dataclasses.dataclass(frozen=True)
class BlockCall:
    """One call of a block of the model in one stage: its tensor arguments by parameter
    name and its tensor results by position in what it returns, as value names of that
    stage (an argument may be one of the stage's inputs)."""

    path: str
    arguments: dict[str, str]
    results: dict[int, str]


class StageEditor(Protocol):
    """How the runtime edits a stage module for a step cache, without looking at graphs:
    ``module_outputs`` names the values a module of the model makes in the stage (``()``:
    none there); ``substituting`` gives a copy of the stage that reads ``substituted``
    values as extra inputs after its own, has each ``(replaced, standing_in, offset)`` of
    ``bypassed`` read ``standing_in`` (plus one more extra input where ``offset``) where
    it read ``replaced``, and returns ``(its outputs, kept values)``; ``computing`` gives a
    copy that computes and returns only the values ``names``; ``block_call`` finds a
    block's call in the stage (None: not there), where the capture recorded it."""

    def module_outputs(self, stage: nn.Module, module: str) -> tuple[str, ...]: ...

    def substituting(self, stage: nn.Module, substituted: Sequence[str], kept: Sequence[str],
                     bypassed: Sequence[tuple[str, str, bool]] = ()) -> nn.Module: ...

    def computing(self, stage: nn.Module, names: Sequence[str]) -> nn.Module: ...

    def block_call(self, stage: nn.Module, path: str) -> BlockCall | None: ...


class WeightSource(Protocol):
    """Where the tensors of a model built without weights come from (its files,
    ``asyncfx.weights.WeightFiles``): ``load`` reads the tensors ``wanted`` names (tensors
    without data, as its stage modules hold them) onto ``device``."""

    def load(self, wanted: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]: ...


@dataclasses.dataclass(frozen=True)
class Program:
    """A model lowered to stages: everything the runtime runs. Stage modules of a
    model built without weights hold tensors on the meta device, which each executor
    loads from ``weights`` for the stages it runs, on their devices.

    Example:
        >>> program = asyncfx.partitioner.lower(captured, plan)
        >>> [len(s.inputs) for s in program.stages], program.call.latent
        ([3, 4], 'sample')
    """

    call: CallSpec
    stages: tuple[StageSpec, ...]
    boundaries: tuple[BoundarySpec, ...]
    plan: StagePlan
    weights: WeightSource | None = None  # where stage tensors without data are loaded from
    split: BatchSplit = BatchSplit()      # the batch groups, each running every stage
    editor: StageEditor | None = None     # stage copies for step caches (None: not supported)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def n_groups(self) -> int:
        return self.split.groups

    @functools.cached_property
    def graph_inputs(self) -> frozenset[str]:
        return frozenset(self.call.names)

    @functools.cached_property
    def boundary(self) -> dict[str, BoundarySpec]:
        """The boundaries by name."""
        return {b.name: b for b in self.boundaries}

    def stage_in_slot(self, slot: int) -> StageSpec:
        """The stage a device slot computes: stage k in slot k, and the last stage in
        stride 2's extra slot."""
        return self.stages[min(slot, self.n_stages - 1)]


class Lowering(Protocol):
    """A captured call, not lowered yet: its ``call`` spec binds calls now, its ``layout``
    is decided, ``lower()`` compiles (unless a plan was given) and makes the program. Where
    the plan was compiled (``rebalances``), ``rebalanced()`` gives the program of a better
    one for the measured seconds of each stage (``parallel``: measured all at once), or
    None to keep it."""

    call: CallSpec

    @property
    def layout(self) -> Layout: ...

    @property
    def rebalances(self) -> bool: ...

    def lower(self) -> Program: ...

    def rebalanced(self, seconds: list[float], parallel: bool) -> Program | None: ...


class Frontend(Protocol):
    """The compiler as the runtime sees it: captures a model for a call like this one."""

    def capture(self, model: nn.Module, args: tuple, kwargs: dict) -> Lowering: ...
