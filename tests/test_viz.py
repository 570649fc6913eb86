"""The plotting functions: what each one draws, checked on the axes."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

import asyncfx  # noqa: E402
from asyncfx import viz  # noqa: E402
from asyncfx.errors import AsyncFXError, PlanError  # noqa: E402
from asyncfx.partitioner.refine import measure_stages  # noqa: E402
from asyncfx.passes.meta import COMPUTE_OPS, ValueClass  # noqa: E402
from asyncfx.app.sweep import SweepRow  # noqa: E402
from conftest import zoo_captured, zoo_example  # noqa: E402
from plans import hand_plan  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def sd():
    """The SD-shaped tiny UNet, profiled, with a 3-stage plan measured stage by stage."""
    captured = zoo_captured("sd_unet")
    _, args, kwargs = zoo_example("sd_unet")
    profile = asyncfx.profile(captured, (args, kwargs), warmup=1, repeats=2)
    plan = asyncfx.compile(captured, 3, example_inputs=(args, kwargs), cost="measure", profile=profile,
                           refine_rounds=1, repeats=2)
    return captured, profile, plan, (args, kwargs)


def _gids(ax, prefix):
    return [a.get_gid() for a in [*ax.lines, *ax.patches, *ax.texts, *ax.collections]
            if a.get_gid() and a.get_gid().startswith(prefix)]


def test_node_costs_draw_cuts_labels_and_stage_shading(sd):
    captured, profile, plan, _ = sd
    ax = viz.plot_node_costs(profile, plan)
    assert [line.get_gid() for line in ax.lines].count("cut") == plan.n_stages - 1   # cut lines
    labels = [t.get_text() for t in ax.texts if t.get_gid().startswith("cut-label:")]
    assert len(labels) == plan.n_stages - 1  # each the end of its stage's first module path
    assert all(stage.first_module.endswith(label.removeprefix("..."))
               for label, stage in zip(labels, plan.stages[1:]))
    spans = [p for p in ax.patches if p.get_label().startswith("stage")]
    assert [to_hex(p.get_facecolor()) for p in spans] == viz.stage_colors(plan.n_stages)
    assert [line.get_label() for line in ax.lines[:2]] == ["estimated (cpu roofline)", "measured"]
    assert len(ax.lines[1].get_xdata()) == len(profile.graph.nodes)


def test_node_costs_without_a_profile_draw_only_the_estimate(sd):
    captured, _, plan, _ = sd
    fresh = asyncfx.capture(*zoo_example("sd_unet"))
    ax = viz.plot_node_costs(fresh, plan)
    assert [line.get_label() for line in ax.lines if not line.get_gid()] == ["estimated (cpu roofline)"]


def test_node_costs_refuse_a_plan_of_another_graph(sd):
    _, profile, _, _ = sd
    with pytest.raises(PlanError, match="compiled for another graph"):
        viz.plot_node_costs(profile, hand_plan())


def test_cut_traffic_separates_main_path_and_skips():
    traffic = viz.cut_traffic(hand_plan())
    assert [(t.stage, [b.name for b in t.main_path], [b.name for b in t.skips]) for t in traffic] == [
        (1, ["skip"], ["a"]), (2, ["b"], ["skip"])]
    assert [t.bytes for t in traffic] == [17_000_000, 18_000_000]


def test_cut_bytes_draw_one_bar_per_tensor_per_cut():
    plan = hand_plan()
    ax = viz.plot_cut_bytes(plan)
    assert sorted(_gids(ax, "tensor:")) == sorted(["tensor:skip", "tensor:a", "tensor:skip", "tensor:b"])
    colors = {p.get_gid(): to_hex(p.get_facecolor()) for p in ax.patches if p.get_gid() == "tensor:a"}
    assert colors == {"tensor:a": viz.SKIP_COLOR}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cut 0|1", "cut 1|2"]
    assert "down.0" in [t.get_text() for t in ax.texts]          # the big tensor is labelled
    assert "  18.0 MB" in [t.get_text() for t in ax.texts]


def test_cut_bytes_of_a_unet_show_skip_connections(sd):
    _, _, plan, _ = sd
    traffic = viz.cut_traffic(plan)
    assert all(t.skips for t in traffic)   # encoder skips stay alive into the decoder


def test_cut_bytes_need_a_cut():
    plan = hand_plan()
    plan.stages, plan.boundaries = plan.stages[:1], []
    with pytest.raises(PlanError, match="no cuts"):
        viz.plot_cut_bytes(plan)


def test_module_graph_groups_nodes_by_module(sd):
    captured, _, plan, _ = sd
    graph = viz.module_graph(captured, plan, depth=1)
    compute = [n for n in captured.graph.nodes if n.op in COMPUTE_OPS]
    assert sum(d["nodes"] for _, d in graph.nodes(data=True)) == len(compute)
    assert {"conv_in", "time_embedding", "mid_block", "conv_out"} <= set(graph.nodes)
    assert graph.nodes["time_embedding"]["value_class"] is ValueClass.STEP
    assert graph.nodes["time_embedding"]["stages"] == []
    assert graph.nodes["conv_in"]["stages"] == [0] and graph.nodes["conv_out"]["stages"] == [2]
    assert graph.has_edge("time_embedding", "down_blocks.0")
    deeper = viz.module_graph(captured, plan, depth=2)
    assert len(deeper) > len(graph) and "down_blocks.0.resnets.0" in deeper


@pytest.mark.parametrize("color_by", ["stage", "value_class"])
def test_module_graph_colours(sd, color_by):
    captured, _, plan, _ = sd
    ax = viz.plot_module_graph(captured, plan, depth=1, color_by=color_by)
    graph = viz.module_graph(captured, plan, depth=1)
    (groups,) = [c for c in ax.collections if c.get_gid() == "module-groups"]
    drawn = [to_hex(c) for c in groups.get_facecolors()]
    assert drawn == viz.group_colors(graph, color_by, plan.n_stages)
    if color_by == "stage":
        expected = {viz.stage_colors(3)[k] for k in range(3)} | {viz.REPLICATED_COLOR}
    else:
        expected = {viz.VALUE_CLASS_COLORS[ValueClass.LATENT], viz.VALUE_CLASS_COLORS[ValueClass.STEP]}
    assert set(drawn) == expected
    assert set(graph.nodes) <= {t.get_text() for t in ax.texts}


def test_module_graph_bad_options(sd):
    captured, _, plan, _ = sd
    with pytest.raises(AsyncFXError, match="needs a plan"):
        viz.plot_module_graph(captured, None, color_by="stage")
    with pytest.raises(AsyncFXError, match="'stage' or 'value_class'"):
        viz.plot_module_graph(captured, plan, color_by="size")
    with pytest.raises(AsyncFXError, match="depth must be 1 or more"):
        viz.module_graph(captured, plan, depth=0)


def test_stage_times_plot_both_plans_with_predictions(sd):
    captured, _, plan, inputs = sd
    naive = measure_stages(captured, asyncfx.compile(captured, 3, cost="uniform"), inputs, repeats=2)
    ax = viz.plot_stage_times({"cost model": plan, "equal node counts": naive})
    bars = [p for p in ax.patches if p.get_gid() in ("measured:cost model", "measured:equal node counts")]
    assert len(bars) == 6
    heights = [p.get_height() for p in bars if p.get_gid() == "measured:cost model"]
    np.testing.assert_allclose(heights, [s.measured_seconds * 1e3 for s in plan.stages])
    assert _gids(ax, "predicted:") == ["predicted:cost model"]   # node counts predict no seconds
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    measured = [s.measured_seconds for s in naive.stages]
    assert f"equal node counts: max/mean {max(measured) / np.mean(measured):.3f}" in legend


def test_stage_times_need_measurements():
    with pytest.raises(PlanError, match="no measured stage times"):
        viz.plot_stage_times({"plan": hand_plan(measured=False)})


def test_tile_images_places_each_sample():
    images = torch.linspace(-1, 1, 6).reshape(6, 1, 1, 1).expand(6, 1, 2, 3)
    grid = viz.tile_images(images, rows=2)
    assert grid.shape == (4, 9) and grid.dtype == np.uint8
    assert grid[0, 0] == 0 and grid[2, 6] == 255 and grid[0, 3] == round((-0.6 + 1) * 127.5)
    with pytest.raises(AsyncFXError, match="multiple of rows"):
        viz.tile_images(images, rows=4)


def test_samples_side_by_side_with_difference():
    torch.manual_seed(0)
    sequential = torch.rand(4, 1, 8, 8) * 2 - 1
    asynchronous = sequential + 0.05
    axes = viz.plot_samples(sequential, asynchronous, rows=2)
    shown = [ax.get_images()[0].get_array() for ax in axes]
    np.testing.assert_array_equal(shown[0], viz.tile_images(sequential, 2))
    np.testing.assert_array_equal(shown[1], viz.tile_images(asynchronous.clamp(-1, 1), 2))
    difference = viz.difference_images(asynchronous, sequential)
    np.testing.assert_array_equal(shown[2], viz.tile_images(difference, 2))
    assert [ax.get_title() for ax in axes] == ["sequential", "asyncfx", "|difference| x4"]
    assert axes[0].figure._suptitle.get_text().startswith("PSNR")
    with pytest.raises(AsyncFXError, match="differ in shape"):
        viz.plot_samples(sequential, asynchronous[:2])


def test_speed_quality_one_line_per_configuration():
    rows = [SweepRow(n, s, w, psnr=30.0 + w, ssim=0.9, class_accuracy=1.0, frechet=None,
                     predicted_speedup=n * s / w, ideal_speedup=n * s)
            for n in (2, 3) for s in (1, 2) for w in (1, 3)]
    ax = viz.plot_speed_quality(rows)
    assert sorted(_gids(ax, "config:")) == ["config:2:1", "config:2:2", "config:3:1", "config:3:2"]
    line = next(line for line in ax.lines if line.get_gid() == "config:3:2")
    np.testing.assert_allclose(line.get_xdata(), [6.0, 2.0])
    np.testing.assert_allclose(line.get_ydata(), [31.0, 33.0])
    assert [t.get_text() for t in ax.texts].count("W=3") == 4
    with pytest.raises(AsyncFXError, match="not a column"):
        viz.plot_speed_quality(rows, metric="lpips")


@pytest.mark.parametrize("stride, devices", [(1, 3), (2, 4)])
def test_timeline_draws_warmup_chains_and_parallel_rounds(stride, devices):
    from asyncfx.partitioner.device import DeviceSpec
    from asyncfx.partitioner.simulate import simulate

    slow = DeviceSpec("slow", 1e12, 1e11, link_bytes_per_s=1e9, link_latency_s=1e-3,
                      host_seconds_per_call=2e-3)
    sim = simulate(hand_plan(), link=slow, steps=10, warmup=2, stride=stride)
    ax = viz.plot_timeline(sim, rounds=3)
    assert len(_gids(ax, "warmup:")) == 2 * 3                 # every stage, one after another
    rounds = sorted(_gids(ax, "round:"))
    assert len(rounds) == 3 * devices and f"round:2:{devices - 1}" in rounds
    assert sorted(_gids(ax, "send:")) == sorted(f"send:{r}:{k}" for r in range(3) for k in (0, 1))
    assert len(_gids(ax, "broadcast:")) == 3
    spans = {p.get_gid(): (p.get_x(), p.get_x() + p.get_width()) for p in ax.patches
             if (p.get_gid() or "").startswith(("broadcast:", "host:"))}
    next_round = (2 * sim.sequential_step + sim.round_overlapped) * 1e3
    assert spans["host:0"] == pytest.approx((next_round - stride * 2.0, next_round))  # 2 ms a call
    assert spans["broadcast:0"][1] == pytest.approx(spans["host:0"][0])
    warmup_bars = [p for p in ax.patches if (p.get_gid() or "").startswith("warmup:")]
    assert sum(p.get_width() for p in warmup_bars) == pytest.approx(2 * sim.sequential_step * 1e3)
    first_round = [p for p in ax.patches if (p.get_gid() or "").startswith("round:0:")]
    # every device starts its first round at once
    assert [p.get_x() for p in first_round] == pytest.approx([2 * sim.sequential_step * 1e3] * devices)
    send = next(p for p in ax.patches if p.get_gid() == "send:0:0")  # ends when stage 0's last send arrives
    arrives = (2 * sim.sequential_step + sim.sends_done[0]) * 1e3
    assert send.get_x() + send.get_width() == pytest.approx(arrives)
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"device {k}" for k in range(devices)]
    with pytest.raises(AsyncFXError, match="rounds must be at least 1"):
        viz.plot_timeline(sim, rounds=0)


def test_timeline_draws_each_batch_group_on_its_own_devices():
    from asyncfx.partitioner.simulate import simulate

    plan = hand_plan()
    plan.groups = 2
    sim = simulate(plan, steps=10, warmup=2)
    ax = viz.plot_timeline(sim, rounds=2)
    assert len(_gids(ax, "warmup:")) == 2 * 3 * 2  # every stage of both groups, groups at once
    warm = {p.get_gid(): p.get_x() for p in ax.patches if (p.get_gid() or "").startswith("warmup:")}
    assert warm["warmup:1:1"] == pytest.approx(warm["warmup:1:4"])  # stage 1 of each group together
    assert len(_gids(ax, "round:")) == 2 * 6 and len(_gids(ax, "send:")) == 2 * 2 * 2
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"group {k // 3} device {k}" for k in range(6)]
    assert "3 stages in each of 2 batch groups" in ax.get_title()


def test_save_plan_views_draws_what_the_plan_can_show(tmp_path, sd):
    _, profile, plan, _ = sd
    path = tmp_path / "plan.png"
    assert viz.save_plan_views(plan, str(path), profile=profile) == ["node costs", "cut bytes", "stage times"]
    from PIL import Image

    with Image.open(path) as image:
        assert image.size == (1200, 1200)
    assert viz.save_plan_views(hand_plan(measured=False), str(path)) == ["cut bytes"]
    one_stage = hand_plan(measured=False)
    one_stage.stages, one_stage.boundaries = one_stage.stages[:1], []
    with pytest.raises(PlanError, match="nothing to draw"):
        viz.save_plan_views(one_stage, str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(PlanError, match="compiled for another graph"):
        viz.save_plan_views(hand_plan(), str(path), profile=profile)
