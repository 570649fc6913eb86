"""End-to-end sampling speedup of asyncfx.partition() on CPU workers.

    python benchmarks/cpu_speedup.py [--steps 20] [--warmup 2] [--n-devices 2] [--distributed]
                                     [--forecast G]

A mid-size SD-shaped UNet (64/128/128 channels, latent 2x4x32x32, about 120 ms a step
on one core) samples 20 DDIM steps. In one run: the original model with 1 intra-op
thread and with all threads, and the partitioned model on N CPU workers (one thread
each; plan from cost="measure" profiled on one thread). Prints end-to-end times, the
ratios, the fraction of the ideal speedup T / (W + (T - W) / N), and what the simulator
(``asyncfx simulate``) predicted for the partitioned run from the plan's stage times.
With --distributed it also runs executor="distributed": N processes (one thread each)
joined by a gloo process group, boundary tensors sent as they are made. With
--forecast G it also times a parallel round (the median call after warm-up) with
``forecast=G`` against plain reuse, on the same plan, alternating ``--repeats`` times.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import DDIMScheduler

import asyncfx
from asyncfx.partitioner.simulate import simulate
from asyncfx.zoo import tiny


def build():
    return tiny.sd_unet(batch=2, size=32, block_out_channels=(64, 128, 128), cross_attention_dim=64,
                        heads=8, text_len=16)


def sample(denoiser, kwargs: dict, steps: int, call_seconds: list | None = None) -> torch.Tensor:
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = kwargs["sample"].clone()
    for t in scheduler.timesteps:
        start = time.perf_counter()
        eps = denoiser(**{**kwargs, "sample": x, "timestep": t}).sample
        if call_seconds is not None:
            call_seconds.append(time.perf_counter() - start)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def timed(denoiser, kwargs: dict, steps: int, repeats: int, threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sample(denoiser, kwargs, steps)  # warm caches and allocators
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            sample(denoiser, kwargs, steps)
            samples.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(samples)


def rounds_with_forecast(model, kwargs: dict, plan, options: argparse.Namespace) -> dict[float, list[float]]:
    """Median round (call after warm-up) of each generation, plain reuse and forecasting
    alternating (in turn first), on ``plan`` (never re-cut). One denoiser serves both, its
    ``forecast`` set between generations, so that both run on the same worker threads:
    two denoisers' workers land differently on the cores, which moved rounds by 6%."""
    denoiser = asyncfx.partition(model, options.n_devices, example_inputs=kwargs, warmup=options.warmup,
                                 plan=plan)
    rounds: dict[float, list[float]] = {0.0: [], options.forecast: []}
    try:
        for repeat in range(options.repeats + 1):  # the first of each warms caches and allocators
            for forecast in (list(rounds) if repeat % 2 else list(rounds)[::-1]):
                denoiser.forecast = forecast  # between generations: each reads its own schedule
                calls: list[float] = []
                sample(denoiser, kwargs, options.steps, calls)
                rounds[forecast].append(statistics.median(calls[options.warmup:]))
    finally:
        denoiser.close()
    return {g: r[1:] for g, r in rounds.items()}


def distributed_rank(rank: int, world: int, folder: str, steps: int, warmup: int, repeats: int) -> None:
    """One rank of the distributed run; rank 0 writes the median generation time."""
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        torch.set_grad_enabled(False)
        model, _, kwargs = build()
        torch.set_num_threads(1)  # each rank profiles and runs as one core
        denoiser = asyncfx.partition(model, world, example_inputs=kwargs, warmup=warmup, cost="measure",
                                     executor="distributed")
        seconds = timed(denoiser, kwargs, steps, repeats, 1)
        denoiser.close()
        if rank == 0:
            with open(os.path.join(folder, "seconds"), "w") as f:
                f.write(str(seconds))
    finally:
        dist.destroy_process_group()


