"""The ``asyncfx`` command line.

    asyncfx demo [--model unet|dit] [--n-devices 2] [--layout GxN] [--warmup W] [--stride 1|2]
                 [--forecast G] [--steps 50] [--seed 0] [--per-class 4] [--out asyncfx_demo.png]
    asyncfx profile MODEL --out profile.json [--device cpu|cuda:0] [--height H --width W
                    --batch B --dtype float16] [--repeats 5]
    asyncfx compile profile.json (--n-devices 4 | --layout GxN) [--link nvlink|pcie4|cpu] --out plan.json
    asyncfx show plan.json [--profile profile.json] [--plot plan.png]
    asyncfx simulate plan.json [--link nvlink|pcie4|cpu] [--steps 50 --warmup 3 --stride 1]
                               [--forecast G] [--cooldown C] [--refresh K] [--host-ms 1.1]
    asyncfx sample MODEL_DIR [--n-devices 2] [--executor local|distributed] [--steps 20]
                             [--warmup W] [--height H --width W --batch B]

MODEL is ``package.module:function`` returning (model, args, kwargs), or a local diffusers
model directory. Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from asyncfx.errors import AsyncFXError
from asyncfx.outputs import check_output
from asyncfx.schedule import DEFAULT_FORECAST
from asyncfx.zoo.digits_model import KINDS


DESCRIPTION = ("Run a diffusion model's denoiser over several devices with asyncfx, and profile, compile, "
               "show and simulate its stage plans. MODEL is package.module:function returning (model, args, "
               "kwargs), or a local diffusers model directory. Errors print one line and exit with status 2.")


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

    parser = _OneLineErrors(prog="asyncfx", description=DESCRIPTION)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="generate digits with the default model, sequentially and with asyncfx",
        description="Load an embedded digits model, show its stage plan, generate the same grid of "
                    "digits sequentially and with asyncfx.partition(), and print both latencies, the "
                    "speedup and the quality metrics; write both grids and their difference as a PNG.")
    demo.add_argument("--model", choices=KINDS, default="unet", help="the digits denoiser: the UNet "
                      "or the transformer (DiT)")
    demo.add_argument("--n-devices", type=_positive_int, default=2, help="CPU workers")
    demo.add_argument("--layout", help="G batch groups x N stages, e.g. 1x2 (default: the fastest predicted "
                      "for the classifier-free-guidance batch)")
    demo.add_argument("--warmup", type=_positive_int, default=None, help="warm-up steps (default: "
                      "asyncfx's default)")
    demo.add_argument("--stride", type=int, choices=(1, 2), default=1,
                      help="steps a round (2: n + 1 workers)")
    demo.add_argument("--forecast", type=float, default=None, help="damping of forecast stale values, 0 "
                      "(off) to 1 (default: asyncfx's default)")
    demo.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps")
    demo.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    demo.add_argument("--per-class", type=_positive_int, default=4, help="samples of each digit")
    demo.add_argument("--out", default="asyncfx_demo.png",
                      help="image to write, in the format its suffix names")
    demo.set_defaults(run=_demo)

    profile = commands.add_parser("profile", help="time every node of a model; write a profile",
                                  description="Capture MODEL and time each node where it runs.")
    profile.add_argument("model", metavar="MODEL",
                         help="package.module:function or a diffusers model directory")
    profile.add_argument("--out", required=True, help="profile JSON to write")
    profile.add_argument("--device", default="cpu", help="cpu or cuda:N")
    profile.add_argument("--height", type=_positive_int, help="latent height")
    profile.add_argument("--width", type=_positive_int, help="latent width")
    profile.add_argument("--batch", type=_positive_int, help="batch size (2 for CFG)")
    profile.add_argument("--dtype", help="float32, float16 or bfloat16")
    profile.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    profile.add_argument("--repeats", type=_positive_int, default=5, help="timed runs; medians kept")
    profile.add_argument("--latent", action="append",
                         help="the noisy-sample argument, where it is not called sample, hidden_states or "
                         "x (as partition(latent=...)); repeat it for a model with several")
    profile.add_argument("--timestep", help="the timestep argument, where it is not called timestep, "
                         "timesteps, t, sigma or sigmas (as partition(timestep=...))")
    profile.set_defaults(run=_profile)

    compile_ = commands.add_parser("compile", help="cut a profiled model into stages; write a plan",
                                   description="Search the cuts of a profiled model.")
    compile_.add_argument("profile", help="profile JSON from 'asyncfx profile'")
    compile_.add_argument("--n-devices", type=_positive_int, help="stages (or give --layout)")
    compile_.add_argument("--layout", help="G batch groups x N stages, e.g. 2x2: N stages of the profiled "
                          "call, which is then one group's (profile it at the group's batch)")
    compile_.add_argument("--link", choices=sorted(PRESETS), default="cpu",
                          help="link between devices, prices boundary transfers")
    compile_.add_argument("--out", required=True, help="plan JSON to write")
    compile_.set_defaults(run=_compile)

    show = commands.add_parser("show", help="print a plan's summary table; optionally draw it",
                               description="Print a plan's summary; with --plot also draw the bytes "
                                           "crossing each cut, the stage times (when measured) and, "
                                           "given the profile it was compiled from, the per-node cost "
                                           "with the cuts (needs matplotlib).")
    show.add_argument("plan", help="plan JSON from 'asyncfx compile'")
    show.add_argument("--profile", help="profile JSON the plan was compiled from (per-node cost view)")
    show.add_argument("--plot", help="figure to write the views to, in the format its suffix names "
                      "(.png, .pdf, .svg, ...)")
    show.set_defaults(run=_show)

    simulate = commands.add_parser(
        "simulate", help="predict a generation's latency on N devices from a plan",
        description="Predict the end-to-end latency and speedup of a generation on N real devices "
                    "from the plan's stage times, boundary bytes and a link model, with and without "
                    "overlapping transfers.")
    simulate.add_argument("plan", help="plan JSON from 'asyncfx compile'")
    simulate.add_argument("--link", choices=sorted(PRESETS), default=None,
                          help="link between devices (default: the plan's)")
    simulate.add_argument("--steps", type=_positive_int, default=50, help="steps of the generation")
    simulate.add_argument("--warmup", type=_positive_int, default=3, help="warm-up steps")
    simulate.add_argument("--stride", type=int, choices=(1, 2), default=1, help="steps a round")
    simulate.add_argument("--forecast", type=float, default=DEFAULT_FORECAST,
                          help="damping of forecast stale values, 0 (off) to 1: each stage reads and "
                          "extrapolates three versions of its inputs (default: asyncfx's default)")
    simulate.add_argument("--cooldown", type=int, default=0, help="last steps run sequentially too")
    simulate.add_argument("--refresh", type=int, default=0, help="one sequential step every K after warm-up")
    simulate.add_argument("--host-ms", type=float, default=None,
                          help="the host's time at each call while the devices wait, in ms "
                               "(default: the link preset's)")
    simulate.set_defaults(run=_simulate)

    sample = commands.add_parser(
        "sample", help="sample with a saved model, each device or rank loading only its stages' weights",
        description="Build the model in MODEL_DIR on the meta device (no weights), partition it with "
                    "weights=MODEL_DIR and sample from random inputs: a model too large for one device "
                    "runs across several. Under torchrun, --executor distributed runs one stage a rank.")
    sample.add_argument("model", metavar="MODEL_DIR", help="a diffusers model directory (save_pretrained)")
    sample.add_argument("--n-devices", type=_positive_int, default=2, help="stages")
    sample.add_argument("--executor", choices=("local", "distributed"), default="local",
                        help="threads in this process, or one rank a stage under torchrun")
    sample.add_argument("--steps", type=_positive_int, default=20, help="DDIM steps")
    sample.add_argument("--warmup", type=_positive_int, default=None, help="warm-up steps")
    sample.add_argument("--batch", type=_positive_int, default=2, help="batch size (2 for CFG)")
    sample.add_argument("--height", type=_positive_int, help="latent height")
    sample.add_argument("--width", type=_positive_int, help="latent width")
    sample.set_defaults(run=_sample)
    return parser


class _WithDefaults(argparse.HelpFormatter):
    """Help that ends each option with its default, where it has one and does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors in one line, like every other asyncfx error; help shows the defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _WithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"asyncfx: error: {message} (see asyncfx --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _demo(options: argparse.Namespace) -> int:
    from asyncfx.app.demo import image_suffixes, run_demo

    check_output(options.out, image_suffixes(), "image")
    return run_demo(model=options.model, n_devices=options.n_devices, layout=options.layout,
                    warmup=options.warmup, stride=options.stride, forecast=options.forecast,
                    steps=options.steps, seed=options.seed, per_class=options.per_class, out=options.out)


