"""The ``asyncfx`` command line.

    asyncfx demo [--model sd_unet] [--n-devices 2] [--cost flops]
"""
from __future__ import annotations

import argparse
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
    except AsyncFXError as exc:
        print(f"asyncfx: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
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
    demo.add_argument("--cost", choices=("flops", "uniform"), default="flops",
                      help="what the cut balances")
    demo.set_defaults(run=_demo)
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
    plan = asyncfx.compile(captured, options.n_devices, cost=options.cost)
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


if __name__ == "__main__":
    sys.exit(main())