def run_distributed(world: int, steps: int, warmup: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(distributed_rank, args=(world, folder, steps, warmup, repeats), nprocs=world,
                           start_method="spawn", join=True)
        with open(os.path.join(folder, "seconds")) as f:
            return float(f.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--n-devices", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distributed", action="store_true", help="also run executor='distributed'")
    parser.add_argument("--forecast", type=float, default=None, help="also time rounds with forecast=G")
    options = parser.parse_args()
    torch.set_grad_enabled(False)
    cores = torch.get_num_threads()
    model, _, kwargs = build()

    one_thread = timed(model, kwargs, options.steps, options.repeats, 1)
    all_threads = timed(model, kwargs, options.steps, options.repeats, cores)

    torch.set_num_threads(1)  # profile as each worker will run: one thread
    start = time.perf_counter()
    denoiser = asyncfx.partition(model, options.n_devices, example_inputs=kwargs, warmup=options.warmup,
                                 cost="measure")
    compile_seconds = time.perf_counter() - start
    torch.set_num_threads(cores)
    partitioned = timed(denoiser, kwargs, options.steps, options.repeats, cores)
    calls: list[float] = []
    sample(denoiser, kwargs, options.steps, calls)
    round_seconds = statistics.median(calls[options.warmup:])
    measured = [s.measured_seconds for s in denoiser.plan.stages]
    predicted = simulate(denoiser.plan, link="cpu", steps=options.steps, warmup=options.warmup)
    denoiser.close()
    if options.forecast is not None:
        forecast_rounds = rounds_with_forecast(model, kwargs, denoiser.plan, options)

    T, W, N = options.steps, options.warmup, options.n_devices
    ideal = T / (W + (T - W) / N)
    print(f"CPU, {cores} cores, torch {torch.__version__}; SD-shaped UNet 64/128/128, latent 2x4x32x32, "
          f"{T} DDIM steps, warm-up {W}, N={N} CPU workers (1 thread each), median of {options.repeats}")
    print(f"  stage times (ms, measured alone): {', '.join(f'{m * 1e3:.1f}' for m in measured)}; "
          f"partition + profile + refinement {compile_seconds:.1f} s (once)")
    print(f"  original, 1 thread      {one_thread:7.2f} s")
    print(f"  original, {cores} threads     {all_threads:7.2f} s")
    print(f"  asyncfx, {N} workers      {partitioned:7.2f} s")
    print(f"  speedup over 1 thread:  {one_thread / partitioned:.2f}x  (ideal {ideal:.2f}x, "
          f"{one_thread / partitioned / ideal:.0%} of ideal; target 1.7x)")
    print(f"  speedup over {cores} threads: {all_threads / partitioned:.2f}x")
    print(f"  round {round_seconds * 1e3:.1f} ms against the slowest stage alone "
          f"{max(measured) * 1e3:.1f} ms: "
          f"{1 - max(measured) / round_seconds:.0%} of the round is runtime overhead and contention")
    print(f"  simulator: {predicted.total():.2f} s for asyncfx ({predicted.total() / partitioned - 1:+.0%} "
          f"against the measurement), from stage times measured alone and a whole-model step of "
          f"{predicted.sequential_step * 1e3:.1f} ms on one thread")
    if options.forecast is not None:
        plain, forecast = (statistics.median(forecast_rounds[g]) for g in (0.0, options.forecast))
        print(f"  round with forecast={options.forecast:g} {forecast * 1e3:.1f} ms against plain reuse "
              f"{plain * 1e3:.1f} ms: {forecast / plain - 1:+.1%} (medians of {options.repeats} alternating "
              "generations, same plan and workers; target at most +2%)")
    if options.distributed:
        distributed = run_distributed(N, options.steps, options.warmup, options.repeats)
        print(f"  asyncfx, {N} gloo ranks   {distributed:7.2f} s: {one_thread / distributed:.2f}x over "
              f"1 thread ({one_thread / distributed / ideal:.0%} of ideal)")


if __name__ == "__main__":
    main()
