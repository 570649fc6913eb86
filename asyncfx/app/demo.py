"""The demo: a digits model, sampled sequentially and with asyncfx.partition()."""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

import asyncfx
from asyncfx.outputs import writing
from asyncfx.schedule import check_forecast
from asyncfx.quality import class_accuracy, frechet_distance, psnr, ssim
from asyncfx.app.sweep import digits_example_inputs
from asyncfx.zoo.digits_model import (IMAGE_SIZE, digits, digits_classifier, digits_dataset,
                                      make_scheduler, sample_digits)


@torch.no_grad()
def run_demo(*, model: str = "unet", n_devices: int = 2, layout: str | None = None,
             warmup: int | None = None, stride: int = 1, forecast: float | None = None, steps: int = 50,
             seed: int = 0, per_class: int = 4, out: str = "asyncfx_demo.png") -> int:
    """Print plan, latencies, speedup and quality; write the two grids as a PNG.

    ``model`` names the denoiser, ``"unet"`` or ``"dit"``; ``layout`` is partition()'s
    (None: chosen for the classifier-free-guidance batch).

    Example:
        >>> run_demo(model="dit", n_devices=2, steps=20, out="demo.png")
    """
    warmup = asyncfx.DEFAULT_WARMUP if warmup is None else warmup
    forecast = check_forecast(asyncfx.DEFAULT_FORECAST if forecast is None else forecast)  # before sampling
    digits_model, classifier = digits(kind=model), digits_classifier()
    labels = torch.arange(10).repeat_interleave(per_class)
    print(f"model: digits {type(digits_model.denoiser).__name__}, "
          f"{sum(p.numel() for p in digits_model.denoiser.parameters()) / 1e6:.2f}M parameters, "
          f"{len(labels)} samples, {steps} DDIM steps, guidance {digits_model.guidance}")

    sequential, sequential_s = _timed(digits_model.denoiser, digits_model, labels, steps, seed, None,
                                      "sequential")
    scheduler = make_scheduler()
    start = time.perf_counter()
    denoiser = asyncfx.partition(digits_model.denoiser, n_devices, layout=layout, warmup=warmup,
                                 stride=stride, forecast=forecast, scheduler=scheduler,
                                 example_inputs=digits_example_inputs(digits_model, labels))
    compile_s = time.perf_counter() - start
    print(f"\nstage plan (compiled in {compile_s:.1f} s):")
    print(denoiser.plan.summary())
    laid_out = denoiser.layout
    partitioned, partitioned_s = _timed(denoiser, digits_model, labels, steps, seed, scheduler,
                                        f"asyncfx {laid_out}")
    denoiser.close()

    real, real_labels = digits_dataset()
    groups, stages = laid_out.groups, laid_out.stages
    slots = groups * (stages + (1 if stride == 2 else 0))
    ideal = (steps / (warmup / groups + (steps - warmup) / (groups * stages * stride)) if stages > 1
             else float(groups))
    print(f"\nlatency: sequential {sequential_s:.2f} s (all {torch.get_num_threads()} threads), "
          f"asyncfx {partitioned_s:.2f} s on {slots} CPU workers: speedup "
          f"{sequential_s / partitioned_s:.2f}x (ideal on {slots} separate devices {ideal:.2f}x; "
          "CPU workers share this machine's cores)")
    features_real = classifier.features(real)
    for name, images in (("sequential", sequential), ("asyncfx", partitioned)):
        distance = frechet_distance(classifier.features(images), features_real)
        print(f"{name:>10}: class accuracy {class_accuracy(classifier, images, labels):.3f}, "
              f"Frechet distance to real digits {distance:.2f}")
    print(f"asyncfx vs sequential, same seeds: PSNR {psnr(partitioned, sequential).mean():.2f} dB, "
          f"SSIM {ssim(partitioned, sequential).mean():.4f}")
    save_grids(out, sequential, partitioned, per_class)
    print(f"wrote {out} (left: sequential, middle: asyncfx, right: |difference| x4)")
    return 0


def _timed(denoiser, model, labels, steps, seed, scheduler, name) -> tuple[torch.Tensor, float]:
    with tqdm(total=steps, desc=name, unit="step") as bar:
        start = time.perf_counter()
        images = sample_digits(denoiser, model, labels, steps=steps, seed=seed, scheduler=scheduler,
                               on_step=bar.update)
        return images, time.perf_counter() - start


def image_suffixes() -> set[str]:
    """The file suffixes an image can be written as (Pillow's formats), e.g. ``.jpg``."""
    from PIL import Image

    return {suffix for suffix, name in Image.registered_extensions().items() if name in Image.SAVE}


def save_grids(path: str, left: torch.Tensor, right: torch.Tensor, per_class: int) -> None:
    """Write the two sample grids (a row per digit) and their difference side by side."""
    from PIL import Image

    from asyncfx.viz import difference_images, tile_images

    gap = np.full((10 * IMAGE_SIZE, 4), 255, dtype=np.uint8)
    grids = [tile_images(images, rows=10) for images in (left, right, difference_images(right, left))]
    canvas = np.concatenate([grids[0], gap, grids[1], gap, grids[2]], axis=1)
    image = Image.fromarray(canvas).resize((canvas.shape[1] * 4, canvas.shape[0] * 4), Image.NEAREST)
    with writing(path, "image") as temporary:
        image.save(temporary)  # in the format path's suffix names
