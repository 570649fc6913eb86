"""Seconds per compiler phase for an SD2.1-shaped UNet (random weights) on this machine.

    python benchmarks/compile_time.py [--size 64] [--batch 2] [--n-devices 4]

Phases: build the model, capture (torch.export + classify), classify alone (re-run),
keeping the model's Python state across the trace alone (snapshot, put back, compare),
compile (FLOP/byte estimate + balanced cut), split (stage GraphModules), and one
check that the chained stages reproduce the model. Target: capture + compile + split
under 60 s on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import asyncfx
from asyncfx.partitioner.traced_state import restoring_traced_state
from asyncfx.passes.classify import classify
from asyncfx.passes.meta import VALUE_CLASS
from asyncfx.zoo.tiny import sd21_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--n-devices", type=int, default=4)
    options = parser.parse_args()
    torch.set_grad_enabled(False)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, args, kwargs = sd21_unet(batch=options.batch, size=options.size)
    timings["build model (not counted)"] = time.perf_counter() - start

    start = time.perf_counter()
    captured = asyncfx.capture(model, args, kwargs)
    timings["capture (export + classify)"] = time.perf_counter() - start

    roles = {n.name: n.meta[VALUE_CLASS] for n in captured.graph.nodes if n.op == "placeholder"}
    start = time.perf_counter()
    classify(captured.graph, roles)
    timings["  of which classify"] = time.perf_counter() - start

    start = time.perf_counter()
    with restoring_traced_state(model):  # what capture does around the trace, with no trace
        pass
    timings["  of which Python state put back"] = time.perf_counter() - start

    start = time.perf_counter()
    plan = asyncfx.compile(captured, options.n_devices)
    timings["compile (cost estimate + cuts)"] = time.perf_counter() - start

    start = time.perf_counter()
    staged = asyncfx.split(captured, plan)
    timings["split"] = time.perf_counter() - start

    total = sum(v for k, v in timings.items() if not k.startswith(("build", " ")))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"SD2.1-shaped UNet, {n_params / 1e6:.0f}M parameters, latent {options.batch}x4x"
          f"{options.size}x{options.size} float32, N={options.n_devices}, "
          f"{len(captured.graph.nodes)} graph nodes; CPU: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for phase, seconds in timings.items():
        print(f"  {phase:32s} {seconds:7.2f} s")
    print(f"  {'total (capture+compile+split)':32s} {total:7.2f} s   target < 60 s: "
          f"{'met' if total < 60 else 'MISSED'}")

    expected = model(*args, **kwargs).sample
    got = staged(*args, **kwargs).sample
    print(f"chained stages vs model: max |difference| = {(expected - got).abs().max().item():.3g}")
    print(plan.summary())


if __name__ == "__main__":
    main()
