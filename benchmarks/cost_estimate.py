"""Which operations the FLOP/byte estimate misprices on this machine's CPU.

    python benchmarks/cost_estimate.py [--size 16] [--threads 1] [--repeats 3] [--top 12]

SD 2.1's UNet config (random weights, fp32, latent 2x4xSxS) is profiled node by node on
``--threads`` intra-op threads (as one rank of the distributed executor runs) and priced
by the ``cpu`` preset's roofline from the estimated FLOPs and bytes (``cost="flops"``).
Prints, per operation, the measured and predicted seconds of a step, their ratio and
the operation's share of the measured step, then the default plan's stages priced both
ways: a stage whose operations run slower than predicted is the one that ends up slow.
"""
from __future__ import annotations

import argparse
import collections

import torch

import asyncfx
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.device import PRESETS
from asyncfx.partitioner.profile import profile_captured
from asyncfx.partitioner.refine import plan_positions
from asyncfx.zoo import tiny


def by_operation(graph, operations: dict[str, str]) -> dict[str, list[float]]:
    """Measured and roofline seconds of each operation's nodes, summed, and their count."""
    spec = PRESETS["cpu"]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for node in [*graph.nodes, *graph.side_nodes]:
        row = totals[operations.get(node.name, "other")]
        row[0] += node.measured_seconds or 0.0
        row[1] += spec.compute_seconds(node.flops, node.bytes)
        row[2] += 1
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.set_grad_enabled(False)
    model, args, kwargs = tiny.sd21_unet(batch=2, size=options.size)
    captured = asyncfx.capture(model, args, kwargs)
    profile = profile_captured(captured, captured.interface.flatten(args, kwargs), repeats=options.repeats)
    operations = {n.name: getattr(n.target, "__name__", str(n.target)).split(".")[0]
                  for n in captured.graph.nodes if n.op == "call_function"}
    totals = by_operation(profile.graph, operations)
    measured_step = sum(row[0] for row in totals.values())
    predicted_step = sum(row[1] for row in totals.values())
    print(f"CPU, {options.threads} thread(s), torch {torch.__version__}; SD 2.1 UNet config, latent "
          f"2x4x{options.size}x{options.size}: a step measured {measured_step * 1e3:.0f} ms node by node, "
          f"predicted {predicted_step * 1e3:.0f} ms by the cpu preset's roofline")
    print("| operation | nodes | measured ms | predicted ms | measured / predicted | share of the step |")
    print("|---|---|---|---|---|---|")
    slowest_first = sorted(totals.items(), key=lambda item: -item[1][0])
    for op, (measured, predicted, count) in slowest_first[:options.top]:
        ratio = measured / predicted if predicted else float("inf")
        print(f"| {op} | {count} | {measured * 1e3:.1f} | {predicted * 1e3:.1f} | {ratio:.2f} | "
              f"{measured / measured_step:.0%} |")
    estimated = CostModel(profile.graph, PRESETS["cpu"], "flops")
    measured_model = CostModel(profile.graph, PRESETS["cpu"], "measure")
    plan = asyncfx.compile(captured, 2)
    cuts = plan_positions(plan)
    for name, cost_model in (("predicted", estimated), ("measured", measured_model)):
        stages = cost_model.predict(cuts).stage_compute
        print(f"default plan's stages, {name}: {' / '.join(f'{s * 1e3:.0f}' for s in stages)} ms")


if __name__ == "__main__":
    main()
