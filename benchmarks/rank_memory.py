"""What a distributed rank's memory is made of, on CPU: the floor, the stage, each step's peak.

    python benchmarks/rank_memory.py [--meta] [--steps 10] [--size 16]

SD 2.1's UNet config with random weights, fp32, latent 2x4x16x16, 2 gloo ranks of one
thread each, the default ``partition(unet, 2, executor="distributed")`` (``--meta``: the
model built on the meta device, each rank loading its stage from ``save_pretrained``
files). Each rank prints its resident memory (RSS) with torch, diffusers and asyncfx
imported and the model built, then after each step with the peak *of that step alone*
(the kernel's high-water mark, reset before the step), the RSS once glibc returned its
free heap pages (``malloc_trim``), and the peak of one call of the stage's largest
convolution alone. ``benchmarks/lean_default.py`` measures the same rank against its
targets; this script says where the bytes above the stage's parameters come from.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from diffusers import DDIMScheduler

import asyncfx
from asyncfx.app.model_spec import example_kwargs
from lean_default import GB, build, empty_copy_from, rss


def step_peak(call) -> tuple[object, float]:
    """What ``call()`` returns, and the process's peak RSS while it ran, in bytes."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the high-water mark (VmHWM) to the current RSS
    result = call()
    with open("/proc/self/status") as status:
        kilobytes = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return result, int(kilobytes) * 1024


def largest_convolution_peak(modules) -> tuple[tuple[int, ...], float]:
    """The largest 4-d weight among ``modules``, and the peak RSS above the RSS before one
    convolution with a weight of its shape (on a 16x16 input)."""
    shape = max((tuple(p.shape) for m in modules for p in m.parameters() if p.dim() == 4),
                key=lambda s: torch.Size(s).numel())
    weight, x = torch.randn(shape), torch.randn(2, shape[1], 16, 16)
    before = rss()
    _, peak = step_peak(lambda: F.conv2d(x, weight, padding=shape[-1] // 2))
    return shape, peak - before


def rank_main(rank: int, folder: str, options: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init')}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=900))
    try:
        torch.set_grad_enabled(False)
        torch.set_num_threads(1)
        settings = {}
        if options.meta:
            model = empty_copy_from(os.path.join(folder, "weights"))
            kwargs = example_kwargs(model, 2, options.size, options.size)
            settings["weights"] = os.path.join(folder, "weights")
        else:
            model, kwargs = build(options.size)
        facts = {"base": rss()}
        denoiser = asyncfx.partition(model, 2, warmup=2, executor="distributed", **settings)
        scheduler = DDIMScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(options.steps)
        x, steps = kwargs["sample"].clone(), []
        for t in scheduler.timesteps:
            output, peak = step_peak(lambda: denoiser(**{**kwargs, "sample": x, "timestep": t}).sample)
            x = scheduler.step(output, t, x).prev_sample
            gc.collect()
            steps.append((rss(), peak))
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        facts.update(steps=steps, trimmed=rss(), stage=denoiser.plan.stages[rank].param_bytes,
                     conv=largest_convolution_peak(denoiser.executor.modules()))
        with open(os.path.join(folder, f"{rank}.json"), "w") as f:
            json.dump(facts, f)
        denoiser.close()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta", action="store_true", help="build the model on the meta device (weights=)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if options.meta:
            build(options.size)[0].save_pretrained(os.path.join(folder, "weights"))
        mp.start_processes(rank_main, args=(folder, options), nprocs=2, start_method="spawn", join=True)
        for rank in range(2):
            with open(os.path.join(folder, f"{rank}.json")) as f:
                facts = json.load(f)
            stage, base = facts["stage"], facts["base"]
            (shape, conv) = facts["conv"]
            print(f"rank {rank}: stage parameters {stage / GB:.3f} GB; imports and the model "
                  f"({'meta' if options.meta else 'with weights'}) {base / GB:.3f} GB")
            for index, (now, peak) in enumerate(facts["steps"]):
                print(f"    step {index}: RSS {now / GB:.3f} GB (+{(now - stage) / GB:.3f} over the stage), "
                      f"peak of the step {peak / GB:.3f} GB (+{(peak - stage) / GB:.3f})")
            print(f"    after malloc_trim: {facts['trimmed'] / GB:.3f} GB "
                  f"(+{(facts['trimmed'] - stage) / GB:.3f} over the stage)")
            print(f"    one call of its largest convolution {tuple(shape)} "
                  f"({torch.Size(shape).numel() * 4 / GB:.3f} GB of weight): peak +{conv / GB:.3f} GB")


if __name__ == "__main__":
    main()
