"""Speed against quality on the default digits model: the paper's warm-up table.

Every configuration samples the same seeds with the serial executor (which computes
exactly what the parallel executors compute), compares the samples with the
sequential ones, and predicts its speedup on separate devices with the simulator from
the plan's measured stage times.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

import asyncfx
from asyncfx.partitioner.simulate import simulate
from asyncfx.quality import class_accuracy, frechet_distance, psnr, ssim
from asyncfx.zoo.digits_model import (IMAGE_SIZE, DigitClassifier, Digits,
                                      make_scheduler, sample_digits)


@dataclasses.dataclass
class SweepRow:
    """One configuration's fidelity to the sequential samples and its predicted speedup."""

    n_stages: int
    stride: int
    warmup: int
    psnr: float                 # dB against the sequential samples, mean over samples
    ssim: float
    class_accuracy: float
    frechet: float | None       # to real digits' classifier features, when given
    predicted_speedup: float    # on n_stages (+1 for stride 2) devices joined by ``link``
    ideal_speedup: float


def digits_example_inputs(model: Digits, labels: torch.Tensor) -> tuple[tuple, dict]:
    """One guided denoiser call of the digits model for these labels, as (args, kwargs)."""
    x = torch.zeros(2 * len(labels), 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        return (x, model.timestep(torch.tensor(999), len(x))), model.condition(labels, model.guidance)


def speed_quality_sweep(model: Digits, classifier: DigitClassifier, labels: torch.Tensor, *,
                        stages: Sequence[int] = (2, 3), strides: Sequence[int] = (1, 2),
                        warmups: Sequence[int] = (1, 3, 5, 9), steps: int = 20, link: str = "cpu",
                        real_features: torch.Tensor | None = None, repeats: int = 3,
                        captured: asyncfx.Captured | None = None) -> list[SweepRow]:
    """Rows for every (N, stride, warm-up); plans compiled once per N with measured costs.
    ``captured``: the denoiser already captured at ``digits_example_inputs(model, labels)``
    (captured here when None; one made at another call is refused as the capture refuses it).

    Example:
        >>> rows = speed_quality_sweep(asyncfx.zoo.digits(), asyncfx.zoo.digits_classifier(),
        ...                            torch.arange(20) % 10, stages=(2,), warmups=(1, 3))
        >>> [(r.warmup, round(r.psnr, 1)) for r in rows]
    """
    with torch.no_grad():
        inputs = digits_example_inputs(model, labels)
        if captured is None:
            captured = asyncfx.capture(model.denoiser, *inputs)
        else:  # one of another model or batch refused before anything samples
            captured.call.flatten(*inputs)
        return _sweep(model, classifier, labels, captured, inputs, stages, strides, warmups, steps, link,
                      real_features, repeats)


def _sweep(model: Digits, classifier: DigitClassifier, labels: torch.Tensor, captured: asyncfx.Captured,
           inputs: tuple[tuple, dict], stages: Sequence[int], strides: Sequence[int], warmups: Sequence[int],
           steps: int, link: str, real_features: torch.Tensor | None, repeats: int) -> list[SweepRow]:
    sequential = sample_digits(model.denoiser, model, labels, steps=steps, seed=0)
    profile = asyncfx.profile(captured, inputs, repeats=repeats)
    rows = []
    for n in stages:
        plan = asyncfx.compile(captured, n, example_inputs=inputs, cost="measure", profile=profile,
                               refine_rounds=1, repeats=repeats)
        for stride in strides:
            for warmup in warmups:
                images = _sample_async(captured, model, labels, plan, stride, warmup, steps)
                sim = simulate(plan, link=link, steps=steps, warmup=warmup, stride=stride)
                rows.append(SweepRow(
                    n_stages=n, stride=stride, warmup=warmup, psnr=float(psnr(images, sequential).mean()),
                    ssim=float(ssim(images, sequential).mean()),
                    class_accuracy=class_accuracy(classifier, images, labels),
                    frechet=(frechet_distance(classifier.features(images), real_features)
                             if real_features is not None else None),
                    predicted_speedup=sim.speedup(), ideal_speedup=sim.ideal_speedup))
    return rows


def _sample_async(captured: asyncfx.Captured, model: Digits, labels: torch.Tensor, plan: asyncfx.StagePlan,
                  stride: int, warmup: int, steps: int) -> torch.Tensor:
    scheduler = make_scheduler()
    denoiser = asyncfx.partition(captured, plan.n_stages, warmup=warmup, stride=stride, scheduler=scheduler,
                                 plan=plan, executor="serial",
                                 example_inputs=digits_example_inputs(model, labels))
    try:
        return sample_digits(denoiser, model, labels, steps=steps, seed=0, scheduler=scheduler)
    finally:
        denoiser.close()
