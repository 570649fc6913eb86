"""Substitution: a stage graph that reads some modules' outputs instead of computing them.

A step cache (``asyncfx.runtime.step_cache``) reuses or forecasts what a module of the
model computed at an earlier step. In a stage graph, a module's call is the nodes its
``nn_module_stack`` names it in, and its outputs the values of those nodes that nodes
outside the call (or the graph's output) read. ``substituting`` makes a copy of a stage
that takes some of those values as extra inputs (what it computed before is then dead
and removed) and returns the others beside its own outputs, to be remembered; it also
has values stand in for others (a skipped chain of blocks: its results read as its
arguments plus a residual). ``computing`` makes a copy that computes only some values (a
chain's first block, whose residual decides whether the rest is computed).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import fx

from asyncfx.errors import CaptureError
from asyncfx.passes.block_calls import block_call
from asyncfx.passes.meta import module_calls
from asyncfx.program import BlockCall

#: Placeholders of substituted values are named this plus the value's name.
SUBSTITUTED_PREFIX = "asyncfx_substituted_"


def module_outputs(graph_module: fx.GraphModule, path: str) -> tuple[str, ...]:
    """The names of the values module ``path``'s call makes in this graph that the rest of
    the graph reads, in graph order; () where none of its nodes is here. A module called
    more than once per model call is refused (each call would need its own memory).

    Example:
        >>> module_outputs(stage, "transformer_blocks.0.attn")
        ('dropout', 'linear_17')
    """
    inside = {node for node in graph_module.graph.nodes
              if node.op not in ("placeholder", "get_attr") and module_calls(node, path)}  # what it computes
    calls = {key for node in inside for key in module_calls(node, path)}
    if len(calls) > 1:
        raise CaptureError(f"module {path!r} is called {len(calls)} times in one call of the model, and a "
                           "step cache keeps one set of outputs per module: cache a module called once "
                           "per step (diffusers' cache configs name modules by pattern).")
    return tuple(node.name for node in inside
                 if any(user not in inside for user in node.users))


#: A value that stands in for another: ``(replaced, standing in, plus an extra input)``.
Bypass = tuple[str, str, bool]


def substituting(graph_module: fx.GraphModule, substituted: Sequence[str], kept: Sequence[str],
                 bypassed: Sequence[Bypass] = ()) -> fx.GraphModule:
    """A copy of ``graph_module`` (sharing its weights) that reads the values named in
    ``substituted`` as extra inputs, after its own, and returns ``(its outputs, kept
    values)``; what only the substituted values needed is not computed. Each
    ``(replaced, standing_in, offset)`` of ``bypassed`` has the value ``standing_in`` read
    where ``replaced`` was, plus an extra input after the substituted ones where ``offset``
    (a chain of blocks skipped: its results are its arguments plus a residual).

    Example:
        >>> variant = substituting(stage, ["dropout"], ["linear_17"])
        >>> outputs, (linear_17,) = variant(*args, cached_dropout)
    """
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(graph_module.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(graph_module.graph, env)
    by_name = {node.name: env[node] for node in graph_module.graph.nodes if node in env}
    _check_named(by_name, [*substituted, *(replaced for replaced, _, _ in bypassed)])
    _check_named(by_name, kept, inputs_too=True)
    graph.output((result, tuple(by_name[name] for name in kept)))  # before the uses are replaced
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    for name in substituted:
        by_name[name].replace_all_uses_with(_extra_input(graph, inputs, name, by_name[name]))
    for replaced, standing_in, offset in bypassed:
        extra = _extra_input(graph, inputs, replaced, by_name[replaced]) if offset else None
        _stand_in(graph, by_name[replaced], by_name[standing_in], extra)
    graph.eliminate_dead_code(is_impure_node=_kept_node)
    variant = fx.GraphModule(graph_module, graph, class_name=type(graph_module).__name__)
    variant.graph.lint()
    return variant


def _kept_node(node: fx.Node) -> bool:
    """Nodes dead code elimination keeps although nothing reads them: module calls (a
    stage's send hooks return nothing) and ops with side effects. Ops that draw random
    numbers go with the module that skips them, as when a cache's hook skips the module
    (attention is tagged so for its dropout)."""
    return node.op == "call_module" or node.is_impure(impure_random=False)


def _extra_input(graph: fx.Graph, inputs: list[fx.Node], name: str, like: fx.Node) -> fx.Node:
    """A new placeholder after ``inputs`` (appended to them) for a value like ``like``."""
    with graph.inserting_after(inputs[-1]) if inputs else graph.inserting_before(next(iter(graph.nodes))):
        placeholder = graph.placeholder(SUBSTITUTED_PREFIX + name)
    placeholder.meta.update(like.meta)
    inputs.append(placeholder)
    return placeholder


def _stand_in(graph: fx.Graph, replaced: fx.Node, standing_in: fx.Node, offset: fx.Node | None) -> None:
    """Every use of ``replaced`` reads ``standing_in`` (plus ``offset``) instead."""
    value = standing_in
    if offset is not None:
        with graph.inserting_after(replaced):
            value = graph.call_function(torch.ops.aten.add.Tensor, (standing_in, offset))
        value.meta.update(replaced.meta)
    replaced.replace_all_uses_with(value)


def computing(graph_module: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A copy of ``graph_module`` (sharing its weights) that computes only the values
    ``names`` (and what they need), and returns them; module calls that return nothing (a
    stage's send hooks) are left out.

    Example:
        >>> head_results = computing(stage, ["add_11", "add_15"])(*args)
    """
    graph = fx.Graph()
    graph._codegen = fx.graph.CodeGen()  # a tuple of values, whatever the stage returns
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(graph_module.graph, env)
    by_name = {node.name: env[node] for node in graph_module.graph.nodes if node in env}
    _check_named(by_name, names, inputs_too=True)
    graph.output(tuple(by_name[name] for name in names))
    graph.eliminate_dead_code(is_impure_node=_has_side_effects)  # a stage's send hooks go too
    part = fx.GraphModule(graph_module, graph, class_name=type(graph_module).__name__)
    part.graph.lint()
    return part


def _has_side_effects(node: fx.Node) -> bool:
    return node.op != "call_module" and node.is_impure(impure_random=False)


def _check_named(by_name: dict[str, fx.Node], names: Sequence[str], inputs_too: bool = False) -> None:
    missing = [name for name in names
               if name not in by_name or not inputs_too and by_name[name].op == "placeholder"]
    if missing:
        raise CaptureError(f"this stage computes no value named {', '.join(map(repr, missing))}: a step "
                           "cache may substitute only values the stage itself computes (a bug: please "
                           "report).")


class StageSubstitution:
    """The functions above and ``block_calls.block_call``, as the program hands them to the
    runtime (``asyncfx.program.StageEditor``)."""

    def module_outputs(self, stage: fx.GraphModule, module: str) -> tuple[str, ...]:
        return module_outputs(stage, module)

    def substituting(self, stage: fx.GraphModule, substituted: Sequence[str], kept: Sequence[str],
                     bypassed: Sequence[Bypass] = ()) -> fx.GraphModule:
        return substituting(stage, substituted, kept, bypassed)

    def computing(self, stage: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
        return computing(stage, names)

    def block_call(self, stage: fx.GraphModule, path: str) -> BlockCall | None:
        return block_call(stage, path)
