"""Stages and step caches together, on a digits model (UNet or DiT), CPU workers.

    python benchmarks/step_caches.py [--model unet|dit] [--samples 50] [--steps 50] [--repeats 3]
                                     [--caches reuse forecast magcache "first block"]
                                     [--write benchmarks/RESULTS.md]

For each cache, four ways to make the same samples (same seeds and DDIM steps, the
model's guidance batch), timed in this run:

- sequential: the model alone, on one core (the baseline of every speedup);
- cache: the model with diffusers' hooks of the cache, on one core;
- stages: 2 stages on 2 CPU workers of one core each (layout 1x2, warm-up 2, the default
  forecast of stale values), without the cache;
- both: the same stages, the model's cache applied by each stage.

Caches: "reuse", Pyramid Attention Broadcast on every self-attention, computed every
other step (its timestep range covering the whole generation); "forecast", TaylorSeer on
the model's large blocks (the UNet's middle and up blocks, the DiT's transformer blocks),
computed at the first 5 steps and one step in 2 after, forecast to first order in between;
on the DiT (whose transformer blocks are a chain diffusers knows) also "magcache",
MagCache with the magnitude ratios its calibration run measures on the model in this run
(threshold 0.1, at most 2 steps skipped in a row), and "first block", the first-block
cache at threshold 0.1.
Columns: seconds (the fastest of ``--repeats`` runs: this machine's timings vary from run
to run), speedup over the sequential model, PSNR and SSIM against the sequential
samples, class accuracy. Speed is measured where the workers fit this machine's cores
(2 workers: 2 cores), as here; fidelity is the serial executor's too, bit for bit.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import time

import torch
from diffusers.hooks.hooks import CacheContext, HookRegistry
from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig, apply_first_block_cache, apply_mag_cache,
                             apply_pyramid_attention_broadcast, apply_taylorseer_cache)

import asyncfx
from asyncfx.app.sweep import digits_example_inputs
from asyncfx.quality import class_accuracy, psnr, ssim
from asyncfx.zoo.digits_model import KINDS, digits, digits_classifier, sample_digits

HEADER = ("| cache | run | seconds | speedup | PSNR dB | SSIM | class acc. |\n"
          "|---|---|---|---|---|---|---|")
#: The modules TaylorSeer forecasts, by model kind (``cache_identifiers``, full matches).
FORECAST_MODULES = {"unet": [r"mid_block", r"up_blocks\.\d+"], "dit": [r"transformer_blocks\.\d+"]}


def with_cache(kind: str, cache: str, steps: int = 50, ratios: list[float] | None = None):
    """A fresh digits model of ``kind`` with ``cache`` applied (``None``: without); MagCache
    with magnitude ``ratios`` over ``steps`` steps (None: its calibration run)."""
    model = digits(kind=kind)
    if cache == "magcache":
        apply_mag_cache(model.denoiser, MagCacheConfig(
            threshold=0.1, max_skip_steps=2, num_inference_steps=steps, mag_ratios=ratios,
            calibrate=ratios is None))
    elif cache == "first block":
        apply_first_block_cache(model.denoiser, FirstBlockCacheConfig(threshold=0.1))
    elif cache == "reuse":
        apply_pyramid_attention_broadcast(model.denoiser, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: 500))
    elif cache == "forecast":
        apply_taylorseer_cache(model.denoiser, TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=5, max_order=1, taylor_factors_dtype=torch.float32,
            cache_identifiers=FORECAST_MODULES[kind]))
    return model


def start_generation(denoiser) -> None:
    """Forget what the cache's hooks kept from the last generation (pipelines do this at
    their end); TaylorSeer's state is kept by call name: one, for the guided batch."""
    HookRegistry.check_if_exists_or_initialize(denoiser).reset_stateful_hooks()
    for module in denoiser.modules():
        for hook in getattr(module.__dict__.get("_diffusers_hook"), "hooks", {}).values():
            if hasattr(hook, "state_manager"):
                hook.state_manager.set_context(CacheContext(name="digits"))


