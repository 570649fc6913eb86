"""``asyncfx.partition()``: the one call that joins the compiler and the runtime.

The options are checked once (``PartitionOptions``); the devices are resolved and
checked now (``runtime.launch``); the denoiser captures through the partitioner's
frontend at the model's first call and builds the stages at the last warm-up step.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from asyncfx.errors import AsyncFXError, DeviceError, PlanError
from asyncfx.cache_hooks import step_cache_rules
from asyncfx.options import DEFAULT_WARMUP, PartitionOptions
from asyncfx.partitioner.binding import LatentOption, check_argument_names
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.diagnose import check_capturable
from asyncfx.partitioner.empty_weights import meta_tensor_names
from asyncfx.partitioner.examples import split_example_inputs
from asyncfx.partitioner.frontend import PartitionFrontend
from asyncfx.plan import StagePlan
from asyncfx.program import Layout, WeightSource
from asyncfx.runtime.denoiser import AsyncDenoiser
from asyncfx.runtime.launch import launcher
from asyncfx.runtime.progress import Progress
from asyncfx.runtime.step_cache import check_stride

__all__ = ["DeviceError", "ModelError", "partition"]


class ModelError(AsyncFXError, TypeError):
    """partition() was given something other than a denoiser module."""


def partition(model: nn.Module, n_devices: int = 2, *, layout: str | None = None, example_inputs: Any = None,
              devices: Sequence[str | torch.device] | str | None = None, warmup: int = DEFAULT_WARMUP,
              stride: int = 1, executor: str = "local", plan: StagePlan | str | os.PathLike | None = None,
              scheduler: Any = None, time_shift: bool = False, forecast: float | None = None,
              cooldown: int = 0, refresh: int = 0, switch_below: float = 0.0, cost: str = "flops",
              link: str = "cpu", latent: LatentOption = None, timestep: str | None = None,
              cuda_graphs: bool | None = None, rebalance: bool = True, release_weights: bool | None = None,
              weights: str | os.PathLike | WeightSource | None = None,
              progress: bool = True) -> AsyncDenoiser:
    """Wrap ``model`` so that its stages run concurrently on ``n_devices`` devices.

    The result is called exactly like ``model``. The first ``warmup`` steps of every
    generation run the stages one after another (exactly the original model); after
    that all stages start each step at once, reading each other's outputs from the
    previous step. ``layout="GxN"`` splits the batch (a classifier-free-guidance pair) over
    G groups of devices, each running the same N stages on its share: exact, for a model
    that computes its samples separately (proven from its graph); ``layout=None`` takes the
    layout predicted fastest for the call's batch, the fewest stages among those within 5%
    of it (stages only with stride 2 or under torch.distributed). ``stride=2`` computes
    two steps per round on ``n_devices + 1`` devices and needs ``scheduler`` (its
    ``timesteps``). ``example_inputs=None`` captures
    the model from its first call. ``plan`` is a StagePlan or a path to one.
    ``devices=None`` means ``cuda:0..`` when there are enough GPUs, else CPU workers.
    ``devices="sm-partitions:N"`` emulates N devices on one GPU: its SMs split into N
    disjoint groups (CUDA green contexts), one per slot; memory bandwidth stays shared, so
    speedups measured this way are an emulation. ``cuda_graphs`` (default on for CUDA
    slots of the local executor) replays each stage as a CUDA graph once warmed up.
    ``model`` may also be a :class:`Captured` from ``asyncfx.capture()`` (captured once,
    partitioned many times, e.g. in a sweep); it then accepts only its captured shapes.
    ``latent`` and ``timestep`` name the noisy-sample and timestep (noise level) arguments
    where their names are not the usual ones (see :func:`asyncfx.capture`); ``latent`` may
    list several (``["hidden_states", "audio_hidden_states"]``). ``rebalance=True``
    re-cuts a compiled plan from the stage times measured while sampling, at the last
    warm-up step of a generation (a ``plan`` given is never re-cut, nor a plan while a
    step cache is on). The model's weights that its stages read and no stage of this
    process holds are released (``release_weights``; default: for a model, not for a
    Captured, which is made to be partitioned again), under torch.distributed from the
    first stage on, elsewhere once the plan is final: the model then answers for its
    config and attributes but cannot be called, converted or captured again.
    ``forecast=g`` (0 to 1; 0: off, AsyncDiff's
    plain reuse; default ``DEFAULT_FORECAST``, 0 with ``time_shift``) reads each stale
    boundary value extrapolated from its last two versions as far as the one before
    confirms their trend, ``B1 + g * r * trend * (B1 - B2)``, and with stride 2 the
    latent of the step ahead from the last two latents (docs/runtime.md). ``cooldown=C``
    runs the last C steps of each generation sequentially too (with ``scheduler``),
    ``refresh=K`` one step in every K after warm-up, after which the stages read fresh
    values again; ``switch_below=c`` goes on with warm-up steps while the noise prediction
    changes by ``c`` or more (relative) from one step to the next. A model too large for
    one device is built on the meta device and given ``weights``, its saved directory or
    ``.safetensors`` file: each device or rank loads only its stages' tensors.
    ``progress`` prints a line on stderr for each slow piece of work at the first calls
    (capturing, building the stages; under torch.distributed, rank 0's).
    docs/usage.md lists every option.

    Example:
        >>> pipe.unet = asyncfx.partition(pipe.unet, n_devices=2, warmup=2)
        >>> images = pipe(prompt_embeds=embeds, num_inference_steps=20).images
    """
    _check_model(model)
    if not isinstance(model, Captured):
        check_argument_names(model, latent=latent, timestep=timestep)
    options = PartitionOptions(n_devices=n_devices, layout=layout, devices=devices, warmup=warmup,
                               stride=stride, executor=executor, plan=plan, scheduler=scheduler,
                               time_shift=time_shift, forecast=forecast, cooldown=cooldown, refresh=refresh,
                               switch_below=switch_below,
                               cost=cost, link=link, latent=latent, timestep=timestep,
                               cuda_graphs=cuda_graphs, rebalance=rebalance,
                               release_weights=release_weights, weights=weights, progress=progress)
    _check_weights(model, options.weights)
    _check_layout(model, options.known_layout)
    check_stride(type(model).__name__, len(step_cache_rules(model)), options.stride)
    launch = launcher(options.executor, options.devices, options.slots, options.cuda_graphs)
    frontend = PartitionFrontend(n_devices=options.n_devices, layout=options.known_layout,
                                 warmup=options.warmup, cost=options.cost, link=options.link,
                                 latent=options.latent, timestep=options.timestep, plan=options.plan,
                                 rebalance=options.rebalance, weights=options.weights,
                                 rank_zero_decides=options.executor == "distributed")
    release = options.release_weights
    denoiser = AsyncDenoiser(model, frontend, launch, n_devices=options.n_devices, warmup=options.warmup,
                             stride=options.stride, time_shift=options.time_shift, forecast=options.forecast,
                             sequential=options.sequential, switch_below=options.switch_below,
                             scheduler=options.scheduler, rebuild=options.plan is None,
                             layout=options.known_layout, convertible=not isinstance(model, Captured),
                             release_weights=not isinstance(model, Captured) if release is None else release,
                             progress=Progress(options.progress and _reports(options.executor)))
    if example_inputs is not None:
        denoiser.build(*split_example_inputs(example_inputs))
    return denoiser


def _reports(executor: str) -> bool:
    """Whether this process prints progress: under torch.distributed only rank 0 does."""
    if executor != "distributed":
        return True
    import torch.distributed as dist

    return dist.get_rank() == 0


def _check_layout(model: nn.Module, layout: Layout | None) -> None:
    """Batch groups capture the model again at a group's batch, which a Captured cannot be."""
    if isinstance(model, Captured) and layout is not None and layout.groups > 1:
        raise PlanError(f"layout {layout} splits the batch over {layout.groups} groups, which captures the "
                        "model again at a group's batch, and a Captured is specialised to the batch it was "
                        f"captured with; partition the model itself, or use layout='1x{layout.devices}'.")


def _check_weights(model: nn.Module, weights: WeightSource | None) -> None:
    """A model built without weights needs ``weights``; one with its weights takes none."""
    module = model.graph_module if isinstance(model, Captured) else model
    empty = meta_tensor_names(module)
    if empty and weights is None:
        raise ModelError(f"{type(module).__name__} holds {len(empty)} tensor(s) on the meta device "
                         f"({empty[0]}, ...): it was built without weights. Pass weights=<the directory it "
                         "was saved to (save_pretrained) or its .safetensors file>, and each device or rank "
                         "loads its stages' tensors from there.")
    if weights is not None and not empty:
        raise ModelError(f"weights= is for a model built without weights (on the meta device), and this "
                         f"{type(module).__name__} holds its own; drop weights=, or build the model with "
                         "accelerate.init_empty_weights() to load each stage's weights from the files.")


def _check_model(model: Any) -> None:
    if isinstance(model, AsyncDenoiser):
        raise ModelError("this model is already partitioned (an AsyncDenoiser); partition its "
                         "original_model instead, or keep using it as it is.")
    if not isinstance(model, nn.Module):
        raise ModelError(f"partition() takes the denoiser, an nn.Module, got {type(model).__name__}; for a "
                         "diffusers pipeline pass its pipe.unet or pipe.transformer.")
    check_capturable(model)
