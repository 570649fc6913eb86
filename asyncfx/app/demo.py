"""The demo: a digits model, sampled sequentially and with asyncfx.partition()."""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

import asyncfx
from asyncfx.outputs import writing
from asyncfx.schedule import check_forecast, devices_needed
from asyncfx.quality import class_accuracy, frechet_distance, psnr, ssim
from asyncfx.app.sweep import digits_example_inputs
from asyncfx.zoo.digits_model import (digits, digits_classifier, digits_dataset,
                                      make_scheduler, sample_digits)


#: The demo image: samples' gap, grids' gap (pixels before scaling), scale, caption band.
TILE_GAP, GRID_GAP, SCALE, CAPTION_HEIGHT = 2, 8, 4, 18
CAPTIONS = ("sequential", "asyncfx (same seeds)", "|difference| x4")


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
    slots = laid_out.groups * devices_needed(laid_out.stages, stride)
    ideal, warmup_note = ideal_speedup(steps, warmup, laid_out, stride)
    print(f"\nlatency: sequential {sequential_s:.2f} s (all {torch.get_num_threads()} threads), "
          f"asyncfx {partitioned_s:.2f} s on {slots} CPU workers: speedup "
          f"{sequential_s / partitioned_s:.2f}x (ideal on {slots} separate devices {ideal:.2f}x; "
          f"CPU workers share this machine's cores){warmup_note}")
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


def ideal_speedup(steps: int, warmup: int, layout: asyncfx.Layout, stride: int) -> tuple[float, str]:
    """The speedup on separate devices with perfect balance and free transfers: warm-up
    steps split over the batch groups only, the others over every device (times the
    stride); and a note when every step is a warm-up step.

    Example:
        >>> ideal_speedup(50, 3, asyncfx.Layout(1, 2), 1)[0]
        1.886...
    """
    warm = min(warmup, steps)
    parallel = (steps - warm) / (layout.groups * layout.stages * stride)
    ideal = steps / (warm / layout.groups + parallel)
    note = (f"; all {steps} steps are warm-up steps, which run the stages one after another: give --steps "
            f"more than --warmup {warmup} to see them run at once" if steps <= warmup and layout.stages > 1
            else "")
    return ideal, note


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
    """Write the two sample grids (a row per digit, a grey line between samples) and their
    difference side by side, each under its caption, in the format ``path``'s suffix names."""
    from PIL import Image, ImageDraw

    from asyncfx.viz import difference_images, tile_images

    grids = [tile_images(images, rows=10, gap=TILE_GAP)
             for images in (left, right, difference_images(right, left))]
    height = grids[0].shape[0]
    gap = np.full((height, GRID_GAP), 255, dtype=np.uint8)
    canvas = np.concatenate([grids[0], gap, grids[1], gap, grids[2]], axis=1)
    scaled = Image.fromarray(canvas).resize((canvas.shape[1] * SCALE, height * SCALE), Image.NEAREST)
    image = Image.new("L", (scaled.width, scaled.height + CAPTION_HEIGHT), 255)
    image.paste(scaled, (0, CAPTION_HEIGHT))
    draw = ImageDraw.Draw(image)
    width = grids[0].shape[1] + GRID_GAP
    for k, caption in enumerate(CAPTIONS):
        draw.text((k * width * SCALE + 2, 4), caption, fill=0)
    with writing(path, "image") as temporary:
        image.save(temporary)  # in the format path's suffix names
