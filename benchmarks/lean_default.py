"""The default partition against a measured plan, with each rank's memory, on CPU.

    python benchmarks/lean_default.py [--generations 4] [--steps 10] [--size 16]

SD 2.1's UNet config with random weights, fp32, latent 2x4x16x16 (classifier-free
guidance's batch of 2), 10 DDIM steps, warm-up 2. In one run:

- the original model on 1 and 2 threads;
- ``executor="distributed"`` on 2 gloo ranks of one thread each, each run in fresh
  processes (their memory and peak are the run's own): the default on the model built on
  the meta device (``weights=``: each rank loads its stage's tensors from the files
  ``save_pretrained`` wrote, and the whole model is never built); then the default
  ``partition(unet, 2)`` and a plan from ``cost="measure"``, alternating (``--rounds``);
- the local executor on 2 CPU workers: the default and ``cost="measure"``.

For each it prints every generation's time, the stage times the executor measured in
the last generation and their balance (slowest over mean), and each rank's resident
memory after each generation, its peak, and its stage's parameter bytes. The targets:
the default within 5% of the measured plan from the second generation on, balance at
most 1.05 after re-cutting, a rank's memory at most its stage's parameters plus 0.6 GB,
and the local executor at most 10% above the original model alone.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import DDIMScheduler, UNet2DConditionModel

import asyncfx
from asyncfx.app.model_spec import example_kwargs
from asyncfx.partitioner.rebalance import balance
from asyncfx.zoo import tiny

GB = 1e9


def build(size: int):
    model, _, kwargs = tiny.sd21_unet(batch=2, size=size)
    return model.eval(), kwargs


def empty_copy_from(directory: str) -> torch.nn.Module:
    """The model saved in ``directory``, built from its config without weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(directory)).eval()


def rss() -> float:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> float:
    """This process's peak resident memory, in bytes: the kernel's high-water mark of its
    address space (``getrusage`` would report the parent's: a spawned rank inherits it)."""
    with open("/proc/self/status") as status:
        kilobytes = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kilobytes) * 1024


def sample(denoiser, kwargs: dict, steps: int) -> float:
    """One generation's seconds."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = kwargs["sample"].clone()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        eps = denoiser(**{**kwargs, "sample": x, "timestep": t}).sample
        x = scheduler.step(eps, t, x).prev_sample
    return time.perf_counter() - start


def generations(denoiser, kwargs: dict, options: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Each generation's seconds and the resident memory after it."""
    seconds, memory = [], []
    for _ in range(options.generations):
        seconds.append(sample(denoiser, kwargs, options.steps))
        gc.collect()
        memory.append(rss())
    return seconds, memory


def partitioned(model, kwargs: dict, options: argparse.Namespace, **settings) -> dict:
    """Sample with a partitioned model; what it measured."""
    denoiser = asyncfx.partition(model, 2, warmup=options.warmup, **settings)
    seconds, memory = generations(denoiser, kwargs, options)
    measured = denoiser.executor.measured()
    facts = {"seconds": seconds, "rss": memory, "peak": peak_rss(),
             "stage seconds": None if measured is None else measured.seconds,
             "stage bytes": [s.param_bytes for s in denoiser.plan.stages],
             "notes": denoiser.plan.notes}
    denoiser.close()
    return facts


def distributed_rank(rank: int, folder: str, options: argparse.Namespace, run: str, label: str) -> None:
    """One rank of one distributed run, in a fresh process (its memory and peak are the
    run's own); writes ``<label>.<rank>.json``."""
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init.' + label)}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=1200))
    try:
        torch.set_grad_enabled(False)
        torch.set_num_threads(1)
        settings = {"executor": "distributed"}
        if run == "meta":  # the model never built with weights: its config, then each rank's stage
            weights = os.path.join(folder, "weights")
            model = empty_copy_from(weights)
            kwargs = example_kwargs(model, 2, options.size, options.size)
            settings["weights"] = weights
        else:
            model, kwargs = build(options.size)
        if run == "measure":
            settings.update(cost="measure", example_inputs=kwargs)
        facts = partitioned(model, kwargs, options, **settings)
        with open(os.path.join(folder, f"{label}.{rank}.json"), "w") as f:
            json.dump(facts, f)
    finally:
        dist.destroy_process_group()


