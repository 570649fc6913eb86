"""Bad inputs are caught early, each with one clear line: plans that do not fit the model
or their schema, options, output paths, and what the command line prints."""
from __future__ import annotations

import datetime
import functools
import json
import os
import re
import threading
import warnings

import numpy as np
import pytest
import torch

import asyncfx
from asyncfx.app.cli import main
from asyncfx.partitioner.layouts import max_stage_count
from conftest import zoo_captured, zoo_example


@functools.lru_cache(maxsize=None)
def sd_plan(batch: int = 2) -> asyncfx.StagePlan:
    """A 3-stage plan of the tiny SD UNet at ``batch`` (dicts made from it are edited)."""
    if batch == 2:
        return asyncfx.compile(zoo_captured("sd_unet"), 3)
    model, _, kwargs = zoo_example("sd_unet")
    _, _, smaller = asyncfx.zoo.tiny.sd_unet(batch=batch)
    return asyncfx.compile(model, 3, example_inputs=((), smaller))


def _edited(edit) -> asyncfx.StagePlan:
    data = sd_plan().to_dict()
    edit(data)
    return asyncfx.StagePlan.from_dict(data)


def _drop_last_stage(data: dict) -> None:
    data["stages"].pop()
    data["boundaries"] = [b for b in data["boundaries"] if b["producer"] < 2]
    for b in data["boundaries"]:
        b["consumers"] = [c for c in b["consumers"] if c < 2]
    data["boundaries"] = [b for b in data["boundaries"] if b["consumers"]]


PLANS_FOR_ANOTHER_GRAPH = {
    "another batch size": (lambda: sd_plan(1), "compiled for another graph"),
    "a node renamed": (lambda: _edited(lambda d: d["stages"][1]["nodes"].__setitem__(0, "renamed")),
                       "they list 'renamed' where the graph has"),
    "nodes reordered": (lambda: _edited(lambda d: d["stages"][1]["nodes"].reverse()),
                        "in order: at position"),
    "a stage removed": (lambda: _edited(_drop_last_stage), "they list nothing more where the graph has"),
    "fingerprint changed": (lambda: _edited(lambda d: d.__setitem__("fingerprint", "0" * 16)),
                            "plan fingerprint 0000000000000000"),
}


@pytest.mark.parametrize("case", list(PLANS_FOR_ANOTHER_GRAPH))
@pytest.mark.parametrize("given_inputs", [False, True], ids=["first call", "partition"])
def test_a_plan_for_another_graph_is_refused_at_the_capture(case, given_inputs):
    """At the first call (the capture), before any step ran, or at partition() itself
    when it is given example inputs; the model captured once (a Captured is laid out at
    its first call as a model is, without tracing it again)."""
    _, _, kwargs = zoo_example("sd_unet")
    model = zoo_captured("sd_unet")
    make, quoted = PLANS_FOR_ANOTHER_GRAPH[case]
    plan = make()
    example = ((), kwargs) if given_inputs else None
    with pytest.raises(asyncfx.PlanError, match=quoted):
        denoiser = asyncfx.partition(model, plan.n_stages, plan=plan, executor="serial",
                                     example_inputs=example, release_weights=False)
        assert not given_inputs
        denoiser(**kwargs)


MALFORMED_PLANS = {
    "nodes a number": (lambda d: d["stages"][0].__setitem__("nodes", 5),
                       "stages[0].nodes must be a list of strings, got 5"),
    "cost a word": (lambda d: d["stages"][0].__setitem__("estimated_cost", "fast"),
                    "stages[0].estimated_cost must be a number, got 'fast'"),
    "a field missing": (lambda d: d["boundaries"][0].pop("shape"), "boundaries[0].shape is missing"),
    "stages an object": (lambda d: d.__setitem__("stages", {}), "stages must be a list of objects"),
    "no groups": (lambda d: d.__setitem__("groups", 0), "groups is 0, not a positive number"),
    "a stage twice": (lambda d: d["stages"][1]["nodes"].append(d["stages"][0]["nodes"][0]),
                      "node 'conv2d' is in two stages"),
    "a producer out of range": (lambda d: d["boundaries"][0].__setitem__("producer", 7),
                                "boundary 'conv2d' is made by stage 7"),
}


@pytest.mark.parametrize("case", list(MALFORMED_PLANS))
def test_a_malformed_plan_file_is_one_line_when_loaded(tmp_path, capsys, case):
    edit, quoted = MALFORMED_PLANS[case]
    data = sd_plan().to_dict()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    for command in ("show", "simulate"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"asyncfx: error: stage plan '{path}' is malformed: {quoted}")
        assert "\n" not in err
    model, _, _ = zoo_example("sd_unet")
    with pytest.raises(asyncfx.PlanError, match="is malformed: " + re.escape(quoted)):
        asyncfx.partition(model, 3, plan=path)


