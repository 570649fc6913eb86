"""Split pass: one GraphModule per stage from an assignment of latent nodes to stages.

A stage holds its own latent nodes plus a private copy of every step and static node
they need (time embedding MLPs, text projections, weights), so it owns its weights
and never receives a non-latent value. Latent values produced in one stage and
consumed in a later one are the stage boundaries.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from torch import fx

from asyncfx.errors import PlanError
from asyncfx.passes.meta import VALUE_CLASS, ValueClass


@dataclasses.dataclass
class StageGraph:
    """One stage: its module and the names of what it reads and returns.

    ``inputs`` are placeholder names: graph inputs (``sample``) or boundary tensors
    (named after the node that produces them). ``outputs`` are the boundary tensors
    it produces; the last stage returns the model's flat outputs instead.
    """

    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]


def stage_members(graph: fx.Graph, assignment: Sequence[Sequence[fx.Node]]) -> list[list[fx.Node]]:
    """The nodes each stage computes, in topological order: its own latent nodes and the
    step/static nodes (weights included) they need, which may repeat across stages.
    The last stage also computes the non-latent values the graph outputs."""
    needs: list[set[fx.Node]] = []
    output = graph.output_node()
    for k, own in enumerate(assignment):
        roots = list(own) + ([output] if k == len(assignment) - 1 else [])
        needs.append(set(own) | non_latent_ancestors(roots))
    return [[n for n in graph.nodes if n in need and n.op not in ("placeholder", "output")]
            for need in needs]


def non_latent_ancestors(roots: Sequence[fx.Node]) -> set[fx.Node]:
    """The step/static nodes (weights included, graph inputs not) that ``roots`` need."""
    seen: set[fx.Node] = set()
    stack = [i for r in roots for i in r.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in seen or node.op == "placeholder" or node.meta[VALUE_CLASS] is ValueClass.LATENT:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def stage_of_nodes(assignment: Sequence[Sequence[fx.Node]]) -> dict[fx.Node, int]:
    return {node: k for k, own in enumerate(assignment) for node in own}


def boundary_consumers(graph: fx.Graph, assignment: Sequence[Sequence[fx.Node]]) -> dict[fx.Node, list[int]]:
    """Each latent value read by a later stage, with the sorted stages that read it
    (the graph output counts as read by the last stage). Ordered by producer."""
    stage_of = stage_of_nodes(assignment)
    last = len(assignment) - 1
    consumers: dict[fx.Node, list[int]] = {}
    for node in graph.nodes:
        if node not in stage_of:
            continue
        readers = {last if user.op == "output" else stage_of.get(user, stage_of[node])
                   for user in node.users}
        later = sorted(k for k in readers if k > stage_of[node])
        if later:
            consumers[node] = later
    return consumers


def split_stages(gm: fx.GraphModule, assignment: Sequence[Sequence[fx.Node]]) -> list[StageGraph]:
    """Build one GraphModule per stage; ``assignment[k]`` lists stage k's latent nodes.

    Chaining the stages, feeding each the graph inputs and earlier boundaries it names,
    computes exactly what ``gm`` computes.

    Example:
        >>> order = latent_order(gm.graph)
        >>> first, second = split_stages(gm, [order[:10], order[10:]])
        >>> second.inputs        # e.g. ['sample', 'timestep', 'conv2d_3']
    """
    graph = gm.graph
    members = stage_members(graph, assignment)
    consumers = boundary_consumers(graph, assignment)
    stage_of = stage_of_nodes(assignment)
    stages = []
    for k, nodes in enumerate(members):
        is_last = k == len(assignment) - 1
        produced = [b for b in consumers if stage_of[b] == k]
        stage_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs = _stage_inputs(graph, nodes, is_last, stage_of, k)
        for source in inputs:
            env[source] = stage_graph.placeholder(source.name)
            env[source].meta.update(source.meta)
        for node in nodes:
            env[node] = stage_graph.node_copy(node, lambda n: env[n])
        if is_last:
            result = fx.map_arg(graph.output_node().args[0], lambda n: env[n])
        else:
            result = tuple(env[b] for b in produced)
        stage_graph.output(result)
        module = fx.GraphModule(gm, stage_graph, class_name=f"Stage{k}")
        module.graph.lint()
        stages.append(StageGraph(module, [n.name for n in inputs],
                                 [] if is_last else [b.name for b in produced]))
    return stages


def _stage_inputs(graph: fx.Graph, nodes: list[fx.Node], is_last: bool,
                  stage_of: dict[fx.Node, int], k: int) -> list[fx.Node]:
    """Graph inputs and earlier stages' values the stage reads, in graph order."""
    readers = list(nodes) + ([graph.output_node()] if is_last else [])
    members = set(nodes)
    read = {i for r in readers for i in r.all_input_nodes if i not in members}
    for node in read:
        if node.op != "placeholder" and stage_of.get(node, k) >= k:
            raise PlanError(f"split: stage {k} reads {node.name}, which no earlier stage "
                            "computes; stages must follow the graph's topological order. "
                            "Make the plan with asyncfx.compile() rather than by hand.")
    return [n for n in graph.nodes if n in read]
