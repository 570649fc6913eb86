"""Host cost of the asyncfx runtime per denoiser call, with stages that do almost nothing.

    python benchmarks/runtime_overhead.py [--calls 300] [--stages 2,4] [--compare REV [--rounds 3]]

A chain of tiny Linear layers (microseconds of arithmetic) is partitioned into N stages
(layout 1xN, the whole batch through every stage), so what a call costs beyond the model
itself is the runtime: binding and checking the inputs, tracking the generation,
scheduling the step, running or handing each stage to its worker, collecting and
rebuilding the output. In one run it times the model alone (the baseline), the serial
executor (every stage in the calling thread: the runtime without threads) and the local
executor on CPU worker threads, each as the median wall time of a parallel step and the
CPU time the calling thread spent in it. On a GPU the calling thread's time is what a
round cannot hide; ``benchmarks/gpu.py`` measures the rest.

``--compare REV`` measures the calls of this checkout and of git revision REV (checked
out in a temporary worktree) in one run, alternating between them ``--rounds`` times in
fresh interpreters, and prints the median of each, with their ratio: a before/after
that the machine's drift affects alike.

Once per generation (per stream of calls) the denoiser also checks whether the model was
edited since it was captured (``asyncfx.runtime.model_state``). That check is timed on
SD2.1- and SDXL-shaped UNets built on the meta device (their modules without their
weights), against a check of the parameters alone (which objects, how many writes) as
the baseline. At every call it checks for diffusers hooks put on the model's layers since
the capture (``diffusers_hooks``); that check is timed on the same UNets.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

import asyncfx
from asyncfx.zoo import tiny
from revisions import alternating

WARMUP = 1


class TinyChain(nn.Module):
    """A denoiser-shaped chain of 16 8x8 Linear layers, conditioned on a text-like vector."""

    def __init__(self, layers: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            sample = layer(sample) + timestep / 1000 + condition
        return sample


def per_call(denoiser: Callable[..., Any], sample: torch.Tensor, condition: torch.Tensor, calls: int,
             generations: int = 3) -> tuple[float, float]:
    """Median wall seconds and calling-thread CPU seconds of the calls after warm-up (the
    conditioning is the same object at every call, as pipelines pass their embeddings)."""
    walls, cpus = [], []
    for _ in range(generations):
        getattr(denoiser, "reset", lambda: None)()
        for step in range(calls):
            timestep = torch.tensor(999.0 - step)
            wall, cpu = time.perf_counter(), time.thread_time()
            denoiser(sample, timestep, condition)
            if step >= WARMUP:
                cpus.append(time.thread_time() - cpu)
                walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus)


def measure(calls: int, stage_counts: Sequence[int]) -> dict[str, Any]:
    """Median wall and calling-thread CPU seconds per call: the model alone, then each
    executor for each stage count (``"N=2, serial"``...)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny layers: more threads would only measure their wake-ups
    model = TinyChain().eval()
    example = (torch.randn(2, 8), torch.tensor(999.0), torch.randn(2, 8))
    rows = {}
    with torch.no_grad():
        rows["model alone"] = per_call(model, example[0], example[2], calls)
        for n in stage_counts:
            for executor, devices in (("serial", None), ("local", ["cpu"] * n)):
                den = asyncfx.partition(model, n, warmup=WARMUP, executor=executor, devices=devices,
                                        example_inputs=(example, {}), **stages_of_one_batch(n))
                try:
                    rows[f"N={n}, {executor}"] = per_call(den, example[0], example[2], calls)
                finally:
                    den.close()
    return {"asyncfx": os.path.dirname(asyncfx.__file__), "rows": rows}


def stages_of_one_batch(n: int) -> dict[str, str]:
    """``partition``'s option for ``n`` stages over the whole batch (``layout="1xN"``): left to
    itself, the compiler may split this model's batch into groups, which is not the runtime
    this measures; empty for a revision from before layouts (``--compare``), whose
    partitions were always stages."""
    return {"layout": f"1x{n}"} if "layout" in inspect.signature(asyncfx.partition).parameters else {}


