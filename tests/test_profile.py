"""The profile pass, Profile artifacts, and compile(cost="measure") with refinement."""
from __future__ import annotations

import pytest
import torch

import asyncfx
from asyncfx.passes.meta import COMPUTE_OPS
from asyncfx.passes.meta import MEASURED_SECONDS
from asyncfx.passes.profile import profile_nodes
from conftest import assert_same_output, on_cuda, zoo_captured, zoo_example


def test_profile_pass_times_every_compute_node():
    model, args, kwargs = zoo_example("skip_list_denoiser")
    captured = asyncfx.capture(model, args, kwargs)
    runs = []
    seconds = profile_nodes(captured.graph_module, captured.interface.flatten(args, kwargs),
                            warmup=1, repeats=3, on_run=lambda: runs.append(1))
    compute = [n for n in captured.graph.nodes if n.op in COMPUTE_OPS]
    assert len(runs) == 4
    assert set(seconds) == {n.name for n in compute}
    assert all(n.meta[MEASURED_SECONDS] == seconds[n.name] > 0 for n in compute)
    with pytest.raises(ValueError, match="repeats >= 1"):
        profile_nodes(captured.graph_module, [], repeats=0)


def test_profile_round_trip_and_offline_compile(tmp_path):
    model, args, kwargs = zoo_example("sd_unet")
    profile = asyncfx.profile(model, (args, kwargs), warmup=1, repeats=3)
    assert profile.fingerprint == zoo_captured("sd_unet").fingerprint
    assert profile.device == "cpu" and profile.threads == torch.get_num_threads()
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = asyncfx.Profile.load(path)
    assert loaded == profile
    plan = asyncfx.compile_profile(loaded, 3, link="pcie4")
    assert plan.n_stages == 3 and plan.cost == "measure" and plan.link == "pcie4"
    assert plan.predicted_round == pytest.approx(max(s.estimated_cost for s in plan.stages), rel=0.5)
    staged = asyncfx.split(zoo_captured("sd_unet"), plan)
    assert_same_output(staged(*args, **kwargs), model(*args, **kwargs))


def test_profile_of_another_graph_is_refused():
    model, args, kwargs = zoo_example("skip_list_denoiser")
    profile = asyncfx.profile(model, args, warmup=0, repeats=1)
    sd_model, sd_args, sd_kwargs = zoo_example("sd_unet")
    with pytest.raises(asyncfx.PlanError, match="profile was measured on another graph"):
        asyncfx.compile(sd_model, 2, example_inputs=(sd_args, sd_kwargs), cost="measure",
                        profile=profile)


def test_measured_compile_refines_with_stage_times():
    model, args, kwargs = zoo_example("sd_unet")
    plan = asyncfx.compile(model, 3, example_inputs=(args, kwargs), cost="measure",
                           refine_rounds=3, repeats=3)
    assert all(s.measured_seconds and s.measured_seconds > 0 for s in plan.stages)
    assert any(note.startswith("refinement by measured stage times: round 0") for note in plan.notes)
    summary = plan.summary()
    assert "measured" in summary and "balance max/mean" in summary
    staged = asyncfx.split(zoo_captured("sd_unet"), plan)
    assert_same_output(staged(*args, **kwargs), model(*args, **kwargs))


def test_measure_needs_example_inputs_and_says_a_capture_does_not_keep_them():
    with pytest.raises(asyncfx.PlanError, match="cost='measure' times the model on real inputs, and a "
                       r"Captured keeps its graph, not the tensors it was captured from .* pass "
                       r"example_inputs=\(args, kwargs\)"):
        asyncfx.compile(zoo_captured("sd_unet"), 2, cost="measure")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_profile_uses_events_and_stage_times_use_graphs():
    model, args, kwargs = zoo_example("sd_unet")
    plan = asyncfx.compile(model.cuda(), 2, example_inputs=on_cuda((args, kwargs)), cost="measure",
                           refine_rounds=2, repeats=3)
    assert all(s.measured_seconds > 0 for s in plan.stages)
    model.cpu()
