"""The ``asyncfx`` command line.

    asyncfx demo [--model demo_unet] [--n-devices 2] [--cost flops]
    asyncfx profile MODEL --out profile.json [--device cpu|cuda:0] [--height H --width W
                    --batch B --dtype float16] [--repeats 5]
    asyncfx compile profile.json --n-devices 4 [--link nvlink|pcie4|cpu] --out plan.json
    asyncfx show plan.json

MODEL is ``package.module:function`` returning (model, args, kwargs), or a local diffusers
model directory. Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import torch

from asyncfx.errors import AsyncFXError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        return options.run(options)
    except (AsyncFXError, OSError) as exc:
        print(f"asyncfx: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _parser() -> argparse.ArgumentParser:
    from asyncfx.partitioner.device import PRESETS
    from asyncfx.zoo.tiny import ZOO

    parser = argparse.ArgumentParser(prog="asyncfx", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="capture a built-in denoiser, cut it into stages and check the split",
        description="Capture a built-in denoiser with torch.export, classify its values, cut it "
                    "into balanced stages, print the stage plan and check that the chained "
                    "stages reproduce the model exactly.")
    demo.add_argument("--model", choices=sorted(ZOO) + ["demo_unet"], default="demo_unet",
                      help="built-in model (default: a small SD-shaped UNet)")
    demo.add_argument("--n-devices", type=_positive_int, default=2, help="number of stages")
    demo.add_argument("--cost", choices=("flops", "measure", "uniform"), default="flops",
                      help="what the cut balances")
    demo.set_defaults(run=_demo)

    profile = commands.add_parser("profile", help="time every node of a model; write a profile",
                                  description="Capture MODEL and time each node where it runs.")
    profile.add_argument("model", metavar="MODEL",
                         help="package.module:function or a diffusers model directory")
    profile.add_argument("--out", required=True, help="profile JSON to write")
    profile.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    profile.add_argument("--height", type=_positive_int, help="latent height")
    profile.add_argument("--width", type=_positive_int, help="latent width")
    profile.add_argument("--batch", type=_positive_int, help="batch size (2 for CFG)")
    profile.add_argument("--dtype", help="float32, float16 or bfloat16")
    profile.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    profile.add_argument("--repeats", type=_positive_int, default=5, help="timed runs; medians kept")
    profile.set_defaults(run=_profile)

    compile_ = commands.add_parser("compile", help="cut a profiled model into stages; write a plan",
                                   description="Search the cuts of a profiled model.")
    compile_.add_argument("profile", help="profile JSON from `asyncfx profile`")
    compile_.add_argument("--n-devices", type=_positive_int, required=True)
    compile_.add_argument("--link", choices=sorted(PRESETS), default="cpu",
                          help="link between devices, prices boundary transfers")
    compile_.add_argument("--out", required=True, help="plan JSON to write")
    compile_.set_defaults(run=_compile)

    show = commands.add_parser("show", help="print a plan's summary table")
    show.add_argument("plan", help="plan JSON from `asyncfx compile`")
    show.set_defaults(run=_show)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _demo(options: argparse.Namespace) -> int:
    import asyncfx
    from asyncfx.zoo import tiny

    torch.set_grad_enabled(False)
    build = tiny.demo_unet if options.model == "demo_unet" else tiny.ZOO[options.model]
    model, args, kwargs = build()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__} ({options.model}), {n_params / 1e6:.2f}M parameters")

    start = time.perf_counter()
    captured = asyncfx.capture(model, args, kwargs)
    captured_at = time.perf_counter()
    plan = asyncfx.compile(captured, options.n_devices, cost=options.cost,
                           example_inputs=(args, kwargs) if options.cost == "measure" else None)
    compiled_at = time.perf_counter()
    staged = asyncfx.split(captured, plan)
    split_at = time.perf_counter()
    print(f"capture {captured_at - start:.2f} s ({captured.method}, {len(captured.graph.nodes)} "
          f"nodes), compile {compiled_at - captured_at:.2f} s, split {split_at - compiled_at:.2f} s\n")
    print(plan.summary())

    expected = _first_tensor(model(*args, **kwargs))
    got = _first_tensor(staged(*args, **kwargs))
    difference = (expected - got).abs().max().item()
    print(f"\nchained stages vs original model: max |difference| = {difference:.3g} "
          f"({'exact' if difference == 0 else 'NOT exact'})")
    return 0 if difference == 0 else 1


def _first_tensor(output: object) -> torch.Tensor:
    return torch.utils._pytree.tree_leaves(output)[0]


def _profile(options: argparse.Namespace) -> int:
    from tqdm import tqdm

    from asyncfx.partitioner.capture import capture
    from asyncfx.partitioner.model_spec import load_model
    from asyncfx.partitioner.profile import profile_captured

    _check_writable(options.out)
    if options.warmup < 0:
        raise AsyncFXError(f"--warmup must be at least 0, got {options.warmup}.")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise AsyncFXError(f"--device {options.device}: no CUDA device is available here.")
    torch.set_grad_enabled(False)
    runs = options.warmup + options.repeats
    with tqdm(total=2 + runs, desc="profile", unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str("loading model")
        model, args, kwargs = load_model(options.model, batch=options.batch, height=options.height,
                                         width=options.width, dtype=options.dtype,
                                         device=options.device)
        bar.update()
        bar.set_postfix_str("capturing")
        captured = capture(model, args, kwargs)
        bar.update()
        bar.set_postfix_str("timing nodes")
        result = profile_captured(captured, captured.interface.flatten(args, kwargs),
                                  warmup=options.warmup, repeats=options.repeats,
                                  model=options.model, on_run=bar.update)
    result.save(options.out)
    seconds = sum(v for v in result.node_seconds().values() if v is not None)
    print(f"profiled {len(result.graph.nodes)} latent and {len(result.graph.side_nodes)} step/static "
          f"nodes of {result.graph.model_class} on {result.device}: {seconds * 1e3:.2f} ms per call; "
          f"wrote {options.out}")
    return 0


def _compile(options: argparse.Namespace) -> int:
    from asyncfx.partitioner.compile import compile_profile
    from asyncfx.partitioner.profile import Profile

    _check_writable(options.out)
    plan = compile_profile(Profile.load(options.profile), options.n_devices, link=options.link)
    plan.save(options.out)
    print(plan.summary())
    print(f"wrote {options.out}")
    return 0


def _show(options: argparse.Namespace) -> int:
    from asyncfx.partitioner.plan import StagePlan

    print(StagePlan.load(options.plan).summary())
    return 0


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AsyncFXError(f"cannot write {path!r}: folder {folder!r} does not exist.")


if __name__ == "__main__":
    sys.exit(main())
