"""Block calls: where the arguments and results of chosen module calls are in a graph.

A step cache that skips a chain of blocks (``asyncfx.cache_rules.SkipChain``) stands a
block's results in for its arguments, so it must know which graph value is which
argument and which result. ``torch.export`` records that for the modules named in
``preserve_module_call_signature`` (``ExportedProgram.module_call_graph``);
``tag_block_calls`` writes it into each value's ``node.meta[BLOCK_IO]``, where it travels
with the node through every later pass and into the stages (a stage's placeholder of a
boundary value carries its producer's meta). A module called more than once per model
call is not recorded (its calls would share the names).

Example:
    >>> exported = torch.export.export(model, args, kwargs, preserve_module_call_signature=blocks)
    >>> tag_block_calls(exported, model, blocks)
    >>> block_call(stage, "transformer_blocks.0").arguments["hidden_states"]
    'linear'
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch.utils._pytree as pytree
from torch import fx, nn

from asyncfx.passes.meta import COMPUTE_OPS, module_calls
from asyncfx.program import BlockCall

#: Written by ``tag_block_calls``: ``((module path, "argument" | "result", name or index), ...)``.
BLOCK_IO = "asyncfx_block_io"


def tag_block_calls(exported, model: nn.Module, paths: Sequence[str]) -> None:
    """Tag the values of ``exported``'s graph that are arguments or results of the calls of
    the modules ``paths`` (exported with ``preserve_module_call_signature=paths``).

    Example:
        >>> tag_block_calls(exported, model, ("transformer_blocks.0",))
        >>> [n.meta[BLOCK_IO] for n in exported.graph.nodes if BLOCK_IO in n.meta][0]
        (('transformer_blocks.0', 'argument', 'hidden_states'),)
    """
    nodes = {node.name: node for node in exported.graph.nodes}
    wanted = set(paths)
    for entry in exported.module_call_graph:
        if entry.fqn not in wanted or entry.signature is None:
            continue
        signature = entry.signature
        names = _argument_names(signature.in_spec, model.get_submodule(entry.fqn))
        for argument, name in zip(signature.inputs, names):
            _tag(nodes.get(getattr(argument, "name", "")), (entry.fqn, "argument", name))
        results = pytree.tree_unflatten(list(range(len(signature.outputs))), signature.out_spec)
        flat = results if isinstance(results, (tuple, list)) else (results,)
        for position, leaf in enumerate(flat):
            if isinstance(leaf, int):  # a tensor result, not a nested structure
                _tag(nodes.get(getattr(signature.outputs[leaf], "name", "")), (entry.fqn, "result", position))


def _argument_names(in_spec: pytree.TreeSpec, module: nn.Module) -> list[str | None]:
    """Per leaf of a call's ``(args, kwargs)`` spec, the parameter it is (None inside a
    nested argument)."""
    parameters = list(inspect.signature(type(module).forward).parameters)[1:]  # the class's: hooks wrap
    args_spec, kwargs_spec = in_spec.children()
    names: list[str | None] = []
    for index, child in enumerate(args_spec.children()):
        names += _leaves_named(parameters[index] if index < len(parameters) else None, child)
    for key, child in zip(kwargs_spec.context, kwargs_spec.children()):
        names += _leaves_named(key, child)
    return names


def _leaves_named(name: str | None, spec: pytree.TreeSpec) -> list[str | None]:
    return [name] if spec.num_leaves == 1 and spec.is_leaf() else [None] * spec.num_leaves


def _tag(node: fx.Node | None, tag: tuple) -> None:
    if node is not None and tag[2] is not None:
        node.meta[BLOCK_IO] = (*node.meta.get(BLOCK_IO, ()), tag)


def block_call(graph_module: fx.GraphModule, path: str) -> BlockCall | None:
    """The call of block ``path`` in this graph: None where none of its nodes is here.

    Example:
        >>> block_call(stage, "single_transformer_blocks.1").results
        {0: 'slice_7', 1: 'slice_8'}
    """
    arguments: dict[str, str] = {}
    results: dict[int, str] = {}
    here = False
    for node in graph_module.graph.nodes:
        here = here or (node.op in COMPUTE_OPS and bool(module_calls(node, path)))
        for where, kind, key in node.meta.get(BLOCK_IO, ()):
            if where == path:
                (arguments if kind == "argument" else results)[key] = node.name
    return BlockCall(path, arguments, results) if here else None


def block_spans(order: Sequence[fx.Node]) -> list[tuple[int, int]]:
    """For each recorded block, the first and last position of its nodes in ``order``: a
    cut between them would split the block (cuts never do, see ``cuts.cut_positions``).

    Example:
        >>> block_spans(latent_order(captured.graph))[:1]
        [(12, 57)]
    """
    paths = {where for node in order for where, _, _ in node.meta.get(BLOCK_IO, ())}
    spans = []
    for path in sorted(paths):
        inside = [i for i, node in enumerate(order) if module_calls(node, path)]
        if inside:
            spans.append((inside[0], inside[-1]))
    return spans
