"""capture(): torch.export graphs of every zoo model, input roles, output types, errors."""
from __future__ import annotations

import copy
import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import asyncfx
from asyncfx.partitioner.cuts import cut_positions, latent_order
from asyncfx.passes.meta import has_data_dependent_size
from asyncfx.passes.pin_shapes import expect_shape
from asyncfx.runtime.guards import CompiledDenoiserError
from asyncfx.zoo import tiny
from asyncfx.zoo.tiny import ZOO
from conftest import assert_same_output, zoo_captured, zoo_example


@pytest.mark.parametrize("name", sorted(ZOO))
def test_captured_graph_reproduces_model(name):
    model, args, kwargs = zoo_example(name)
    captured = zoo_captured(name)
    assert captured.method == "export"
    assert_same_output(captured(*args, **kwargs), model(*args, **kwargs))


@pytest.mark.parametrize("return_dict", [True, False])
def test_output_structure_follows_return_dict(return_dict):
    model, args, kwargs = zoo_example("sd_unet")
    kwargs = {**kwargs, "return_dict": return_dict}
    captured = asyncfx.capture(model, args, kwargs)
    out = captured(*args, **kwargs)
    assert_same_output(out, model(*args, **kwargs))
    assert isinstance(out, tuple) != return_dict
    assert hasattr(out, "sample") == return_dict


def test_input_roles_of_sdxl_include_nested_conditioning():
    captured = zoo_captured("sdxl_unet")
    roles = {i.name: str(i.role) for i in captured.inputs}
    assert roles == {"sample": "latent", "timestep": "timestep", "encoder_hidden_states": "condition",
                     "added_cond_kwargs.text_embeds": "condition",
                     "added_cond_kwargs.time_ids": "condition"}
    placeholders = [n.name for n in captured.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["sample", "timestep", "encoder_hidden_states",
                            "added_cond_kwargs_text_embeds", "added_cond_kwargs_time_ids"]


def test_roles_by_name_for_transformers_and_hand_written_models():
    flux = {i.name: str(i.role) for i in zoo_captured("flux_transformer").inputs}
    assert flux["hidden_states"] == "latent" and flux["timestep"] == "timestep"
    assert {flux[k] for k in ("img_ids", "txt_ids", "guidance", "pooled_projections")} == {"condition"}
    skip = {i.name: str(i.role) for i in zoo_captured("skip_list_denoiser").inputs}
    assert skip == {"x": "latent", "t": "timestep", "cond": "condition"}


class TwoImages(nn.Module):
    """The latent is neither first nor conventionally named."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 3, 1)

    def forward(self, reference, noisy, t):
        return self.conv(torch.cat([reference, noisy], 1)) * t


def test_latent_defaults_to_first_tensor_and_can_be_named():
    args = (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.tensor(0.5))
    default = asyncfx.capture(TwoImages(), args)
    assert default.latent_input.name == "reference"
    named = asyncfx.capture(TwoImages(), args, latent="noisy")
    assert named.latent_input.name == "noisy"
    assert {i.name: str(i.role) for i in named.inputs}["reference"] == "condition"
    with pytest.raises(asyncfx.CaptureError, match="latent='image' names no tensor argument"):
        asyncfx.capture(TwoImages(), args, latent="image")


class NoiseLevel(nn.Module):
    """An EDM-style denoiser: its timestep is a noise level with a name of its own."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, noise_level, scale):
        return self.linear(x) * noise_level[:, None] + scale


class KeywordsOnly(nn.Module):
    """A wrapper that passes every argument on, as adapters and hooks do."""

    def __init__(self):
        super().__init__()
        self.inner = TwoImages()

    def forward(self, **kwargs):
        return self.inner(**kwargs)


class PassesArguments(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TwoImages()

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_timestep_can_be_named_also_among_star_args_and_star_star_kwargs():
    args = (torch.randn(2, 4), torch.full((2,), 80.0), torch.ones(2, 1))
    assert asyncfx.capture(NoiseLevel(), args).timestep_input is None
    named = asyncfx.capture(NoiseLevel(), args, timestep="noise_level")
    assert {i.name: str(i.role) for i in named.inputs} == {
        "x": "latent", "noise_level": "timestep", "scale": "condition"}
    with pytest.raises(asyncfx.CaptureError, match=r"timestep='sigma' names none of the tensor or "
                                                   r"number arguments of NoiseLevel .*: "
                                                   r"\['x', 'noise_level', 'scale'\]"):
        asyncfx.capture(NoiseLevel(), args, timestep="sigma")
    with pytest.raises(asyncfx.CaptureError, match="'x' of NoiseLevel cannot be both the latent and"):
        asyncfx.capture(NoiseLevel(), args, timestep="x")
    wrapper = KeywordsOnly()
    kwargs = dict(reference=torch.randn(1, 3, 4, 4), noisy=torch.randn(1, 3, 4, 4), t=981)
    captured = asyncfx.capture(wrapper, (), kwargs, latent="noisy")
    assert {i.name: str(i.role) for i in captured.inputs}["t"] == "timestep"
    later = {**kwargs, "t": 500}  # a number too: an input of the graph, not a constant
    assert_same_output(captured(**later), wrapper(**later))
    wrapper = PassesArguments()  # called positionally, as pipelines call pipe.unet
    args = (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), 981)
    captured = asyncfx.capture(wrapper, args, latent="args[1]", timestep="args[2]")
    assert [str(i.role) for i in captured.inputs] == ["condition", "latent", "timestep"]
    assert_same_output(captured(*args[:2], 500), wrapper(*args[:2], 500))


def test_a_compiled_model_is_refused_with_its_original_named():
    compiled = torch.compile(TwoImages())
    with pytest.raises(asyncfx.CaptureError, match="compiled with torch.compile.*its _orig_mod, a TwoImages"):
        asyncfx.capture(compiled, (torch.randn(1, 3, 4, 4),) * 2 + (torch.tensor(1.0),))
    with pytest.raises(asyncfx.CaptureError, match="compiled with torch.compile"):
        asyncfx.partition(compiled, 2)  # at once, not at the first call


def test_compiling_the_denoiser_is_refused_at_its_first_call_and_loses_nothing():
    model = TwoImages()
    args = (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.tensor(1.0))
    den = asyncfx.partition(model, 2, executor="serial")
    with pytest.raises(CompiledDenoiserError, match=r"torch.compile\(\) cannot trace an AsyncDenoiser "
                                                    r"\(of TwoImages\).*Call the denoiser uncompiled"):
        torch.compile(den, backend="eager")(*args)
    assert den.interface is None  # nothing captured, no step counted
    assert_same_output(den(*args), model(*args))


def test_hooks_that_wrap_forward_to_move_weights_are_refused():
    from accelerate import cpu_offload_with_hook

    grouped, _, kwargs = tiny.sd_unet()
    cpu = torch.device("cpu")
    grouped.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                 num_blocks_per_group=1)
    with pytest.raises(asyncfx.CaptureError, match="UNet2DConditionModel has diffusers' 'group_offloading' "
                                                   "hook wrapping its forward"):
        asyncfx.partition(grouped, 2)  # at once, not at the first call
    offloaded, _ = cpu_offload_with_hook(tiny.sd_unet()[0], execution_device="cpu")  # model offloading's
    refused = r"UNet2DConditionModel has accelerate's CpuOffload wrapping its forward.*remove_all_hooks\(\)"
    with pytest.raises(asyncfx.CaptureError, match=refused):
        asyncfx.capture(offloaded, (), kwargs)


