"""What every rank of the distributed tests runs (spawned by test_distributed.py)."""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

import asyncfx
from asyncfx.zoo.tiny import ZOO
from conftest import ddim, sample

LATENT = {"sd_unet": "sample", "sd3_transformer": "hidden_states"}


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
    """One process for many scenarios ``(model_name, world, stride, guided_at)``, each with
    a process group of its own (ranks beyond a scenario's world skip it), so that the
    interpreters, imports and zoo models are made once; results go to ``out_root/<i>``."""
    captures: dict[str, asyncfx.Captured] = {}  # each model captured once by this rank
    for index, (model_name, world, stride, guided_at) in enumerate(scenarios):
        if rank < world:
            out_dir = os.path.join(out_root, str(index))
            os.makedirs(out_dir, exist_ok=True)
            if model_name not in captures:
                model, _, kwargs = ZOO[model_name]()
                captures[model_name] = asyncfx.capture(model, (), kwargs)
            run(rank, world, os.path.join(out_root, f"init{index}"), out_dir, model_name, steps,
                stride=stride, guided_at=guided_at, captured=captures[model_name])


def run(rank: int, world: int, init_file: str, out_dir: str, model_name: str, steps: int,
        dying_rank: int | None = None, timeout_s: float = 60.0, stride: int = 1,
        guided_at: tuple[int, ...] = (), captured: asyncfx.Captured | None = None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)
    try:
        model, _, kwargs = ZOO[model_name]()
        denoiser = asyncfx.partition(captured or model, world - (stride - 1), warmup=2, executor="distributed",
                                     stride=stride, scheduler=ddim(steps) if stride == 2 else None)
        caller = _ExitAt(denoiser, 4 if rank == dying_rank else None)
        with torch.no_grad():  # two generations: the second starts while the first's last
            results = [sample(caller, kwargs, LATENT[model_name], steps=steps,  # messages fly
                              guided_at=guided_at) for _ in range(2)]
        module = denoiser.executor.module
        held = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        denoiser.close()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        with open(os.path.join(out_dir, f"held{rank}.txt"), "w") as f:
            f.write(str(held))
    except Exception as exc:  # the test reads what each rank saw
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
