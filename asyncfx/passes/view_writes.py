"""View-writes pass: in-place writes into slices of a fresh intermediate as new values.

The common in-place writes of denoisers fill, scale or index into a slice or an element of
a tensor the forward just made (FreeU's ``mask[..., a:b] = scale`` and
``h[:, :n] = h[:, :n] * b``, a token refiner's ``mask[:, :, :, 0] = True``, boolean-index
assignment). Each becomes the out-of-place op on the written view, scattered back into a
new base (``slice_scatter``, ``select_scatter``); the base and the views on the way, where
read after the write, are read from the new values. torch's own rewrite (``functionalise``)
retraces the whole program, taking as long as the export itself; this pass rewrites those
nodes only. It takes a write only where nothing else can see it: the written tensor is
made by an op that returns a new tensor (not an input or a weight), the views between it
and the write are slices, selects or the tensor itself (``to`` its own dtype), nothing but
plain reads follows on them, and no other view of it made before the write is read after.
Which views alias their input is read from export's recorded values (their storages).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from asyncfx.passes.functionalise import in_place_ops, writes_in_place
from asyncfx.passes.meta import VALUE

#: View ops that a scatter inverts: the view's arguments, after the base, are the scatter's.
_SCATTERS = {torch.ops.aten.slice.Tensor: torch.ops.aten.slice_scatter.default,
             torch.ops.aten.select.int: torch.ops.aten.select_scatter.default}


def rewrite_view_writes(graph: fx.Graph) -> bool:
    """Rewrite each in-place write of ``graph`` as new values (see the module docstring);
    False, leaving the graph partly rewritten, at the first write it cannot take: the caller
    works on a copy and keeps it only on True.

    Example:
        >>> graph = copy_graph(traced)
        >>> rewrite_view_writes(graph)   # FreeU's masks and slice scaling
        True
    """
    # which views share their input's storage, from export's values (a rewrite makes new
    # values for the bases it writes, which the views after it read without a value of their own)
    views = {node for node in graph.nodes if _returns_alias(node) and _shares_storage(node)}
    for write in in_place_ops(graph):
        chain, functional = _written_chain(write, views), _functional(write.target)
        if chain is None or functional is None:
            return False
        order = {node: index for index, node in enumerate(graph.nodes)}  # before this write's rewrite
        if _read_after(chain, write, views, order) or not _rewrite(graph, write, chain, functional, order):
            return False
    return True


def _returns_alias(node: fx.Node) -> bool:
    """Whether the node's value shares storage with an argument (a view, or an item of
    ops that return views, like ``split``)."""
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _written_chain(write: fx.Node, views: set[fx.Node]) -> list[fx.Node] | None:
    """``[base, view, ..., written view]``, or None where the write is not one this pass
    takes (it writes another argument, through a view no scatter inverts, or into a
    tensor that is not the forward's own). A link is a slice or a select, or an op that
    returned its input itself (``to`` its own dtype); an op that may alias but made a new
    tensor (``to`` another dtype) is the base."""
    written = [a.alias_info is not None and a.alias_info.is_write for a in write.target._schema.arguments]
    if written[:1] != [True] or any(written[1:]):
        return None
    chain = [write.args[0]]
    while chain[0] in views:
        if chain[0].target not in _SCATTERS and not _is_its_input(chain[0]):
            return None
        chain.insert(0, chain[0].args[0])
    base = chain[0]
    if base.op != "call_function" or getattr(base.meta.get(VALUE), "fake_mode", None) is None:
        return None  # an input or weight (refused before), or a value export did not record
    return chain


def _shares_storage(node: fx.Node) -> bool:
    """Whether the node's recorded value shares its first argument's storage."""
    source = node.args[0] if node.args else None
    value, of = node.meta.get(VALUE), source.meta.get(VALUE) if isinstance(source, fx.Node) else None
    if not (isinstance(value, torch.Tensor) and isinstance(of, torch.Tensor)):
        return True  # unknown: taken as a view, which the chain then refuses unless it is one
    return StorageWeakRef(value.untyped_storage()) == StorageWeakRef(of.untyped_storage())


def _is_its_input(node: fx.Node) -> bool:
    """Whether the node's value is its input's tensor itself (same storage, layout, dtype)."""
    value, of = node.meta.get(VALUE), node.args[0].meta.get(VALUE)
    if not (isinstance(value, torch.Tensor) and isinstance(of, torch.Tensor)):
        return False  # an item of ops that return several views (``split``)
    return (value.dtype == of.dtype and value.storage_offset() == of.storage_offset()
            and _concrete(value.shape) == _concrete(of.shape) is not None
            and _concrete(value.stride()) == _concrete(of.stride()))


def _concrete(sizes: Any) -> tuple[int, ...] | None:
    return tuple(sizes) if all(isinstance(size, int) for size in sizes) else None


def _read_after(chain: list[fx.Node], write: fx.Node, views: set[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Whether a view of the chain's base made before ``write`` is read after it where the
    rewrite cannot give the read the written value: a view off the chain, or a view or a
    write of a view on it (``order``: each node's position in the graph)."""
    base = chain[0]
    aliases, stack = set(), [base]
    while stack:
        for user in stack.pop().users:
            if user not in aliases and user in views and order[user] < order[write]:
                aliases.add(user)
                stack.append(user)
    for alias in aliases:
        later = [user for user in alias.users if order[user] > order[write]]
        if later and (alias not in chain or any(u in views or writes_in_place(u) for u in later)):
            return True
    return False


def _rewrite(graph: fx.Graph, write: fx.Node, chain: list[fx.Node], functional: Any,
             order: dict[fx.Node, int]) -> bool:
    """The written view computed by the functional op and scattered back up the chain:
    each link read after the write (the write's result included) reads its new value.
    False where the functional op promotes the dtype the write kept (half ``mul_`` float)."""
    later = {node: [user for user in node.users if order[user] > order[write]] for node in chain}
    new = last = _made(graph, write, write, functional, (chain[-1], *write.args[1:]), write.kwargs)
    if new.meta[VALUE].dtype != chain[-1].meta[VALUE].dtype:
        return False
    write.replace_all_uses_with(new)  # an in-place op returns the view it wrote
    news = {chain[-1]: new}
    for view in reversed(chain[1:]):  # a link's new value is its view's scattered back, or that itself
        if view.target in _SCATTERS:
            scatter_args = (view.args[0], new, *view.args[1:])
            new = last = _made(graph, write, last, _SCATTERS[view.target], scatter_args, {})
        news[view.args[0]] = new
    for node, readers in later.items():
        for reader in readers:
            reader.replace_input_with(node, news[node])
    graph.erase_node(write)
    return True


def _made(graph: fx.Graph, write: fx.Node, after: fx.Node, target: Any, args: tuple, kwargs: dict) -> fx.Node:
    """A new node right after ``after``, with the write's metadata and its own value."""
    with graph.inserting_after(after):
        node = graph.call_function(target, args, kwargs)
    node.meta.update({key: value for key, value in write.meta.items() if key != VALUE})
    values, named = fx.node.map_arg((args, kwargs), lambda argument: argument.meta[VALUE])
    with values[0].fake_mode:  # the export's fake tensors, symbolic sizes included
        node.meta[VALUE] = target(*values, **named)
    return node


def _functional(target: Any) -> Any:
    """The out-of-place overload of an in-place ATen op (``fill_.Scalar`` -> ``fill.Scalar``),
    or None where there is none (``fill_diagonal_``)."""
    packet = getattr(torch.ops.aten, target.overloadpacket.__name__.rstrip("_"), None)
    functional = getattr(packet, target._overloadname, None) if packet is not None else None
    return functional if isinstance(functional, torch._ops.OpOverload) else None