def _sample(options: argparse.Namespace) -> int:
    from asyncfx.app.sample import init_process_group, sample_from_directory

    created = init_process_group(options.executor)
    try:
        for line in sample_from_directory(options.model, n_devices=options.n_devices,
                                          executor=options.executor, steps=options.steps,
                                          warmup=options.warmup, batch=options.batch,
                                          height=options.height, width=options.width):
            print(line)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


@torch.no_grad()
def _profile(options: argparse.Namespace) -> int:
    from tqdm import tqdm

    from asyncfx.partitioner.capture import capture
    from asyncfx.app.model_spec import load_model
    from asyncfx.partitioner.profile import profile_captured

    check_output(options.out, what="JSON file")
    if options.warmup < 0:
        raise AsyncFXError(f"--warmup must be at least 0, got {options.warmup}.")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise AsyncFXError(f"--device {options.device}: no CUDA device is available here.")
    runs = options.warmup + options.repeats
    with tqdm(total=3 + runs, desc="profile", unit="step", file=sys.stderr) as bar:
        bar.set_postfix_str("loading model")
        model, args, kwargs = load_model(options.model, batch=options.batch, height=options.height,
                                         width=options.width, dtype=options.dtype,
                                         device=options.device)
        bar.update()
        bar.set_postfix_str("capturing")
        captured = capture(model, args, kwargs, latent=options.latent, timestep=options.timestep)
        bar.update()
        bar.set_postfix_str("timing nodes")
        result = profile_captured(captured, captured.interface.flatten(args, kwargs),
                                  warmup=options.warmup, repeats=options.repeats,
                                  model=options.model, on_run=bar.update,
                                  on_cost_graph=lambda: bar.set_postfix_str("building the cost graph"))
        bar.update()
    result.save(options.out)
    seconds = sum(v for v in result.node_seconds().values() if v is not None)
    print(f"profiled {len(result.graph.nodes)} latent and {len(result.graph.side_nodes)} step/static "
          f"nodes of {result.graph.model_class} on {result.device}: {seconds * 1e3:.2f} ms per call; "
          f"wrote {options.out}")
    return 0


