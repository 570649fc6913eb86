"""The estimate_cost pass: FLOPs and bytes from shapes alone."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import asyncfx
from asyncfx.passes import estimate_cost
from asyncfx.passes.meta import BYTES, FLOPS
from test_capture import NumpyActivation


class ConvLinearAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.linear = nn.Linear(8, 16)

    def forward(self, x):
        pooled = torch.relu(self.conv(x)).mean((2, 3))
        q = self.linear(pooled)[:, None, None, :].expand(2, 2, 4, 16)
        return nn.functional.scaled_dot_product_attention(q, q, q)


def test_flops_and_bytes_match_hand_counts():
    captured = asyncfx.capture(ConvLinearAttention(), (torch.randn(2, 3, 8, 8),))
    total = estimate_cost(captured.graph_module)
    by_target = {str(n.target): n for n in captured.graph.nodes if n.op == "call_function"}
    conv = by_target["aten.conv2d.default"]
    assert conv.meta[FLOPS] == 2 * 8 * 3 * 3 * 3 * (2 * 8 * 8)      # 2 * Cout * Cin * k * k * outputs
    assert conv.meta[BYTES] == 4 * (2 * 3 * 64 + 8 * 3 * 9 + 8 + 2 * 8 * 64)  # input, weight, bias, out
    assert by_target["aten.linear.default"].meta[FLOPS] == 2 * 2 * 8 * 16
    attention = by_target["aten.scaled_dot_product_attention.default"]
    assert attention.meta[FLOPS] == 2 * (2 * 2 * 2 * 4 * 4 * 16)   # QK^T and AV
    assert by_target["aten.relu.default"].meta[FLOPS] == 0
    assert by_target["aten.relu.default"].meta[BYTES] == 2 * 4 * 2 * 8 * 64
    assert total == sum(n.meta[FLOPS] for n in captured.graph.nodes)


def test_nodes_that_cannot_run_on_fake_tensors_are_costed_by_bytes_with_a_warning():
    captured = asyncfx.capture(NumpyActivation(), (torch.randn(2, 4), torch.tensor(2.0)))
    with pytest.warns(UserWarning, match="numpy_tanh.* cannot run on fake tensors"):
        estimate_cost(captured.graph_module)
    leaf = next(n for n in captured.graph.nodes if "numpy_tanh" in n.name)
    assert leaf.meta[FLOPS] == 0 and leaf.meta[BYTES] == 2 * 2 * 4 * 4


class SplitsAmongExperts(nn.Module):
    """Tokens split among experts by counts read with tolist(), as NucleusMoE's loop does,
    padded back to the input's length."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(2, 4, 4))
        self.out = nn.Linear(4, 4)

    def forward(self, x, t, counts):
        sizes = counts.tolist()
        routed = sum(sizes)
        parts = torch.split(x[:routed], sizes)
        mixed = torch.cat([part @ expert for part, expert in zip(parts, self.experts)])
        mixed = torch.vstack((mixed, mixed.new_zeros(x.shape[0] - routed, 4)))
        return self.out(mixed * x) * t


def test_sizes_that_depend_on_values_are_counted_at_their_bound_and_leave_later_nodes_their_shapes():
    args = (torch.randn(6, 4), torch.tensor(1.0), torch.tensor([2, 3]))
    captured = asyncfx.capture(SplitsAmongExperts(), args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every node runs on fake tensors, none is guessed
        estimate_cost(captured.graph_module)
    by_target = {}
    for node in captured.graph.nodes:
        by_target.setdefault(str(node.target), []).append(node)
    (linear,) = by_target["aten.linear.default"]
    assert linear.meta[FLOPS] == 2 * 6 * 4 * 4  # after the padding: the captured shape
    experts = by_target["aten.matmul.default"]
    assert len(experts) == 2 and all(node.meta[FLOPS] > 0 for node in experts)


@torch.library.custom_op("asyncfx_tests::halve", mutates_args=())
def halve(x: torch.Tensor) -> torch.Tensor:
    return x / 2


#: The shapes the custom op's fake kernel was called with.
HALVE_FAKE_CALLS: list[torch.Size] = []


@halve.register_fake
def _halve_fake(x: torch.Tensor) -> torch.Tensor:
    HALVE_FAKE_CALLS.append(x.shape)
    return torch.empty_like(x)


class Halving(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(halve(x))


def test_only_nodes_that_can_count_flops_run_and_the_others_are_costed_from_their_recorded_values():
    """An op without a FLOP formula that does not decompose counts none: the estimate does
    not run it; the node that reads it gets a fake tensor shaped like its recorded value."""
    captured = asyncfx.capture(Halving(), (torch.randn(2, 4),))
    HALVE_FAKE_CALLS.clear()
    total = estimate_cost(captured.graph_module)
    assert HALVE_FAKE_CALLS == []
    by_target = {str(n.target): n for n in captured.graph.nodes if n.op == "call_function"}
    halving = by_target["asyncfx_tests.halve.default"]
    assert halving.meta[FLOPS] == 0 and halving.meta[BYTES] == 2 * 2 * 4 * 4
    assert by_target["aten.linear.default"].meta[FLOPS] == 2 * 2 * 4 * 4 == total


class TwinLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.second(self.first(x))


def test_an_op_on_values_shaped_alike_runs_once_and_counts_the_same(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    captured = asyncfx.capture(TwinLinears(), (torch.randn(2, 4),))
    counted = []
    original = FlopCounterMode._count_flops

    def recording(self, func_packet, out, args, kwargs):
        counted.append(func_packet)
        return original(self, func_packet, out, args, kwargs)

    monkeypatch.setattr(FlopCounterMode, "_count_flops", recording)
    total = estimate_cost(captured.graph_module)
    linears = [n for n in captured.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert [n.meta[FLOPS] for n in linears] == [2 * 2 * 4 * 4] * 2 and total == 2 * 2 * 2 * 4 * 4
    assert [n.meta[BYTES] for n in linears] == [4 * (2 * 4 + 4 * 4 + 4 + 2 * 4)] * 2
    assert counted.count(torch.ops.aten.addmm) == 1  # the second linear took the first's count
