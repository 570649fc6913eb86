"""Models built without weights (on the meta device), their stages loading their own
weights from the model's files; and releasing what no stage of a process holds."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

import asyncfx
from asyncfx.errors import PlanError
from asyncfx.runtime.stage_weights import release_unheld, stage_tensors, without_data
from asyncfx.errors import WeightsError
from asyncfx.weights import WeightFiles
from conftest import sample, zoo_captured, zoo_example

LATENT = {"sd_unet": "sample", "sd3_transformer": "hidden_states"}


def empty_copy(model):
    """The model built again without weights, as ``from_pretrained(low_cpu_mem_usage=True)``
    builds it before loading: parameters on the meta device, buffers real."""
    with init_empty_weights():
        return type(model).from_config(model.config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each model's directory as save_pretrained writes it."""
    root = tmp_path_factory.mktemp("weights")
    for name in LATENT:
        zoo_example(name)[0].save_pretrained(root / name)
    return root


@pytest.mark.parametrize("name", sorted(LATENT))
def test_a_model_built_without_weights_samples_as_the_model_with_them(name, saved):
    model, _, kwargs = zoo_example(name)
    expected = sample(asyncfx.partition(zoo_captured(name), 2, warmup=1, rebalance=False), kwargs,
                      LATENT[name], steps=4)
    empty = empty_copy(model)
    denoiser = asyncfx.partition(empty, 2, layout="1x2", warmup=1, weights=saved / name, rebalance=False)
    got = sample(denoiser, kwargs, LATENT[name], steps=4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # each stage read the parameters it computes with from the files, and nothing else
    stages = denoiser.executor.slot_modules()
    parameters = sum(p.nbytes for stage in stages for p in stage.parameters())
    assert denoiser.program.weights.loaded_bytes == parameters
    assert [sum(t.nbytes for _, t in stage_tensors(stage)) for stage in stages] == [
        s.param_bytes for s in denoiser.plan.stages]
    assert all(p.is_meta for p in empty.parameters())  # the model itself never got weights


def test_a_model_without_weights_compiles_the_plan_of_the_model_with_them(saved):
    model, args, kwargs = zoo_example("sd_unet")
    captured = asyncfx.capture(empty_copy(model), args, kwargs)
    assert captured.fingerprint == zoo_captured("sd_unet").fingerprint
    assert asyncfx.compile(captured, 3).to_dict() == asyncfx.compile(zoo_captured("sd_unet"), 3).to_dict()
    with pytest.raises(PlanError, match=r"cost='measure' times the graph's nodes, which needs the weights.*"
                                        r"meta device.*cost='flops'"):
        asyncfx.compile(captured, 2, cost="measure", example_inputs=(args, kwargs))


def test_the_serial_executor_loads_a_model_without_weights_where_it_is_told(saved):
    model, _, kwargs = zoo_example("sd_unet")
    expected = sample(asyncfx.partition(zoo_captured("sd_unet"), 2, warmup=1, executor="serial"),
                      kwargs, "sample", steps=3)
    denoiser = asyncfx.partition(empty_copy(model), 2, layout="1x2", warmup=1, executor="serial",
                                 devices=["cpu", "cpu"], weights=saved / "sd_unet")
    torch.testing.assert_close(sample(denoiser, kwargs, "sample", steps=3), expected, rtol=0, atol=0)


def test_sharded_weights_load_through_their_index(saved, tmp_path):
    model, _, kwargs = zoo_example("sd_unet")
    state = model.state_dict()
    names = sorted(state)
    halves = {"first.safetensors": names[:len(names) // 2], "second.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: state[k].contiguous() for k in keys}, tmp_path / file)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}))
    files = WeightFiles(tmp_path)
    loaded = files.load({"conv_in.weight": model.conv_in.weight, names[-1]: state[names[-1]]},
                        torch.device("cpu"))
    torch.testing.assert_close(loaded["conv_in.weight"], model.conv_in.weight, rtol=0, atol=0)
    assert files.loaded_bytes == model.conv_in.weight.nbytes + state[names[-1]].nbytes


def test_weights_that_do_not_fit_are_refused_with_the_cause(saved, tmp_path):
    model, _, kwargs = zoo_example("sd_unet")
    with pytest.raises(asyncfx.ModelError, match=r"meta device.*built without weights.*Pass weights="):
        asyncfx.partition(empty_copy(model), 2)
    with pytest.raises(asyncfx.ModelError, match=r"weights= is for a model built without weights"):
        asyncfx.partition(model, 2, weights=saved / "sd_unet")
    with pytest.raises(WeightsError, match=r"does not exist"):
        asyncfx.partition(empty_copy(model), 2, weights=tmp_path / "nowhere")
    with pytest.raises(WeightsError, match=r"holds no \.safetensors file"):
        asyncfx.partition(empty_copy(model), 2, weights=tmp_path)
    with pytest.raises(WeightsError, match=r"weights must be a path"):
        asyncfx.partition(empty_copy(model), 2, weights=3)
    denoiser = asyncfx.partition(empty_copy(model), 2, warmup=1, weights=saved / "sd3_transformer")
    with pytest.raises(WeightsError, match=r"holds no tensor named 'conv_in.bias', 'conv_in.weight'.*and "
                                           r"others.*Pass the model's own"):
        denoiser(**kwargs)  # the stages are built at the first call: the model holds no weights to warm up
    small = {k: v[..., :1].contiguous() if v.dim() else v for k, v in model.state_dict().items()}
    save_file(small, tmp_path / "small.safetensors")
    with pytest.raises(WeightsError, match=r"with shape \[.*\], but the model has \[.*\]: the files are "
                                           r"another"):
        asyncfx.partition(empty_copy(model), 2, warmup=1, weights=tmp_path / "small.safetensors")(**kwargs)
    save_file(small, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match=r"holds several weight files "
                                           r"\(other.safetensors, small.safetensors\)"):
        WeightFiles(tmp_path)


def test_a_model_without_weights_is_not_converted(saved):
    model, _, kwargs = zoo_example("sd_unet")
    denoiser = asyncfx.partition(empty_copy(model), 2, warmup=1, weights=saved / "sd_unet")
    with pytest.raises(asyncfx.AsyncFXError, match=r"was built without weights \(on the meta device\), so it "
                                                  r"cannot be converted"):
        denoiser.to(torch.float64)


def test_releasing_frees_what_other_stages_read_and_keeps_what_no_stage_reads():
    model, args, kwargs = zoo_example("sd_unet")
    model = copy.deepcopy(model)  # the zoo's model is shared with other tests
    model.spare = spare = torch.nn.Linear(2, 2)  # read by no stage (an adapter switched off)
    captured = asyncfx.capture(model, args, kwargs)
    program = asyncfx.partitioner.lower(captured, asyncfx.compile(captured, 2))
    first, second = (stage.module for stage in program.stages)
    freed = release_unheld(model, [first, second], [first])
    assert freed == sum(t.nbytes for _, t in stage_tensors(second)) - shared_bytes(first, second)
    assert not any(without_data(t) for _, t in stage_tensors(first))
    assert all(without_data(t) for name, t in stage_tensors(second) if name not in dict(stage_tensors(first)))
    assert not without_data(spare.weight)


def shared_bytes(first, second) -> int:
    """Bytes of the tensors both stages read (weights of step and static nodes both compute)."""
    theirs = dict(stage_tensors(second))
    return sum(t.nbytes for name, t in stage_tensors(first) if name in theirs)
