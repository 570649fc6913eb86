"""``asyncfx.partition()``: capture, compile and split a denoiser and run it asynchronously."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from asyncfx.errors import AsyncFXError, PlanError
from asyncfx.partitioner import Captured, StagePlan, capture, compile, split
from asyncfx.partitioner.capture import LatentOption, check_argument_names, check_capturable
from asyncfx.partitioner.compile import split_example_inputs
from asyncfx.partitioner.cost_model import check_cost
from asyncfx.partitioner.device import device_spec
from asyncfx.runtime.cuda_graphs import check_cuda_graphs_option
from asyncfx.runtime.denoiser import AsyncDenoiser, CallInterfaceLike, SchedulerError
from asyncfx.runtime.distributed import DistributedExecutor, TensorSpec, require_process_group
from asyncfx.runtime.executor import Executor, SerialExecutor, StageProgram
from asyncfx.runtime.green import parse_sm_partitions, sm_partitions
from asyncfx.runtime.local import LocalExecutor
from asyncfx.runtime.schedule import devices_needed

#: Default warm-up steps, chosen from benchmarks/quality.py on the trained default model:
#: with 3-4 stages staleness compounds, and three warm-up steps recover most of the
#: fidelity nine would (N=4: SSIM 0.865 at W=1, 0.913 at W=3, 0.945 at W=9) for 4-9% of
#: the ideal speedup at 50 steps; class accuracy stays at the sequential level throughout.
DEFAULT_WARMUP = 3
EXECUTORS = ("local", "serial", "distributed")


class DeviceError(AsyncFXError, ValueError):
    """The devices asked for do not exist here."""


class ModelError(AsyncFXError, TypeError):
    """partition() was given something other than a denoiser module."""


def partition(model: nn.Module, n_devices: int = 2, *, example_inputs: Any = None,
              devices: Sequence[str | torch.device] | str | None = None, warmup: int = DEFAULT_WARMUP,
              stride: int = 1, executor: str = "local", plan: StagePlan | str | os.PathLike | None = None,
              scheduler: Any = None, time_shift: bool = False, cost: str = "flops", link: str = "cpu",
              latent: LatentOption = None, timestep: str | None = None,
              cuda_graphs: bool | None = None) -> AsyncDenoiser:
    """Wrap ``model`` so that its stages run concurrently on ``n_devices`` devices.

    The result is called exactly like ``model``. The first ``warmup`` steps of every
    generation run the stages one after another (exactly the original model); after
    that all stages start each step at once, reading each other's outputs from the
    previous step. ``stride=2`` computes two steps per round on ``n_devices + 1``
    devices and needs ``scheduler`` (its ``timesteps``). ``example_inputs=None`` captures
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
    list several (LTX-2: ``["hidden_states", "audio_hidden_states"]``).

    Example:
        >>> pipe.unet = asyncfx.partition(pipe.unet, n_devices=2, warmup=2)
        >>> images = pipe(prompt_embeds=embeds, num_inference_steps=20).images
    """
    _check_model(model)
    if not isinstance(model, Captured):
        check_argument_names(model, latent=latent, timestep=timestep)
    _check_options(n_devices, warmup, stride, executor, scheduler)
    _check_cost_and_link(cost, link)
    check_cuda_graphs_option(cuda_graphs)
    streams = None
    if parse_sm_partitions(devices) is not None:
        slots, streams = partition_slots(devices, devices_needed(n_devices, stride), executor)
    elif executor == "distributed":
        slots = [distributed_device(devices, devices_needed(n_devices, stride))]
    elif executor == "serial" and devices is None:
        slots = []  # one thread computes every stage where the model's weights are
    else:
        slots = resolve_devices(devices, devices_needed(n_devices, stride))
    plan = StagePlan.load(plan) if isinstance(plan, (str, os.PathLike)) else plan
    if plan is not None and plan.n_stages != n_devices:
        raise PlanError(f"the plan has {plan.n_stages} stages but n_devices={n_devices}; pass "
                        f"n_devices={plan.n_stages} or compile a plan for {n_devices}.")

    def build(source: nn.Module | Captured, args: tuple, kwargs: dict):
        captured = (source if isinstance(source, Captured)
                    else capture(source, args, kwargs, latent=latent, timestep=timestep))

        def make_executor(compiled: StagePlan | None = None) -> tuple[Executor, StagePlan]:
            if compiled is not None:  # compiled before the last executor was closed
                stage_plan = compiled
            elif plan is not None:
                stage_plan = plan
            elif executor == "distributed":  # every rank must cut alike: rank 0 decides
                stage_plan = _plan_from_rank_zero(lambda: compile(
                    captured, n_devices, cost=cost, link=link, example_inputs=(args, kwargs)))
            else:
                stage_plan = compile(captured, n_devices, cost=cost, link=link,
                                     example_inputs=(args, kwargs) if cost == "measure" else None)
            return _executor(captured, stage_plan, executor, slots, streams, cuda_graphs), stage_plan

        return _interface(captured), make_executor

    denoiser = AsyncDenoiser(model, build, n_stages=n_devices, warmup=warmup, stride=stride,
                             time_shift=time_shift, scheduler=scheduler, rebuild=plan is None,
                             convertible=not isinstance(model, Captured))
    if example_inputs is not None:
        denoiser.build(*split_example_inputs(example_inputs), compile_now=True,
                       reason="the example inputs given to partition()")
    return denoiser


def _interface(captured: Captured) -> CallInterfaceLike:
    return CallInterfaceLike(
        flatten=captured.interface.flatten, unflatten=captured.interface.unflatten,
        names=[i.placeholder for i in captured.inputs], roles=[str(i.role) for i in captured.inputs],
        written_arguments=captured.interface.written_arguments)


def _executor(captured: Captured, plan: StagePlan, kind: str, devices: list[torch.device],
              streams: list[Any] | None = None, cuda_graphs: bool | None = None) -> Executor:
    staged = split(captured, plan)
    programs = [StageProgram(module, inputs, outputs) for module, inputs, outputs
                in zip(staged.stages, staged.stage_inputs, staged.stage_outputs)]
    graph_inputs = {i.placeholder for i in captured.inputs}
    runner: Executor
    if kind == "serial":
        runner = SerialExecutor(programs, graph_inputs)
    elif kind == "local":
        runner = LocalExecutor(programs, graph_inputs, devices, streams=streams, cuda_graphs=cuda_graphs)
    else:
        boundaries = {b.name: TensorSpec(tuple(b.shape), _dtype(b.dtype)) for b in plan.boundaries}
        outputs = [TensorSpec(tuple(v.shape), v.dtype) for v in
                   (node.meta["val"] for node in captured.graph.output_node().args[0])]
        runner = DistributedExecutor(programs, graph_inputs, boundaries, outputs, devices[0])
    return runner


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _plan_from_rank_zero(make_plan) -> StagePlan:
    """Rank 0 compiles; every rank gets its plan (cost="measure" would differ per rank)."""
    import torch.distributed as dist

    require_process_group()
    box = [make_plan().to_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return StagePlan.from_dict(box[0])


def distributed_device(devices: Sequence[str | torch.device] | None, needed: int) -> torch.device:
    """This rank's device: ``devices[rank]`` if given, else its local GPU, else the CPU."""
    import torch.distributed as dist

    require_process_group()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != needed:
        raise DeviceError(f"the process group has {world} ranks but this partition needs {needed} "
                          "(one per stage, plus one for stride 2); launch with "
                          f"torchrun --nproc-per-node {needed}.")
    if devices is not None:
        return resolve_devices(devices, needed)[rank]
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
    return torch.device("cpu")


