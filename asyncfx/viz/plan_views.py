"""Views of a plan: cost along the graph with the cuts, bytes crossing each cut, stage
times, and all of them in one file."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from asyncfx.errors import AsyncFXError, PlanError
from asyncfx.outputs import check_output, writing
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.cost_graph import CostGraph, build_cost_graph
from asyncfx.partitioner.device import DeviceSpec, device_spec
from asyncfx.partitioner.profile import Profile
from asyncfx.plan import BoundaryTensor, StagePlan, format_bytes
from asyncfx.viz.style import (MAIN_PATH_COLOR, SKIP_COLOR, axes, legend_patches, require_matplotlib,
                               stage_colors)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# --- cost along the graph ---------------------------------------------------------------

def cost_graph_of(source: Captured | Profile | CostGraph) -> CostGraph:
    """The CostGraph of a captured model (measured costs included once profiled), a
    profile, or a CostGraph itself."""
    if isinstance(source, CostGraph):
        return source
    if isinstance(source, Profile):
        return source.graph
    if isinstance(source, Captured):
        return build_cost_graph(source)
    raise AsyncFXError(f"expected a Captured, a Profile or a CostGraph, got {type(source).__name__}; "
                       "make one with asyncfx.capture() or asyncfx.profile().")


def cut_indices(plan: StagePlan) -> list[int]:
    """Positions in the latent order before which the plan cuts."""
    return [int(p) for p in np.cumsum([len(s.nodes) for s in plan.stages])[:-1]]


def plot_node_costs(source: Captured | Profile | CostGraph, plan: StagePlan, *,
                    link: str | DeviceSpec = "cpu", ax: Axes | None = None) -> Axes:
    """Per-node cost along the topological order of the latent nodes: the measured time
    (where the model was profiled) and the estimate from FLOPs and bytes on ``link``'s
    device, with the plan's cuts as labelled vertical lines and its stages shaded.

    Example:
        >>> ax = plot_node_costs(asyncfx.profile(model, inputs), plan)
    """
    graph = matching_graph(source, plan)
    ax = axes(ax, figsize=(12, 4))
    spec = device_spec(link)
    x = np.arange(len(graph.nodes))
    estimated = np.array([spec.compute_seconds(n.flops, n.bytes) for n in graph.nodes]) * 1e3
    ax.plot(x, estimated, drawstyle="steps-mid", color="#555555", lw=0.8,
            label=f"estimated ({spec.name} roofline)")
    measured = [n.measured_seconds for n in graph.nodes]
    if all(m is not None for m in measured):
        ax.plot(x, np.array(measured) * 1e3, drawstyle="steps-mid", color="black", lw=1.2, label="measured")
    _shade_stages(ax, plan, len(graph.nodes))
    _label_stage_totals(ax, plan, len(graph.nodes))
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(float(np.percentile(estimated[estimated > 0], 1)), 1e-6) / 2
                if (estimated > 0).any() else None)
    ax.set_xlim(-0.5, len(graph.nodes) - 0.5)
    ax.set_xlabel("latent node (topological order)")
    ax.set_ylabel("ms per node")
    ax.set_title(f"{graph.model_class}: {len(graph.nodes)} latent nodes, {plan.n_stages} stages; "
                 f"{_balance(plan)}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax


def _shade_stages(ax: Axes, plan: StagePlan, n_nodes: int) -> None:
    colors = stage_colors(plan.n_stages)
    bounds = [0, *cut_indices(plan), n_nodes]
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        ax.axvspan(start - 0.5, end - 0.5, color=colors[k], alpha=0.15, lw=0, label=f"stage {k}")
    for stage, position in zip(plan.stages[1:], bounds[1:-1]):
        ax.axvline(position - 0.5, color="black", ls="--", lw=1, gid="cut")
        ax.annotate(_short_module(stage.first_module), (position - 0.5, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(-3, -3), textcoords="offset points",
                    rotation=90, va="top", ha="right", fontsize="x-small", gid=f"cut-label:{stage.index}")


def _short_module(path: str, names: int = 3) -> str:
    """A module path from its last ``names`` named components on, with the indices between
    them (``...attentions.0.transformer_blocks.0.attn1``)."""
    if not path:
        return "(top)"
    parts = path.split(".")
    named = [i for i, part in enumerate(parts) if not part.isdigit()]
    return path if len(named) <= names else "..." + ".".join(parts[named[-names]:])


def _label_stage_totals(ax: Axes, plan: StagePlan, n_nodes: int) -> None:
    """Each stage's total (measured where the plan has it, else predicted) and share, at
    the foot of its span, and the balance (slowest over mean) in the title: a staggered
    second row where stages are too many to keep the labels apart."""
    totals, _ = _stage_totals(plan)
    whole = sum(totals) or 1.0
    bounds = [0, *cut_indices(plan), n_nodes]
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        height = 0.02 + (0.1 if plan.n_stages > 4 and k % 2 else 0.0)
        ax.text((start + end - 1) / 2, height, f"{plan.format_cost(totals[k])}\n{totals[k] / whole:.0%}",
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize="x-small",
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "lw": 0},
                gid=f"stage-total:{k}")


def _stage_totals(plan: StagePlan) -> tuple[list[float], str]:
    """Each stage's time, measured where every stage is, else predicted, and which."""
    if all(s.measured_seconds is not None for s in plan.stages):
        return [s.measured_seconds for s in plan.stages], "measured"
    return [s.estimated_cost for s in plan.stages], "predicted"


