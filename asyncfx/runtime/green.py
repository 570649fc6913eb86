"""Several emulated devices on one GPU: disjoint SM partitions through CUDA green contexts.

``cuDevSmResourceSplitByCount`` splits the GPU's streaming multiprocessors into N
disjoint groups in one call; each group gets a green context and a stream in it, which
torch drives as a ``torch.cuda.ExternalStream``. Kernels launched on stream k run only
on group k's SMs, so N stages behave like N smaller devices computing concurrently.
Memory, its bandwidth and the L2 cache stay shared: results measured this way are an
emulation and are labelled so.

Needs an NVIDIA GPU, a driver with green contexts (CUDA 12.4+) and cuda-python
(``cuda.bindings.driver``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from asyncfx.errors import AsyncFXError

#: ``devices="sm-partitions:N"`` (optionally ``"sm-partitions:N@cuda:1"``).
SM_PARTITIONS = re.compile(r"^sm-partitions:(\d+)(?:@(cuda(?::\d+)?))?$")


class PartitionError(AsyncFXError, RuntimeError):
    """The GPU, its driver or cuda-python cannot split the GPU into SM partitions."""


@dataclasses.dataclass
class SmPartition:
    """One disjoint group of SMs and the stream whose kernels run on it."""

    index: int
    device: torch.device
    sm_count: int
    stream: torch.cuda.ExternalStream
    green_context: Any          # kept alive as long as the stream is used


def parse_sm_partitions(devices: Any) -> tuple[int, torch.device] | None:
    """``(N, device)`` for ``"sm-partitions:N[@cuda:K]"``, None for anything else.

    Example:
        >>> parse_sm_partitions("sm-partitions:4")
        (4, device(type='cuda', index=0))
    """
    if not isinstance(devices, str):
        return None
    match = SM_PARTITIONS.match(devices.strip())
    if match is None:
        if devices.startswith("sm-partitions"):
            raise PartitionError(f"devices={devices!r} is not understood; write 'sm-partitions:N' "
                                 "or 'sm-partitions:N@cuda:K' with N the number of SM groups.")
        return None
    count, device = int(match.group(1)), torch.device(match.group(2) or "cuda:0")
    if count < 1:
        raise PartitionError(f"devices={devices!r} asks for {count} SM partitions; ask for 1 or more.")
    return count, torch.device("cuda", device.index or 0)


def sm_partitions(count: int, device: str | torch.device = "cuda:0") -> list[SmPartition]:
    """Split ``device``'s SMs into ``count`` disjoint groups of equal size (one call to
    ``cuDevSmResourceSplitByCount``), with a green context and a stream for each.

    Example:
        >>> parts = sm_partitions(4)
        >>> [p.sm_count for p in parts]          # an H100 SXM: 132 SMs
        [32, 32, 32, 32]
        >>> with torch.cuda.stream(parts[0].stream): y = model(x)   # on 32 SMs only
    """
    device = torch.device(device)
    _check_cuda(device)
    driver = _driver()
    torch.cuda.synchronize(device)  # makes the primary context, whose memory the groups share
    _call(driver, "cuInit", 0)      # no-op after torch's, but cuda-python may have loaded the driver anew
    cu_device = _call(driver, "cuDeviceGet", device.index or 0)
    whole = _call(driver, "cuDeviceGetDevResource", cu_device,
                  driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    total = int(whole.sm.smCount)
    per_group = _group_size(total, count, whole, torch.cuda.get_device_capability(device)[0])
    groups, made, _ = _call(driver, "cuDevSmResourceSplitByCount", count, whole, 0, per_group)
    if int(made) < count:
        raise PartitionError(f"the GPU's {total} SMs split into only {int(made)} groups of at least "
                             f"{per_group}; ask for at most {int(made)} partitions.")
    partitions = []
    for index in range(count):
        desc = _call(driver, "cuDevResourceGenerateDesc", [groups[index]], 1)
        context = _call(driver, "cuGreenCtxCreate", desc, cu_device,
                        driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
        stream = _call(driver, "cuGreenCtxStreamCreate", context,
                       driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0)
        partitions.append(SmPartition(index, device, int(groups[index].sm.smCount),
                                      torch.cuda.ExternalStream(int(stream), device=device), context))
    return partitions


def _group_size(total: int, count: int, whole: Any, major: int) -> int:
    """SMs per group: an equal share, rounded down to the driver's partition granularity
    (reported by newer drivers; else the documented one: 8 SMs from compute capability
    9.0, 2 before)."""
    documented = 8 if major >= 9 else 2
    granularity = max(int(getattr(whole.sm, "smCoscheduledAlignment", 0) or 0),
                      int(getattr(whole.sm, "minSmPartitionSize", 0) or 0), documented)
    size = total // count // granularity * granularity
    if size < 1:
        raise PartitionError(f"the GPU has {total} SMs, too few for {count} partitions of at least "
                             f"{granularity} SMs; ask for at most {total // granularity}.")
    return size


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise PartitionError("SM partitions need cuda-python's driver bindings "
                             "(pip install cuda-python; module cuda.bindings.driver).") from exc
    if not hasattr(driver, "cuDevSmResourceSplitByCount"):
        raise PartitionError("this cuda-python has no green-context API (cuDevSmResourceSplitByCount); "
                             "install cuda-python 12.4 or newer.")
    return driver


def _check_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise PartitionError(f"SM partitions split a CUDA GPU, not {device}.")
    if not torch.cuda.is_available():
        raise PartitionError("SM partitions need a CUDA GPU, and torch sees none here; use "
                             "devices=None (CPU workers) or run on a machine with an NVIDIA GPU.")
    if (device.index or 0) >= torch.cuda.device_count():
        raise PartitionError(f"{device} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")


def _call(driver: Any, name: str, *args: Any) -> Any:
    """Call a driver function; raise PartitionError naming it and the CUDA error on failure."""
    result = getattr(driver, name)(*args)
    status, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if status != driver.CUresult.CUDA_SUCCESS:
        _, message = driver.cuGetErrorString(status)
        raise PartitionError(f"{name} failed: {getattr(status, 'name', status)} "
                             f"({message.decode() if isinstance(message, bytes) else message}). Green "
                             "contexts need CUDA 12.4+ drivers and a GPU of compute capability 9.0 or "
                             "newer for fine-grained splits.")
    return values[0] if len(values) == 1 else values
