"""Views of a partition: where the cuts are, what crosses them, how balanced the stages are.

Every function draws on a matplotlib ``Axes`` (a new figure when ``ax`` is None) and
returns it, so the views work in notebooks, scripts and tests alike; the data behind
each view is a plain function too (``cut_traffic``, ``module_graph``, ``tile_images``).

    >>> from asyncfx import viz
    >>> viz.plot_node_costs(captured, plan)          # cost along the graph, cuts, stages
    >>> viz.plot_cut_bytes(plan)                     # bytes crossing each cut, by tensor
    >>> viz.plot_module_graph(captured, plan, depth=2, color_by="stage")
    >>> viz.plot_stage_times({"cost model": plan, "equal node counts": naive})
    >>> viz.plot_timeline(simulate(plan, link="pcie4"))   # warm-up, then parallel rounds
    >>> viz.plot_samples(sequential_images, async_images)

matplotlib is an optional dependency: ``pip install 'asyncfx[viz]'``.
"""
from asyncfx.viz.generation import plot_speed_quality, plot_timeline
from asyncfx.viz.images import difference_images, plot_samples, tile_images
from asyncfx.viz.module_graph import group_colors, module_graph, plot_module_graph
from asyncfx.viz.plan_views import (CutTraffic, cost_graph_of, cut_indices, cut_traffic, plot_cut_bytes,
                                    plot_node_costs, plot_stage_times, save_plan_views)
from asyncfx.viz.style import (MAIN_PATH_COLOR, REPLICATED_COLOR, SKIP_COLOR, VALUE_CLASS_COLORS,
                               stage_colors)

__all__ = ["MAIN_PATH_COLOR", "REPLICATED_COLOR", "SKIP_COLOR", "VALUE_CLASS_COLORS", "CutTraffic",
           "cost_graph_of", "cut_indices", "cut_traffic", "difference_images", "group_colors", "module_graph",
           "plot_cut_bytes", "plot_module_graph", "plot_node_costs", "plot_samples", "plot_speed_quality",
           "plot_stage_times", "plot_timeline", "save_plan_views", "stage_colors", "tile_images"]
