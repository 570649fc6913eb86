"""The module-level graph of a captured model, coloured by value class or by stage."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import networkx as nx

from asyncfx.errors import AsyncFXError
from asyncfx.partitioner.captured import Captured
from asyncfx.passes.meta import COMPUTE_OPS, VALUE_CLASS, ValueClass
from asyncfx.plan import StagePlan
from asyncfx.viz.plan_views import matching_graph
from asyncfx.viz.style import REPLICATED_COLOR, VALUE_CLASS_COLORS, axes, legend_patches, stage_colors

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# --- module-level graph -----------------------------------------------------------------

def module_graph(captured: Captured, plan: StagePlan | None = None, depth: int = 2) -> nx.DiGraph:
    """The captured graph's compute nodes grouped by the module that made them, ``depth``
    levels below the root (``down_blocks.1`` at depth 1, ``down_blocks.1.attentions.0``
    at 2). Each group carries its node count, value class (the largest among its nodes),
    the stages owning its latent nodes and its first position; edges carry tensor counts.

    Example:
        >>> g = module_graph(captured, plan, depth=1)
        >>> g.nodes["mid_block"]["stages"]
        [1]
    """
    if depth < 1:
        raise AsyncFXError(f"depth must be 1 or more (1 = the model's direct children), got {depth}.")
    if plan is not None:
        matching_graph(captured, plan)
    stage_of = {name: s.index for s in (plan.stages if plan else []) for name in s.nodes}
    group_of: dict[Any, str] = {}
    graph = nx.DiGraph()
    for position, node in enumerate(captured.graph.nodes):
        if node.op not in COMPUTE_OPS:
            continue
        name = _group_name(node, depth)
        group_of[node] = name
        if name not in graph:
            graph.add_node(name, nodes=0, value_class=ValueClass.STATIC, stages=[], position=position)
        data = graph.nodes[name]
        data["nodes"] += 1
        data["value_class"] = max(data["value_class"], node.meta[VALUE_CLASS])
        if node.name in stage_of and stage_of[node.name] not in data["stages"]:
            data["stages"] = sorted([*data["stages"], stage_of[node.name]])
        for source in node.all_input_nodes:
            if source in group_of and group_of[source] != name:
                edge = graph.get_edge_data(group_of[source], name, {"tensors": 0})
                graph.add_edge(group_of[source], name, tensors=edge["tensors"] + 1)
    return graph


def _group_name(node: Any, depth: int) -> str:
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
    return paths[min(depth, len(paths)) - 1] if paths else "(top)"


def group_colors(graph: nx.DiGraph, color_by: str, n_stages: int = 0) -> list[str]:
    """Colour of each group of ``module_graph`` (in node order): by the stage owning its
    latent nodes (grey when only replicated work), or by its value class."""
    if color_by == "value_class":
        return [VALUE_CLASS_COLORS[d["value_class"]] for _, d in graph.nodes(data=True)]
    if color_by == "stage":
        colors = stage_colors(max(n_stages, 1))
        return [colors[d["stages"][0]] if d["stages"] else REPLICATED_COLOR
                for _, d in graph.nodes(data=True)]
    raise AsyncFXError(f"color_by={color_by!r} is not known; use 'stage' or 'value_class'.")


def plot_module_graph(captured: Captured, plan: StagePlan | None = None, *, depth: int = 2,
                      color_by: str = "stage", ax: Axes | None = None) -> Axes:
    """``module_graph`` drawn left to right in execution order, one lane per value class
    (latent in the middle, step above, static below), coloured by stage or value class.
    A group split by a cut takes the colour of its first stage and gets a black ring.

    Example:
        >>> ax = plot_module_graph(captured, plan, depth=1, color_by="value_class")
    """
    if color_by == "stage" and plan is None:
        raise AsyncFXError("color_by='stage' needs a plan; pass plan= or use color_by='value_class'.")
    graph = module_graph(captured, plan, depth)
    ax = axes(ax, figsize=(max(8, 0.35 * len(graph)), 5))
    colors = group_colors(graph, color_by, plan.n_stages if plan else 0)
    positions = _lane_layout(graph)
    split = [len(d["stages"]) > 1 for _, d in graph.nodes(data=True)]
    nx.draw_networkx_edges(graph, positions, ax=ax, alpha=0.3, arrowsize=6, node_size=120,
                           connectionstyle="arc3,rad=-0.25")  # long arcs: skip connections
    nodes = nx.draw_networkx_nodes(graph, positions, ax=ax, node_color=colors, node_size=120,
                                   edgecolors=["black" if s else "none" for s in split], linewidths=1.5)
    nodes.set_gid("module-groups")
    for name, (x, y) in positions.items():
        ax.text(x, y + 0.12, name, rotation=60, fontsize="xx-small", ha="left", va="bottom")
    if color_by == "stage":
        legend = {f"stage {k}": c for k, c in enumerate(stage_colors(plan.n_stages))}
        legend["replicated (step/static)"] = REPLICATED_COLOR
    else:
        legend = {str(v): c for v, c in VALUE_CLASS_COLORS.items()}
    ax.legend(handles=legend_patches(legend), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_yticks([-1, 0, 1], ["static", "latent", "step"])
    ax.tick_params(left=True, labelleft=True)
    ax.set_ylim(-1.6, 2.2)
    ax.set_title(f"{captured.model_class}: modules at depth {depth}, "
                 f"coloured by {color_by.replace('_', ' ')}")
    return ax


def _lane_layout(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    lane = {ValueClass.LATENT: 0.0, ValueClass.STEP: 1.0, ValueClass.STATIC: -1.0}
    order = sorted(graph.nodes, key=lambda n: graph.nodes[n]["position"])
    return {name: (float(i), lane[graph.nodes[name]["value_class"]] + (0.2 if i % 2 else -0.2) * 0.5)
            for i, name in enumerate(order)}


