"""How balanced are the stages the cost model chooses, measured, against naive cuts?

    python benchmarks/partition_quality.py [--threads 2] [--repeats 3] [--models sd21,sdxl,sd3]
                                           [--stages 2,3,4]

For an SD2.1-shaped UNet (random weights, latent 2x4x32x32, float32) and the SDXL- and
SD3-shaped tiny models of the test zoo, on this machine's CPU, for N = 2, 3, 4:
profile once, then compile with cost="measure" (search + refinement by measured stage
times), and in the same run cut the same graph at equal node counts and at equal
cumulative FLOPs. Every plan's stages are timed as whole modules (median of repeats).
Columns: max/mean of measured stage times per plan (target <= 1.10 for the cost model),
and how far the first (unrefined) prediction was from its measurement. Last, the search
time for N = 8 on the SD2.1-shaped graph (target < 5 s).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import asyncfx
from asyncfx.partitioner.make_plan import plan_from_cuts
from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.device import PRESETS
from asyncfx.partitioner.profile import profile_captured
from asyncfx.partitioner.refine import time_stages
from asyncfx.partitioner.search import balanced_cuts, search_cuts
from asyncfx.zoo import tiny

MODELS = {
    "sd21": ("SD2.1-shaped UNet, 2x4x32x32", lambda: tiny.sd21_unet(batch=2, size=32)),
    "sdxl": ("SDXL-shaped tiny UNet", tiny.sdxl_unet),
    "sd3": ("SD3-shaped tiny transformer", tiny.sd3_transformer),
}


def balance(times: list[float]) -> float:
    return max(times) / float(np.mean(times))


def prediction_error(plan: asyncfx.StagePlan, measured: list[float]) -> float:
    return max(abs(s.estimated_cost / m - 1) for s, m in zip(plan.stages, measured))


def measure(captured, plan, flat, repeats) -> list[float]:
    return time_stages(asyncfx.split(captured, plan), flat, warmup=1, repeats=repeats)


def run_model(name: str, build, stage_counts, repeats: int) -> list[str]:
    model, args, kwargs = build()
    captured = asyncfx.capture(model, args, kwargs)
    flat = captured.interface.flatten(args, kwargs)
    profile = profile_captured(captured, flat, warmup=1, repeats=repeats)
    cost_model = CostModel(profile.graph, PRESETS["cpu"], "measure")
    flops = np.array([n.flops for n in profile.graph.nodes], dtype=float)
    rows = []
    for n in stage_counts:
        first = plan_from_cuts(cost_model, search_cuts(cost_model, n))
        first_measured = measure(captured, first, flat, repeats)
        plan = asyncfx.compile(captured, n, example_inputs=(args, kwargs), cost="measure",
                               profile=profile, refine_rounds=5, repeats=repeats)
        final = [s.measured_seconds for s in plan.stages]
        final_again = measure(captured, plan, flat, repeats)  # a fresh measurement of the same plan
        counts = measure(captured, plan_from_cuts(cost_model, balanced_cuts(
            cost_model, n, costs=np.ones(len(flops)))), flat, repeats)
        equal_flops = measure(captured, plan_from_cuts(cost_model, balanced_cuts(
            cost_model, n, costs=flops)), flat, repeats)
        rows.append(
            f"| {name} | {n} | {balance(final):.3f} | {balance(final_again):.3f} | "
            f"{balance(counts):.3f} | {balance(equal_flops):.3f} | "
            f"{prediction_error(first, first_measured):.0%} | {prediction_error(plan, final_again):.0%} | "
            f"{max(final) * 1e3:.1f} / {max(counts) * 1e3:.1f} / {max(equal_flops) * 1e3:.1f} |")
        print(rows[-1], flush=True)
    return rows


def search_time(stages: int) -> float:
    model, args, kwargs = tiny.sd21_unet(batch=2, size=32)
    captured = asyncfx.capture(model, args, kwargs)
    from asyncfx.partitioner.cost_graph import build_cost_graph

    cost_model = CostModel(build_cost_graph(captured), PRESETS["cpu"], "flops")
    start = time.perf_counter()
    search_cuts(cost_model, stages)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--models", default="sd21,sdxl,sd3", help=f"of {sorted(MODELS)}")
    parser.add_argument("--stages", default="2,3,4", help="values of N")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.set_grad_enabled(False)
    print(f"CPU, {options.threads} threads, torch {torch.__version__}, median of "
          f"{options.repeats} runs per stage")
    print("| model | N | cost model max/mean (refinement) | same plan re-measured | equal node "
          "counts | equal FLOPs | prediction error, first plan | prediction error, final | "
          "slowest stage ms: cost model / counts / FLOPs |")
    print("|---|---|---|---|---|---|---|---|---|")
    stages = [int(n) for n in options.stages.split(",")]
    for key in options.models.split(","):
        name, build = MODELS[key]
        # millisecond stages of the tiny models need more runs for a stable median
        repeats = options.repeats if key == "sd21" else max(options.repeats, 15)
        run_model(name, build, stages, repeats)
    print(f"search time, N=8, SD2.1-shaped graph: {search_time(8):.3f} s (target < 5 s)")


if __name__ == "__main__":
    main()
