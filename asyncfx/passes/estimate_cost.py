"""Estimate-cost pass: analytical FLOPs and bytes of every node, without running the model.

The graph is interpreted on fake tensors (shapes and dtypes only) under
``torch.utils.flop_counter.FlopCounterMode``, so an SD-sized UNet costs seconds to
estimate and no memory for activations. Only nodes that can count FLOPs run: an op the
counter has a formula for, or one that decomposes into others (``linear`` into ``addmm``);
every other node is costed by the bytes of the values the capture recorded, and made as
a fake tensor only where a running node reads it. An op called again on values shaped
alike (the same layer shape in every block) takes the count of its first run. A size
that depends on tensor values (a boolean mask's selection) is counted at its bound, as
if the whole mask were selected.
"""
from __future__ import annotations

import contextlib
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from asyncfx.passes.meta import BYTES, FLOPS, VALUE, has_data_dependent_size, size_bound


def estimate_cost(gm: fx.GraphModule) -> int:
    """Write ``node.meta[FLOPS]`` and ``node.meta[BYTES]`` for every node; return total FLOPs.

    Bytes are those of the node's tensor inputs and outputs (a memory-traffic estimate);
    FLOPs are torch's flop counter formulas (matmuls, convolutions, attention).

    Example:
        >>> total = estimate_cost(captured.graph_module)
        >>> sum(n.meta[FLOPS] for n in captured.graph.nodes) == total
        True
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with fake_mode:
        inputs = [_fake_like(node.meta[VALUE]) for node in gm.graph.nodes if node.op == "placeholder"]
    device = inputs[0].device if inputs else torch.device("cpu")
    with fake_mode, counter, torch.no_grad(), _no_cast_cache():
        _CostInterpreter(gm, counter, device).run(*inputs)
    return sum(node.meta[FLOPS] for node in gm.graph.nodes)


@contextlib.contextmanager
def _no_cast_cache() -> Iterator[None]:
    """Autocast keeps the copies it casts weights to until its region ends: under a
    caller's autocast, fake copies made here would be what the model computes with next."""
    cached = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(cached)


@dataclass(frozen=True)
class _NotRun:
    """A node's value that no running node has read yet (made when one does)."""
    node: fx.Node


class _CostInterpreter(fx.Interpreter):
    """Runs the nodes that can count FLOPs on fake tensors; weights stand in as fake tensors
    like them (without data, a model built on the meta device, on the inputs' ``device``)."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode, device: torch.device):
        super().__init__(gm)
        self.counter = counter
        self.device = device
        self.counted: dict[str, int] = {}  # FLOPs of an op on values shaped alike, run once

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor):  # a fake like it, cheaper than converting the tensor
            device = self.device if value.is_meta else value.device
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
        return value

    def map_nodes_to_values(self, args: Any, n: fx.Node) -> Any:
        return fx.node.map_aggregate(super().map_nodes_to_values(args, n), self._made)

    def _made(self, value: Any) -> Any:
        if not isinstance(value, _NotRun):
            return value
        node = value.node
        if node.op == "get_attr":
            made = self.fetch_attr(node.target)
        else:
            made = pytree.tree_map_only((torch.Tensor, torch.SymInt), _bounded_like, node.meta[VALUE])
        self.env[node] = made
        return made

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "get_attr" or _counts_no_flops(node, self.counter.flop_registry):
            return self._not_run(node, 0)
        bounded = VALUE in node.meta and _has_data_dependent_sizes(node)
        alike = None if bounded else _call_signature(node)
        if alike is not None and alike in self.counted:  # the same op on values shaped alike
            return self._not_run(node, self.counted[alike])
        before = self.counter.get_total_flops()
        try:
            result = super().run_node(node)
        except Exception as exc:  # e.g. a leaf function that calls numpy
            if VALUE not in node.meta:
                raise
            if not bounded:
                _warn_cannot_run(node, exc)
            bounded = True
        if bounded:  # what later nodes read is shaped as captured, not as the bounds made it
            result = pytree.tree_map_only((torch.Tensor, torch.SymInt), _bounded_like, node.meta[VALUE])
        node.meta[FLOPS] = int(self.counter.get_total_flops() - before)
        node.meta[BYTES] = 0 if node.op in ("placeholder", "output") else self._bytes(node, result)
        if alike is not None and not bounded:  # bounded: it failed on fake tensors
            self.counted[alike] = node.meta[FLOPS]
        return result

    def _not_run(self, node: fx.Node, flops: int) -> _NotRun:
        """Cost ``node`` by ``flops`` and the bytes of its recorded value, without running it."""
        node.meta[FLOPS] = flops
        node.meta[BYTES] = 0 if node.op == "get_attr" else self._bytes(node, node.meta[VALUE])
        return _NotRun(node)

    def _bytes(self, node: fx.Node, result: Any) -> int:
        """Bytes of the node's tensor arguments and of its ``result``."""
        reads = fx.node.map_arg((node.args, node.kwargs), self._value_read)
        return _tensor_bytes(reads) + _tensor_bytes(result)

    def _value_read(self, node: fx.Node) -> Any:
        value = self.env.get(node)
        if not isinstance(value, _NotRun):
            return value
        return node.meta[VALUE] if VALUE in node.meta else super().fetch_attr(node.target)


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


