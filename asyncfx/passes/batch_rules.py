"""The batch rule of each ATen op: how it moves the batch axes of its arguments
(``batch_axes.py``), or why it may mix samples. An op without a rule here, and not
tagged pointwise, is not proven: the graph is then not separable by batch."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from asyncfx.passes.batch_axes import (NOTHING, Axis, Mixes, Operands, Sample, Shared, broadcast, dim_of,
                                       expanded, filled, first_argument, made, permuted, pointwise,
                                       repeated, repeated_each, reshaped, transposed)
from asyncfx.passes.meta import draws_random_numbers

Rule = Callable[[Operands], "Axis | tuple"]


def _dims(ops: Operands, name: str) -> list[int] | None:
    dims = ops.arg(name)
    if dims is None:
        return None
    ndim = len(ops.shape(ops.node.args[0]))
    return [dim_of(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


def _away_from(ops: Operands, dims: Sequence[int] | None, what: str, keep: bool = True) -> Axis:
    """The first argument's axis where the op works along ``dims`` only (None: all of
    them): refused where those hold the samples; the dims go away unless ``keep``."""
    axis = ops.axis(ops.node.args[0])
    if isinstance(axis, Sample):
        if dims is None or axis.dim in dims:
            raise Mixes(f"it {what} over the batch dimension")
        return axis if keep else axis.moved(axis.dim - sum(d < axis.dim for d in dims))
    if dims is None:
        return NOTHING
    return axis.mapped(lambda d: None if d in dims else d if keep else d - sum(r < d for r in dims))


def reduced(ops: Operands) -> Axis:
    keep = bool(ops.arg("keepdim", False))
    return _away_from(ops, _dims(ops, "dim"), "reduces", keep=keep)


def along_dim(ops: Operands) -> Axis:
    """softmax, cumsum and the like: along one dimension, keeping the shape."""
    return _away_from(ops, _dims(ops, "dim"), "normalises or accumulates")


def group_normed(ops: Operands) -> Axis:
    """group_norm, instance norm: statistics per entry of the first dimension."""
    axis = ops.axis(ops.node.args[0])
    if isinstance(axis, Sample) and axis.dim != 0:
        raise Mixes("it normalises each entry of the first dimension, and the samples lie along another")
    _weights_shared(ops, ops.tensors()[1:])
    return axis if isinstance(axis, Sample) else axis.mapped(lambda d: d if d == 0 else None)


def layer_normed(ops: Operands) -> Axis:
    ndim = len(ops.shape(ops.node.args[0]))
    normalised = range(ndim - len(ops.node.args[1]), ndim)
    _weights_shared(ops, ops.tensors()[1:])
    return _away_from(ops, list(normalised), "normalises")


def batch_normed(ops: Operands) -> Axis | tuple:
    """batch_norm: per channel (the second dimension), with running statistics unless
    training, when it takes them from the whole batch."""
    training = ops.node.target.overloadpacket.__name__ == "batch_norm" and bool(ops.arg("training"))
    if training and isinstance(ops.axis(ops.node.args[0]), Sample):
        raise Mixes("it normalises with statistics of the whole batch (training mode)")
    _weights_shared(ops, ops.tensors()[1:])
    axis = _away_from(ops, [1], "normalises per channel")
    return axis if not isinstance(ops.values.get(ops.node), (list, tuple)) else (axis, NOTHING, NOTHING)


def _weights_shared(ops: Operands, weights: Sequence) -> None:
    if any(isinstance(ops.axis(w), Sample) for w in weights):
        raise Mixes("its weights differ per sample")


def linear(ops: Operands) -> Axis:
    _weights_shared(ops, ops.tensors()[1:])
    return _away_from(ops, [len(ops.shape(ops.node.args[0])) - 1], "contracts")


def _matmul_axis(ops: Operands, left, right) -> Axis:
    """matmul semantics: batch dims broadcast, ``[..., n, k] @ [..., k, m]``."""
    out_ndim = len(ops.out_shape)
    placed = []
    for operand, contracted, kept in ((left, -1, -2), (right, -2, -1)):
        axis, ndim = ops.axis(operand), len(ops.shape(operand))
        if not isinstance(axis, Sample):
            continue
        if ndim < 2 or axis.dim == ndim + contracted:
            raise Mixes("it contracts over the batch dimension")
        placed.append(axis.moved(out_ndim + kept if axis.dim == ndim + kept else out_ndim - ndim + axis.dim))
    if len(set(placed)) > 1:
        raise Mixes("it multiplies samples of one operand with other samples of the other")
    return placed[0] if placed else NOTHING


def matmul(ops: Operands) -> Axis:
    return _matmul_axis(ops, ops.node.args[0], ops.node.args[1])


def added_matmul(ops: Operands) -> Axis:
    """addmm, baddbmm, addbmm: ``input + a @ b``."""
    product = _matmul_axis(ops, ops.node.args[1], ops.node.args[2])
    added = broadcast(ops, [ops.node.args[0]])
    if isinstance(product, Sample) and isinstance(added, Sample) and product != added:
        raise Mixes("it adds samples of one operand to other samples of the product")
    return product if isinstance(product, Sample) else added


def outer(ops: Operands) -> Axis:
    left, right = ops.axis(ops.node.args[0]), ops.axis(ops.node.args[1])
    if isinstance(left, Sample) and isinstance(right, Sample):
        raise Mixes("it multiplies every sample with every other")
    return left if isinstance(left, Sample) else right.moved(1) if isinstance(right, Sample) else NOTHING


def einsum(ops: Operands) -> Axis:
    equation = ops.node.args[0].replace(" ", "")
    given, _, result = equation.partition("->")
    if "." in equation or not result:
        raise Mixes("its equation uses ellipses or an implicit output, which the rule does not read")
    letters = {}
    for operand, subscripts in zip(ops.node.args[1], given.split(",")):
        axis = ops.axis(operand)
        if isinstance(axis, Sample):
            letters[subscripts[axis.dim]] = axis.inner
    if len(letters) > 1 or any(letter not in result for letter in letters):
        raise Mixes("it contracts over the batch or pairs samples of different operands")
    if not letters:
        return NOTHING
    (letter, inner), = letters.items()
    return Sample(result.index(letter), inner)


def spatial(ops: Operands) -> Axis:
    """Convolutions, pooling, upsampling: per entry of the first dimension (channels too,
    where the op keeps them apart, which only the first dimension is sure to be)."""
    axis = ops.axis(ops.node.args[0])
    _weights_shared(ops, ops.tensors()[1:])
    if isinstance(axis, Sample) and axis.dim != 0:
        raise Mixes("it works across the dimensions after the first, where the samples lie")
    return axis if isinstance(axis, Sample) else axis.mapped(lambda d: d if d == 0 else None)


def attention(ops: Operands) -> Axis:
    """scaled_dot_product_attention(q, k, v, mask): per entry of the leading dimensions,
    and of q's rows where only q and the mask carry samples."""
    query, key, value = ops.node.args[:3]
    ndim = len(ops.out_shape)
    for operand in (key, value):
        axis = ops.axis(operand)
        if isinstance(axis, Sample) and axis.dim >= len(ops.shape(operand)) - 2:
            raise Mixes("it attends over keys or values from several samples")
    mask = ops.arg("attn_mask")
    axis = broadcast(ops, [t for t in (query, key, value, mask) if t is not None], ndim)
    if isinstance(axis, Sample) and axis.dim == ndim - 1:
        raise Mixes("the samples lie along the features it contracts, or along its mask's keys")
    return axis if isinstance(axis, Sample) else axis.mapped(lambda d: d if d < ndim - 2 else None)


