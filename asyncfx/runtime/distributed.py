"""DistributedExecutor: one rank per device slot under torchrun (SPMD).

Every rank runs the same sampling script; rank k computes only the runs of slot k and
holds only that stage. Boundary tensors go point to point, each only to the ranks that
read it; the last stage's output is broadcast so that every rank's sampler takes the
same step. The caller creates the process group (gloo on CPU, NCCL on GPUs); its
timeout turns a dead peer into an error on the ranks that wait for it.

Protocol (both sides derive it from the schedule, so sends and receives always pair):
- a warm-up step sends each boundary right after it is computed, and its readers
  receive it before they run, in stage order;
- a parallel step reads the previous version: first every rank sends the outputs it
  kept from the previous step (unless the previous step was warm-up, which already
  delivered them), then receives its inputs, then computes and keeps its outputs.
Nothing is sent that will not be read in the same step, so no message outlives a
generation.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from asyncfx.errors import AsyncFXError
from asyncfx.runtime.executor import BoundaryStore, Executor, InputsFor, StageProgram
from asyncfx.runtime.schedule import Mode, StageRun, StepSchedule


class PeerError(AsyncFXError, RuntimeError):
    """Another rank stopped answering (it died, hung, or ran a different script)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class DistributedExecutor(Executor):
    """Executes this rank's slot of every step; see the module notes for the protocol.

    Example (every rank, under torchrun, after dist.init_process_group("gloo")):
        >>> unet = asyncfx.partition(unet, n_devices=dist.get_world_size(), executor="distributed")
    """

    def __init__(self, programs: Sequence[StageProgram], graph_inputs: set[str],
                 boundaries: dict[str, TensorSpec], outputs: Sequence[TensorSpec],
                 device: torch.device, warmup: int, group: dist.ProcessGroup | None = None):
        super().__init__(programs, graph_inputs)
        require_process_group()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = torch.device(device)
        self.warmup = warmup
        self.boundaries = boundaries
        self.outputs = list(outputs)
        self.slot = self.rank
        stage = min(self.slot, len(programs) - 1)
        # keep only this rank's stage; the others are never run here
        self.programs = [p if i == stage else StageProgram(None, p.inputs, p.outputs)  # type: ignore[arg-type]
                         for i, p in enumerate(programs)]
        module = programs[stage].module
        self.module = module if self.device.type == "cpu" else copy.deepcopy(module).to(self.device)

    def step(self, plan: StepSchedule, inputs_for: InputsFor,
             store: BoundaryStore) -> dict[int, tuple[torch.Tensor, ...]]:
        results: dict[int, tuple[torch.Tensor, ...]] = {}
        if plan.mode is Mode.CACHED:
            return results
        mine = [r for r in plan.runs if r.slot == self.slot]
        if plan.mode is Mode.PARALLEL:
            reads = plan.runs[0].reads
            if reads >= self.warmup:  # the previous step was parallel: deliver its outputs now
                self._exchange(plan.runs, reads, store)
            for run in mine:
                self._compute(run, inputs_for, store, results)
        else:
            for run in plan.runs:
                if run.slot == self.slot:
                    self._compute(run, inputs_for, store, results)
                self._exchange([run], run.writes, store)
        self._broadcast_outputs(plan, results)
        self.finish(plan, store)
        return results

    def _compute(self, run: StageRun, inputs_for: InputsFor, store: BoundaryStore,
                 results: dict[int, tuple[torch.Tensor, ...]]) -> None:
        inputs = inputs_for(run.timestep)
        args = [inputs[name].to(self.device) if name in self.graph_inputs else store.get(name, run.reads)
                for name in self.programs[run.stage].inputs]
        with torch.no_grad():
            outputs = self.module(*args)
        self.record(run, outputs, store, results)

    def _exchange(self, runs: Sequence[StageRun], version: int | None, store: BoundaryStore) -> None:
        """Send this rank's outputs of ``runs`` (version ``version``) to the ranks that read
        them, and receive those this rank reads, in one fixed order on every rank."""
        if version is None:
            return
        for run in runs:
            if run.writes is None:
                continue
            producer = run.slot
            for name in self.programs[run.stage].outputs:
                readers = self._readers(name)
                if producer == self.rank:
                    for reader in readers:
                        self._send(store.get(name, version), reader, name)
                elif self.rank in readers:
                    store.put(version, {name: self._recv(name, producer)})

    def _readers(self, name: str) -> list[int]:
        readers = [slot for slot in range(self.world)
                   if name in self.programs[min(slot, len(self.programs) - 1)].inputs]
        return sorted(readers)

    def _send(self, tensor: torch.Tensor, peer: int, name: str) -> None:
        try:
            dist.send(tensor.contiguous(), dst=peer, group=self.group)
        except RuntimeError as exc:
            raise PeerError(f"rank {self.rank}: sending boundary tensor {name!r} to rank {peer} "
                            f"failed ({_one_line(exc)}); did rank {peer} exit or hang?") from exc

    def _recv(self, name: str, peer: int) -> torch.Tensor:
        spec = self.boundaries[name]
        buffer = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
        try:
            dist.recv(buffer, src=peer, group=self.group)
        except RuntimeError as exc:
            raise PeerError(f"rank {self.rank}: waiting for boundary tensor {name!r} from rank {peer} "
                            f"failed ({_one_line(exc)}); did rank {peer} exit or hang?") from exc
        return buffer

    def _broadcast_outputs(self, plan: StepSchedule, results: dict[int, tuple[torch.Tensor, ...]]) -> None:
        for run in plan.runs:
            if run.gives is None:
                continue
            if run.slot == self.rank:
                tensors = [t.contiguous() for t in results[run.gives]]
            else:
                tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in self.outputs]
            for tensor in tensors:
                try:
                    dist.broadcast(tensor, src=run.slot, group=self.group)
                except RuntimeError as exc:
                    raise PeerError(f"rank {self.rank}: the noise prediction of step {run.gives} from "
                                    f"rank {run.slot} did not arrive ({_one_line(exc)}); did rank "
                                    f"{run.slot} exit or hang?") from exc
            results[run.gives] = tuple(tensors)


def require_process_group() -> None:
    """Raise unless the caller has created a torch.distributed process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise AsyncFXError("executor='distributed' needs a torch.distributed process group: call "
                           "dist.init_process_group(...) in every rank first (run the script under "
                           "torchrun); asyncfx never creates one itself.")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
