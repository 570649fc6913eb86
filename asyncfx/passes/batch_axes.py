"""Batch axes: where the batch runs through a value, and how each kind of op moves it.

A tensor in a graph is either :class:`Sample`: block ``i`` of its dimension ``dim``
(``inner`` elements long) belongs to sample ``i`` and is computed from sample ``i`` of
the batched inputs and from constants only; or :class:`Shared`: computed from no
batched input at all, the same for every sample, and repeating along some dimensions
with a period (constant along them: period 1; an expanded, filled or tiled tensor), where
it may meet the samples: each block of ``inner`` elements, a multiple of the period, sees
the same values.

Each rule takes a node, the axes of its tensor arguments and their values (fake tensors,
for shapes) and returns the axes of its result, or raises :class:`Mixes` with the reason
the samples may mix there. ``batch_separability`` (``batch.py``) drives the rules.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function


@dataclasses.dataclass(frozen=True)
class Sample:
    """Block ``i`` of dimension ``dim`` (``inner`` elements long) belongs to sample ``i``."""

    dim: int
    inner: int = 1

    def moved(self, dim: int) -> "Sample":
        return Sample(dim, self.inner)


@dataclasses.dataclass(frozen=True)
class Shared:
    """The same for every sample; along the dimensions in ``periods`` its values repeat every
    so many elements, ``(dim, period)`` (period 1: constant along it)."""

    periods: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, periods: dict[int, int]) -> "Shared":
        return cls(tuple(sorted(periods.items())))

    def period(self, dim: int) -> int | None:
        return dict(self.periods).get(dim)

    def mapped(self, where: Callable[[int], int | None]) -> "Shared":
        """The periods of dimensions that stay (``where(dim)``: the new dim, or None)."""
        return Shared.of({where(d): p for d, p in self.periods if where(d) is not None})

Axis = Sample | Shared
NOTHING = Shared()


class Mixes(Exception):
    """The op may mix samples (or its rule cannot prove that it does not)."""


@dataclasses.dataclass
class Operands:
    """A node's arguments as the rules see them: ``axis(x)`` and ``shape(x)`` of an argument
    (a node or a constant), the node's own ``out_shape`` and its arguments by name, ``arg``."""

    node: fx.Node
    axes: dict[fx.Node, Any]
    values: dict[fx.Node, Any]
    named: dict[str, Any] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        normalised = normalize_function(self.node.target, self.node.args, self.node.kwargs,
                                        normalize_to_only_use_kwargs=True)
        self.named = dict(normalised.kwargs) if normalised is not None else dict(self.node.kwargs)

    def arg(self, name: str, default: Any = None) -> Any:
        value = self.named.get(name)
        return default if value is None else value

    def axis(self, value: Any) -> Any:
        return self.axes.get(value, NOTHING) if isinstance(value, fx.Node) else NOTHING

    def shape(self, value: Any) -> tuple[int, ...]:
        found = self.values.get(value) if isinstance(value, fx.Node) else value
        return tuple(found.shape) if isinstance(found, torch.Tensor) else ()

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape(self.node)

    def tensors(self) -> list[fx.Node]:
        """The tensor arguments, lists of them included, in order."""
        found: list[fx.Node] = []
        for value in (*self.node.args, *self.node.kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, fx.Node) and isinstance(self.values.get(item), torch.Tensor):
                    found.append(item)
        return found


