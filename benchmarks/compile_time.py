"""Seconds per compiler phase for an SD2.1-shaped UNet (random weights) on this machine.

    python benchmarks/compile_time.py [--size 64] [--batch 2] [--n-devices 4] [--again 3]
                                      [--compare REV [--rounds 2]]

Phases: build the model, capture (torch.export + classify), classify alone (re-run),
keeping the model's Python state across the trace alone (snapshot, put back, compare),
compile (FLOP/byte estimate + balanced cut), split (stage GraphModules), and one
check that the chained stages reproduce the model. Target: capture + compile + split
under 60 s on a 2-core CPU. ``--again N`` also captures the model N more times in the
same process and reports their median: a capture after an edit between generations,
or any capture after the first of a process (torch's caches filled).

``--compare REV`` times the phases of this checkout and of git revision REV in one run,
each in a fresh interpreter (a first capture and estimate fill torch's caches of fake
kernels, as a user's first do), alternating ``--rounds`` times, and prints the median of
each phase with their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import torch

import asyncfx
from asyncfx.partitioner.traced_state import restoring_traced_state
from asyncfx.passes.classify import classify
from asyncfx.passes.meta import VALUE_CLASS
from asyncfx.timing import median_wall_seconds
from asyncfx.zoo.tiny import sd21_unet
from revisions import alternating


def phases(size: int, batch: int, n_devices: int, freeu: bool = False, again: int = 0) -> tuple:
    """Seconds of each phase, and what they made: ``(timings, model, args, kwargs, captured,
    plan, staged)``; ``freeu``: with FreeU on (its masks and slice scaling are in-place writes
    the capture makes new values); ``again``: captures after the first, timed apart."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, args, kwargs = sd21_unet(batch=batch, size=size)
    if freeu:
        model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    timings["build model (not counted)"] = time.perf_counter() - start

    start = time.perf_counter()
    captured = asyncfx.capture(model, args, kwargs)
    timings["capture (export + classify)"] = time.perf_counter() - start
    if again:
        recapture = lambda: asyncfx.capture(model, args, kwargs)
        timings["  capture again (median)"] = median_wall_seconds(recapture, warmup=0, repeats=again)

    roles = {n.name: n.meta[VALUE_CLASS] for n in captured.graph.nodes if n.op == "placeholder"}
    start = time.perf_counter()
    classify(captured.graph, roles)
    timings["  of which classify"] = time.perf_counter() - start

    start = time.perf_counter()
    with restoring_traced_state(model):  # what capture does around the trace, with no trace
        pass
    timings["  of which Python state put back"] = time.perf_counter() - start

    start = time.perf_counter()
    plan = asyncfx.compile(captured, n_devices)
    timings["compile (cost estimate + cuts)"] = time.perf_counter() - start

    start = time.perf_counter()
    staged = asyncfx.split(captured, plan)
    timings["split"] = time.perf_counter() - start

    return timings, model, args, kwargs, captured, plan, staged


def compare(revision: str, rounds: int, arguments: list[str]) -> list[str]:
    """Each phase's median seconds in ``revision`` and in this checkout, alternating in
    fresh interpreters."""
    samples = alternating(revision, pathlib.Path(__file__).resolve(), arguments, rounds, "timings")
    lines = [f"seconds per phase, median of {rounds} alternating runs in fresh interpreters:",
             f"  {'':32} {revision:>12} {'this checkout':>14} {'ratio':>7}"]
    for phase, seconds in samples["this checkout"].items():
        before, after = statistics.median(samples[revision][phase]), statistics.median(seconds)
        lines.append(f"  {phase:32} {before:10.2f} s {after:12.2f} s {after / before:6.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--n-devices", type=int, default=4)
    parser.add_argument("--freeu", action="store_true", help="with FreeU on (in-place writes)")
    parser.add_argument("--again", type=int, default=0, metavar="N",
                        help="capture N more times in the same process (median reported)")
    parser.add_argument("--compare", metavar="REV", help="also time git revision REV, alternating")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each with --compare")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one run, for --compare
    options = parser.parse_args()
    torch.set_grad_enabled(False)
    if options.compare:
        arguments = ["--size", str(options.size), "--batch", str(options.batch),
                     "--n-devices", str(options.n_devices), "--again", str(options.again)]
        arguments += ["--freeu"] * options.freeu
        print("\n".join(compare(options.compare, options.rounds, arguments)))
        return
    timings, model, args, kwargs, captured, plan, staged = phases(
        options.size, options.batch, options.n_devices, options.freeu, options.again)
    if options.json:
        print(json.dumps({"asyncfx": os.path.dirname(asyncfx.__file__), "timings": timings}))
        return
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
