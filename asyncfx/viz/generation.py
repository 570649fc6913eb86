"""Views of generations: a simulated timeline of rounds, and speed against quality."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from asyncfx.errors import AsyncFXError
from asyncfx.partitioner.simulate import Simulation
from asyncfx.viz.style import axes, legend_patches, stage_colors

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# --- speed against quality -------------------------------------------------------------

def plot_speed_quality(rows: Sequence[Any], *, metric: str = "psnr", ax: Axes | None = None) -> Axes:
    """Fidelity to the sequential samples against predicted speedup, one line per
    (N, stride) through its warm-up settings (each point labelled W=...): the paper's
    warm-up table as a picture. ``rows`` are ``asyncfx.app.sweep.SweepRow``.

    Example:
        >>> plot_speed_quality(speed_quality_sweep(model, classifier, labels), metric="ssim")
    """
    if not rows:
        raise AsyncFXError("plot_speed_quality needs at least one row; run speed_quality_sweep first.")
    if not hasattr(rows[0], metric):
        raise AsyncFXError(f"metric={metric!r} is not a column of the rows; "
                           "use psnr, ssim or class_accuracy.")
    ax = axes(ax, figsize=(7, 4.5))
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
    stride 2 the extra device runs the last stage for the round's second step. With batch
    groups each group's devices run the same chain at the same times, on its share.

    Example:
        >>> plot_timeline(simulate(plan, link="pcie4", steps=50, warmup=3), rounds=4)
    """
    if rounds < 1:
        raise AsyncFXError(f"rounds must be at least 1, got {rounds}.")
    ax = axes(ax, figsize=(12, 0.8 + 0.7 * sim.devices))
    colors = stage_colors(sim.n_stages)
    chain = sum(sim.stage_seconds) or 1.0
    slots = sim.devices // sim.groups
    t = 0.0
    for step in range(min(sim.warmup, sim.steps)):  # scaled so a step lasts the whole model's time
        for k, seconds in enumerate(sim.stage_seconds):
            width = seconds * sim.sequential_step / chain
            for device in range(k, sim.devices, slots):  # stage k of every group
                ax.barh(device, width * 1e3, left=t * 1e3, color=colors[k], edgecolor="white",
                        gid=f"warmup:{step}:{device}")
            t += width
    ax.axvline(t * 1e3, color="black", lw=1)
    ax.annotate("warm-up ", (t * 1e3, 0.02), xycoords=("data", "axes fraction"), ha="right", va="bottom",
                fontsize="small")
    for r in range(min(rounds, sim.rounds)):
        _draw_round(ax, sim, r, t, colors)
        t += sim.round_overlapped
        ax.axvline(t * 1e3, color="black", lw=0.5, ls=":")
    ax.set_yticks(range(sim.devices), [f"device {k}" if sim.groups == 1 else f"group {k // slots} device {k}"
                                       for k in range(sim.devices)])
    ax.invert_yaxis()
    ax.set_xlabel("ms from the start of the generation")
    ax.legend(handles=legend_patches({f"stage {k}": c for k, c in enumerate(colors)}),
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    groups = f" in each of {sim.groups} batch groups" if sim.groups > 1 else ""
    ax.set_title(f"{sim.n_stages} stages{groups}, stride {sim.stride}, over {sim.link}: warm-up, then "
                 f"rounds of {sim.round_overlapped * 1e3:.2f} ms ({sim.speedup():.2f}x predicted)")
    return ax


def _draw_round(ax: Axes, sim: Simulation, index: int, start: float, colors: list[str]) -> None:
    lanes = list(enumerate(sim.stage_seconds))
    if sim.stride == 2:  # the extra device computes the last stage of the round's second step
        lanes.append((sim.n_stages - 1, sim.stage_seconds[-1]))
    lanes = lanes * sim.groups  # every group's devices in turn
    for device, (stage, seconds) in enumerate(lanes):
        ax.barh(device, seconds * 1e3, left=start * 1e3, color=colors[stage], edgecolor="white",
                gid=f"round:{index}:{device}")
        send = sim.send_seconds[stage] if device % (len(lanes) // sim.groups) < sim.n_stages else 0.0
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