def test_python_number_timestep_is_a_graph_input_not_a_constant():
    model, _, kwargs = zoo_example("sd_unet")
    kwargs = {**kwargs, "timestep": 981}
    captured = asyncfx.capture(model, (), kwargs)
    assert captured.timestep_input is not None
    later = {**kwargs, "timestep": 500}
    assert_same_output(captured(**later), model(**later))


def numpy_tanh(h: torch.Tensor) -> torch.Tensor:
    """A leaf function torch.export cannot trace (it leaves torch for numpy)."""
    return torch.from_numpy(np.tanh(h.detach().numpy()))


torch.fx.wrap("numpy_tanh")


class NumpyActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.outer = nn.Linear(4, 4)

    def forward(self, x, t, return_dict: bool = False):
        out = self.outer(numpy_tanh(self.inner(x)) * t)
        return {"sample": out} if return_dict else (out,)


@pytest.mark.parametrize("return_dict", [True, False])
def test_symbolic_trace_fallback_where_export_fails(return_dict):
    model, x, t = NumpyActivation(), torch.randn(2, 4), torch.tensor(2.0)
    captured = asyncfx.capture(model, (x, t), {"return_dict": return_dict})
    assert captured.method == "symbolic_trace"
    assert any(n.op == "call_module" for n in captured.graph.nodes)
    assert_same_output(captured(x, t, return_dict=return_dict), model(x, t, return_dict=return_dict))