def sliced(ops: Operands) -> Axis:
    source = ops.node.args[0]
    dim, axis = dim_of(ops.arg("dim", 0), len(ops.shape(source))), ops.axis(source)
    if isinstance(axis, Sample) and axis.dim == dim and ops.out_shape != ops.shape(source):
        raise Mixes("it takes part of the batch")
    if isinstance(axis, Sample) or ops.out_shape == ops.shape(source):
        return axis
    return axis.mapped(lambda d: d if d != dim or axis.period(d) == 1 else None)


def selected(ops: Operands) -> Axis:
    source = ops.node.args[0]
    dim = dim_of(ops.arg("dim"), len(ops.shape(source)))
    return _away_from(ops, [dim], "picks one entry", keep=False)


def embedded(ops: Operands) -> Axis:
    """embedding(weight, indices): rows picked per index."""
    _weights_shared(ops, [ops.node.args[0]])
    return ops.axis(ops.node.args[1]) if isinstance(ops.axis(ops.node.args[1]), Sample) else NOTHING


def indexed(ops: Operands) -> Axis:
    """x[..., idx, ...] with shared indices after the samples' dimension."""
    source, indices = ops.node.args[0], ops.node.args[1]
    axis = ops.axis(source)
    if any(isinstance(ops.axis(i), Sample) for i in indices if i is not None):
        raise Mixes("its indices differ per sample")
    used = [d for d, index in enumerate(indices) if index is not None]
    if isinstance(axis, Sample) and used and axis.dim >= used[0]:
        raise Mixes("it indexes the batch dimension, or one before it")
    return axis if isinstance(axis, Sample) else NOTHING


def index_selected(ops: Operands) -> Axis:
    source, index = ops.node.args[0], ops.node.args[2]
    dim = dim_of(ops.arg("dim"), len(ops.shape(source)))
    picked = ops.axis(index)
    if isinstance(picked, Sample):
        if isinstance(ops.axis(source), Sample):
            raise Mixes("it picks from a batched tensor with batched indices")
        return picked.moved(dim)
    return _away_from(ops, [dim], "picks entries")


