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
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import networkx as nx
import numpy as np
import torch

from asyncfx.errors import AsyncFXError, PlanError
from asyncfx.partitioner.capture import Captured
from asyncfx.partitioner.cost_graph import CostGraph, build_cost_graph
from asyncfx.partitioner.device import DeviceSpec, device_spec
from asyncfx.partitioner.plan import BoundaryTensor, StagePlan, format_bytes
from asyncfx.partitioner.profile import Profile
from asyncfx.partitioner.simulate import Simulation
from asyncfx.passes.meta import COMPUTE_OPS, VALUE_CLASS, ValueClass

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: Colours of the value classes in every view.
VALUE_CLASS_COLORS = {ValueClass.LATENT: "#d62728", ValueClass.STEP: "#1f77b4",
                      ValueClass.STATIC: "#7f7f7f"}
#: Colour of groups that no stage owns (step/static work each stage replicates).
REPLICATED_COLOR = "#c7c7c7"
#: Colours of boundary tensors in ``plot_cut_bytes``.
MAIN_PATH_COLOR, SKIP_COLOR = "#1f77b4", "#ff7f0e"


def stage_colors(n_stages: int) -> list[str]:
    """One distinct colour per stage (matplotlib's tab10, then tab20), as hex strings."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab10" if n_stages <= 10 else "tab20"]
    return [to_hex(palette(k % palette.N)) for k in range(n_stages)]


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
    graph = _matching_graph(source, plan)
    ax = _axes(ax, figsize=(12, 4))
    spec = device_spec(link)
    x = np.arange(len(graph.nodes))
    estimated = np.array([spec.compute_seconds(n.flops, n.bytes) for n in graph.nodes]) * 1e3
    ax.plot(x, estimated, drawstyle="steps-mid", color="#555555", lw=0.8,
            label=f"estimated ({spec.name} roofline)")
    measured = [n.measured_seconds for n in graph.nodes]
    if all(m is not None for m in measured):
        ax.plot(x, np.array(measured) * 1e3, drawstyle="steps-mid", color="black", lw=1.2, label="measured")
    _shade_stages(ax, plan, len(graph.nodes))
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(float(np.percentile(estimated[estimated > 0], 1)), 1e-6) / 2
                if (estimated > 0).any() else None)
    ax.set_xlim(-0.5, len(graph.nodes) - 0.5)
    ax.set_xlabel("latent node (topological order)")
    ax.set_ylabel("ms per node")
    ax.set_title(f"{graph.model_class}: {len(graph.nodes)} latent nodes, {plan.n_stages} stages")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return ax


def _shade_stages(ax: Axes, plan: StagePlan, n_nodes: int) -> None:
    colors = stage_colors(plan.n_stages)
    bounds = [0, *cut_indices(plan), n_nodes]
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        ax.axvspan(start - 0.5, end - 0.5, color=colors[k], alpha=0.15, lw=0, label=f"stage {k}")
    for stage, position in zip(plan.stages[1:], bounds[1:-1]):
        ax.axvline(position - 0.5, color="black", ls="--", lw=1, gid="cut")
        ax.annotate(stage.first_module or "(top)", (position - 0.5, 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize="x-small", gid="cut-label")


def _matching_graph(source: Captured | Profile | CostGraph, plan: StagePlan) -> CostGraph:
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
    ax = _axes(ax, figsize=(10, 1 + 0.6 * len(traffic)))
    widest = max(t.bytes for t in traffic) or 1
    for row, cut in enumerate(traffic):
        left = 0.0
        for tensors, color in ((cut.main_path, MAIN_PATH_COLOR), (cut.skips, SKIP_COLOR)):
            for tensor in tensors:
                ax.barh(row, tensor.bytes / 1e6, left=left / 1e6, color=color, edgecolor="white",
                        gid=f"tensor:{tensor.name}")
                if tensor.bytes >= label_min_fraction * widest:
                    ax.text((left + tensor.bytes / 2) / 1e6, row, tensor.module or tensor.name,
                            ha="center", va="center", fontsize="xx-small", rotation=0, clip_on=True)
                left += tensor.bytes
        ax.text(left / 1e6, row, f"  {format_bytes(cut.bytes)}", va="center", fontsize="small")
    ax.set_yticks(range(len(traffic)), [f"cut {t.stage - 1}|{t.stage}" for t in traffic])
    ax.invert_yaxis()
    ax.set_xlabel("MB alive across the cut (sent once per step)")
    ax.set_xlim(0, widest / 1e6 * 1.2)
    ax.legend(handles=_legend_patches({"main path": MAIN_PATH_COLOR, "skip connection": SKIP_COLOR}),
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_title(f"{plan.model_class}: tensors crossing each cut")
    return ax


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
        _matching_graph(captured, plan)
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
    ax = _axes(ax, figsize=(max(8, 0.35 * len(graph)), 5))
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
    ax.legend(handles=_legend_patches(legend), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
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
    ax = _axes(ax, figsize=(8, 4))
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


# --- speed against quality -------------------------------------------------------------

def plot_speed_quality(rows: Sequence[Any], *, metric: str = "psnr", ax: Axes | None = None) -> Axes:
    """Fidelity to the sequential samples against predicted speedup, one line per
    (N, stride) through its warm-up settings (each point labelled W=...): the paper's
    warm-up table as a picture. ``rows`` are ``asyncfx.sweep.SweepRow``.

    Example:
        >>> plot_speed_quality(speed_quality_sweep(model, classifier, labels), metric="ssim")
    """
    if not rows:
        raise AsyncFXError("plot_speed_quality needs at least one row; run speed_quality_sweep first.")
    if not hasattr(rows[0], metric):
        raise AsyncFXError(f"metric={metric!r} is not a column of the rows; "
                           "use psnr, ssim or class_accuracy.")
    ax = _axes(ax, figsize=(7, 4.5))
    groups: dict[tuple[int, int], list[Any]] = {}
    for row in rows:
        groups.setdefault((row.n_stages, row.stride), []).append(row)
    for (n, stride), members in groups.items():
        members = sorted(members, key=lambda r: r.warmup)
        x, y = [r.predicted_speedup for r in members], [getattr(r, metric) for r in members]
        ax.plot(x, y, "o-", label=f"N={n}, stride {stride}", gid=f"config:{n}:{stride}")
        for r, xi, yi in zip(members, x, y):
            ax.annotate(f"W={r.warmup}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small")
    ax.set_xlabel("predicted speedup over one device")
    ax.set_ylabel({"psnr": "PSNR vs sequential (dB)", "ssim": "SSIM vs sequential"}.get(metric, metric))
    ax.legend(fontsize="small")
    ax.set_title("more warm-up: closer to sequential, less speedup")
    return ax


# --- timeline of a generation ----------------------------------------------------------

def plot_timeline(sim: Simulation, *, rounds: int = 3, ax: Axes | None = None) -> Axes:
    """A Gantt chart of the start of a generation as the simulator sees it: the warm-up
    steps, whose stages run one after another (stage k on device k), then ``rounds``
    parallel rounds where every stage starts at once, each stage's boundary sends on its
    copy stream (hatched, ending when its last send arrives: tensors leave as they are
    made) and the noise-prediction broadcast closing the round. With
    stride 2 the extra device runs the last stage for the round's second step.

    Example:
        >>> plot_timeline(simulate(plan, link="pcie4", steps=50, warmup=3), rounds=4)
    """
    if rounds < 1:
        raise AsyncFXError(f"rounds must be at least 1, got {rounds}.")
    ax = _axes(ax, figsize=(12, 0.8 + 0.7 * sim.devices))
    colors = stage_colors(sim.n_stages)
    chain = sum(sim.stage_seconds) or 1.0
    t = 0.0
    for step in range(min(sim.warmup, sim.steps)):  # scaled so a step lasts the whole model's time
        for k, seconds in enumerate(sim.stage_seconds):
            width = seconds * sim.sequential_step / chain
            ax.barh(k, width * 1e3, left=t * 1e3, color=colors[k], edgecolor="white",
                    gid=f"warmup:{step}:{k}")
            t += width
    ax.axvline(t * 1e3, color="black", lw=1)
    ax.annotate("warm-up ", (t * 1e3, 0.02), xycoords=("data", "axes fraction"), ha="right", va="bottom",
                fontsize="small")
    for r in range(min(rounds, sim.rounds)):
        _draw_round(ax, sim, r, t, colors)
        t += sim.round_overlapped
        ax.axvline(t * 1e3, color="black", lw=0.5, ls=":")
    ax.set_yticks(range(sim.devices), [f"device {k}" for k in range(sim.devices)])
    ax.invert_yaxis()
    ax.set_xlabel("ms from the start of the generation")
    ax.legend(handles=_legend_patches({f"stage {k}": c for k, c in enumerate(colors)}),
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_title(f"{sim.n_stages} stages, stride {sim.stride}, over {sim.link}: warm-up, then rounds of "
                 f"{sim.round_overlapped * 1e3:.2f} ms ({sim.speedup():.2f}x predicted)")
    return ax


def _draw_round(ax: Axes, sim: Simulation, index: int, start: float, colors: list[str]) -> None:
    lanes = list(enumerate(sim.stage_seconds))
    if sim.stride == 2:  # the extra device computes the last stage of the round's second step
        lanes.append((sim.n_stages - 1, sim.stage_seconds[-1]))
    for device, (stage, seconds) in enumerate(lanes):
        ax.barh(device, seconds * 1e3, left=start * 1e3, color=colors[stage], edgecolor="white",
                gid=f"round:{index}:{device}")
        send = sim.send_seconds[stage] if device < sim.n_stages else 0.0
        if send > 0:
            left = start + sim.sends_done[stage] - send
            ax.barh(device + 0.3, send * 1e3, left=left * 1e3, height=0.25, color="none",
                    edgecolor=colors[stage], hatch="////", gid=f"send:{index}:{device}")
    host = sim.stride * sim.host_seconds  # the round ends with the host's time at each call
    end = start + sim.round_overlapped - host
    if sim.broadcast_seconds > 0:
        ax.axvspan((end - sim.broadcast_seconds) * 1e3, end * 1e3, color="black", alpha=0.15, lw=0,
                   gid=f"broadcast:{index}")
    if host > 0:
        ax.axvspan(end * 1e3, (end + host) * 1e3, color="grey", alpha=0.08, lw=0, gid=f"host:{index}")


# --- samples ----------------------------------------------------------------------------

def tile_images(images: torch.Tensor, rows: int) -> np.ndarray:
    """(B, C, H, W) images in [-1, 1] as one uint8 mosaic of ``rows`` rows, (H*rows, W*B/rows[, C])."""
    if images.dim() != 4 or len(images) % rows:
        raise AsyncFXError(f"expected (B, C, H, W) images with B a multiple of rows={rows}, got "
                           f"shape {tuple(images.shape)}.")
    tiles = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, c, h, w = tiles.shape
    grid = tiles.reshape(rows, b // rows, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, b // rows * w, c)
    return grid[..., 0].numpy() if c == 1 else grid.numpy()


def difference_images(images: torch.Tensor, references: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """``|images - references| * gain`` mapped to [-1, 1] (black = identical)."""
    return ((images - references).abs() * gain).clamp(0, 2) - 1


def plot_samples(sequential: torch.Tensor, asynchronous: torch.Tensor, *, rows: int = 10,
                 titles: Sequence[str] = ("sequential", "asyncfx", "|difference| x4"),
                 axes: Sequence[Axes] | None = None) -> list[Axes]:
    """Sequential and asynchronous samples of the same seeds side by side, with the
    difference map; PSNR and SSIM between them in the figure title.

    Example:
        >>> plot_samples(sample_digits(model.unet, ...), sample_digits(partitioned, ...))
    """
    from asyncfx.quality import psnr, ssim

    if sequential.shape != asynchronous.shape:
        raise AsyncFXError(f"the two sets of samples differ in shape: {tuple(sequential.shape)} vs "
                           f"{tuple(asynchronous.shape)}; sample the same seeds with both.")
    if axes is None:
        import matplotlib.pyplot as plt

        axes = plt.subplots(1, 3, figsize=(10, 4))[1]
    panels = (sequential, asynchronous, difference_images(asynchronous, sequential))
    for ax, images, title in zip(axes, panels, titles):
        ax.imshow(tile_images(images, rows), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    axes[0].figure.suptitle(f"PSNR {psnr(asynchronous, sequential).mean():.2f} dB, "
                            f"SSIM {ssim(asynchronous, sequential).mean():.4f}")
    return list(axes)


# --- all views of a plan in one file ---------------------------------------------------

def save_plan_views(plan: StagePlan, path: str, *, profile: Profile | None = None) -> list[str]:
    """Draw what a plan alone (and its profile, if given) can show into one PNG: per-node
    cost with the cuts (with a profile), bytes crossing each cut (2+ stages), stage times
    (when measured). Returns the names of the views drawn. Written atomically.

    Example:
        >>> save_plan_views(StagePlan.load("plan.json"), "plan.png", profile=Profile.load("profile.json"))
        ['node costs', 'cut bytes', 'stage times']
    """
    import os

    views = []
    if profile is not None:
        _matching_graph(profile, plan)
        views.append(("node costs", lambda ax: plot_node_costs(profile, plan, ax=ax)))
    if plan.n_stages > 1:
        views.append(("cut bytes", lambda ax: plot_cut_bytes(plan, ax=ax)))
    if all(s.measured_seconds is not None for s in plan.stages):
        views.append(("stage times", lambda ax: plot_stage_times({"plan": plan}, ax=ax)))
    if not views:
        raise PlanError("this one-stage plan has no measured stage times and no profile was given: "
                        "nothing to draw; pass the profile it was compiled from.")
    _require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4 * len(views)))  # not pyplot's: nothing stays registered
    axes = figure.subplots(len(views), 1, squeeze=False)[:, 0]
    for ax, (_, draw) in zip(axes, views):
        draw(ax)
    figure.tight_layout()
    temporary = f"{path}.tmp.png"
    figure.savefig(temporary, dpi=100)
    os.replace(temporary, path)
    return [name for name, _ in views]


# --- helpers ----------------------------------------------------------------------------

def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    _require_matplotlib()
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise AsyncFXError("asyncfx.viz draws with matplotlib, which is not installed; "
                           "pip install 'asyncfx[viz]'.") from exc


def _legend_patches(colors: Mapping[str, str]) -> list[Any]:
    from matplotlib.patches import Patch

    return [Patch(color=c, label=label) for label, c in colors.items()]
