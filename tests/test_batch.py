"""Batch separability (``passes.batch``): proven from the graph, checked numerically, and
refused with the node named where a model mixes its samples."""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import asyncfx
from asyncfx.errors import PlanError
from asyncfx.partitioner.layouts import candidate_layouts, separability
from asyncfx.program import Layout
from tests.conftest import zoo_captured, zoo_example


def perturbed(example: tuple, names: set[int], sample: int) -> tuple:
    """The example with ``sample`` of every tensor in ``names`` (ids) changed."""
    def change(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in names:
            return t
        t = t.clone()
        t[sample] = t[sample] + 0.5 if t.is_floating_point() else t[sample] + 1
        return t
    return pytree.tree_map_only(torch.Tensor, change, example)


@pytest.mark.parametrize("name, batched", [
    ("sd_unet", ("sample", "encoder_hidden_states")),
    ("dit_transformer", ("hidden_states", "timestep", "class_labels")),
])
def test_zoo_models_are_separable_and_each_output_sample_moves_only_with_its_own(name, batched):
    captured = zoo_captured(name)
    found = separability(captured)
    assert found.separable and found.batch == 2 and found.inputs == batched
    model, args, kwargs = zoo_example(name)
    flat = captured.call.flatten(args, kwargs)
    ids = {id(t) for t, n in zip(flat, captured.call.names) if n in batched}
    with torch.no_grad():
        before = captured(*args, **kwargs)
        after = captured(*perturbed((args, kwargs), ids, 1)[0], **perturbed((args, kwargs), ids, 1)[1])
    before, after = pytree.tree_leaves(before)[0], pytree.tree_leaves(after)[0]
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert (after[1] - before[1]).abs().max() > 1e-3


class BatchNormalising(nn.Module):
    """Normalises its features over the batch: each sample's output depends on the others."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = Centred()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)) * t[:, None, None, None]


class Centred(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - h.mean(dim=0, keepdim=True)


class PositionInBatch(nn.Module):
    """Adds each sample's position in the batch: separable by data, not by shape."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * t[:, None, None, None] + torch.arange(x.shape[0], dtype=x.dtype)[:, None, None, None]


class FramesInBatch(nn.Module):
    """Folds frames into the batch, ``(b f) c h w``, and back: separable, in blocks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[:2]
        h = self.conv(x.reshape(b * f, *x.shape[2:])) * t.repeat_interleave(f)[:, None, None, None]
        return h.reshape(b, f, *h.shape[1:]) + torch.arange(f, dtype=x.dtype)[:, None, None, None]


def video_inputs():
    return torch.randn(2, 3, 3, 4, 4), torch.tensor([3.0, 5.0])


def test_a_model_that_normalises_over_the_batch_is_not_separable_and_the_node_is_named():
    model, args = BatchNormalising().eval(), (torch.randn(2, 3, 4, 4), torch.tensor([1.0, 2.0]))
    captured = asyncfx.capture(model, args, {})
    found = separability(captured)
    assert not found.separable
    assert "node 'mean'" in found.failure and "module 'norm'" in found.failure
    assert "reduces over the batch dimension" in found.failure
    assert candidate_layouts(4, found) == [Layout(1, 4)]
    with pytest.raises(PlanError, match=r"layout 2x1 splits the batch .* does not compute its samples "
                                        r"separately: node 'mean' .*module 'norm'.* Use layout='1x2'"):
        asyncfx.partition(model, 2, layout="2x1", example_inputs=args)
    denoiser = asyncfx.partition(model, 2, example_inputs=args, rebalance=False)  # the choice never splits it
    assert denoiser.layout == Layout(1, 2)
    denoiser.close()


def test_a_model_that_reads_the_samples_position_is_not_separable():
    captured = asyncfx.capture(PositionInBatch(), (torch.randn(2, 3, 4, 4), torch.tensor([1.0, 2.0])), {})
    failure = separability(captured).failure
    assert failure is not None and "depends on the sample's position in it" in failure


def test_frames_folded_into_the_batch_stay_separable():
    model, args = FramesInBatch().eval(), video_inputs()
    captured = asyncfx.capture(model, args, {})
    found = separability(captured)
    assert found.separable and found.inputs == ("x", "t")
    denoiser = asyncfx.partition(model, 2, layout="2x1", executor="serial", example_inputs=args)
    with torch.no_grad():
        halves = torch.cat([model(args[0][i:i + 1], args[1][i:i + 1]) for i in range(2)])
        torch.testing.assert_close(denoiser(*args), halves, rtol=0, atol=0)


@pytest.mark.parametrize("layout, message", [
    ("2by2", r"a layout is written 'GxN'"),
    ("0x4", r"a layout is written 'GxN'"),
    ("2x2", r"layout 2x2 runs 2 batch group\(s\) of 2 stage\(s\), 4 devices, but n_devices=3"),
])
def test_bad_layouts_are_refused_with_the_fix(layout, message):
    with pytest.raises(PlanError, match=message):
        asyncfx.partition(nn.Linear(2, 2), 3, layout=layout)


def test_a_capture_cannot_be_split_into_batch_groups():
    with pytest.raises(PlanError, match=r"layout 2x2 splits the batch over 2 groups, which captures the "
                                        r"model again .* partition the model itself, or use layout='1x4'"):
        asyncfx.partition(zoo_captured("sd_unet"), 4, layout="2x2")


def test_a_batch_that_does_not_divide_into_the_groups_is_refused():
    model, args = FramesInBatch().eval(), video_inputs()
    with pytest.raises(PlanError, match=r"layout 4x1 splits the batch over 4 groups, but the call's batch "
                                        r"is 2"):
        asyncfx.partition(model, 4, layout="4x1", example_inputs=args)


def test_calls_of_one_sample_each_leave_nothing_to_split():
    """A pipeline that makes its conditional and unconditional calls apart gains nothing
    from batch groups, and the choice sees that from the call's batch."""
    model, (x, t) = FramesInBatch().eval(), video_inputs()
    denoiser = asyncfx.partition(model, 2, example_inputs=(x[:1], t[:1]), rebalance=False)
    assert denoiser.layout == Layout(1, 2) and not any(n.startswith("layout ") for n in denoiser.plan.notes)
    denoiser.close()


class Ops(nn.Module):
    """One op on a latent ``x`` of shape (2, 3, 4) and its timestep ``t`` of shape (2,)."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.op(x * t[:, None, None])


@pytest.mark.parametrize("op, failure", [
    (lambda x: torch.einsum("bij,bkj->bik", x, x), None),                    # per-sample attention scores
    (lambda x: torch.bmm(x, x.transpose(1, 2)).softmax(-1), None),
    (lambda x: x.flatten(1).unflatten(1, (3, 4)), None),
    (lambda x: torch.einsum("bij,cij->bc", x, x)[:, :1, None].expand(2, 3, 4), "contracts over the batch"),
    (lambda x: x.softmax(0), "over the batch dimension"),
    (lambda x: torch.cat([x[:1], x[1:]]), "takes part of the batch"),
    (lambda x: x.flip(0), "has no batch rule"),
    (lambda x: x.reshape(3, 2, 4), "splits the batch over several dimensions"),
])
def test_each_op_moves_the_batch_by_its_rule_or_is_refused(op, failure):
    captured = asyncfx.capture(Ops(op), (torch.randn(2, 3, 4), torch.tensor([1.0, 2.0])), {})
    found = separability(captured)
    assert found.failure is None if failure is None else failure in found.failure, found.failure


class SingleSampleShortcut(nn.Module):
    """Takes another path for a batch of one: separable, but not the same graph at a
    group's batch."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x * t[:, None, None] * 2
        return (x + x) * t[:, None, None]


def test_a_model_that_runs_other_ops_at_a_groups_batch_is_left_on_stages():
    model, args = SingleSampleShortcut(), (torch.randn(2, 3, 4), torch.tensor([1.0, 2.0]))
    with pytest.raises(PlanError, match=r"layout 2x1 cannot split the batch: at the group's batch "
                                        r"SingleSampleShortcut runs other ops than at the whole batch"):
        asyncfx.partition(model, 2, layout="2x1", example_inputs=args)
    denoiser = asyncfx.partition(model, 2, example_inputs=args, rebalance=False, executor="serial")
    assert denoiser.layout == Layout(1, 2)
    assert "layout 2x1 left out: layout 2x1 cannot split the batch" in denoiser.plan.notes[-1]
