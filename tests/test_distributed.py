"""The distributed executor with real gloo process groups, spawned by the test."""
from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

import asyncfx
from conftest import sample, zoo_example
from distributed_worker import LATENT, run

STEPS = 10


def spawn(tmp_path, world: int, model_name: str, dying_rank=None, timeout_s=60.0) -> float:
    init_file = tmp_path / "init"
    start = time.perf_counter()
    mp.start_processes(run, args=(world, str(init_file), str(tmp_path), model_name, STEPS,
                                  dying_rank, timeout_s),
                       nprocs=world, start_method="spawn", join=True)
    return time.perf_counter() - start


def serial_result(model_name: str, world: int) -> torch.Tensor:
    model, _, kwargs = zoo_example(model_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sample(asyncfx.partition(model, world, warmup=2, executor="serial"), kwargs,
                      LATENT[model_name], steps=STEPS)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("model_name, world", [("sd_unet", 2), ("sd_unet", 3), ("sd3_transformer", 2)])
def test_distributed_ranks_equal_serial(tmp_path, model_name, world):
    spawn(tmp_path, world, model_name)
    errors = {p.name: p.read_text() for p in tmp_path.glob("error*.txt")}
    assert not errors, errors
    expected = serial_result(model_name, world)
    for rank in range(world):  # every rank's sampler took the same steps
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, rtol=0, atol=0)
    held = [int((tmp_path / f"held{rank}.txt").read_text()) for rank in range(world)]
    plan = asyncfx.compile(asyncfx.capture(zoo_example(model_name)[0], (), zoo_example(model_name)[2]),
                           world)
    assert held == [s.param_bytes for s in plan.stages]


def test_a_rank_that_exits_makes_the_others_fail_clearly(tmp_path):
    elapsed = spawn(tmp_path, 2, "sd_unet", dying_rank=1, timeout_s=20.0)
    message = (tmp_path / "error0.txt").read_text()
    assert message.startswith("PeerError: rank 0:") and "did rank 1 exit or hang?" in message
    assert elapsed < 60