def run(calls: int, stage_counts: Sequence[int]) -> list[str]:
    rows = measure(calls, stage_counts)["rows"]
    alone_wall, alone_cpu = rows.pop("model alone")
    lines = [f"model alone:                      {alone_wall * 1e6:7.0f} us a call "
             f"({alone_cpu * 1e6:.0f} us CPU in the calling thread)"]
    for name, (wall, cpu) in rows.items():
        n, executor = name.split(", ")
        lines.append(f"{n}, {executor:6} executor:          {wall * 1e6:7.0f} us a call "
                     f"({cpu * 1e6:.0f} us CPU in the calling thread); runtime "
                     f"+{(wall - alone_wall) * 1e6:.0f} us over the model alone")
    return lines


def compare(revision: str, calls: int, stage_counts: Sequence[int], rounds: int) -> list[str]:
    """This checkout against ``revision``, alternating in fresh interpreters."""
    arguments = ["--calls", str(calls), "--stages", ",".join(map(str, stage_counts))]
    samples = alternating(revision, pathlib.Path(__file__).resolve(), arguments, rounds, "rows")
    lines = [f"calling-thread CPU per call, median of {rounds} alternating runs "
             f"({calls} calls a generation):",
             f"{'':18} {revision:>14} {'this checkout':>14} {'ratio':>7}"]
    for name in samples["this checkout"]:
        before = statistics.median(cpu for _, cpu in samples[revision][name])
        after = statistics.median(cpu for _, cpu in samples["this checkout"][name])
        lines.append(f"{name:18} {before * 1e6:11.0f} us {after * 1e6:11.0f} us {after / before:6.2f}x")
    return lines


def parameters_signature(model: nn.Module) -> int:
    """The baseline check: which parameter objects, and how many in-place writes."""
    return hash(tuple((name, id(p), p._version) for name, p in model.named_parameters()))


def edit_check_lines(repeats: int = 20) -> list[str]:
    from asyncfx.integration import diffusers_hooks
    from asyncfx.runtime.model_state import state_signature
    from asyncfx.timing import median_wall_seconds

    lines = []
    for name, make in (("SD2.1-shaped UNet", tiny.sd21_unet), ("SDXL-shaped UNet", tiny.sdxl_base_unet)):
        with torch.device("meta"):
            model, _, _ = make(2, 8)
        times = {}
        for check in (state_signature, parameters_signature):
            check(model)
            start = time.perf_counter()
            for _ in range(repeats):
                check(model)
            times[check] = (time.perf_counter() - start) / repeats
        lines.append(f"edit check, {name} ({sum(1 for _ in model.modules())} modules): "
                     f"{times[state_signature] * 1e3:.1f} ms a generation; parameters alone "
                     f"{times[parameters_signature] * 1e3:.1f} ms "
                     f"({times[state_signature] / times[parameters_signature]:.1f}x)")
        dicts = [module.__dict__ for module in model.modules()]
        per_call = median_wall_seconds(lambda: diffusers_hooks(model, dicts), 1, repeats * 50)
        lines.append(f"hook check, {name}: {per_call * 1e6:.1f} us a call")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="denoiser calls per generation")
    parser.add_argument("--stages", default="2,4", help="stage counts, comma-separated")
    parser.add_argument("--compare", metavar="REV", help="also measure git revision REV, alternating")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each with --compare")
    # one measurement as JSON, for --compare
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    try:
        stage_counts = [int(n) for n in options.stages.split(",")]
    except ValueError:
        parser.error(f"--stages {options.stages!r} must be integers separated by commas, e.g. 2,4")
    if options.calls <= WARMUP + 1 or min(stage_counts) < 2:
        parser.error(f"need --calls > {WARMUP + 1} and stage counts of at least 2")
    if options.json:
        print(json.dumps(measure(options.calls, stage_counts)))
        return 0
    print(f"torch {torch.__version__}, {options.calls} calls a generation, 3 generations, "
          "1 intra-op thread", flush=True)
    if options.compare:
        lines = compare(options.compare, options.calls, stage_counts, options.rounds)
    else:
        lines = run(options.calls, stage_counts) + edit_check_lines()
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