def _counts_no_flops(node: fx.Node, formulas: dict) -> bool:
    """Whether running ``node`` cannot count FLOPs: an op the counter has no formula for and
    that does not decompose into other ops (the counter counts only the ops it sees), or an
    item of a tuple; its recorded value stands in for it."""
    if node.op != "call_function" or VALUE not in node.meta:
        return False
    if node.target is operator.getitem:
        return True
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op.overloadpacket in formulas:
        return False
    return _COMPOSITE not in op.py_kernels and not torch._C._dispatch_has_kernel_for_dispatch_key(
        op.name(), _COMPOSITE)


def _call_signature(node: fx.Node) -> str | None:
    """What a node's FLOPs depend on: its op, and its arguments with each value read given
    by its shape, strides and dtype (None: a node that is not an op call, or whose value or
    a value it reads the capture did not record)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if any(VALUE not in n.meta for n in (node, *node.all_input_nodes)):
        return None
    arguments = fx.node.map_arg((node.args, node.kwargs), lambda n: _value_signature(n.meta[VALUE]))
    return f"{node.target}{arguments}"


def _value_signature(value: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, _tensor_signature, value)


def _tensor_signature(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _has_data_dependent_sizes(node: fx.Node) -> bool:
    """Whether ``node`` makes or reads a value whose size depends on tensor values: fake
    tensors without symbolic shapes cannot run it (``nonzero``, a boolean-mask write), and
    its cost is counted on the values' bounds."""
    values = [node.meta.get(VALUE), *(n.meta.get(VALUE) for n in node.all_input_nodes)]
    return any(has_data_dependent_size(value) for value in values)


def _warn_cannot_run(node: fx.Node, exc: Exception) -> None:
    warnings.warn(f"estimate_cost: node {node.name} ({node.format_node()}) cannot run on "
                  f"fake tensors ({type(exc).__name__}: {exc}); its FLOPs are counted as "
                  "0 and its cost comes from the bytes it reads and writes.", stacklevel=3)


def _tensor_bytes(value: Any) -> int:
    tensors = [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
    return sum(map(tensor_bytes, tensors))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``, a size that depends on tensor values counted at its bound.

    Example:
        >>> tensor_bytes(torch.empty(2, 3))
        24
    """
    return math.prod(size_bound(size) for size in tensor.shape) * tensor.element_size()


def _fake_like(value: torch.Tensor) -> torch.Tensor:
    """A tensor like ``value``: its strides too, unless a size depends on tensor values
    (then contiguous, with that size at its bound)."""
    device = "cpu" if value.device.type == "meta" else value.device
    if has_data_dependent_size(value):
        return torch.empty([size_bound(size) for size in value.shape], dtype=value.dtype, device=device)
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)


def _bounded_like(value: torch.Tensor | torch.SymInt) -> torch.Tensor | int:
    """A stand-in for a node's value: a fake tensor like it, or a symbolic size's bound."""
    return size_bound(value) if isinstance(value, torch.SymInt) else _fake_like(value)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's flop counter knows the CUDA attention kernels but not the CPU one.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