def joined(ops: Operands) -> Axis:
    """cat and stack: refused along the samples' dimension."""
    tensors = list(ops.node.args[0])
    stacking = "stack" in ops.node.target.__name__
    ndim = len(ops.out_shape)
    dim = dim_of(ops.arg("dim", 0), ndim)
    axis = broadcast(ops, tensors, ndim - 1 if stacking else ndim)
    if isinstance(axis, Sample):
        if axis.dim == dim and not stacking:
            raise Mixes("it concatenates along the batch dimension")
        return axis.moved(axis.dim + (stacking and axis.dim >= dim))
    return axis.mapped(lambda d: d + 1 if stacking and d >= dim else None if d == dim and not stacking else d)


def split_up(ops: Operands) -> tuple:
    """chunk, split, split_with_sizes, unbind, tensor_split: each part keeps the axis."""
    source, name = ops.node.args[0], ops.node.target.__name__
    ndim = len(ops.shape(source))
    dim = dim_of(ops.arg("dim", 0), ndim)
    axis = _away_from(ops, [dim], "splits", keep=not name.startswith("unbind"))
    parts = len(ops.values[ops.node]) if isinstance(ops.values.get(ops.node), (list, tuple)) else 1
    if isinstance(axis, Shared) and not name.startswith("unbind"):
        axis = axis.mapped(lambda d: d if d != dim or axis.period(d) == 1 else None)
    return (axis,) * parts


def of_shared_only(what: str) -> Rule:
    def rule(ops: Operands) -> Axis:
        if any(isinstance(ops.axis(t), Sample) for t in ops.tensors()):
            raise Mixes(f"it {what}")
        return NOTHING
    return rule


def native_group_normed(ops: Operands) -> tuple:
    axis = group_normed(ops)
    return (axis, axis, axis) if isinstance(axis, Sample) else (NOTHING,) * 3


#: Ops by their packet name (``aten.add.Tensor`` -> ``add``).
RULES: dict[str, Rule] = {
    **dict.fromkeys(["to", "_to_copy", "dropout", "contiguous", "alias", "clone", "detach", "polar",
                     "lift_fresh_copy", "native_dropout", "clamp", "nan_to_num", "masked_fill", "lerp",
                     "complex", "view_as_real", "view_as_complex"], pointwise),
    "type_as": first_argument,
    **dict.fromkeys(["ones", "zeros", "full", "empty", "scalar_tensor", "ones_like", "zeros_like",
                     "full_like", "empty_like", "new_ones", "new_zeros", "new_full", "new_empty"], filled),
    **dict.fromkeys(["arange", "linspace"], made),
    **dict.fromkeys(["view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze",
                     "view_as"], reshaped),
    "permute": permuted, "transpose": transposed, "t": transposed, "swapaxes": transposed,
    **dict.fromkeys(["expand", "broadcast_to", "expand_as"], expanded),
    "repeat": repeated, "repeat_interleave": repeated_each,
    **dict.fromkeys(["mean", "sum", "amax", "amin", "var", "std", "prod", "logsumexp", "norm",
                     "linalg_vector_norm", "any", "all", "argmax", "argmin"], reduced),
    **dict.fromkeys(["softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod"], along_dim),
    "group_norm": group_normed, "instance_norm": group_normed, "native_group_norm": native_group_normed,
    **dict.fromkeys(["layer_norm", "rms_norm"], layer_normed),
    **dict.fromkeys(["batch_norm", "_native_batch_norm_legit_no_training"], batch_normed),
    "linear": linear, **dict.fromkeys(["matmul", "bmm", "mm"], matmul),
    **dict.fromkeys(["addmm", "baddbmm"], added_matmul), "outer": outer, "einsum": einsum,
    **dict.fromkeys(["conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                     "conv_transpose3d", "upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest3d",
                     "_upsample_nearest_exact2d", "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d",
                     "pixel_shuffle", "pixel_unshuffle", "interpolate"], spatial),
    "scaled_dot_product_attention": attention,
    "slice": sliced, "select": selected, "embedding": embedded, "index": indexed,
    "index_select": index_selected,
    **dict.fromkeys(["cat", "concat", "concatenate", "stack"], joined),
    **dict.fromkeys(["chunk", "split", "split_with_sizes", "unbind", "tensor_split"], split_up),
    "meshgrid": of_shared_only("makes a grid from a batched tensor"),
    "pad_sequence": of_shared_only("pads a list of tensors into one"),
}


def rule_for(target: object) -> Rule | None:
    """The batch rule of an op (a pointwise-tagged op without one broadcasts)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    rule = RULES.get(target.overloadpacket.__name__)
    if rule is None and torch.Tag.pointwise in target.tags:
        return pointwise
    if rule is None and draws_random_numbers(target):
        raise Mixes("it draws random numbers, which a split batch draws differently")
    return rule
