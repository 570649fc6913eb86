"""Where the stages run: the device slots ``partition()`` resolves at once, and the
executor a program gets when its stages are built."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch

from asyncfx.errors import DeviceError
from asyncfx.program import Program
from asyncfx.runtime.distributed import DistributedExecutor, require_process_group
from asyncfx.runtime.executor import Executor, SerialExecutor
from asyncfx.runtime.green import parse_sm_partitions, sm_partitions
from asyncfx.runtime.local import LocalExecutor


@dataclasses.dataclass(frozen=True)
class Launcher:
    """Makes the executor of a program: ``kind`` on ``devices`` (one per slot; for the
    distributed executor, this rank's), with ``streams`` per slot (SM partitions).

    Example:
        >>> launch = launcher("local", ["cpu", "cpu"], slots=2)
        >>> executor = launch(program)
    """

    kind: str
    devices: tuple[torch.device, ...]
    streams: tuple[Any, ...] | None = None
    cuda_graphs: bool | None = None

    def __call__(self, program: Program) -> Executor:
        if self.kind == "serial":
            return SerialExecutor(program, self.devices[0] if self.devices else None)
        if self.kind == "local":
            return LocalExecutor(program, self.devices, streams=self.streams, cuda_graphs=self.cuda_graphs)
        return DistributedExecutor(program, self.devices[0])


def launcher(kind: str, devices: Sequence[str | torch.device] | str | None, slots: int,
             cuda_graphs: bool | None = None) -> Launcher:
    """The launcher for ``slots`` device slots (stages, plus one for stride 2), its devices
    resolved and checked now."""
    if parse_sm_partitions(devices) is not None:
        resolved, streams = partition_slots(devices, slots, kind)
        return Launcher(kind, tuple(resolved), tuple(streams), cuda_graphs)
    if kind == "distributed":
        return Launcher(kind, (distributed_device(devices, slots),), None, cuda_graphs)
    if kind == "serial" and devices is None:
        return Launcher(kind, (), None, cuda_graphs)  # one thread computes every stage where the weights are
    return Launcher(kind, tuple(resolve_devices(devices, slots)), None, cuda_graphs)


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


def resolve_devices(devices: Sequence[str | torch.device] | str | None, needed: int) -> list[torch.device]:
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
    if len(resolved) != needed:
        raise DeviceError(f"{needed} devices are needed (one per stage of each batch group, plus one a "
                          f"group for stride 2) but devices lists {len(resolved)}; list {needed}, or pass "
                          f"n_devices={len(resolved)} to use them all.")
    for device in resolved:
        check_device_type(device)
    missing = [str(d) for d in resolved if d.type == "cuda" and (d.index or 0) >= available]
    if missing:
        raise DeviceError(f"asked for {', '.join(missing)} but {found}.")
    return resolved


#: The device types whose slots asyncfx runs stages on.
STAGE_DEVICE_TYPES = ("cpu", "cuda")


def check_device_type(device: torch.device) -> None:
    """Refuse a device no stage can run on: one without data (meta), or of a type the
    executors do not drive (their threads, CUDA streams and events are CPU and CUDA ones)."""
    if device.type == "meta":
        raise DeviceError("devices lists 'meta', which holds no data, so no stage can compute there; list "
                          "'cpu' or 'cuda:N' devices (a model built on the meta device takes weights=<its "
                          "files> instead).")
    if device.type not in STAGE_DEVICE_TYPES:
        raise DeviceError(f"devices lists {str(device)!r}: asyncfx runs stages on 'cpu' and 'cuda:N' "
                          f"devices (threads, CUDA streams and events), not on {device.type!r} ones; list "
                          "cpu or cuda devices.")
