"""Speed against quality of asynchronous denoising on a digits model (UNet or DiT).

    python benchmarks/quality.py [--model unet|dit] [--samples 500] [--steps 50]
                                 [--forecasts 0,0.25,0.5] [--warmups 1,2,3,2+c1,2+r25]
                                 [--layouts 1x4,2x2,4x1] [--write benchmarks/RESULTS.md]

Rows: N in {1, 2, 3, 4} x stride {1, 2} x sequential steps x forecast damping
(``partition(forecast=g)``, 0: plain reuse of stale values; default 0 only). Sequential
steps: ``W`` warm-up steps (default 1, 2, 3, 5, 9), ``W+cC`` with a cool-down of C steps,
``W+rK`` with a refresh every K steps (``partition(cooldown=, refresh=)``), ``W+sX`` with
warm-up going on while the noise prediction changes by X or more from one step to the next
(``partition(switch_below=X)``; the row says how many steps that made). Each row generates the
same samples (same seeds, 50 DDIM steps, the model's guidance) with the serial executor,
which computes exactly what the parallel executors compute. Columns: PSNR and SSIM against
the sequential samples, class accuracy, Frechet distance of classifier features to
real digits, the mean per-sample distance of each sample's classifier features to its
sequential sample's (``asyncfx.quality.feature_distance``, an LPIPS stand-in), and the
speedup over the sequential model on one core: measured on CPU
workers (one core each) where the slots fit this machine's cores (N * stride <= cores),
otherwise (or with ``--predicted``) predicted from the plan's stage costs as
T / (S + P * round / sequential), with S sequential steps and P parallel rounds, and
marked "(pred.)". With ``--layouts`` the rows are layouts of batch groups x stages
(``partition(layout=)``; the guidance batch, conditional then unconditional halves, split
over the groups) instead of stage counts, stride 1, their speed predicted as the compiler
predicts it when it chooses a layout (``partitioner.layouts.predicted_generation``, at
``--steps``) over the whole model's predicted time on one device.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import time

import torch

import asyncfx
from asyncfx.partitioner.layouts import predicted_generation
from asyncfx.partitioner.simulate import parallel_rounds
from asyncfx.schedule import SequentialSteps
from asyncfx.quality import class_accuracy, feature_distance, frechet_distance, psnr, ssim
from asyncfx.app.sweep import digits_example_inputs
from asyncfx.zoo.digits_model import (KINDS, digits, digits_classifier, digits_dataset, make_scheduler,
                                      sample_digits)

HEADER = ("| N | stride | sequential steps | forecast | PSNR dB | SSIM | class acc. | Frechet dist. "
          "| feature dist. | speedup |\n|---|---|---|---|---|---|---|---|---|---|")


def generate(denoiser, model, labels, steps, scheduler=None):
    start = time.perf_counter()
    images = sample_digits(denoiser, model, labels, steps=steps, seed=0, scheduler=scheduler)
    return images, time.perf_counter() - start


def one_core(function):
    """Run ``function`` with one intra-op thread: one core is one device here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function()
    finally:
        torch.set_num_threads(threads)


def placement(spec: str) -> dict[str, int]:
    """``"2+c1"`` -> ``{"warmup": 2, "cooldown": 1, "refresh": 0}`` (see the module note)."""
    warmup, _, extra = spec.partition("+")
    kinds = {"c": ("cooldown", int), "r": ("refresh", int), "s": ("switch_below", float)}
    placed = {"warmup": int(warmup), "cooldown": 0, "refresh": 0, "switch_below": 0.0}
    if extra:
        name, kind = kinds[extra[0]]
        placed[name] = kind(extra[1:])
    return placed


def speedup(model, labels, n, stride, placed, warmup_used, steps, sequential_s, plan, cores, forecast=0.0):
    """Measured on CPU workers when the slots fit the cores (against ``sequential_s()``,
    the sequential model's seconds on one core), else predicted; with ``switch_below``,
    as the warm-up it made (``warmup_used``)."""
    slots = n + (1 if stride == 2 else 0)
    if slots <= cores and n > 1:
        scheduler = make_scheduler()

        def run():
            den = asyncfx.partition(model.denoiser, n, stride=stride, scheduler=scheduler, plan=plan,
                                    forecast=forecast, example_inputs=digits_example_inputs(model, labels),
                                    **{**placed, "warmup": warmup_used, "switch_below": 0.0})
            try:
                return generate(den, model, labels, steps, scheduler)[1]
            finally:
                den.close()

        return f"{sequential_s() / one_core(run):.2f}x"
    stage = [s.estimated_cost for s in plan.stages] if n > 1 else [1.0]
    placed_steps = SequentialSteps(cooldown=placed["cooldown"], refresh=placed["refresh"])
    sequential = placed_steps.count(warmup_used, steps)
    rounds = parallel_rounds(steps, n, warmup_used, stride, placed_steps)
    predicted = steps / (sequential + rounds * max(stage) / sum(stage))
    return f"{predicted:.2f}x (pred.)"


