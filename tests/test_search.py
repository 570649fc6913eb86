"""Cost model and cut search: brute force agreement, determinism, boundary awareness, scale."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

import asyncfx
from asyncfx.partitioner.cost_graph import CostGraph, CostNode
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.device import DeviceSpec, device_spec
from asyncfx.partitioner.search import MAX_CANDIDATES, balanced_cuts, candidate_positions, search_cuts

# One FLOP takes a microsecond, bytes are free to compute on, links move a byte per ns.
TOY = DeviceSpec("toy", flops_per_s=1e6, bytes_per_s=1e30, link_bytes_per_s=1e9, link_latency_s=0.0)


def synthetic_graph(flops: list[int], out_bytes: list[int], readers: list[list[int]],
                    needs: list[list[str]] | None = None, side_flops: dict[str, int] | None = None,
                    output_needs: list[str] | None = None) -> CostGraph:
    n = len(flops)
    needs = needs or [[] for _ in range(n)]
    nodes = [CostNode(name=f"n{i}", module=f"block.{i}", flops=f, bytes=0, out_bytes=b,
                      out_shape=[b], out_dtype="torch.uint8", readers=r, needs=d)
             for i, (f, b, r, d) in enumerate(zip(flops, out_bytes, readers, needs))]
    side = [CostNode(name=name, module="time_mlp", flops=f, bytes=0, out_bytes=0, out_shape=None,
                     out_dtype=None, readers=[], needs=[]) for name, f in (side_flops or {}).items()]
    return CostGraph(fingerprint="synthetic", model_class="Synthetic", inputs=[], nodes=nodes,
                     cut_positions=list(range(1, n)), weights={}, holds={},
                     output_needs=output_needs or [], side_nodes=side)


def random_graph(rng: random.Random, n: int, n_side: int = 0) -> CostGraph:
    readers = []
    for i in range(n):
        later = sorted({min(n, i + 1)} | {rng.randint(i + 1, n) for _ in range(rng.randint(0, 2))})
        readers.append(later)
    side = {f"s{j}": rng.randint(1, 15) for j in range(n_side)}
    needs = [rng.sample(sorted(side), rng.randint(0, min(2, n_side))) for _ in range(n)]
    return synthetic_graph([rng.randint(1, 20) for _ in range(n)],
                           [rng.choice([0, 1000, 5000, 20000]) for _ in range(n)], readers,
                           needs, side, rng.sample(sorted(side), min(1, n_side)))


def objective(model: CostModel, cuts: list[int]) -> float:
    """The search objective, written out plainly: each stage's compute, or when its
    serial sends of values read beyond the stage finish, whichever is later."""
    n = len(model.graph.nodes)
    bounds = [0, *cuts, n]
    worst = 0.0
    for start, end in zip(bounds, bounds[1:]):
        elapsed = clock = 0.0
        for i in range(start, end):
            elapsed += model.own[i]
            if max(model.graph.nodes[i].readers) >= end:
                clock = max(clock, elapsed) + model.transfer[i]
        replicated = {name for node in model.graph.nodes[start:end] for name in node.needs}
        if end == n:
            replicated |= set(model.graph.output_needs)
        compute = elapsed + sum(model.side[name] for name in replicated)
        worst = max(worst, compute, clock)
    return worst


@pytest.mark.parametrize("seed", range(12))
def test_search_matches_brute_force(seed):
    rng = random.Random(seed)
    graph = random_graph(rng, rng.randint(4, 11), n_side=seed % 4)
    model = CostModel(graph, TOY, "flops")
    n_stages = rng.randint(1, min(4, graph.max_stages))
    found = [c.position for c in search_cuts(model, n_stages)]
    best = min(objective(model, list(c)) for c in itertools.combinations(graph.cut_positions, n_stages - 1))
    assert objective(model, found) == pytest.approx(best, rel=1e-12)
    assert found == sorted(set(found)) and len(found) == n_stages - 1


def test_search_is_deterministic():
    graph = random_graph(random.Random(7), 300)
    model = CostModel(graph, TOY, "flops")
    first, second = search_cuts(model, 5), search_cuts(CostModel(graph, TOY, "flops"), 5)
    assert first == second
    assert all(cut.reason.startswith("after n") for cut in first)


def test_cheap_compute_cut_that_sends_a_huge_tensor_is_avoided():
    # Four equal nodes. Cutting in the middle balances compute (2 + 2) but sends node 1's
    # 10 MB output, which takes 10 ms after it is made at 2 ms; cutting after node 0 or
    # node 2 sends only a small tensor.
    graph = synthetic_graph([1000] * 4, [10, 10_000_000, 10, 10], [[1], [2, 3], [3], [4]])
    model = CostModel(graph, TOY, "flops")
    assert objective(model, [2]) == pytest.approx(2e-3 + 10e-3)
    cuts = search_cuts(model, 2)
    assert [c.position for c in cuts] in ([1], [3])
    assert model.predict([c.position for c in cuts]).round == pytest.approx(3e-3, rel=1e-3)
    free_links = CostModel(graph, DeviceSpec("free", 1e6, 1e30, 1e30, 0.0), "flops")
    assert [c.position for c in search_cuts(free_links, 2)] == [2]


def test_prediction_counts_every_consumer_and_late_production():
    # n0 -> n1 -> n2, and n0 also read by n2: with a cut after each node, n0 goes to both
    # stages 1 and 2 on stage 0's one copy stream.
    graph = synthetic_graph([1000, 2000, 3000], [1_000_000, 500_000, 10], [[1, 2], [2], [3]])
    prediction = CostModel(graph, TOY, "flops").predict([1, 2])
    assert prediction.stage_compute == pytest.approx([1e-3, 2e-3, 3e-3])
    # stage 0 makes n0 at 1 ms, sends 1 MB to stage 1 (done at 2 ms), then to stage 2 (3 ms);
    # stage 1 makes n1 at 2 ms and sends 0.5 MB to stage 2 (done at 2.5 ms).
    assert prediction.stage_arrival == pytest.approx([0.0, 2e-3, 3e-3])
    assert prediction.round == pytest.approx(3e-3)


def test_ten_thousand_nodes_are_thinned_and_searched():
    graph = random_graph(random.Random(3), 10_000)
    model = CostModel(graph, TOY, "flops")
    candidates = candidate_positions(model)
    assert len(candidates) <= MAX_CANDIDATES and set(candidates) <= set(graph.cut_positions)
    cuts = search_cuts(model, 8)
    positions = [c.position for c in cuts]
    assert positions == sorted(set(positions)) and len(positions) == 7
    assert all("among positions kept for few live bytes" in c.reason for c in cuts)
    naive = [c.position for c in balanced_cuts(model, 8)]
    assert model.predict(positions).round <= model.predict(naive).round * 1.02


def test_balanced_cuts_are_the_equal_cost_baseline():
    graph = synthetic_graph([1] * 12, [0] * 12, [[i + 1] for i in range(12)])
    model = CostModel(graph, TOY, "flops")
    assert [c.position for c in balanced_cuts(model, 3)] == [4, 8]
    weights = np.array([6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=float)
    assert [c.position for c in balanced_cuts(model, 2, costs=weights)] == [3]


def test_device_presets_and_unknown_link():
    nvlink, pcie = device_spec("nvlink"), device_spec("pcie4")
    assert nvlink.transfer_seconds(95e6) < pcie.transfer_seconds(95e6) / 10
    assert device_spec(nvlink) is nvlink
    with pytest.raises(asyncfx.PlanError, match="unknown link/device 'infiniband'"):
        device_spec("infiniband")


def test_measured_cost_needs_measurements():
    graph = synthetic_graph([1, 1], [0, 0], [[1], [2]])
    with pytest.raises(asyncfx.PlanError, match="node n0 .* has no measured time"):
        CostModel(graph, TOY, "measure")
