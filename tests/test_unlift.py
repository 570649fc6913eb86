"""The unlift pass: an exported program as a module holding its weights, as
``ExportedProgram.module()`` makes it less its input checks and argument structure."""
from __future__ import annotations

import pytest
import torch

from asyncfx.passes.functionalise import functionalise
from asyncfx.passes.remove_checks import remove_checks
from asyncfx.passes.unlift import unlift


class Holder(torch.nn.Module):
    """Every kind of state a graph reads: parameters of a submodule, a persistent and a
    non-persistent buffer, a plain tensor attribute (a constant to export), and a
    subgraph of its own (export's for a block under autocast)."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(4, 4))
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.register_buffer("shift", torch.full((4,), 0.5), persistent=False)
        self.table = torch.arange(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            x = self.inner(x)
        return x * self.scale + self.shift + self.table


def test_the_module_reads_each_kind_of_state_as_torchs_unlift_does():
    model, x = Holder().eval(), torch.randn(3, 4)
    exported = torch.export.export(model, (x,), strict=False)
    got, expected = unlift(exported), exported.module()
    expected_graph = expected.graph
    remove_checks(expected_graph)  # torch's guard call is the only node unlift leaves out
    assert [(n.op, n.name, str(n.target)) for n in got.graph.nodes] == \
        [(n.op, n.name, str(n.target)) for n in expected_graph.nodes]
    assert dict(got.named_parameters()).keys() == {"inner.0.weight", "inner.0.bias"}
    assert got.get_parameter("inner.0.weight") is model.inner[0].weight  # the model's own tensors, not copies
    assert (got.state_dict().keys() == expected.state_dict().keys()
            == {"inner.0.weight", "inner.0.bias", "scale"})
    assert dict(got.named_buffers()).keys() == {"scale", "shift"}  # not persistent: no state_dict entry
    assert "table" not in dict(got.named_buffers()) and isinstance(got.table, torch.Tensor)
    (subgraph,) = [n.target for n in got.graph.nodes if n.op == "get_attr" and n.target.startswith("submod")]
    assert isinstance(got.get_submodule(subgraph), torch.fx.GraphModule)
    torch.testing.assert_close(got(x)[0], model(x), rtol=0, atol=0)


def test_a_program_that_writes_back_a_buffer_is_left_to_torchs_unlift():
    class Counts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x + self.calls

    exported = functionalise(torch.export.export(Counts(), (torch.randn(2),), strict=False))
    with pytest.raises(ValueError, match=r"BUFFER_MUTATION calls.*use ExportedProgram.module\(\), "
                                         "which writes mutations back"):
        unlift(exported)
