"""``asyncfx sample``: sample with a saved model that need not fit one device.

The model is built from its directory's config on the meta device (no weights), captured
and compiled from shapes alone, and partitioned with ``weights=`` the directory: each
device, or each rank under ``torchrun`` (``--executor distributed``), loads only its
stages' tensors from the safetensors files. The inputs are random (text embeddings of
the config's width), so the samples are noise; the command shows that, and how fast and
how lean, the model runs.

    torchrun --nproc-per-node 2 -m asyncfx sample path/to/unet --executor distributed
"""
from __future__ import annotations

import datetime
import os
import resource
import time
from typing import Any

import torch

from asyncfx.app.model_spec import ModelSpecError, example_kwargs, model_class_of


def sample_from_directory(path: str, *, n_devices: int, executor: str, steps: int, warmup: int | None,
                          batch: int, height: int | None, width: int | None) -> list[str]:
    """Sample once with the model saved in ``path``; the lines to print (this rank's).

    Example:
        >>> unet.save_pretrained("unet_dir")
        >>> print("\\n".join(sample_from_directory("unet_dir", n_devices=2, executor="local", steps=4,
        ...                                        warmup=None, batch=2, height=None, width=None)))
    """
    import asyncfx
    from accelerate import init_empty_weights
    from diffusers import DDIMScheduler

    model_class = model_class_of(path)
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(path)).eval()
    kwargs = example_kwargs(model, batch, height, width)
    latent = "sample" if "sample" in kwargs else "hidden_states"
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    options: dict[str, Any] = {} if warmup is None else {"warmup": warmup}
    denoiser = asyncfx.partition(model, n_devices, executor=executor, weights=path, scheduler=scheduler,
                                 **options)
    x = kwargs[latent]
    started = time.perf_counter()
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = denoiser(**{**kwargs, latent: x, "timestep": _timestep(kwargs["timestep"], t)})
            x = scheduler.step(output[0] if isinstance(output, tuple) else output.sample, t, x).prev_sample
    seconds = time.perf_counter() - started
    plan, loaded = denoiser.plan, denoiser.program.weights.loaded_bytes
    denoiser.close()
    where = f"rank {_rank()}: " if executor == "distributed" else ""
    return [f"{where}{model_class.__name__} from {path}: {steps} steps in {seconds:.2f} s on "
            f"{n_devices} stage(s) ({executor}); sample {list(x.shape)}, "
            f"finite: {bool(torch.isfinite(x).all())}",
            f"{where}weights loaded from the files: {loaded / 1e6:.1f} MB of the model's "
            f"{plan.total_param_bytes / 1e6:.1f} MB; peak resident memory {_peak_rss() / 1e9:.2f} GB"]


#: How long a rank waits for another before failing: rank 0 compiling the plan at the first
#: call of a large model on CPUs takes minutes, and a frozen rank is found within this.
RANK_TIMEOUT = datetime.timedelta(minutes=10)


def init_process_group(executor: str) -> bool:
    """Under torchrun with ``--executor distributed``: create the process group (NCCL on
    GPUs, gloo on CPUs); whether this process created it."""
    import torch.distributed as dist

    if executor != "distributed":
        return False
    if "WORLD_SIZE" not in os.environ:
        raise ModelSpecError("--executor distributed runs one process per stage: launch the command with "
                             "torchrun --nproc-per-node N -m asyncfx sample ...")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=RANK_TIMEOUT)
    return True


def _timestep(example: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(example, float(t)) if example.dim() else t


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _peak_rss() -> int:
    """The peak resident memory of this process (Linux: its address space's high-water
    mark, which a rank spawned by a larger process does not inherit as getrusage's does)."""
    try:
        with open("/proc/self/status") as status:
            return int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