def layout_rows(options, model, labels, captured, sequential, classifier, real_features) -> list[str]:
    """A row for each layout x warm-up x forecast (stride 1), speed predicted."""
    rows, whole = [], asyncfx.compile(captured, 1).sequential_cost * options.steps
    for layout, spec, forecast in itertools.product(options.layouts.split(","), options.warmups.split(","),
                                                    map(float, options.forecasts.split(","))):
        placed = placement(spec)
        devices = asyncfx.Layout.parse(layout).devices
        den = asyncfx.partition(model.denoiser, devices, layout=layout, executor="serial", forecast=forecast,
                                rebalance=False, example_inputs=digits_example_inputs(model, labels),
                                **placed)
        images, _ = generate(den, model, labels, options.steps)
        predicted = whole / predicted_generation(den.plan, placed["warmup"], options.steps)
        features = classifier.features(images)
        row = (f"| {layout} | 1 | {spec} | {forecast:g} | {psnr(images, sequential).mean():.2f} | "
               f"{ssim(images, sequential).mean():.4f} | {class_accuracy(classifier, images, labels):.3f} | "
               f"{frechet_distance(features, real_features):.2f} | "
               f"{feature_distance(features, classifier.features(sequential)).mean():.4f} | "
               f"{predicted:.2f}x (pred.) |")
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=KINDS, default="unet", help="the digits denoiser")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--warmups", default="1,2,3,5,9")
    parser.add_argument("--strides", default="1,2")
    parser.add_argument("--forecasts", default="0", help="forecast dampings, comma-separated (0: off)")
    parser.add_argument("--predicted", action="store_true",
                        help="predict every row's speed (no timed runs: the machine may be busy)")
    parser.add_argument("--layouts", help="rows of layouts GxN, comma-separated, instead of --stages")
    parser.add_argument("--write", help="append the table to this markdown file")
    options = parser.parse_args()
    torch.set_grad_enabled(False)
    cores = 1 if options.predicted else torch.get_num_threads()  # one core fits no parallel row
    model, classifier = digits(kind=options.model), digits_classifier()
    labels = torch.arange(options.samples) % 10
    real, _ = digits_dataset()
    real_features = classifier.features(real)
    sequential, _ = generate(model.denoiser, model, labels, options.steps)
    sequential_features = classifier.features(sequential)
    sequential_s = functools.cache(
        lambda: one_core(lambda: generate(model.denoiser, model, labels, options.steps))[1])
    measured = cores >= 2 and "2" in options.stages.split(",") and "1" in options.strides.split(",")
    # timed before the rows measured on workers
    timing = f", {sequential_s():.1f} s on one core." if measured else "."
    lines = [f"{type(model.denoiser).__name__}, {options.samples} samples, {options.steps} DDIM steps, "
             f"guidance {model.guidance}, "
             f"CPU with {torch.get_num_threads()} threads, torch {torch.__version__}. "
             "Sequential: class accuracy "
             f"{class_accuracy(classifier, sequential, labels):.3f}, Frechet distance "
             f"{frechet_distance(sequential_features, real_features):.2f}{timing}", "", HEADER]
    print("\n".join(lines), flush=True)
    captured = asyncfx.capture(model.denoiser, *digits_example_inputs(model, labels))
    if options.layouts:
        lines += layout_rows(options, model, labels, captured, sequential, classifier, real_features)
    for n in ([] if options.layouts else map(int, options.stages.split(","))):
        plan = asyncfx.compile(captured, n) if n > 1 else None
        for stride, spec, forecast in itertools.product(
                map(int, options.strides.split(",")), options.warmups.split(","),
                map(float, options.forecasts.split(","))):
            placed = placement(spec)
            if n == 1 and stride == 1 and (spec != "1" or forecast):
                continue  # one stage, stride 1: every row is the sequential model
            scheduler = make_scheduler()
            den = asyncfx.partition(model.denoiser, n, stride=stride, scheduler=scheduler, plan=plan,
                                    executor="serial", forecast=forecast,
                                    example_inputs=digits_example_inputs(model, labels), **placed)
            images, _ = generate(den, model, labels, options.steps, scheduler)
            warmup_used = max(s.warmup for s in den.captures()[0].streams.values())
            gain = speedup(model, labels, n, stride, placed, warmup_used, options.steps, sequential_s, plan,
                           cores, forecast)
            made = f" (W={warmup_used})" if placed["switch_below"] else ""
            features = classifier.features(images)
            row = (f"| {n} | {stride} | {spec}{made} | {forecast:g} | "
                   f"{psnr(images, sequential).mean():.2f} | {ssim(images, sequential).mean():.4f} | "
                   f"{class_accuracy(classifier, images, labels):.3f} | "
                   f"{frechet_distance(features, real_features):.2f} | "
                   f"{feature_distance(features, sequential_features).mean():.4f} | {gain} |")
            print(row, flush=True)
            lines.append(row)
    if options.write:
        with open(options.write, "a", encoding="utf-8") as f:
            f.write(f"\n## Speed against quality on the digits {options.model} "
                    "(`python benchmarks/quality.py`)\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
