"""The ``node.meta`` keys asyncfx passes write, the value classes of the classify pass,
and how to read sizes from node values.

Each key has exactly one owning pass; other code only reads it.
"""
from __future__ import annotations

import enum
import math
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

#: fx node kinds that compute something (the others are inputs, weights and the output).
COMPUTE_OPS = ("call_function", "call_method", "call_module")

#: Written by ``classify``: the node's :class:`ValueClass`.
VALUE_CLASS = "asyncfx_value_class"
#: Written by ``estimate_cost``: floating-point operations of the node (int).
FLOPS = "asyncfx_flops"
#: Written by ``estimate_cost``: bytes the node reads and writes (int).
BYTES = "asyncfx_bytes"
#: Written by ``profile_nodes``: median measured seconds of the node on its device (float).
MEASURED_SECONDS = "asyncfx_measured_seconds"
#: Written by ``capture`` (``torch.export`` writes it itself): the node's value, a fake or
#: meta tensor (or a pytree of them) carrying shape and dtype.
VALUE = "val"

#: Node values that may carry a size computed from tensor values.
SYMBOLIC_VALUES = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, list, tuple)


def has_data_dependent_size(value: Any) -> bool:
    """Whether a node's value has a size computed from tensor values (``nonzero``,
    boolean-mask indexing): torch.export gives it an unbacked symbol, not a number.

    Example:
        >>> has_data_dependent_size(torch.empty(2, 3))
        False
    """
    # only tensors and symbolic numbers have sizes (torch 2.11 raises on a string)
    return isinstance(value, SYMBOLIC_VALUES) and bool(free_unbacked_symbols(value))


def draws_random_numbers(target: Any) -> bool:
    """Whether an op draws new numbers at every call (tagged ``nondeterministic_seeded``).

    Example:
        >>> draws_random_numbers(torch.ops.aten.randn.default)
        True
    """
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def module_path(node: fx.Node) -> str:
    """The path of the module a node came from (``down_blocks.2.resnets.0``), "" for top level."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return str(node.target) if node.op == "call_module" else ""


def module_calls(node: fx.Node, path: str) -> list[str]:
    """The keys of the calls of module ``path`` that computed ``node`` (torch.export names
    each call of a module in ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [key for key, (where, _) in stack.items() if where == path]


def size_bound(size: int | torch.SymInt) -> int:
    """A size, or for a data-dependent one the largest it can be (all of a boolean mask
    selected), as torch.export bounded it; 1 where it has no bound.

    Example:
        >>> size_bound(3)
        3
    """
    if not isinstance(size, torch.SymInt):
        return int(size)
    upper = float(size.node.shape_env.bound_sympy(size.node.expr).upper)
    return int(upper) if math.isfinite(upper) else 1


class ValueClass(enum.IntEnum):
    """How often a value changes during one generation, ordered so that a node's class
    is the largest class among its inputs."""

    #: Depends only on inputs constant over a generation (text embeddings, class
    #: labels, position ids) and on constants (weights). Computed once per generation.
    STATIC = 0
    #: Depends on the timestep (and static values) but not on the latent. Recomputed
    #: locally every step by each stage that needs it; never sent between stages.
    STEP = 1
    #: Depends on the latent. Cut into stages; crosses stage boundaries one step stale.
    LATENT = 2

    def __str__(self) -> str:
        return self.name.lower()
