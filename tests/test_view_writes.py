"""The view-writes pass: writes into slices of a fresh tensor as new values, and the writes
it leaves to torch's rewrite."""
from __future__ import annotations

import pytest
import torch

import asyncfx
from asyncfx.passes.copy_graph import copy_graph
from asyncfx.passes.functionalise import in_place_ops
from asyncfx.passes.unlift import unlift
from asyncfx.passes.view_writes import rewrite_view_writes
from conftest import assert_same_output


class WritesIntoSlices(torch.nn.Module):
    """FreeU's and HunyuanVideo's kinds of write: a mask filled in slices and in one
    element column, a slice of a value scaled in place and read after, and a whole value
    written in place."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.first(x) + t
        mask = torch.ones_like(h)
        mask[:, 1:3] = 0.5
        mask[:2, :][:, 0] = 2.0
        h[:, 2:] *= 3.0
        h.sub_(1.0)
        return self.second(h * mask) + h


class ReadsAViewAfterTheWrite(torch.nn.Module):
    """A view made before a write and read after it must see the write: left to torch."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = x * t
        front = h[:, :3]
        h[:, 2:] = 0.0
        return front.sum(-1, keepdim=True) + h


class WritesThroughAConversion(torch.nn.Module):
    """``to`` its own dtype returns its input itself, whose write the reads after see (as
    HunyuanVideo's token refiner fills its mask); ``to`` another dtype makes a new tensor,
    whose write the input does not see."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = x * t
        mask = h.to(torch.float32)
        mask[:, 0] = 1.0
        copied = h.to(torch.float64)
        copied[:, 1] = 2.0
        return h + mask + copied.float()


class WritesThroughATranspose(torch.nn.Module):
    """A view no scatter inverts: left to torch."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = x * t
        h.t()[0] = 1.0
        return h + 1


class WritesAPromotedValue(torch.nn.Module):
    """A half tensor multiplied in place by a float one stays half; out of place it would be
    float: left to torch."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = (x * t).half()
        h[:, :2].mul_(x[:, :2])
        return h.float() + 1


def _graph(model: torch.nn.Module, args: tuple) -> torch.fx.Graph:
    return copy_graph(unlift(torch.export.export(model, args, strict=False)))


ARGS = (torch.randn(3, 4), torch.tensor(0.5))


@pytest.mark.parametrize("model", [WritesIntoSlices(), WritesThroughAConversion()],
                         ids=lambda m: type(m).__name__)
def test_writes_into_slices_of_a_fresh_tensor_become_scatters_that_compute_the_same(model):
    graph = _graph(model.eval(), ARGS)
    assert in_place_ops(graph)
    assert rewrite_view_writes(graph)
    assert in_place_ops(graph) == []
    targets = {node.target for node in graph.nodes}
    assert torch.ops.aten.select_scatter.default in targets
    captured = asyncfx.capture(model, ARGS)
    assert in_place_ops(captured.graph) == []
    assert_same_output(captured(*ARGS), model(*ARGS))


def test_a_slice_scaled_in_place_is_a_write_and_a_copy_both_rewritten():
    graph = _graph(WritesIntoSlices().eval(), ARGS)
    assert len(in_place_ops(graph)) == 5  # `h[:, 2:] *= 3` is a mul_ and a copy_ into the slice
    assert rewrite_view_writes(graph)
    assert torch.ops.aten.slice_scatter.default in {node.target for node in graph.nodes}


@pytest.mark.parametrize("model", [ReadsAViewAfterTheWrite(), WritesThroughATranspose(),
                                   WritesAPromotedValue()], ids=lambda m: type(m).__name__)
def test_a_write_another_view_would_see_or_no_scatter_inverts_is_left_to_torch(model):
    assert not rewrite_view_writes(_graph(model, ARGS))
    captured = asyncfx.capture(model, ARGS)  # torch's rewrite, the same numbers
    assert in_place_ops(captured.graph) == []
    assert_same_output(captured(*ARGS), model(*ARGS))
