"""Weights that follow a re-cut from rank to rank under torch.distributed.

Each rank releases the model's weights its own stage does not read as soon as its
first stage is built (``release_weights``; see the denoiser's note on weights). A later
plan (re-cut from measured stage times) may give a rank nodes whose weights another
rank holds: when the rank builds its new stage, those tensors are sent to it by a rank
that holds them, into their own storage again, and the rank's old weights are released
once it no longer runs them. Every rank calls ``fill_from_peers`` at the same point (the
executor of a new program is built at the same step everywhere): it gathers which
tensors each rank lacks and holds, then sends and receives them in one order that every
rank follows, so no transfer waits on one posted later.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from asyncfx.errors import WeightsReleasedError
from asyncfx.program import Program
from asyncfx.runtime.stage_weights import stage_tensors, without_data


def fill_from_peers(program: Program, slot: int, device: torch.device,
                    group: dist.ProcessGroup | None = None) -> int:
    """Give this rank's stage the tensors it lacks, from the ranks that hold them, and
    send what other ranks lack and this rank holds; the bytes this rank received. A
    collective: every rank of ``group`` calls it for the same program.

    Example:
        >>> received = fill_from_peers(program, dist.get_rank(), torch.device("cpu"))
    """
    everything = {name: t for stage in program.stages for name, t in stage_tensors(stage.module)}
    mine = dict(stage_tensors(program.stage_in_slot(slot).module))
    lacking = sorted(name for name, tensor in mine.items() if without_data(tensor))
    holding = sorted(name for name, tensor in everything.items() if not without_data(tensor))
    gathered: list[tuple[list[str], list[str]] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (lacking, holding), group=group)
    rank, received = dist.get_rank(group), 0
    wire = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    for receiver, (names, _) in enumerate(gathered):
        for name in names:
            sender = _holder(name, receiver, gathered)
            if rank == sender:
                dist.send(everything[name].detach().to(wire).contiguous(), dst=receiver, group=group)
            elif rank == receiver:
                received += _receive(mine[name], sender, wire, group)
    return received


def _holder(name: str, receiver: int, gathered: list) -> int:
    """The first rank that holds ``name`` (every rank finds the same one)."""
    for rank, (_, holding) in enumerate(gathered):
        if name in holding:
            return rank
    raise WeightsReleasedError(
        f"rank {receiver}'s stage reads {name!r}, which no rank holds any more: the weights were released "
        "and nothing can load them again. Partition with release_weights=False, or build the model on the "
        "meta device and pass weights=<its saved directory>.")


def _receive(tensor: torch.Tensor, sender: int, wire: torch.device, group: dist.ProcessGroup | None) -> int:
    """Receive ``tensor``'s values into its own storage, sized again."""
    extent = tensor.storage_offset() + sum((size - 1) * stride for size, stride in
                                           zip(tensor.shape, tensor.stride())) + 1
    storage = tensor.untyped_storage()
    storage.resize_(max(storage.nbytes(), extent * tensor.element_size()))
    buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device=wire)
    dist.recv(buffer, src=sender, group=group)
    with torch.no_grad():
        tensor.copy_(buffer)
    return buffer.nbytes
