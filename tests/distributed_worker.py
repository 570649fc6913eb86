"""What every rank of the distributed tests runs (spawned by test_distributed.py)."""
from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

import asyncfx
from asyncfx.zoo.tiny import ZOO
from conftest import ddim, mispriced_example, sample

LATENT = {"sd_unet": "sample", "sd3_transformer": "hidden_states", "mispriced": "sample"}


def example(model_name: str):
    """The model and its call: a tiny zoo model, or the one the FLOP estimate misprices."""
    if model_name == "mispriced":
        return mispriced_example()
    model, _, kwargs = ZOO[model_name]()
    return model, kwargs


class _ExitAt:
    """Wraps the denoiser; the rank that should die exits at the given call."""

    def __init__(self, denoiser, exit_at: int | None):
        self.denoiser, self.exit_at, self.calls = denoiser, exit_at, 0

    def __call__(self, *args, **kwargs):
        if self.calls == self.exit_at:
            os._exit(0)
        self.calls += 1
        return self.denoiser(*args, **kwargs)


def run_scenarios(rank: int, out_root: str, scenarios: list[tuple], steps: int) -> None:
    """One process for many scenarios ``(model_name, world, stride, guided_at, rebalance)``, each with
    a process group of its own (ranks beyond a scenario's world skip it), so that the
    interpreters, imports and zoo models are made once; results go to ``out_root/<i>``."""
    captures: dict[str, asyncfx.Captured] = {}  # each model captured once by this rank
    for index, (model_name, world, stride, guided_at, rebalance) in enumerate(scenarios):
        if rank < world:
            out_dir = os.path.join(out_root, str(index))
            os.makedirs(out_dir, exist_ok=True)
            if model_name not in captures:
                model, kwargs = example(model_name)
                captures[model_name] = asyncfx.capture(model, (), kwargs)
            run(rank, world, os.path.join(out_root, f"init{index}"), out_dir, model_name, steps,
                stride=stride, guided_at=guided_at, captured=captures[model_name], rebalance=rebalance)


def run(rank: int, world: int, init_file: str, out_dir: str, model_name: str, steps: int,
        dying_rank: int | None = None, timeout_s: float = 60.0, stride: int = 1,
        guided_at: tuple[int, ...] = (), captured: asyncfx.Captured | None = None,
        rebalance: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)
    try:
        model, kwargs = example(model_name)
        denoiser = asyncfx.partition(captured or model, world - (stride - 1), warmup=3 if rebalance else 2,
                                     executor="distributed", stride=stride, rebalance=rebalance,
                                     scheduler=ddim(steps) if stride == 2 else None)
        caller = _ExitAt(denoiser, 4 if rank == dying_rank else None)
        results, plans = [], []
        with torch.no_grad():  # two generations: the second starts while the first's last messages fly
            for _ in range(2):
                results.append(sample(caller, kwargs, LATENT[model_name], steps=steps, guided_at=guided_at))
                plans.append(json.dumps(denoiser.plan.to_dict()))  # the plan the generation's parallel steps ran
        module = denoiser.executor.module
        held = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        denoiser.close()
        torch.save((results, plans), os.path.join(out_dir, f"rank{rank}.pt"))
        with open(os.path.join(out_dir, f"held{rank}.txt"), "w") as f:
            f.write(str(held))
    except Exception as exc:  # the test reads what each rank saw
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