def test_a_malformed_profile_is_one_line_when_loaded(tmp_path, capsys):
    profile_path, plan_path = tmp_path / "profile.json", tmp_path / "plan.json"
    data = {"format": "asyncfx.Profile", "version": 1, "graph": {"fingerprint": 3}, "device": "cpu",
            "threads": 1, "warmup": 0, "repeats": 1}
    profile_path.write_text(json.dumps(data))
    assert main(["compile", str(profile_path), "--n-devices", "2", "--out", str(plan_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is malformed: graph.fingerprint must be a string, got 3; profile again." in err
    assert not plan_path.exists()


BAD_OPTIONS = {
    "an mps device": ({"devices": ["mps", "mps"]}, asyncfx.DeviceError, "not on 'mps' ones"),
    "a meta device": ({"devices": ["meta", "meta"]}, asyncfx.DeviceError, "'meta', which holds no data"),
    "more devices than slots": ({"devices": ["cpu"] * 4}, asyncfx.DeviceError,
                                "2 devices are needed .* devices lists 4; list 2, or pass n_devices=4"),
    "time_shift a word": ({"time_shift": "yes", "forecast": 0}, asyncfx.PlanError,
                          "time_shift must be True or False, got 'yes'"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_refused_by_partition_itself(case):
    model, _, _ = zoo_example("sd_unet")
    options, error, quoted = BAD_OPTIONS[case]
    with pytest.raises(error, match=quoted):
        asyncfx.partition(model, 2, **options)


@pytest.mark.parametrize("layout", [None, "1x1000000"])
def test_more_devices_than_the_model_has_stages_is_refused_at_the_capture(layout):
    model, _, kwargs = zoo_example("sd_unet")
    limit = max_stage_count(zoo_captured("sd_unet"))
    stages = 500000 if layout is None else 1000000  # the auto layout's fewest stages: 2 groups
    with pytest.raises(asyncfx.PlanError, match=f"need {stages} stages, more than the {limit} "
                                                f"UNet2DConditionModel can be cut into"):
        asyncfx.partition(model, 10 ** 6, layout=layout, example_inputs=((), kwargs))


def _unwritable_folder(tmp_path) -> str:
    """A folder that takes no new files, even for root: a read-only file system."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs a read-only file system (procfs)")
    return "/proc/self"


OUTPUTS = {
    "profile": lambda out: ["profile", "asyncfx.zoo.tiny:sd_unet", "--out", out],
    "compile": lambda out: ["compile", "profile.json", "--n-devices", "2", "--out", out],
    "show --plot": lambda out: ["show", "plan.json", "--plot", out],
    "demo": lambda out: ["demo", "--out", out],
}


@pytest.mark.parametrize("command", list(OUTPUTS))
@pytest.mark.parametrize("where", ["a folder", "a missing folder", "an unwritable folder"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, monkeypatch, capsys, command,
                                                                      where):
    """Checked before anything runs: the profile and plan these commands would read do
    not even exist, and the demo would sample for minutes."""
    monkeypatch.chdir(tmp_path)
    suffix = ".json" if command in ("profile", "compile") else ".png"
    out = {"a folder": str(tmp_path), "a missing folder": str(tmp_path / "missing" / f"out{suffix}"),
           "an unwritable folder": os.path.join(_unwritable_folder(tmp_path), f"out{suffix}")}[where]
    assert main(OUTPUTS[command](out)) == 2
    err = capsys.readouterr().err.strip()
    reason = {"a folder": "it is a folder", "a missing folder": "does not exist",
              "an unwritable folder": "does not take new files"}[where]
    assert err.startswith("asyncfx: error: cannot write the ") and f"{out!r}: " in err and reason in err
    assert "\n" not in err and ".tmp" not in err


@pytest.mark.parametrize("command", ["show --plot", "demo"])
@pytest.mark.parametrize("name", ["plan.txt", "plan"])
def test_an_image_suffix_that_names_no_format_is_refused(tmp_path, monkeypatch, capsys, command, name):
    monkeypatch.chdir(tmp_path)
    assert main(OUTPUTS[command](name)) == 2
    err = capsys.readouterr().err
    assert "names no format it can be written in; use one of" in err and ".jpg" in err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name, magic", [("plan.pdf", b"%PDF"), ("plan.jpg", b"\xff\xd8\xff"),
                                         ("plan.svg", b"<?xml"), ("plan.png", b"\x89PNG")])
def test_show_writes_the_format_its_suffix_names(tmp_path, capsys, name, magic):
    pytest.importorskip("matplotlib")
    plan_path = tmp_path / "plan.json"
    sd_plan().save(plan_path)
    assert main(["show", str(plan_path), "--plot", str(tmp_path / name)]) == 0
    assert (tmp_path / name).read_bytes().startswith(magic)
    assert sorted(os.listdir(tmp_path)) == sorted(["plan.json", name])  # no temporary file left


def test_the_demo_grids_are_written_in_the_format_their_suffix_names(tmp_path):
    from asyncfx.app.demo import save_grids

    images = torch.zeros(10, 1, 16, 16)
    for name, magic in (("demo.jpg", b"\xff\xd8\xff"), ("demo.png", b"\x89PNG")):
        save_grids(str(tmp_path / name), images, images, per_class=1)
        assert (tmp_path / name).read_bytes().startswith(magic)


def test_the_demo_image_captions_each_grid_and_keeps_the_digits_apart(tmp_path):
    from PIL import Image

    from asyncfx.app.demo import CAPTION_HEIGHT, GRID_GAP, SCALE, TILE_GAP, save_grids

    white = torch.ones(20, 1, 16, 16)  # two white samples a row: only the gaps between them are not
    save_grids(str(tmp_path / "demo.png"), white, -white, per_class=2)
    pixels = np.asarray(Image.open(tmp_path / "demo.png"))
    grid_width = (2 * 16 + TILE_GAP) * SCALE
    for k in range(3):  # a caption (dark text on the white band) over each grid
        band = pixels[:CAPTION_HEIGHT, k * (grid_width + GRID_GAP * SCALE):][:, :grid_width]
        assert (band < 128).any()
    first = pixels[CAPTION_HEIGHT:, :grid_width]
    between_columns = first[:, 16 * SCALE:(16 + TILE_GAP) * SCALE]
    between_rows = first[16 * SCALE:(16 + TILE_GAP) * SCALE]
    assert (between_columns == 128).all() and (between_rows == 128).all()
    assert (first[:16 * SCALE, :16 * SCALE] == 255).all()


@pytest.mark.parametrize("steps, layout, ideal, noted", [(50, "1x2", 50 / (3 + 47 / 2), False),
                                                          (2, "1x2", 1.0, True), (2, "2x1", 2.0, False)])
def test_the_demos_ideal_speedup_counts_warm_up_steps_it_cannot_overlap(steps, layout, ideal, noted):
    from asyncfx.app.demo import ideal_speedup

    got, note = ideal_speedup(steps, 3, asyncfx.Layout.parse(layout), 1)
    assert got == pytest.approx(ideal) and got >= 1.0
    assert ("all 2 steps are warm-up steps" in note) is noted


def test_a_failed_save_names_the_path_given_and_leaves_nothing(tmp_path):
    folder = tmp_path / "plan.json"
    folder.mkdir()
    with pytest.raises(asyncfx.OutputError, match=f"cannot write the JSON file '{folder}': Is a directory"):
        sd_plan().save(folder)
    assert os.listdir(tmp_path) == ["plan.json"] and not os.listdir(folder)


@pytest.mark.parametrize("timeout", [None, datetime.timedelta(seconds=120)])
def test_a_process_group_with_torchs_default_timeout_is_warned_about(tmp_path, timeout):
    """A frozen rank keeps the others waiting until the timeout: 30 minutes by default."""
    import torch.distributed as dist

    model, _, _ = zoo_example("sd_unet")
    given = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1, **given)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            asyncfx.partition(model, 1, warmup=1, executor="distributed")
        said = [str(w.message) for w in caught if "timeout" in str(w.message)]
        if timeout is None:
            assert len(said) == 1 and "torch's default (0:30:00)" in said[0]
            assert "init_process_group(..., timeout=datetime.timedelta(seconds=...))" in said[0]
        else:
            assert not said
    finally:
        dist.destroy_process_group()


def test_cpu_workers_leave_the_callers_threads_and_other_threads_within_rounding():
    """The limit docs/usage.md states: a worker's thread count is its own, except MKL's,
    which is process-wide, so another thread's results stay within float rounding."""
    model, _, kwargs = zoo_example("sd_unet")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            alone = model(**kwargs).sample
            denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=1, release_weights=False)
            stop, failures = threading.Event(), []

            def generation() -> None:
                for t in (900, 800, 700, 600):  # warm-up and parallel steps: the switches
                    denoiser(**{**kwargs, "timestep": torch.tensor(t)})

            def sample() -> None:
                try:
                    while not stop.is_set():
                        generation()
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    failures.append(exc)

            generation()  # captured and built here: capturing is no thing to do beside a call

            worker = threading.Thread(target=sample)
            worker.start()
            try:
                beside = [model(**kwargs).sample for _ in range(10)]
            finally:
                stop.set()
                worker.join()
            denoiser.close()
        assert not failures and torch.get_num_threads() == 2
        for result in beside:
            torch.testing.assert_close(result, alone, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", [[], ["demo"], ["profile"], ["compile"], ["show"], ["simulate"],
                                     ["sample"]])
def test_help_shows_plain_text_and_every_default(capsys, command):
    import argparse

    from asyncfx.app.cli import _parser

    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "`" not in shown
    parser = _parser()
    if command:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = commands.choices[command[0]]
    options = shown.split(" options: ", 1)[1]
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            entry = options.split(f" {action.option_strings[-1]} ", 1)[1].split(" --", 1)[0]
            assert "(default: " in entry, action.option_strings


def test_a_plan_for_another_batch_is_refused_at_the_models_own_first_call():
    model, _, kwargs = zoo_example("sd_unet")
    denoiser = asyncfx.partition(model, 3, plan=sd_plan(1), executor="serial", release_weights=False)
    with pytest.raises(asyncfx.PlanError, match=r"compiled for another graph .* inputs sample \(latent, "
                                                r"float32\[1, 4, 8, 8\]\).* this graph .* sample \(latent, "
                                                r"float32\[2, 4, 8, 8\]\)"):
        denoiser(**kwargs)
    assert denoiser.plan is None  # nothing was built


@pytest.mark.parametrize("progress", [True, False])
def test_the_first_calls_say_what_takes_seconds(capsys, progress):
    model, _, kwargs = zoo_example("sd_unet")
    denoiser = asyncfx.partition(model, 2, layout="1x2", warmup=1, release_weights=False, progress=progress)
    capsys.readouterr()
    for t in (900, 800):  # captured at the first call, its stages built at the second
        denoiser(**{**kwargs, "timestep": torch.tensor(t)})
    denoiser.close()
    err = capsys.readouterr().err
    if not progress:
        assert err == ""
        return
    lines = err.strip().splitlines()
    assert re.fullmatch(r"asyncfx: capturing UNet2DConditionModel \(torch.export\) and laying it out \.\.\. "
                        r"\d+\.\d s", lines[0])
    assert re.fullmatch(r"asyncfx: building the stages of UNet2DConditionModel \.\.\. \d+\.\d s", lines[1])


def test_simulate_says_which_kind_of_estimate_its_stage_times_are_and_how_far_to_trust_them():
    from asyncfx.partitioner.simulate import simulate

    model, _, kwargs = zoo_example("sd_unet")
    profiled = asyncfx.compile_profile(asyncfx.profile(zoo_captured("sd_unet"), ((), kwargs), repeats=1), 3)
    said = {"flops": simulate(sd_plan()).summary(), "profile": simulate(profiled).summary()}
    assert "stage times (estimated from FLOPs): " in said["flops"]
    assert "how far to trust it: FLOPs and bytes priced by the cpu roofline" in said["flops"]
    assert "stage times (predicted from measured node times): " in said["profile"]
    assert "how far to trust it: node times measured one by one and summed" in said["profile"]
    assert "predicted" not in said["flops"] and "FLOPs" not in said["profile"]


@functools.lru_cache(maxsize=None)
def sd_profile() -> asyncfx.Profile:
    _, _, kwargs = zoo_example("sd_unet")
    return asyncfx.profile(zoo_captured("sd_unet"), ((), kwargs), repeats=1, warmup=0)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("n_stages", [3, 7])
def test_plan_views_labels_keep_clear_of_lines_and_each_other_and_show_each_stages_total(n_stages):
    """Looked at as a person would, by bounding boxes: cut labels beside (not on) their
    dashed lines, tensor labels inside their bar segments and apart, a total per stage."""
    pytest.importorskip("matplotlib")
    from asyncfx.viz.plan_views import labelled_segment, plan_views, plan_views_figure

    plan = asyncfx.compile_profile(sd_profile(), n_stages)
    figure = plan_views_figure(plan_views(plan, sd_profile()))
    figure.draw_without_rendering()
    costs, cut_bytes = figure.axes[:2]
    cut_x = [costs.transData.transform((line.get_xdata()[0], 0))[0] for line in costs.lines
             if line.get_gid() == "cut"]
    labels = [t for t in costs.texts if (t.get_gid() or "").startswith("cut-label:")]
    assert len(labels) == len(cut_x) == n_stages - 1
    for label, x in zip(labels, cut_x):
        box = label.get_window_extent()
        assert box.x1 < x and x - box.x1 < 10  # beside its line, left of it
    totals = [t for t in costs.texts if (t.get_gid() or "").startswith("stage-total:")]
    assert len(totals) == n_stages and "slowest/mean" in costs.get_title()
    boxes = [t.get_window_extent() for t in totals]
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    shown = [t for t in cut_bytes.texts
             if (t.get_gid() or "").startswith("tensor-label:") and t.get_visible()]
    assert shown  # the large tensors are named
    for text in shown:
        box, segment = text.get_window_extent(), labelled_segment(cut_bytes, text).get_window_extent()
        assert segment.x0 <= box.x0 and box.x1 <= segment.x1
    boxes = [t.get_window_extent() for t in shown]
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
