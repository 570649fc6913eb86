"""Property test: random small denoisers split at random N reproduce themselves exactly."""
from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import asyncfx
from asyncfx.partitioner.cuts import cut_positions, latent_order
from asyncfx.zoo.tiny import sinusoidal_embedding
from conftest import check_boundaries

CHANNELS = 4


@dataclasses.dataclass(frozen=True)
class Spec:
    depth: int
    skips: tuple[tuple[int, int], ...]   # (source output i, destination block j), i < j
    merge: str                           # how skips join a block's input: "add" or "cat"
    use_time: bool
    use_cond: bool
    seed: int


@st.composite
def specs(draw) -> Spec:
    depth = draw(st.integers(1, 6))
    pairs = st.tuples(st.integers(0, depth - 1), st.integers(0, depth - 1)).filter(lambda p: p[0] < p[1])
    skips = tuple(sorted(set(draw(st.lists(pairs, max_size=5))))) if depth > 1 else ()
    return Spec(depth, skips, draw(st.sampled_from(["add", "cat"])), draw(st.booleans()),
                draw(st.booleans()), draw(st.integers(0, 2**16)))


class RandomDenoiser(nn.Module):
    """Conv blocks whose inputs take skip connections from any earlier block's output."""

    def __init__(self, spec: Spec):
        super().__init__()
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.stem = nn.Conv2d(3, CHANNELS, 1)
        widths = [CHANNELS * (1 + self.fan_in(j)) if spec.merge == "cat" else CHANNELS
                  for j in range(spec.depth)]
        self.blocks = nn.ModuleList(nn.Conv2d(w, CHANNELS, 3, padding=1) for w in widths)
        self.time_mlp = nn.Linear(CHANNELS, CHANNELS) if spec.use_time else None
        self.cond_proj = nn.Linear(5, CHANNELS) if spec.use_cond else None
        self.head = nn.Conv2d(CHANNELS, 3, 1)

    def fan_in(self, j: int) -> int:
        return sum(1 for _, dst in self.spec.skips if dst == j)

    def forward(self, x, t, cond):
        emb = None
        if self.time_mlp is not None:
            emb = self.time_mlp(sinusoidal_embedding(t, CHANNELS))
        if self.cond_proj is not None:
            projected = self.cond_proj(cond)
            emb = projected if emb is None else emb + projected
        outputs = [self.stem(x)]
        for j, block in enumerate(self.blocks):
            extra = [outputs[i + 1] for i, dst in self.spec.skips if dst == j]
            h = outputs[-1]
            if extra:
                h = torch.cat([h, *extra], 1) if self.spec.merge == "cat" else h + sum(extra)
            if emb is not None:
                h = h + emb.repeat(1, h.shape[1] // CHANNELS)[:, :, None, None]
            outputs.append(torch.tanh(block(h)))
        return self.head(outputs[-1])


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), n_fraction=st.floats(0, 1))
def test_random_denoisers_split_exactly(spec: Spec, n_fraction: float):
    model = RandomDenoiser(spec).eval()
    generator = torch.Generator().manual_seed(spec.seed)
    args = (torch.randn(2, 3, 6, 6, generator=generator), torch.tensor([3, 800]),
            torch.randn(2, 5, generator=generator))
    with torch.no_grad():
        captured = asyncfx.capture(model, args)
        most = len(cut_positions(latent_order(captured.graph))) + 1
        n_devices = 1 + round(n_fraction * (most - 1))
        plan = asyncfx.compile(captured, n_devices)
        staged = asyncfx.split(captured, plan)
        torch.testing.assert_close(staged(*args), model(*args), rtol=0, atol=0)
    check_boundaries(captured, plan, staged)
    assert [n for s in plan.stages for n in s.nodes] == [n.name for n in latent_order(captured.graph)]