def original(model, kwargs: dict, options: argparse.Namespace, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    return [sample(model, kwargs, options.steps) for _ in range(2)]


def report(name: str, facts: list[dict], baseline: float, options: argparse.Namespace) -> float:
    """Print one run's lines; its median time from the second generation on."""
    later = statistics.median(facts[0]["seconds"][1:])
    times = ", ".join(f"{s:.2f}" for s in facts[0]["seconds"])
    print(f"{name}: generations {times} s; from the second on {later:.2f} s, {baseline / later:.2f}x "
          f"the original on 1 thread")
    stage_seconds = facts[0]["stage seconds"]
    if stage_seconds:
        measured = " / ".join(f"{s * 1e3:.0f}" for s in stage_seconds)
        print(f"    stages measured in the last generation: {measured} ms, "
              f"max/mean {balance(stage_seconds):.3f}")
    for rank, rank_facts in enumerate(facts):
        memory = " ".join(f"{m / GB:.2f}" for m in rank_facts["rss"])
        peak = f"{rank_facts['peak'] / GB:.2f} GB"
        if len(facts) == 1:  # one process holds every stage
            print(f"    process: RSS after each generation {memory} GB, peak {peak}")
            continue
        own = rank_facts["stage bytes"][rank]
        print(f"    rank {rank}: RSS after each generation {memory} GB, peak {peak}; "
              f"its stage's parameters {own / GB:.2f} GB (+{(rank_facts['rss'][0] - own) / GB:.2f} GB after "
              f"the first generation)")
    for note in facts[0]["notes"]:
        if note.startswith(("re-cut", "back to")):
            print(f"    {note}")
    return later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--rounds", type=int, default=2, help="alternating default and measured runs")
    parser.add_argument("--skip-local", action="store_true")
    options = parser.parse_args()
    torch.set_grad_enabled(False)
    cores = torch.get_num_threads()
    print(f"CPU, {cores} cores, torch {torch.__version__}; SD 2.1 UNet config, random weights, fp32, latent "
          f"2x4x{options.size}x{options.size}, {options.steps} DDIM steps, warm-up {options.warmup}, "
          f"{options.generations} generations")
    with tempfile.TemporaryDirectory() as folder:
        model, kwargs = build(options.size)
        model.save_pretrained(os.path.join(folder, "weights"))
        model_alone = rss()
        one = statistics.median(original(model, kwargs, options, 1))
        two = statistics.median(original(model, kwargs, options, cores))
        print(f"original: 1 thread {one:.2f} s, {cores} threads {two:.2f} s a generation; the process holds "
              f"{model_alone / GB:.2f} GB with the model")
        names = {"meta": "default, model built on the meta device (weights=)",
                 "default": "default partition(unet, 2)", "measure": "cost='measure' plan"}
        later: dict[str, list[float]] = {"default": [], "measure": []}
        for index, run in enumerate(["meta"] + ["default", "measure"] * options.rounds):
            label = f"{run}{index}"
            mp.start_processes(distributed_rank, args=(folder, options, run, label), nprocs=2,
                               start_method="spawn", join=True)
            facts = [json.load(open(os.path.join(folder, f"{label}.{rank}.json"))) for rank in range(2)]
            seconds = report(f"distributed, {names[run]}", facts, one, options)
            later.setdefault(run, []).append(seconds)
        if options.rounds:
            default, measured = statistics.median(later["default"]), statistics.median(later["measure"])
            print(f"    default against the measured plan, medians of {options.rounds} alternating runs: "
                  f"{default / measured - 1:+.1%} (target within 5%)")
        if options.skip_local:
            return
        torch.set_num_threads(cores)
        local_measure = report("local, cost='measure' plan", [partitioned(
            model, kwargs, options, cost="measure", example_inputs=kwargs)], one, options)
        local_default = report("local, default partition(unet, 2)", [partitioned(model, kwargs, options)],
                               one, options)
        print(f"    default against the measured plan: {local_default / local_measure - 1:+.1%}; the process "
              f"now holds {rss() / GB:.2f} GB, {rss() / model_alone - 1:+.1%} against the model alone "
              "(target at most +10%)")


if __name__ == "__main__":
    main()