def _balance(plan: StagePlan) -> str:
    totals, kind = _stage_totals(plan)
    mean = sum(totals) / len(totals)
    return f"stage totals {kind}, slowest/mean {max(totals) / mean:.2f}" if mean else f"stage totals {kind}"


def matching_graph(source: Captured | Profile | CostGraph, plan: StagePlan) -> CostGraph:
    graph = cost_graph_of(source)
    if graph.fingerprint != plan.fingerprint:
        raise PlanError(f"the plan was compiled for another graph (plan {plan.fingerprint}, "
                        f"{plan.model_class}; this graph {graph.fingerprint}, {graph.model_class}); "
                        "pass the model or profile the plan was compiled from.")
    return graph


# --- bytes crossing each cut ------------------------------------------------------------

@dataclasses.dataclass
class CutTraffic:
    """The boundary tensors alive across the cut before ``stage``."""

    stage: int
    main_path: list[BoundaryTensor]   # made by the last node before the cut
    skips: list[BoundaryTensor]       # made earlier and read later: skip connections

    @property
    def bytes(self) -> int:
        return sum(b.bytes for b in [*self.main_path, *self.skips])


def cut_traffic(plan: StagePlan) -> list[CutTraffic]:
    """For each cut, the tensors produced before it and read after it (a tensor read
    several stages later crosses several cuts), split into main path and skips.

    Example:
        >>> [format_bytes(t.bytes) for t in cut_traffic(plan)]
        ['655.4 KB', '1.6 MB', '2.0 MB']
    """
    traffic = []
    for stage in range(1, plan.n_stages):
        last_before = plan.stages[stage - 1].nodes[-1]
        crossing = [b for b in plan.boundaries if b.producer < stage <= max(b.consumers)]
        traffic.append(CutTraffic(stage, [b for b in crossing if b.name == last_before],
                                  [b for b in crossing if b.name != last_before]))
    return traffic