def magnitude_ratios(kind: str, labels: torch.Tensor, steps: int) -> list[float]:
    """MagCache's calibration run on the model: the ratios it prints at its last step."""
    model = with_cache(kind, "magcache", steps)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        start_generation(model.denoiser)
        sample_digits(model.denoiser, model, labels, steps=steps)
    lines = printed.getvalue().splitlines()
    return ast.literal_eval(next(line for line in lines if line.startswith("[") and "]" == line[-1:]))


def timed(run, repeats: int) -> tuple[torch.Tensor, float]:
    """``run()``'s samples and its fastest seconds of ``repeats`` runs (the first also warms
    up: kernels, stage copies), with one intra-op thread (a core is a worker here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fastest = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            images = run()
            fastest = min(fastest, time.perf_counter() - start)
        return images, fastest
    finally:
        torch.set_num_threads(threads)


def samples(model, labels, steps: int, staged: bool, repeats: int) -> tuple[torch.Tensor, float]:
    """The samples of ``model`` (partitioned in 2 stages on CPU workers where ``staged``)."""
    if not staged:
        def run():
            start_generation(model.denoiser)
            return sample_digits(model.denoiser, model, labels, steps=steps)

        return timed(run, repeats)
    denoiser = asyncfx.partition(model.denoiser, 2, layout="1x2", warmup=2, release_weights=False,
                                 example_inputs=digits_example_inputs(model, labels), progress=False)
    try:
        return timed(lambda: sample_digits(denoiser, model, labels, steps=steps), repeats)
    finally:
        denoiser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=KINDS, default="unet", help="the digits denoiser")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way, the fastest kept")
    parser.add_argument("--caches", nargs="*", choices=("reuse", "forecast", "magcache", "first block"),
                        help="the caches to run (default: those the model takes)")
    parser.add_argument("--write", help="append the table to this markdown file")
    options = parser.parse_args()
    torch.set_grad_enabled(False)
    classifier, labels = digits_classifier(), torch.arange(options.samples) % 10
    plain, repeats = with_cache(options.model, None), options.repeats
    reference, sequential_s = samples(plain, labels, options.steps, staged=False, repeats=repeats)
    lines = [f"{type(plain.denoiser).__name__}, {options.samples} samples, {options.steps} DDIM steps, "
             f"guidance {plain.guidance}, CPU with {torch.get_num_threads()} cores, "
             f"torch {torch.__version__}. "
             f"Sequential: {sequential_s:.2f} s on one core, class accuracy "
             f"{class_accuracy(classifier, reference, labels):.3f}.", "", HEADER]
    print("\n".join(lines), flush=True)
    stages = samples(plain, labels, options.steps, staged=True, repeats=repeats)
    chains = ["magcache", "first block"] if options.model == "dit" else []
    caches = options.caches or ["reuse", "forecast", *chains]
    ratios = magnitude_ratios(options.model, labels, options.steps) if "magcache" in caches else None
    for cache in caches:
        made = (options.model, cache, options.steps, ratios)
        runs = {"cache": samples(with_cache(*made), labels, options.steps, False, repeats),
                "stages": stages,
                "both": samples(with_cache(*made), labels, options.steps, True, repeats)}
        for name, (images, seconds) in runs.items():
            row = (f"| {cache} | {name} | {seconds:.2f} | {sequential_s / seconds:.2f}x | "
                   f"{psnr(images, reference).mean():.2f} | {ssim(images, reference).mean():.4f} | "
                   f"{class_accuracy(classifier, images, labels):.3f} |")
            print(row, flush=True)
            lines.append(row)
    if options.write:
        with open(options.write, "a", encoding="utf-8") as f:
            f.write(f"\n## Stages and step caches on the digits {options.model} "
                    "(`python benchmarks/step_caches.py`)\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