class RotaryTable:
    """A plain object that makes its table at the first call, as Z-Image's rotary embedder."""

    def __init__(self):
        self.table = None

    def __call__(self, n: int) -> torch.Tensor:
        if self.table is None:
            self.table = torch.arange(1, n + 1, dtype=torch.float32) / n
        return self.table


class KeepsStateInPython(nn.Module):
    def __init__(self, leave_torch: bool):
        super().__init__()
        self.linear, self.rotary, self.leave_torch = nn.Linear(4, 4), RotaryTable(), leave_torch
        self.last_input, self.timesteps_seen = None, []

    def forward(self, x, t):
        self.last_input = x
        self.timesteps_seen.append(t)
        h = numpy_tanh(self.linear(x)) if self.leave_torch else self.linear(x)
        return h * self.rotary(4) * t


class StepController:
    """What prompt-to-prompt's attention controllers keep: a step counter that decides
    what the processors do, and the attention maps of the step, by layer."""

    def __init__(self):
        self.step, self.edit_until = 0, 1
        self.step_store = {"attention": []}


class CountingProcessor:
    def __init__(self, controller: StepController):
        self.controller = controller

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.controller.step < self.controller.edit_until:
            h = h * 2
        self.controller.step += 1
        self.controller.step_store["attention"].append(h.softmax(-1))
        return h