def _compile(options: argparse.Namespace) -> int:
    from asyncfx.partitioner.compile import compile_profile
    from asyncfx.partitioner.profile import Profile

    check_output(options.out, what="JSON file")
    layout = _layout(options.layout, options.n_devices)
    plan = compile_profile(Profile.load(options.profile), layout.stages, link=options.link)
    if layout.groups > 1:
        plan.groups = layout.groups
        plan.notes.append(f"layout {layout}: the profiled call is one group's; partition() splits each "
                          f"call's batch over {layout.groups} groups")
    plan.save(options.out)
    print(plan.summary())
    print(f"wrote {options.out}")
    return 0


def _layout(text: str | None, n_devices: int | None):
    """``--layout`` and ``--n-devices`` as one Layout (``--n-devices N`` alone: ``1xN``)."""
    from asyncfx.program import Layout

    if text is None:
        if n_devices is None:
            raise AsyncFXError("give --n-devices N (stages) or --layout GxN (batch groups x stages).")
        return Layout(1, n_devices)
    try:
        layout = Layout.parse(text)
    except ValueError as exc:
        raise AsyncFXError(f"--layout: {exc}.") from None
    if n_devices is not None and n_devices != layout.devices:
        raise AsyncFXError(f"--layout {layout} uses {layout.devices} devices but --n-devices is {n_devices}; "
                           "give one of them.")
    return layout


def _show(options: argparse.Namespace) -> int:
    from asyncfx.plan import StagePlan
    from asyncfx.partitioner.profile import Profile

    if options.profile and not options.plot:
        raise AsyncFXError("--profile only adds a view to --plot; pass --plot plan.png as well.")
    if options.plot:
        from asyncfx.viz.plan_views import figure_suffixes

        check_output(options.plot, figure_suffixes(), "figure")
    plan = StagePlan.load(options.plan)
    profile = Profile.load(options.profile) if options.profile else None
    print(plan.summary())
    if options.plot:
        from asyncfx.viz import save_plan_views

        views = save_plan_views(plan, options.plot, profile=profile)
        print(f"wrote {options.plot} ({', '.join(views)})")
    return 0


def _simulate(options: argparse.Namespace) -> int:
    from asyncfx.plan import StagePlan
    from asyncfx.partitioner.simulate import simulate
    from asyncfx.schedule import SequentialSteps

    plan = StagePlan.load(options.plan)
    host = None if options.host_ms is None else options.host_ms / 1e3
    print(simulate(plan, link=options.link, steps=options.steps, warmup=options.warmup,
                   stride=options.stride, host_seconds=host, forecast=options.forecast,
                   sequential=SequentialSteps(cooldown=options.cooldown, refresh=options.refresh)).summary())
    for note in plan.notes:  # why the plan is laid out as it is
        if note.startswith("layout "):
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
