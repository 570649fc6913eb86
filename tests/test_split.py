"""compile() + split(): stage plans, exact split equivalence, weights per stage, errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import asyncfx
from asyncfx.partitioner.cuts import cut_positions, latent_order
from asyncfx.passes.functionalise import fill_diagonal
from asyncfx.passes.meta import VALUE_CLASS, ValueClass
from asyncfx.zoo.tiny import ZOO
from conftest import assert_same_output, check_boundaries, zoo_captured, zoo_example


@pytest.mark.parametrize("n_devices", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_chained_stages_equal_the_model_exactly(name, n_devices):
    model, args, kwargs = zoo_example(name)
    captured = zoo_captured(name)
    plan = asyncfx.compile(captured, n_devices)
    staged = asyncfx.split(captured, plan)
    assert plan.n_stages == len(staged.stages) == n_devices
    assert_same_output(staged(*args, **kwargs), model(*args, **kwargs))
    check_boundaries(captured, plan, staged)


def test_hand_made_model_cut_after_every_cuttable_node():
    model, args, kwargs = zoo_example("skip_list_denoiser")
    captured = zoo_captured("skip_list_denoiser")
    order = latent_order(captured.graph)
    most = len(cut_positions(order)) + 1
    assert most == len(order)  # every latent node of this model returns a tensor
    plan = asyncfx.compile(captured, most)
    assert [len(s.nodes) for s in plan.stages] == [1] * most
    staged = asyncfx.split(captured, plan)
    assert_same_output(staged(*args, **kwargs), model(*args, **kwargs))
    check_boundaries(captured, plan, staged)
    # the skip list shows up as boundaries read by a stage far downstream
    assert any(max(b.consumers) - b.producer > 2 for b in plan.boundaries)


class WritesInPlace(torch.nn.Module):
    """In-place writes to intermediates, as FreeU makes them: a mask filled in place
    (nothing reads the fill's result) and a slice of a latent value scaled in place; and
    a diagonal filled in place, as perturbed-attention guidance makes SD3's masks."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, t):
        h = self.first(x) + t
        mask = torch.ones_like(h[:1])
        mask[:, :2] = 0.5
        h[:, 2:] *= 3.0
        mix = torch.zeros(4, 4)
        mix[:2, :2] = -1.0
        mix[:2, :2].fill_diagonal_(2.0)  # torch writes a diagonal through as_strided
        h = torch.relu(self.second(h * mask)) @ mix.softmax(-1)
        h.sub_(1.0)
        return h + x


@pytest.mark.parametrize("n_devices", [1, 2, 3])
def test_in_place_writes_to_intermediates_survive_the_split(n_devices):
    model, args = WritesInPlace().eval(), (torch.randn(3, 4), torch.tensor(0.5))
    captured = asyncfx.capture(model, args)
    assert not any(getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable
                   for n in captured.graph.nodes)  # functionalised
    staged = asyncfx.split(captured, asyncfx.compile(captured, n_devices, cost="uniform"))
    assert_same_output(staged(*args), model(*args))


class WritesThroughAsStrided(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        h = self.linear(x) * t
        h[:2].as_strided((2, 2), (1, 2)).mul_(2.0)
        return h


def test_in_place_writes_torch_cannot_functionalise_are_a_clear_error():
    with pytest.raises(asyncfx.CaptureError, match=r"WritesThroughAsStrided.forward writes to intermediate "
                                                   r"values in place \(mul_\).*torch could not.*"
                                                   r"as_strided.*Write those values out of place"):
        asyncfx.capture(WritesThroughAsStrided(), (torch.randn(3, 4), torch.tensor(0.5)))


@pytest.mark.parametrize("shape, wrap", [((3, 3), False), ((3, 5), False), ((7, 3), False), ((7, 3), True),
                                         ((8, 2), True), ((3, 3, 3), False)])
def test_fill_diagonal_as_a_masked_copy_equals_torch(shape, wrap):
    tensor = torch.randn(shape)
    expected = tensor.clone().fill_diagonal_(-2.0, wrap=wrap)
    torch.testing.assert_close(fill_diagonal(tensor.clone(), -2.0, wrap), expected, rtol=0, atol=0)


def test_freeu_survives_the_split():
    model, args, kwargs = zoo_example("sd_unet")
    model = copy.deepcopy(model)
    model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # fills masks and scales slices in place
    captured = asyncfx.capture(model, args, kwargs)
    staged = asyncfx.split(captured, asyncfx.compile(captured, 2))
    assert_same_output(staged(*args, **kwargs), model(*args, **kwargs))


def test_multi_output_ops_stay_with_their_getitems():
    captured = zoo_captured("sd_unet")  # GEGLU chunks its projection in two
    order = latent_order(captured.graph)
    allowed = set(cut_positions(order))
    for i, node in enumerate(order):
        if node.target is torch.ops.aten.chunk.default:
            assert i + 1 not in allowed
    plan = asyncfx.compile(captured, len(allowed) + 1)
    nodes = {n.name: n for n in captured.graph.nodes}
    assert all(isinstance(nodes[b.name].meta["val"], torch.Tensor) for b in plan.boundaries)
    assert any(n.target is torch.ops.aten.chunk.default for n in order)


def tensors_of(module: torch.nn.Module) -> dict[int, torch.Tensor]:
    return {id(t): t for t in [*module.parameters(), *module.buffers()]}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", ["sd_unet", "sdxl_unet", "flux_transformer"])
def test_each_stage_holds_only_its_weights(name):
    captured = zoo_captured(name)
    plan = asyncfx.compile(captured, 3)
    staged = asyncfx.split(captured, plan)
    per_stage = [tensors_of(stage) for stage in staged.stages]
    union = {k: t for stage in per_stage for k, t in stage.items()}
    model_tensors = tensors_of(zoo_example(name)[0])
    assert set(union) <= set(model_tensors)

    # Replicated tensors are exactly those read by step/static nodes in several stages.
    replicated = {k for k in union if sum(k in s for s in per_stage) > 1}
    non_latent_weights = set()
    for stage in staged.stages:
        for node in stage.graph.nodes:
            if node.op == "get_attr" and all(u.meta[VALUE_CLASS] is not ValueClass.LATENT
                                             for u in node.users):
                non_latent_weights.add(id(getattr_path(stage, node.target)))
    assert replicated and replicated <= non_latent_weights
    replicated_bytes = sum(nbytes([union[k]]) * (sum(k in s for s in per_stage) - 1)
                           for k in replicated)
    stage_bytes = [nbytes(s.values()) for s in per_stage]
    assert [s.param_bytes for s in plan.stages] == stage_bytes
    assert sum(stage_bytes) == nbytes(union.values()) + replicated_bytes
    assert plan.total_param_bytes == nbytes(union.values())
    print(f"{name}: {nbytes(union.values())} weight bytes, {replicated_bytes} replicated "
          f"({replicated_bytes / nbytes(union.values()):.1%}) over 3 stages")
    # a latent layer's weight lives in one stage only
    last_conv = [n for n in captured.graph.nodes if n.op == "get_attr"][-1]
    assert sum(id(getattr_path(captured.graph_module, last_conv.target)) in s
               for s in per_stage) == 1


def getattr_path(module: torch.nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def test_uniform_cost_balances_node_counts():
    plan = asyncfx.compile(zoo_captured("sd_unet"), 4, cost="uniform")
    counts = [len(s.nodes) for s in plan.stages]
    assert max(counts) - min(counts) <= 6, counts  # cuts avoid splitting chunk/getitem


def test_flops_cost_balances_estimated_cost():
    plan = asyncfx.compile(zoo_captured("sdxl_unet"), 2)
    costs = [s.estimated_cost for s in plan.stages]
    assert max(costs) / (sum(costs) / 2) < 1.1, costs
    assert plan.cost == "flops" and plan.stages[1].cut_reason.startswith("after ")
    assert "live here" in plan.stages[1].cut_reason


def test_plan_json_round_trip_and_summary(tmp_path):
    plan = asyncfx.compile(zoo_captured("sdxl_unet"), 3)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert asyncfx.StagePlan.load(path) == plan
    assert not list(tmp_path.glob("*.tmp"))
    summary = plan.summary()
    assert "StagePlan for UNet2DConditionModel: 3 stage(s)" in summary
    assert "added_cond_kwargs_time_ids (condition" in summary
    for stage in plan.stages:
        assert stage.first_module in summary and stage.last_module in summary
    for boundary in plan.boundaries:
        assert boundary.name in summary
    assert "bytes into each stage" in summary and "replicated across stages" in summary


def test_compile_takes_a_model_and_example_inputs_in_every_form():
    model, args, kwargs = zoo_example("skip_list_denoiser")
    expected = asyncfx.compile(zoo_captured("skip_list_denoiser"), 2)
    assert asyncfx.compile(model, 2, example_inputs=args) == expected
    assert asyncfx.compile(model, 2, example_inputs=(args, {})) == expected
    named = dict(zip(("x", "t", "cond"), args))
    assert asyncfx.compile(model, 2, example_inputs=named).fingerprint == expected.fingerprint


def test_bad_n_devices_are_refused():
    captured = zoo_captured("skip_list_denoiser")
    most = len(cut_positions(latent_order(captured.graph))) + 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(asyncfx.PlanError, match="n_devices must be a positive integer"):
            asyncfx.compile(captured, bad)
    with pytest.raises(asyncfx.PlanError, match=f"n_devices={most + 1} is more than the {most} "
                                                "stages SkipListDenoiser can be cut into"):
        asyncfx.compile(captured, most + 1)


def test_plan_for_another_graph_is_refused():
    plan = asyncfx.compile(zoo_captured("sd_unet"), 2)
    with pytest.raises(asyncfx.PlanError, match="compiled for another graph .*UNet2DConditionModel"):
        asyncfx.split(zoo_captured("dit_transformer"), plan)


def test_tampered_plan_is_refused(tmp_path):
    plan = asyncfx.compile(zoo_captured("sd_unet"), 2)
    plan.stages[0].nodes, plan.stages[1].nodes = plan.stages[1].nodes, plan.stages[0].nodes
    with pytest.raises(asyncfx.PlanError, match="do not list the graph's .* latent nodes in order"):
        asyncfx.split(zoo_captured("sd_unet"), plan)
    not_a_plan = tmp_path / "other.json"
    not_a_plan.write_text(json.dumps({"hello": 1}))
    with pytest.raises(asyncfx.PlanError, match="not an asyncfx stage plan"):
        asyncfx.StagePlan.load(not_a_plan)
    with pytest.raises(asyncfx.PlanError, match="no stage plan at"):
        asyncfx.StagePlan.load(tmp_path / "missing.json")


def test_wrong_shape_at_call_is_refused():
    model, args, kwargs = zoo_example("sd_unet")
    staged = asyncfx.split(zoo_captured("sd_unet"), asyncfx.compile(zoo_captured("sd_unet"), 2))
    wrong = {**kwargs, "sample": torch.randn(1, 4, 8, 8)}
    with pytest.raises(asyncfx.InputMismatchError, match=r"'sample' .* float32\[1, 4, 8, 8\]"):
        staged(*args, **wrong)


def test_other_compile_errors():
    model, args, kwargs = zoo_example("skip_list_denoiser")
    with pytest.raises(asyncfx.CaptureError, match="without example inputs"):
        asyncfx.compile(model, 2)
    with pytest.raises(asyncfx.PlanError, match="cost='bogus' is not known"):
        asyncfx.compile(zoo_captured("skip_list_denoiser"), 2, cost="bogus")
    with pytest.raises(asyncfx.PlanError, match="needs a Captured"):
        asyncfx.split(model, asyncfx.compile(zoo_captured("skip_list_denoiser"), 2))