def dim_of(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# -- broadcasting ops ----------------------------------------------------------------------
def broadcast(ops: Operands, tensors: Sequence[fx.Node], out_ndim: int | None = None) -> Axis:
    """The axis of an elementwise result of ``tensors`` (broadcast against each other)."""
    out_shape = ops.out_shape
    out_ndim = len(out_shape) if out_ndim is None else out_ndim
    samples = {}
    for tensor in tensors:
        axis = ops.axis(tensor)
        if isinstance(axis, Sample):
            samples[tensor] = axis.moved(out_ndim - len(ops.shape(tensor)) + axis.dim)
    if len(set(samples.values())) > 1:
        raise Mixes("it combines values whose samples lie along different dimensions")
    if not samples:
        return _shared_broadcast(ops, tensors, out_ndim)
    sample = next(iter(samples.values()))
    for tensor in tensors:
        if tensor not in samples:
            _check_meets(ops, tensor, sample, out_ndim)
    return sample


def _check_meets(ops: Operands, shared: fx.Node, sample: Sample, out_ndim: int) -> None:
    """A shared value meeting the samples' dimension must be constant along it."""
    shape = ops.shape(shared)
    dim = sample.dim - (out_ndim - len(shape))
    period = ops.axis(shared).period(dim) if dim >= 0 else 1
    if dim < 0 or shape[dim] == 1 or period is not None and sample.inner % period == 0:
        return
    raise Mixes(f"it combines each sample with a slice of {shared.name!r}, which is the same for every "
                "batch but not along the batch (it depends on the sample's position in it)")


def _shared_broadcast(ops: Operands, tensors: Sequence[fx.Node], out_ndim: int) -> Shared:
    """Each output dimension repeats with the longest period of its operands' (all periodic)."""
    periods: dict[int, int | None] = dict.fromkeys(range(out_ndim), 1)
    for tensor in tensors:
        shape, axis = ops.shape(tensor), ops.axis(tensor)
        offset = out_ndim - len(shape)
        for d, size in enumerate(shape):
            own = 1 if size == 1 else axis.period(d)
            before = periods[offset + d]
            periods[offset + d] = None if own is None or before is None else math.lcm(own, before)
    return Shared.of({d: p for d, p in periods.items() if p is not None})


def pointwise(ops: Operands) -> Axis:
    return broadcast(ops, ops.tensors())


def first_argument(ops: Operands) -> Axis:
    """Values computed elementwise from the first argument alone (``type_as``)."""
    return broadcast(ops, ops.tensors()[:1])


def filled(ops: Operands) -> Axis:
    """A tensor filled with one value: the same everywhere."""
    return Shared.of(dict.fromkeys(range(len(ops.out_shape)), 1))


def made(ops: Operands) -> Axis:
    """A tensor made from no input (``arange``): shared, varying along its dimensions."""
    if any(isinstance(ops.axis(t), Sample) for t in ops.tensors()):
        raise Mixes("it makes one tensor from several samples' values")
    return NOTHING


# -- shape ops -------------------------------------------------------------------------------
def reshaped(ops: Operands) -> Axis:
    """view, reshape, flatten, unflatten, (un)squeeze: where the sample block lands."""
    source = ops.tensors()[0]
    axis, before, after = ops.axis(source), ops.shape(source), ops.out_shape
    if isinstance(axis, Shared):
        return _reshaped_uniform(axis, before, after)
    landed = _block_lands(before, after, axis.dim, before[axis.dim] // axis.inner, axis.inner)
    if landed is None:
        raise Mixes(f"it reshapes {list(before)} to {list(after)}, which splits the batch over several "
                    "dimensions or merges it under another one")
    return Sample(*landed)


def _reshaped_uniform(axis: Shared, before: tuple[int, ...], after: tuple[int, ...]) -> Shared:
    """A dimension repeating every ``p`` elements has ``size / p`` equal blocks: where they
    land whole, the new dimension repeats every block."""
    kept = {}
    for dim, period in axis.periods:
        landed = _block_lands(before, after, dim, before[dim] // period, period)
        if landed is not None:
            kept[landed[0]] = landed[1]
    return Shared.of(kept)


def _block_lands(before: tuple[int, ...], after: tuple[int, ...], dim: int, count: int,
                 inner: int) -> tuple[int, int] | None:
    """Where ``count`` blocks of ``inner`` elements along ``before[dim]`` land after a
    reshape to ``after``: ``(dim, inner)`` of one dimension holding them all, outermost."""
    outside = math.prod(before[:dim])
    within = inner * math.prod(before[dim + 1:])
    for candidate, size in enumerate(after):
        if math.prod(after[:candidate]) != outside or size % count:
            continue
        if (size // count) * math.prod(after[candidate + 1:]) == within:
            return candidate, size // count
    return None


def permuted(ops: Operands) -> Axis:
    order = [dim_of(d, len(ops.out_shape)) for d in ops.arg("dims")]
    return _moved(ops.axis(ops.node.args[0]), lambda d: order.index(d))


def transposed(ops: Operands) -> Axis:
    ndim = len(ops.out_shape)
    if ops.node.target.__name__.startswith("t."):
        first, second = 0, 1
    else:
        first, second = dim_of(ops.arg("dim0"), ndim), dim_of(ops.arg("dim1"), ndim)
    return _moved(ops.axis(ops.node.args[0]),
                  lambda d: second if d == first else first if d == second else d)


def _moved(axis: Axis, where: Callable[[int], int]) -> Axis:
    if isinstance(axis, Sample):
        return axis.moved(where(axis.dim))
    return axis.mapped(where)


def expanded(ops: Operands) -> Axis:
    """expand, broadcast_to, expand_as: new and size-1 dimensions become uniform."""
    source = ops.node.args[0]
    before, after = ops.shape(source), ops.out_shape
    offset, axis = len(after) - len(before), ops.axis(source)
    if isinstance(axis, Sample):
        return axis.moved(axis.dim + offset)
    grown = {d: 1 for d in range(len(after)) if d < offset or before[d - offset] == 1}
    return Shared.of({**{d + offset: p for d, p in axis.periods}, **grown})


def repeated(ops: Operands) -> Axis:
    source = ops.node.args[0]
    repeats, before = list(ops.arg("repeats")), ops.shape(source)
    offset, axis = len(repeats) - len(before), ops.axis(source)
    if isinstance(axis, Sample):
        if repeats[axis.dim + offset] != 1:
            raise Mixes("it repeats the whole batch (samples interleave with their copies)")
        return axis.moved(axis.dim + offset)
    tiled = {d + offset: before[d] for d in range(len(before)) if repeats[d + offset] != 1}
    return Shared.of({**tiled, **{d + offset: p for d, p in axis.periods}, **dict.fromkeys(range(offset), 1)})


def repeated_each(ops: Operands) -> Axis:
    """repeat_interleave(x, repeats, dim): each sample's block grows ``repeats`` times."""
    source, dim = ops.node.args[0], ops.arg("dim")
    axis = ops.axis(source)
    if dim is None and len(ops.shape(source)) == 1:  # flattening one dimension changes nothing
        dim = 0
    if not isinstance(ops.arg("repeats"), int) or dim is None:
        if isinstance(axis, Sample):
            raise Mixes("it repeats elements by a tensor of counts or over the flattened tensor")
        return NOTHING
    dim = dim_of(dim, len(ops.out_shape))
    if isinstance(axis, Sample):
        return Sample(axis.dim, axis.inner * ops.arg("repeats")) if axis.dim == dim else axis
    period, periods = axis.period(dim), dict(axis.periods)
    if period is not None:
        periods[dim] = 1 if period == 1 else period * ops.arg("repeats")
    return Shared.of(periods)
