"""Speed against quality of asynchronous denoising on the default digits model.

    python benchmarks/quality.py [--samples 500] [--steps 50] [--write benchmarks/RESULTS.md]

Rows: N in {1, 2, 3, 4} x stride {1, 2} x warm-up {1, 2, 3, 5, 9}; each row generates the
same samples (same seeds, 50 DDIM steps, guidance 3) with the serial executor, which
computes exactly what the parallel executors compute. Columns: PSNR and SSIM against
the sequential samples, class accuracy, Frechet distance of classifier features to
real digits, and the speedup over the sequential model on one core: measured on CPU
workers (one core each) where the slots fit this machine's cores (N * stride <= cores),
otherwise predicted from the plan's stage costs as T / (W + (T - W) * round / sequential)
and marked "(pred.)".
"""
from __future__ import annotations

import argparse
import time

import torch

import asyncfx
from asyncfx.quality import class_accuracy, frechet_distance, psnr, ssim
from asyncfx.app.sweep import digits_example_inputs
from asyncfx.zoo.digits_model import (DEFAULT_GUIDANCE, digits, digits_classifier,
                                      digits_dataset, make_scheduler, sample_digits)

HEADER = ("| N | stride | warm-up | PSNR dB | SSIM | class acc. | Frechet dist. | speedup |\n"
          "|---|---|---|---|---|---|---|---|")


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


def speedup(model, labels, n, stride, warmup, steps, sequential_s, plan, cores):
    """Measured on CPU workers when the slots fit the cores, else predicted."""
    slots = n + (1 if stride == 2 else 0)
    if slots <= cores and n > 1:
        scheduler = make_scheduler()

        def run():
            den = asyncfx.partition(model.unet, n, warmup=warmup, stride=stride, scheduler=scheduler,
                                    plan=plan, example_inputs=digits_example_inputs(model, labels))
            try:
                return generate(den, model, labels, steps, scheduler)[1]
            finally:
                den.close()

        return f"{sequential_s / one_core(run):.2f}x"
    if n == 1:
        round_fraction = 1.0 / stride
    else:
        stage = [s.estimated_cost for s in plan.stages]
        round_fraction = max(stage) / sum(stage) / stride
    predicted = steps / (warmup + (steps - warmup) * round_fraction)
    return f"{predicted:.2f}x (pred.)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--warmups", default="1,2,3,5,9")
    parser.add_argument("--write", help="append the table to this markdown file")
    options = parser.parse_args()
    torch.set_grad_enabled(False)
    cores = torch.get_num_threads()
    model, classifier = digits(), digits_classifier()
    labels = torch.arange(options.samples) % 10
    real, _ = digits_dataset()
    real_features = classifier.features(real)
    sequential, _ = generate(model.unet, model, labels, options.steps)
    _, sequential_s = one_core(lambda: generate(model.unet, model, labels, options.steps))
    lines = [f"{options.samples} samples, {options.steps} DDIM steps, guidance {DEFAULT_GUIDANCE}, "
             f"CPU with {cores} threads, torch {torch.__version__}. Sequential: class accuracy "
             f"{class_accuracy(classifier, sequential, labels):.3f}, Frechet distance "
             f"{frechet_distance(classifier.features(sequential), real_features):.2f}, "
             f"{sequential_s:.1f} s on one core.", "", HEADER]
    print("\n".join(lines), flush=True)
    captured = asyncfx.capture(model.unet, *digits_example_inputs(model, labels))
    for n in map(int, options.stages.split(",")):
        plan = asyncfx.compile(captured, n) if n > 1 else None
        for stride in (1, 2):
            for warmup in map(int, options.warmups.split(",")):
                if n == 1 and stride == 1 and warmup > 1:
                    continue  # one stage, stride 1: every warm-up is the sequential model
                scheduler = make_scheduler()
                den = asyncfx.partition(model.unet, n, warmup=warmup, stride=stride, scheduler=scheduler,
                                        plan=plan, executor="serial",
                                        example_inputs=digits_example_inputs(model, labels))
                images, _ = generate(den, model, labels, options.steps, scheduler)
                gain = speedup(model, labels, n, stride, warmup, options.steps, sequential_s, plan, cores)
                row = (f"| {n} | {stride} | {warmup} | {psnr(images, sequential).mean():.2f} | "
                       f"{ssim(images, sequential).mean():.4f} | "
                       f"{class_accuracy(classifier, images, labels):.3f} | "
                       f"{frechet_distance(classifier.features(images), real_features):.2f} | "
                       f"{gain} |")
                print(row, flush=True)
                lines.append(row)
    if options.write:
        with open(options.write, "a", encoding="utf-8") as f:
            f.write("\n## Speed against quality on the default model (`python benchmarks/quality.py`)\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