def partition_slots(devices: str, needed: int, executor: str) -> tuple[list[torch.device], list[Any]]:
    """Slots and their streams for ``devices="sm-partitions:N"``: one SM partition each."""
    count, device = parse_sm_partitions(devices)
    if count != needed:
        raise DeviceError(f"devices={devices!r} makes {count} emulated devices but this partition needs "
                          f"{needed} (one per stage, plus one for stride 2); write 'sm-partitions:{needed}'.")
    if executor != "local":
        raise DeviceError(f"SM partitions are emulated devices inside one process; use executor='local' "
                          f"with devices={devices!r}, not executor={executor!r}.")
    partitions = sm_partitions(count, device)
    return [device] * count, [p.stream for p in partitions]


def resolve_devices(devices: Sequence[str | torch.device] | None, needed: int) -> list[torch.device]:
    """The devices of the slots: given ones (checked), else GPUs, else CPU workers."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    found = f"this machine has {available} CUDA device(s)" + (
        f" ({', '.join(f'cuda:{i}' for i in range(available))})" if available else "")
    if isinstance(devices, str):
        raise DeviceError(f"devices={devices!r} is a string; pass a list such as ['cuda:0', 'cuda:1'] "
                          "(one per slot), or 'sm-partitions:N' to emulate N devices on one GPU.")
    if devices is None:
        if available >= needed:
            return [torch.device(f"cuda:{i}") for i in range(needed)]
        if available == 0:
            return [torch.device("cpu")] * needed
        raise DeviceError(f"{needed} devices are needed and {found}; pass devices=[...] explicitly "
                          "(e.g. fewer n_devices, or CPU workers with devices=['cpu'] * n).")
    resolved = []
    for device in devices:
        try:
            resolved.append(torch.device(device))
        except (RuntimeError, TypeError) as exc:
            raise DeviceError(f"devices lists {device!r}, which is not a torch device ({exc}); use 'cpu' "
                              "or 'cuda:N'.") from exc
    if len(resolved) < needed:
        raise DeviceError(f"{needed} devices are needed (stages plus stride 2's extra device) but "
                          f"devices lists {len(resolved)}.")
    missing = [str(d) for d in resolved if d.type == "cuda" and (d.index or 0) >= available]
    if missing:
        raise DeviceError(f"asked for {', '.join(missing)} but {found}.")
    return resolved[:needed]


def _check_model(model: Any) -> None:
    if isinstance(model, AsyncDenoiser):
        raise ModelError("this model is already partitioned (an AsyncDenoiser); partition its "
                         "original_model instead, or keep using it as it is.")
    if not isinstance(model, nn.Module):
        raise ModelError(f"partition() takes the denoiser, an nn.Module, got {type(model).__name__}; for a "
                         "diffusers pipeline pass its pipe.unet or pipe.transformer.")
    check_capturable(model)


def _check_cost_and_link(cost: str, link: Any) -> None:
    """Checked now rather than when the stages are built, at the last warm-up step."""
    check_cost(cost)
    device_spec(link)


def _check_options(n_devices: Any, warmup: Any, stride: Any, executor: str, scheduler: Any) -> None:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise PlanError(f"n_devices must be a positive integer, got {n_devices!r}.")
    if stride not in (1, 2):
        raise PlanError(f"stride must be 1 or 2, got {stride!r}.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < (1 if n_devices > 1 else 0):
        raise PlanError(f"warmup must be an integer >= 1 with several devices (the last warm-up "
                        f"step fills the stale buffers), got {warmup!r}.")
    if executor not in EXECUTORS:
        raise PlanError(f"executor={executor!r} is not known; use one of {list(EXECUTORS)}.")
    if stride == 2 and scheduler is None:
        raise SchedulerError("stride=2 computes the next step's timestep ahead of time and needs the "
                             "sampler's schedule: pass scheduler=pipe.scheduler.")