class CountsSteps(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.processor = nn.Linear(4, 4), CountingProcessor(StepController())

    def forward(self, x, t):
        return self.processor(self.linear(x)) * t


def test_python_state_that_forward_changes_is_warned_about_as_fixed_at_the_capture():
    """Every other test captures with this warning as an error (setup.cfg): no diffusers
    model, nor a table made at the first call, sets it off."""
    model, args = CountsSteps(), (torch.randn(2, 4), torch.tensor(2.0))
    with pytest.warns(asyncfx.PythonStateWarning,
                      match=r"^CountsSteps.forward changed the model's Python state while it was captured: "
                      r"processor.controller.step \(0 -> 1\)\. The captured graph runs "
                      r"no Python, so this state will not change at later calls"):
        captured = asyncfx.capture(model, args)
    assert model.processor.controller.step == 0  # put back, as torch.export does with module attributes
    assert model.processor.controller.step_store == {"attention": []}  # no traced value left, 4 levels down
    first = captured(*args)
    torch.testing.assert_close(captured(*args), first)  # the branch taken at the capture, for good
    assert model.processor.controller.step == 0
    torch.testing.assert_close(model(*args), first)  # the eager model, never traced, counts on
    assert model.processor.controller.step == 1
    torch.testing.assert_close(model(*args), first / 2)


class CountsOnItself(nn.Module):
    """A counter on the module itself, which torch.export puts back without a word."""

    def __init__(self):
        super().__init__()
        self.linear, self.calls = nn.Linear(4, 4), 0

    def forward(self, x, t):
        self.calls += 1
        return self.linear(x) * t / self.calls


class HoldsCountingModule(nn.Module):
    def __init__(self, leave_torch: bool):
        super().__init__()
        self.inner, self.leave_torch = CountsOnItself(), leave_torch

    def forward(self, x, t):
        return self.inner(numpy_tanh(x) if self.leave_torch else x, t)


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_a_counter_a_module_keeps_on_itself_is_warned_about_and_put_back(method):
    model = HoldsCountingModule(leave_torch=method == "symbolic_trace")
    args = (torch.randn(2, 4), torch.tensor(2.0))
    with pytest.warns(asyncfx.PythonStateWarning, match=r"^HoldsCountingModule.forward changed the model's "
                      r"Python state while it was captured: inner.calls \(0 -> 1\)\. The captured graph"):
        captured = asyncfx.capture(model, args)
    assert captured.method == method
    assert model.inner.calls == 0
    first = model(*args)
    torch.testing.assert_close(captured(*args), first)  # what forward computed at the capture's count
    torch.testing.assert_close(model(*args), first / 2)  # the eager model counts on


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_capture_leaves_no_traced_values_in_the_models_python_state(method):
    model = KeepsStateInPython(leave_torch=method == "symbolic_trace")
    x, t = torch.randn(2, 4), torch.tensor(2.0)
    expected = copy.deepcopy(model)(x, t)  # a model never traced
    captured = asyncfx.capture(model, (x, t))
    assert captured.method == method
    assert model.last_input is None and model.timesteps_seen == []  # as before the capture
    torch.testing.assert_close(model(x, t), expected, rtol=0, atol=0)
    torch.testing.assert_close(captured(x, t), expected, rtol=0, atol=0)
    assert torch.equal(model.rotary.table, torch.tensor([0.25, 0.5, 0.75, 1.0]))


class MemoisedTable(nn.Module):
    """A rotary table memoised with functools.lru_cache on the method, as NucleusMoE's is:
    the cache lives on the class, outside the module's state."""

    def __init__(self):
        super().__init__()
        self.linear, self.base = nn.Linear(4, 4), torch.arange(1.0, 5.0)  # a plain tensor attribute

    @functools.lru_cache(maxsize=8)
    def table(self, n: int) -> torch.Tensor:
        return self.base[:n] / n

    def forward(self, x, t):
        return self.linear(x) * self.table(4) * t


def test_a_method_cache_filled_while_capturing_is_cleared():
    model, args = MemoisedTable(), (torch.randn(2, 4), torch.tensor(2.0))
    expected = copy.deepcopy(model)(*args)
    MemoisedTable.table.cache_clear()
    captured = asyncfx.capture(model, args)
    assert MemoisedTable.table.cache_info().currsize == 0  # else it would hand out the traced table
    torch.testing.assert_close(model(*args), expected, rtol=0, atol=0)
    assert MemoisedTable.table.cache_info().currsize == 1  # the eager call filled it again
    captured_again = asyncfx.capture(model, args)  # a trace that only reads the cache keeps it
    assert MemoisedTable.table.cache_info().currsize == 1
    for graph in (captured, captured_again):
        torch.testing.assert_close(graph(*args), expected, rtol=0, atol=0)


def test_forward_hooks_are_warned_about_as_running_only_while_capturing():
    model, args = TwoImages(), (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.tensor(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncfx.capture(model, args)  # no hooks, no warning
    kept = []
    model.conv.register_forward_hook(lambda module, inputs, output: kept.append(output))
    with pytest.warns(UserWarning, match="TwoImages has forward hooks on conv: they run once, while the "
                                         "model is captured"):
        captured = asyncfx.capture(model, args)
    captured(*args)
    assert len(kept) == 1  # the trace's call only


class NumpyActivationMasked(NumpyActivation):
    def forward(self, x, t):
        h = numpy_tanh(self.inner(x))
        h.mul_(0.5)  # an in-place write to an intermediate
        return self.outer(h) * t


def test_symbolic_trace_fallback_refuses_in_place_writes():
    with pytest.raises(asyncfx.CaptureError) as info:
        asyncfx.capture(NumpyActivationMasked(), (torch.randn(2, 4), torch.tensor(2.0)))
    message = str(info.value)
    assert "symbolic_trace fallback failed too" in message
    assert "writes to intermediate values in place (mul_)" in message and "out of place" in message


class TableWrittenThroughData(nn.Module):
    def forward(self, x):
        table = x.new_zeros(1, 4)
        table.data[:, 2:].copy_(torch.ones(2))  # as CogVideoX's patch embedding at other sizes
        return table


class UntraceableTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.table = TableWrittenThroughData()

    def forward(self, x, t):  # symbolic_trace cannot take len() of a traced shape:
        assert len(t.shape) == 0
        return self.linear(x + self.table(x)) * t


def test_each_capture_failure_is_reported_where_it_happened():
    with pytest.raises(asyncfx.CaptureError) as info:
        asyncfx.capture(UntraceableTable(), (torch.randn(2, 4), torch.tensor(2.0)))
    message = str(info.value)
    export, trace = message.split("; the torch.fx.symbolic_trace fallback failed too")
    assert "torch.export failed with RuntimeError" in export and "len(t.shape)" not in export
    assert "test_capture.py" in trace and "`assert len(t.shape) == 0`" in trace
    assert "module 'table' makes a tensor in forward" in trace and "tensor.data" in trace


class BranchOnLengths(nn.Module):
    """Masks attention only when the prompts' lengths differ (as Lumina 2 does)."""

    def forward(self, x, t, mask):
        lengths = mask.sum(1).tolist()
        if len(set(lengths)) > 1:
            return x * mask[..., None] * t
        return x * t


class SpreadsNone(nn.Module):
    """Spreads a missing options dict into a block, as LuminaNext's attention does with
    ``cross_attention_kwargs=None``: Python's message starts with the block's repr."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x, t, options=None):
        return self.block(x, **options) * t


def test_an_error_message_over_several_lines_is_summed_up_by_its_first_and_last():
    with pytest.raises(asyncfx.CaptureError, match=r"with TypeError: Sequential\(\.\.\.\) argument "
                                                   r"after \*\* must be a mapping, not NoneType"):
        asyncfx.capture(SpreadsNone(), (torch.randn(2, 4), torch.tensor(1.0)))


def test_values_read_into_python_get_the_data_dependent_advice():
    args = (torch.randn(2, 5, 4), torch.tensor(1.0), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(asyncfx.CaptureError, match=r"(?s)cannot capture BranchOnLengths.*"
                                                   r"len\(set\(lengths\)\).*x.tolist\(\)"):
        asyncfx.capture(BranchOnLengths(), args)


class PicksTokensByMask(nn.Module):
    """Mochi's and GLM-Image's ways with masks: the valid prompt tokens picked with nonzero,
    the dropped prior embeddings zeroed through a boolean index."""

    def __init__(self):
        super().__init__()
        self.embed, self.linear, self.out = nn.Embedding(8, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, t, mask, ids, drop):
        prior = self.embed(ids)
        prior[drop] *= 0.0
        valid = torch.nonzero(mask[0]).flatten()
        h = torch.tanh(self.linear(x + prior))
        context = h[:, valid].mean(1, keepdim=True)
        return x + self.out(torch.tanh(h + context)) * t


def _mask_inputs(valid: list[int], dropped: list[int]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (1, 5), generator=generator)
    return (torch.randn(1, 5, 4, generator=generator), torch.tensor(0.9), torch.tensor([valid]), ids,
            torch.tensor([dropped], dtype=torch.bool))


def test_sizes_that_depend_on_mask_values_stay_inside_stages():
    model, args = PicksTokensByMask().eval(), _mask_inputs([1, 1, 0, 1, 0], [0, 1, 0, 0, 1])
    captured = asyncfx.capture(model, args)
    nodes = {node.name: node for node in captured.graph.nodes}
    order = latent_order(captured.graph)
    selections = [n for n in order if has_data_dependent_size(n.meta["val"])]
    assert selections, "the latent selection h[:, valid] keeps its symbolic size"
    for p in cut_positions(order):  # no cut lets a symbolic size cross
        crossing = {v for v in order[:p] for user in v.users if user in order[p:]}
        assert not crossing & set(selections)
    most = len(cut_positions(order)) + 1
    assert most > 2
    plan = asyncfx.compile(captured, most)
    assert all(not has_data_dependent_size(nodes[b.name].meta["val"]) for b in plan.boundaries)
    with torch.no_grad():
        torch.testing.assert_close(asyncfx.split(captured, plan)(*args), model(*args), rtol=0, atol=0)
        other = _mask_inputs([1, 0, 0, 0, 1], [1, 1, 1, 0, 0])  # another count: the same graph
        torch.testing.assert_close(captured(*other), model(*other), rtol=0, atol=0)
        _check_warm_up_then_stale(model, captured, [
            (args[0] * (1 - 0.1 * step), torch.tensor(0.9 - 0.1 * step), *other[2:]) for step in range(3)])


def _check_warm_up_then_stale(model: nn.Module, captured: asyncfx.Captured, calls: list[tuple]) -> None:
    """``captured`` in two stages, serial and local: the first call (warm-up) computes what
    ``model`` does, the later ones read stale values, and local computes what serial does."""
    serial, local = (asyncfx.partition(captured, 2, warmup=1, executor=e) for e in ("serial", "local"))
    try:
        for step, call in enumerate(calls):
            expected, got = model(*call), serial(*call)
            torch.testing.assert_close(local(*call), got, rtol=0, atol=0)
            assert torch.equal(got, expected) == (step == 0), step
    finally:
        local.close()


class KeepsTheLatentTokens(nn.Module):
    """FramePack's way: the valid prompt tokens (a count read from the mask) join the
    latent tokens for a block, which splits them off again; the latent part's size is one
    torch.export cannot prove fixed."""

    def __init__(self):
        super().__init__()
        self.pre, self.mix = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, t, context, mask):
        text = context[:, :mask.sum(dim=1, dtype=torch.int)[0]]
        h = torch.tanh(self.pre(torch.tanh(self.pre(x))))  # fixed sizes: cuts may go here
        joint = torch.tanh(self.mix(torch.cat([h, text], 1)))
        joint = joint + joint.mean(1, keepdim=True)
        return torch.tanh(self.mix(joint[:, :-text.shape[1]])) * t


def test_an_output_of_a_size_export_cannot_prove_takes_the_examples_size():
    model, x, context = KeepsTheLatentTokens().eval(), torch.randn(1, 6, 4), torch.randn(1, 5, 4)
    captured = asyncfx.capture(model, (x, torch.tensor(1.0), context, torch.tensor([[1, 1, 1, 0, 0]])))
    (output,) = captured.graph.output_node().args[0]
    assert output.target is expect_shape and tuple(output.meta["val"].shape) == (1, 6, 4)
    with torch.no_grad():
        for step, valid in enumerate(([1, 1, 1, 0, 0], [1, 1, 0, 0, 0])):  # another count: the same size
            args = (x * (1 - 0.1 * step), torch.tensor(0.9 - 0.1 * step), context, torch.tensor([valid]))
            torch.testing.assert_close(captured(*args), model(*args), rtol=0, atol=0)
        _check_warm_up_then_stale(model, captured, [
            (x * (1 - 0.1 * step), torch.tensor(0.9 - 0.1 * step), context, torch.tensor([valid]))
            for step in range(3)])


class ReturnsValidTokens(nn.Module):
    def forward(self, x, t, mask):
        return x[:, mask[0].bool()] * t


def test_an_output_whose_shape_changes_with_values_is_a_clear_error_at_the_call():
    model, x = ReturnsValidTokens(), torch.randn(1, 5, 4)
    captured = asyncfx.capture(model, (x, torch.tensor(1.0), torch.tensor([[1, 1, 0, 1, 0]])))
    torch.testing.assert_close(captured(x, torch.tensor(0.5), torch.tensor([[0, 1, 1, 1, 0]])),
                               model(x, torch.tensor(0.5), torch.tensor([[0, 1, 1, 1, 0]])))  # 3 again
    with pytest.raises(asyncfx.OutputShapeError) as info:
        captured(x, torch.tensor(1.0), torch.tensor([[1, 1, 1, 1, 0]]))
    message = str(info.value)
    assert message.startswith("output 0 of ReturnsValidTokens.forward (aten.mul.Tensor at test_capture.py:")
    assert ("`return x[:, mask[0].bool()] * t`) has shape (1, 4, 4) at this call but (1, 3, 4) at the call"
            in message)
    assert "keep the output's shape fixed in the model" in message.lower()


def test_captures_record_source_lines_only_where_an_output_is_pinned():
    """Export's per-node source lines cost a third of a capture; only a graph with a pinned
    output (above) keeps them, for its error. torch.fx's switch is put back."""
    graph = zoo_captured("sd_unet").graph
    assert not any(node.meta.get("stack_trace") for node in graph.nodes)
    assert any(node.meta.get("nn_module_stack") for node in graph.nodes)  # module paths stay
    assert torch.fx.config.do_not_emit_stack_traces is False
    model, x = ReturnsValidTokens(), torch.randn(1, 5, 4)
    pinned = asyncfx.capture(model, (x, torch.tensor(1.0), torch.tensor([[1, 1, 0, 1, 0]]))).graph
    assert any("test_capture.py" in (node.meta.get("stack_trace") or "") for node in pinned.nodes)


class BranchOnValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, t):
        if x.sum() > 0:
            return self.linear(x) * t
        return x


def test_model_branching_on_tensor_value_is_a_clear_capture_error():
    with pytest.raises(asyncfx.CaptureError) as info:
        asyncfx.capture(BranchOnValue(), (torch.randn(2, 4), torch.tensor(1.0)))
    message = str(info.value)
    assert "cannot capture BranchOnValue" in message
    assert "test_capture.py" in message and "if x.sum() > 0:" in message
    assert "symbolic_trace fallback failed too" in message and "torch.cond" in message
    assert info.value.__cause__ is not None


def test_buffer_mutation_in_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train()
    with pytest.raises(asyncfx.CaptureError,
                       match=r"writes to buffers or inputs .*num_batches_tracked.*model.eval\(\)"):
        asyncfx.capture(model, (torch.randn(2, 3, 4, 4),))


def test_calls_that_differ_from_the_capture_are_refused():
    model, args, kwargs = zoo_example("skip_list_denoiser")
    captured = zoo_captured("skip_list_denoiser")
    x, t, cond = args
    with pytest.raises(asyncfx.InputMismatchError, match=r"input 'x' .* float32\[4, 3, 8, 8\] .*"
                                                         r"captured for float32\[2, 3, 8, 8\]"):
        captured(torch.randn(4, 3, 8, 8), t, cond)
    with pytest.raises(asyncfx.InputMismatchError, match="input 't' .* must be a tensor"):
        captured(x, "five", cond)
    with pytest.raises(asyncfx.InputMismatchError,
                       match=r"arguments \['x', 't', 'cond'\] but is called with "
                             r"\['x', 't\[0\]', 't\[1\]', 'cond'\]"):
        captured(x, [5, 5], cond)
    sd, sd_args, sd_kwargs = zoo_example("sd_unet")
    with pytest.raises(asyncfx.InputMismatchError, match="'return_dict' .* True at capture"):
        zoo_captured("sd_unet")(*sd_args, **sd_kwargs, return_dict=False)


def test_non_module_is_refused():
    with pytest.raises(asyncfx.CaptureError, match="needs a torch.nn.Module"):
        asyncfx.capture(lambda x: x, (torch.randn(2),))


def test_fingerprint_depends_on_shapes_not_on_weights():
    model, args, kwargs = zoo_example("skip_list_denoiser")
    other_weights = type(model)(channels=8, depth=3, cond_dim=6).eval()
    same = asyncfx.capture(other_weights, args, kwargs)
    assert same.fingerprint == zoo_captured("skip_list_denoiser").fingerprint
    bigger = asyncfx.capture(model, (torch.randn(2, 3, 16, 16), *args[1:]))
    assert bigger.fingerprint != same.fingerprint


def test_inputs_the_model_rejects_get_input_advice():
    model, _, kwargs = zoo_example("sd3_transformer")
    with pytest.raises(asyncfx.CaptureError) as info:
        asyncfx.capture(model, (), {**kwargs, "timestep": torch.tensor(500.0)})  # 0-d, needs 1-d
    message = str(info.value)
    assert "Timesteps should be a 1d-array" in message and "embeddings.py" in message
    assert "cannot run on this call's arguments" in message and "timestep float32[]" in message
    assert "branches on a tensor's value" not in message


def _bad_sd_calls() -> dict[str, tuple[dict, str]]:
    """Calls of the tiny SD UNet that do not fit it, and what the error must quote."""
    _, _, kwargs = zoo_example("sd_unet")
    sample, text = kwargs["sample"], kwargs["encoder_hidden_states"]
    return {"dtype": ({"sample": sample.double()}, "sample float64[2, 4, 8, 8]"),
            "channels": ({"sample": sample[:, :3]}, "expected input[2, 3, 8, 8] to have 4 channels"),
            "batches": ({"sample": torch.cat([sample, sample[:1]])}, "sample float32[3, 4, 8, 8]"),
            "3-D latent": ({"sample": sample[0]}, "sample float32[4, 8, 8]"),
            "empty batch": ({"sample": sample[:0], "encoder_hidden_states": text[:0]},
                            "encoder_hidden_states float32[0, 4, 8]")}


@pytest.mark.parametrize("case", list(_bad_sd_calls()))
def test_a_call_the_model_refuses_is_one_line_naming_the_arguments_without_the_fallbacks_noise(case, caplog):
    model, _, kwargs = zoo_example("sd_unet")
    changed, quoted = _bad_sd_calls()[case]
    with (pytest.raises(asyncfx.CaptureError) as info,
          caplog.at_level("DEBUG", "torch._subclasses.fake_tensor")):
        asyncfx.capture(model, (), {**kwargs, **changed})
    assert "failed while attempting to run meta" not in caplog.text  # torch's traceback of it, not shown
    message = str(info.value)
    assert message.startswith("UNet2DConditionModel cannot run on this call's arguments")
    assert quoted in message and "timestep int64[]" in message
    assert "\n" not in message and "symbolic_trace" not in message and "Proxy" not in message


class _Keys:
    """A layer's cached keys, with a number that is part of the call's structure."""

    def __init__(self, key: torch.Tensor):
        self.key, self.tokens = key, key.shape[-1]


class _Cache:
    def __init__(self, layers: list):
        self.layers, self.note = layers, None


class _ReadsACache(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, sample, timestep, cache):
        return self.proj(sample) * timestep + cache.layers[0].key.mean(-1, keepdim=True)


class _MakesACache(nn.Module):
    def forward(self, sample, timestep):
        return sample * timestep, _Cache([_Keys(sample.sum(0, keepdim=True))])


def test_objects_holding_tensors_are_refused_until_their_classes_are_registered():
    unregistered = type("_UnregisteredCache", (_Cache,), {})
    cache = unregistered([type("_UnregisteredKeys", (_Keys,), {})(torch.randn(2, 3))])
    with pytest.raises(asyncfx.CaptureError, match=r"argument 'cache' of _ReadsACache is a "
                       r"_UnregisteredCache, an object holding tensors.*"
                       r"register_tensor_container\(_UnregisteredCache\); "
                       r"asyncfx.register_tensor_container\(_UnregisteredKeys\)"):
        asyncfx.capture(_ReadsACache(), (torch.randn(2, 3), torch.tensor(0.5), cache))
    empty = type("_UnregisteredEmptyCache", (_Cache,), {})([])  # a cache the call would fill
    with pytest.raises(asyncfx.CaptureError, match=r"argument 'cache' of _ReadsACache is a "
                       r"_UnregisteredEmptyCache, an object of a class torch.export does not know.*"
                       r"or the call fills it with some \(a cache\).*"
                       r"asyncfx.register_tensor_container\(_UnregisteredEmptyCache\) \(from test_capture\)"):
        asyncfx.capture(_ReadsACache(), (torch.randn(2, 3), torch.tensor(0.5), empty))
    with pytest.raises(asyncfx.CaptureError, match=r"_MakesACache.forward returns a _Cache .*"
                       r"register_tensor_container\(_Cache\)"):
        asyncfx.capture(_MakesACache(), (torch.randn(2, 3), torch.tensor(0.5)))
    with pytest.raises(TypeError, match="takes a plain Python class"):
        asyncfx.register_tensor_container(nn.Linear)


def test_a_registered_objects_tensors_are_inputs_and_outputs_of_the_graph():
    asyncfx.register_tensor_container(_Cache)
    asyncfx.register_tensor_container(_Keys)
    asyncfx.register_tensor_container(_Keys)  # again: nothing happens
    model, sample = _ReadsACache(), torch.randn(2, 3)
    captured = asyncfx.capture(model, (sample, torch.tensor(0.5), _Cache([_Keys(torch.randn(2, 3))])))
    assert [(i.name, str(i.role)) for i in captured.inputs] == [
        ("sample", "latent"), ("timestep", "timestep"), ("cache.layers[0].key", "condition")]
    other = _Cache([_Keys(torch.randn(2, 3))])  # another call's cache: read, not baked in
    torch.testing.assert_close(captured(sample, torch.tensor(0.5), other),
                               model(sample, torch.tensor(0.5), other))
    changed = _Cache([_Keys(torch.randn(2, 3))])
    changed.layers[0].tokens = 4
    with pytest.raises(asyncfx.InputMismatchError, match=r"objects among them hold other non-tensor values"):
        captured(sample, torch.tensor(0.5), changed)

    made = asyncfx.capture(_MakesACache(), (sample, torch.tensor(0.5)))
    out, cache = made(sample, torch.tensor(0.25))
    assert type(cache) is _Cache and type(cache.layers[0]) is _Keys and cache.note is None
    assert cache.layers[0].tokens == 3
    torch.testing.assert_close(cache.layers[0].key, sample.sum(0, keepdim=True))
    torch.testing.assert_close(out, sample * 0.25)


def test_a_call_a_model_built_without_weights_refuses_is_one_line_too():
    """The model runs on fake weights for the check: nothing is computed, nothing loaded."""
    import accelerate
    from diffusers import UNet2DConditionModel

    model, _, kwargs = zoo_example("sd_unet")
    with accelerate.init_empty_weights():
        empty = UNet2DConditionModel.from_config(model.config)
    refused = r"^UNet2DConditionModel cannot run on this call's arguments: .*expected input\[2, 3, 8, 8\]"
    with pytest.raises(asyncfx.CaptureError, match=refused):
        asyncfx.capture(empty, (), {**kwargs, "sample": kwargs["sample"][:, :3]})
    assert all(p.is_meta for p in empty.parameters())


def test_a_capture_generates_code_only_for_the_graph_that_runs(monkeypatch):
    """The intermediate GraphModules of a capture (export's, unlift's, the normalised
    graph's before pinning) never run: their Python code is generated when first run or
    read. Only the exported program's own module makes its code as it is built."""
    generated = []
    python_code = torch.fx.Graph.python_code

    def counting(graph, *args, **kwargs):
        generated.append(graph)
        return python_code(graph, *args, **kwargs)

    model, args, kwargs = zoo_example("sd_unet")
    monkeypatch.setattr(torch.fx.Graph, "python_code", counting)
    captured = asyncfx.capture(model, args, kwargs)
    assert len(generated) == 1 and generated[0] is not captured.graph
    assert_same_output(captured(*args, **kwargs), model(*args, **kwargs))  # its code made at its first run
    assert len(generated) == 2 and generated[1] is captured.graph
    assert "def forward" in captured.graph_module.code
    assert len(generated) == 2