def plot_cut_bytes(plan: StagePlan, *, label_min_fraction: float = 0.15, ax: Axes | None = None) -> Axes:
    """One horizontal bar per cut, stacked from the tensors crossing it: the main path in
    blue, skip connections in orange; tensors larger than ``label_min_fraction`` of the
    widest cut are labelled with their module.

    Example:
        >>> ax = plot_cut_bytes(plan)      # a UNet's decoder cuts carry its skip tensors
    """
    if plan.n_stages < 2:
        raise PlanError("a one-stage plan has no cuts to draw; compile for 2 or more devices.")
    traffic = cut_traffic(plan)
    ax = axes(ax, figsize=(10, 1 + 0.6 * len(traffic)))
    widest = max(t.bytes for t in traffic) or 1
    for row, cut in enumerate(traffic):
        left = 0.0
        for tensors, color in ((cut.main_path, MAIN_PATH_COLOR), (cut.skips, SKIP_COLOR)):
            for tensor in tensors:
                ax.barh(row, tensor.bytes / 1e6, left=left / 1e6, color=color, edgecolor="white",
                        gid=f"tensor:{tensor.name}")
                if tensor.bytes >= label_min_fraction * widest:
                    ax.text((left + tensor.bytes / 2) / 1e6, row, _short_module(tensor.module, 2)
                            if tensor.module else tensor.name, ha="center", va="center", fontsize="xx-small",
                            clip_on=True, gid=f"tensor-label:{tensor.name}")
                left += tensor.bytes
        ax.text(left / 1e6, row, f"  {format_bytes(cut.bytes)}", va="center", fontsize="small")
    ax.set_yticks(range(len(traffic)), [f"cut {t.stage - 1}|{t.stage}" for t in traffic])
    ax.invert_yaxis()
    ax.set_xlabel("MB alive across the cut (sent once per step)")
    ax.set_xlim(0, widest / 1e6 * 1.2)
    ax.legend(handles=legend_patches({"main path": MAIN_PATH_COLOR, "skip connection": SKIP_COLOR}),
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_title(f"{plan.model_class}: tensors crossing each cut")
    fit_segment_labels(ax)
    return ax


def fit_segment_labels(ax: Axes) -> None:
    """Show each tensor's label only where it fits inside its bar segment (call again after
    the figure's layout changes, as ``save_plan_views`` does)."""
    for text in ax.texts:
        if (text.get_gid() or "").startswith("tensor-label:"):
            text.set_visible(True)
            segment = labelled_segment(ax, text).get_window_extent()
            text.set_visible(text.get_window_extent().width <= segment.width - 4)


def labelled_segment(ax: Axes, label: Any) -> Any:
    """The bar segment a tensor label of ``plot_cut_bytes`` names: its tensor's, under it
    (a tensor that crosses several cuts has a segment in each row)."""
    x, y = label.get_position()
    gid = label.get_gid().replace("tensor-label:", "tensor:", 1)
    return next(patch for patch in ax.patches if patch.get_gid() == gid
                and patch.get_x() <= x <= patch.get_x() + patch.get_width()
                and patch.get_y() <= y <= patch.get_y() + patch.get_height())


# --- stage times ------------------------------------------------------------------------

def plot_stage_times(plans: Mapping[str, StagePlan], *, ax: Axes | None = None) -> Axes:
    """Measured stage times (bars) and predicted ones (markers, when the plan predicts
    seconds) for one or more plans side by side, with each plan's max/mean in the legend.

    Example:
        >>> plot_stage_times({"cost model": plan, "equal node counts": naive})
    """
    if not plans:
        raise AsyncFXError("plot_stage_times needs at least one plan.")
    missing = [name for name, p in plans.items() if any(s.measured_seconds is None for s in p.stages)]
    if missing:
        raise PlanError(f"plans {missing} have no measured stage times; compile with cost='measure' "
                        "or fill them with asyncfx.partitioner.refine.measure_stages().")
    ax = axes(ax, figsize=(8, 4))
    width = 0.8 / len(plans)
    for j, (name, plan) in enumerate(plans.items()):
        measured = np.array([s.measured_seconds for s in plan.stages]) * 1e3
        x = np.arange(plan.n_stages) + (j - (len(plans) - 1) / 2) * width
        ax.bar(x, measured, width, label=f"{name}: max/mean {measured.max() / measured.mean():.3f}",
               gid=f"measured:{name}")
        if plan.cost_unit == "seconds":
            predicted = np.array([s.estimated_cost for s in plan.stages]) * 1e3
            ax.plot(x, predicted, "k_", markersize=14, mew=2, gid=f"predicted:{name}")
    ax.plot([], [], "k_", markersize=14, mew=2, label="predicted")
    n_stages = max(p.n_stages for p in plans.values())
    ax.set_xticks(range(n_stages), [f"stage {k}" for k in range(n_stages)])
    ax.set_ylabel("ms per step")
    ax.legend(fontsize="small")
    ax.set_title("stage times: measured (bars) and predicted (markers)")
    return ax


# --- all views of a plan in one file ---------------------------------------------------

def save_plan_views(plan: StagePlan, path: str, *, profile: Profile | None = None) -> list[str]:
    """Draw what a plan alone (and its profile, if given) can show into one figure, in the
    format ``path``'s suffix names (``figure_suffixes()``): per-node cost with the cuts
    (with a profile), bytes crossing each cut (2+ stages), stage times (when measured).
    Returns the names of the views drawn. Written atomically.

    Example:
        >>> save_plan_views(StagePlan.load("plan.json"), "plan.png", profile=Profile.load("profile.json"))
        ['node costs', 'cut bytes', 'stage times']
    """
    check_output(path, figure_suffixes(), "figure")
    views = plan_views(plan, profile)
    if not views:
        raise PlanError("this one-stage plan has no measured stage times and no profile was given: "
                        "nothing to draw; pass the profile it was compiled from.")
    figure = plan_views_figure(views)
    with writing(path, "figure") as temporary:
        figure.savefig(temporary, dpi=100)  # in the format path's suffix names
    return [name for name, _ in views]


def plan_views(plan: StagePlan, profile: Profile | None = None) -> list[tuple[str, Callable[[Axes], Axes]]]:
    """The ``(name, draw)`` views a plan alone (and its profile, if given) can show."""
    views: list[tuple[str, Callable[[Axes], Axes]]] = []
    if profile is not None:
        matching_graph(profile, plan)
        views.append(("node costs", lambda ax: plot_node_costs(profile, plan, ax=ax)))
    if plan.n_stages > 1:
        views.append(("cut bytes", lambda ax: plot_cut_bytes(plan, ax=ax)))
    if all(s.measured_seconds is not None for s in plan.stages):
        views.append(("stage times", lambda ax: plot_stage_times({"plan": plan}, ax=ax)))
    return views


def plan_views_figure(views: list[tuple[str, Callable[[Axes], Axes]]]) -> Figure:
    """One figure of the ``(name, draw)`` views, one panel each, laid out, labels fitted."""
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4 * len(views)))  # not pyplot's: nothing stays registered
    axes = figure.subplots(len(views), 1, squeeze=False)[:, 0]
    for ax, (_, draw) in zip(axes, views):
        draw(ax)
    figure.tight_layout()
    for ax in axes:
        fit_segment_labels(ax)
    return figure


def figure_suffixes() -> set[str]:
    """The file suffixes a figure can be saved as (matplotlib's formats), e.g. ``.pdf``."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    return {f".{suffix}" for suffix in FigureCanvasBase.get_supported_filetypes()}


