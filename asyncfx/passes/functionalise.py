"""functionalise: turn an exported graph's in-place writes into new values.

The passes read a graph as dataflow (a value is what its node computed), which an
in-place write to an intermediate breaks: the split would drop a write nothing reads the
result of (a mask filled in place) or apply it in one stage to what another stage
reads. ``torch.export`` keeps such writes in its training IR; ``functionalise`` rewrites
them with ``ExportedProgram.run_decompositions({})``, which decomposes nothing else; the
capture takes it for the writes ``view_writes`` leaves (that pass rewrites the common ones
without retracing the program).

torch cannot functionalise a write through ``as_strided``, which is how
``fill_diagonal_`` writes (perturbed-attention guidance builds attention masks with
it), so that op is first replaced by an equivalent masked copy.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import fx
from torch.export import ExportedProgram


def in_place_ops(graph: fx.Graph) -> list[fx.Node]:
    """The ATen ops of an exported graph whose schema writes to an argument."""
    return [node for node in graph.nodes if writes_in_place(node)]


def writes_in_place(node: fx.Node) -> bool:
    """Whether ``node`` calls an ATen op whose schema writes to an argument."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def functionalise(exported: ExportedProgram) -> ExportedProgram:
    """``exported`` with every in-place write made a new value (its graph's
    ``fill_diagonal_`` calls are replaced first, in place).

    Example:
        >>> program = functionalise(torch.export.export(unet_with_freeu, (), kwargs))
        >>> in_place_ops(program.module().graph)
        []
    """
    writes_diagonals = [node for node in exported.graph.nodes if node.op == "call_function"
                        and node.target is torch.ops.aten.fill_diagonal_.default]
    for node in writes_diagonals:
        node.target = fill_diagonal
    if writes_diagonals:  # its code made again only where the graph changed
        exported.graph_module.recompile()
    with warnings.catch_warnings():  # torch's own use of a deprecated pytree class
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return exported.run_decompositions({})


def fill_diagonal(tensor: torch.Tensor, fill_value: float, wrap: bool = False) -> torch.Tensor:
    """``tensor.fill_diagonal_(fill_value, wrap)`` as a masked copy, which torch can
    functionalise (``fill_diagonal_`` itself writes through ``as_strided``).

    Example:
        >>> fill_diagonal(torch.zeros(2, 3), 1.0)
        tensor([[1., 0., 0.],
                [0., 1., 0.]])
    """
    if tensor.dim() == 2:
        rows = torch.arange(tensor.shape[0], device=tensor.device)[:, None]
        columns = torch.arange(tensor.shape[1], device=tensor.device)
        # a tall matrix's diagonal starts again below a gap row when wrap is set
        mask = rows % (tensor.shape[1] + 1) == columns if wrap else rows == columns
    else:  # fill_diagonal_ needs every dimension the same size
        coordinates = [torch.arange(size, device=tensor.device).view(
            [-1 if d == k else 1 for d in range(tensor.dim())]) for k, size in enumerate(tensor.shape)]
        mask = functools.reduce(torch.logical_and, (c == coordinates[0] for c in coordinates[1:]))
    return tensor.copy_(torch.where(mask, fill_value, tensor))
