"""DistributedExecutor: one rank per device slot under torchrun (SPMD).

Every rank runs the same sampling script; rank k computes only the runs of slot k and
holds only that stage. Boundary tensors go point to point, each only to the ranks that
read it; the last stage's output is broadcast so that every rank's sampler takes the
same step. With batch groups (``Program.split``) ranks ``g * S .. g * S + S - 1`` are
group g's S slots: they compute on the group's share of the batch and exchange
boundaries among themselves only; every group's output is broadcast, and every rank
joins them into the whole batch's. The caller creates the process group (gloo on CPU,
NCCL on GPUs); its timeout turns a dead peer into an error on the ranks that wait for it.

Protocol (both sides derive it from the schedule, so sends and receives always pair):
- a warm-up step sends each boundary right after it is computed, and its readers
  receive it before they run, in stage order;
- a parallel step first waits for the messages of the previous parallel step (its
  inputs, one step stale; after a warm-up step they are already here), then posts
  non-blocking receives for the boundaries it will read next step and computes; each
  boundary tensor is sent (non-blocking) the moment the stage produces it, through a
  hook node inserted after its producer in the stage graph. Transfers thus overlap the
  rest of the producer's stage, the other stages and the broadcast.
The last parallel step of a generation leaves messages in flight; the next warm-up
step (or close()) waits for them and stores them (a stream of calls that warms up again
mid-generation, see the denoiser's note on shapes, may leave another stream's messages
in flight, which that stream reads at its next step). Every rank posts
the same operations in the same order, so this never deadlocks: a rank only waits for
sends its peers posted before they joined the previous broadcast.
"""
from __future__ import annotations

import dataclasses
import datetime
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

from asyncfx.errors import AsyncFXError
from asyncfx.program import Program
from asyncfx.runtime.executor import (BoundaryStore, Executor, InputsFor, MeasuredStages, cache_call,
                                      group_inputs, stage_arguments)
from asyncfx.runtime.hooks import with_send_hooks
from asyncfx.runtime.peer_weights import fill_from_peers
from asyncfx.runtime.stage_weights import placed
from asyncfx.runtime.step_cache import call_stage
from asyncfx.schedule import Mode, StageRun, StepSchedule
from asyncfx.timing import RunTimer


class PeerError(AsyncFXError, RuntimeError):
    """Another rank stopped answering (it died, hung, or ran a different script)."""


@dataclasses.dataclass
class _InFlight:
    """Non-blocking messages of one parallel step of one stream of calls."""

    receives: list[tuple[str, int, int, torch.Tensor, Any]] = dataclasses.field(default_factory=list)
    sends: list[tuple[str, int, torch.Tensor, Any]] = dataclasses.field(default_factory=list)


class DistributedExecutor(Executor):
    """Executes this rank's slot of every step; see the module notes for the protocol.

    Example (every rank, under torchrun, after dist.init_process_group("gloo")):
        >>> unet = asyncfx.partition(unet, n_devices=dist.get_world_size(), executor="distributed")
        >>> executor = DistributedExecutor(program, torch.device("cpu"))   # what partition() builds
    """

    #: A new program's stage gets the weights this rank released from the ranks holding them.
    refills_weights = True

    def __init__(self, program: Program, device: torch.device, group: dist.ProcessGroup | None = None):
        require_process_group()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = torch.device(device)
        self.slots_per_group = self.world // program.n_groups
        self.batch_group, self.slot = divmod(self.rank, self.slots_per_group)
        self.first_rank = self.batch_group * self.slots_per_group  # this group's slot 0
        super().__init__(program)
        stage = program.stage_in_slot(self.slot)
        self.received_bytes = 0  # of weights released here earlier, from the ranks that hold them
        if program.weights is None:
            self.received_bytes = fill_from_peers(program, self.slot, self.device, group)
        self.module = placed(stage.module, self.device, program.weights)  # the only stage this rank runs
        self._hooked = with_send_hooks(self.module, stage.outputs, self._produced)
        self._tags = {name: i for i, name in enumerate(sorted(program.boundary))}
        self._reader_ranks = {name: [self.first_rank + slot for slot in range(self.slots_per_group)
                                     if name in self.program.stage_in_slot(slot).inputs]
                              for name in program.boundary}
        self._in_flight: dict[BoundaryStore, _InFlight] = {}
        self._sending: _InFlight | None = None  # set while a parallel step computes

    def step(self, plan: StepSchedule, inputs_for: InputsFor,
             store: BoundaryStore) -> dict[int, tuple[torch.Tensor, ...]]:
        results: dict[int, tuple[torch.Tensor, ...]] = {}
        if plan.mode is Mode.CACHED:
            return results
        inputs_for = group_inputs(self.program.split, inputs_for, self.batch_group)
        mine = [r for r in plan.runs if r.slot == self.slot]
        if plan.mode is Mode.PARALLEL:
            self._deliver(store)
            flight = self._post_receives(plan.runs)
            self._sending = flight
            try:
                for run in mine:
                    self._compute(run, plan, inputs_for, store, results, parallel=True)
            finally:
                self._sending = None
                self._in_flight[store] = flight
            self._share_decisions(plan, plan.runs)
        else:
            self._drain()  # messages still in flight, of any stream, are waited for and kept
            for run in plan.runs:
                if run.slot == self.slot:
                    self._compute(run, plan, inputs_for, store, results, parallel=False)
                self._exchange([run], run.writes, store)
                self._share_decisions(plan, [run])
        self._broadcast_outputs(plan, results)
        self.finish(plan, store)
        return results

    def _compute(self, run: StageRun, plan: StepSchedule, inputs_for: InputsFor, store: BoundaryStore,
                 results: dict[int, tuple[torch.Tensor, ...]], *, parallel: bool) -> None:
        cache = cache_call(self.program, plan, run, store)
        args = stage_arguments(self.program, run, inputs_for, store.get, cache=cache)
        args = [arg.to(self.device) for arg in args]
        with torch.no_grad(), RunTimer(self.device) as timer:
            outputs = call_stage(self._hooked, args)
        self.times.record(run.stage, timer, parallel=parallel)
        self.record(run, outputs, store, results)

    def _share_decisions(self, plan: StepSchedule, runs: Sequence[StageRun]) -> None:
        """A step cache's chain decided from values (first-block cache): the decision the
        stage of its first block made for its run's origin, from that stage's rank to all
        (a collective every rank joins at the same point: after each run of a warm-up
        step, before the stages after it; after a parallel step's runs, a step before the
        later stages read it)."""
        if plan.cache is None:
            return
        stages = [stage.module for stage in self.program.stages]
        deciding = plan.cache.cache.deciding_stages(stages, self.program.editor)
        for run in runs:
            for chain in (chain for chain, stage in deciding.items() if stage == run.stage):
                decided = plan.cache.decided[run.origin]
                flag = torch.tensor([-1 if decided.get(chain) is None else int(decided[chain])],
                                    device=self.device)
                source = self.first_rank + run.slot
                self._guard(lambda: dist.broadcast(flag, src=source, group=self.group),
                            f"the step cache's decision for call {run.origin} from rank {source}", source)
                decided[chain] = bool(flag.item()) if flag.item() >= 0 else None

    def modules(self) -> list[nn.Module]:
        return [self.module]

    def measured(self) -> MeasuredStages | None:
        """Every rank's times of its stage, gathered (a collective: every rank calls it at
        the same point of the same step, as the denoiser does), so that all ranks see the
        same; None unless every stage was timed the same way."""
        mine = self.times.take([min(self.slot, self.program.n_stages - 1)])
        gathered: list[MeasuredStages | None] = [None] * self.world
        dist.all_gather_object(gathered, mine, group=self.group)
        if any(g is None for g in gathered) or len({g.parallel for g in gathered}) != 1:
            return None
        return MeasuredStages([g.seconds[0] for g in gathered[:self.program.n_stages]], gathered[0].parallel)

    def _produced(self, name: str, tensor: torch.Tensor) -> None:
        """The hook after each boundary producer: in a parallel step, send it now."""
        flight = self._sending
        if flight is None:
            return
        tensor = tensor.contiguous()
        for reader in self._readers(name):
            work = self._guard(lambda: dist.isend(tensor, dst=reader, group=self.group, tag=self._tags[name]),
                               _sending(name, reader), reader)
            flight.sends.append((name, reader, tensor, work))

    def _post_receives(self, runs: Sequence[StageRun]) -> _InFlight:
        """Non-blocking receives of what this step's runs write and this rank reads."""
        flight = _InFlight()
        for run in runs:
            producer = self.first_rank + run.slot
            if run.writes is None or producer == self.rank:
                continue
            for name in self.program.stages[run.stage].outputs:
                if self.rank in self._readers(name):
                    buffer = self._buffer(name)
                    work = self._guard(lambda: dist.irecv(buffer, src=producer, group=self.group,
                                                          tag=self._tags[name]),
                                       _receiving(name, producer), producer)
                    flight.receives.append((name, producer, run.writes, buffer, work))
        return flight

    def _deliver(self, store: BoundaryStore) -> None:
        """Wait for the previous parallel step's messages and store what arrived."""
        flight = self._in_flight.pop(store, None)
        if flight is None:
            return  # the previous step was a warm-up step, which delivered synchronously
        self._wait(flight)
        for name, _, version, buffer, _ in flight.receives:
            store.put(version, {name: self._laid_out(name, buffer)})

    def _drain(self) -> None:
        """Wait for every stream's messages in flight and store them."""
        for store in list(self._in_flight):
            self._deliver(store)

    def _wait(self, flight: _InFlight) -> None:
        for name, peer, _, work in flight.sends:
            self._guard(work.wait, _sending(name, peer), peer)
        for name, peer, _, _, work in flight.receives:
            self._guard(work.wait, _receiving(name, peer), peer)

    def _guard(self, operation: Callable[[], Any], what: str, peer: int) -> Any:
        try:
            return operation()
        except RuntimeError as exc:
            raise PeerError(f"rank {self.rank}: {what} failed ({_one_line(exc)}); did rank {peer} "
                            "exit or hang?") from exc

    def close(self) -> None:
        """Wait for the messages still in flight (they pair with posted peer operations),
        then let go of the stage (its hooked copy refers back to this executor, a cycle
        that would keep its weights until the garbage collector runs)."""
        self._drain()
        self.module = self._hooked = None

    def _exchange(self, runs: Sequence[StageRun], version: int | None, store: BoundaryStore) -> None:
        """Send this rank's outputs of ``runs`` (version ``version``) to the ranks that read
        them, and receive those this rank reads, in one fixed order on every rank."""
        if version is None:
            return
        for run in runs:
            if run.writes is None:
                continue
            producer = self.first_rank + run.slot
            for name in self.program.stages[run.stage].outputs:
                readers = self._readers(name)
                if producer == self.rank:
                    for reader in readers:
                        self._send(store.get(name, version), reader, name)
                elif self.rank in readers:
                    store.put(version, {name: self._recv(name, producer)})

    def _readers(self, name: str) -> list[int]:
        return self._reader_ranks[name]

    def _buffer(self, name: str) -> torch.Tensor:
        return self.program.boundary[name].tensor.empty(self.device)

    def _send(self, tensor: torch.Tensor, peer: int, name: str) -> None:
        self._guard(lambda: dist.send(tensor.contiguous(), dst=peer, group=self.group, tag=self._tags[name]),
                    _sending(name, peer), peer)

    def _recv(self, name: str, peer: int) -> torch.Tensor:
        buffer = self._buffer(name)
        self._guard(lambda: dist.recv(buffer, src=peer, group=self.group, tag=self._tags[name]),
                    _receiving(name, peer), peer)
        return self._laid_out(name, buffer)

    def _laid_out(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        """A received boundary with its producer's strides (``TensorSpec.laid_out``)."""
        return self.program.boundary[name].tensor.laid_out(buffer)

    def _broadcast_outputs(self, plan: StepSchedule, results: dict[int, tuple[torch.Tensor, ...]]) -> None:
        """Every group's noise prediction to every rank, joined into the whole batch's."""
        for run in plan.runs:
            if run.gives is None:
                continue
            parts = [self._broadcast_from(group * self.slots_per_group + run.slot, run.gives, results)
                     for group in range(self.program.n_groups)]
            results[run.gives] = self.program.split.joined(parts)

    def _broadcast_from(self, source: int, step: int, results: dict[int, tuple[torch.Tensor, ...]]
                        ) -> list[torch.Tensor]:
        if source == self.rank:
            tensors = [t.contiguous() for t in results[step]]
        else:
            tensors = [spec.empty(self.device) for spec in self.program.call.outputs]
        for tensor in tensors:
            try:
                dist.broadcast(tensor, src=source, group=self.group)
            except RuntimeError as exc:
                raise PeerError(f"rank {self.rank}: the noise prediction of step {step} from rank "
                                f"{source} did not arrive ({_one_line(exc)}); did rank {source} exit or "
                                "hang?") from exc
        return tensors


def require_process_group() -> None:
    """Raise unless the caller has created a torch.distributed process group; warn when its
    timeout is torch's default (``warn_about_default_timeout``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise AsyncFXError("executor='distributed' needs a torch.distributed process group: call "
                           "dist.init_process_group(...) in every rank first (run the script under "
                           "torchrun); asyncfx never creates one itself.")
    warn_about_default_timeout(group_timeout())


def group_timeout() -> datetime.timedelta | None:
    """The default process group's timeout, where its backend tells (None: it does not)."""
    for device in ("cpu", "cuda"):
        try:
            return dist.group.WORLD._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError):  # no backend for the device, or no options
            continue
    return None


def warn_about_default_timeout(timeout: datetime.timedelta | None) -> None:
    """A rank that freezes (rather than dies: that is seen at once) leaves every other rank
    waiting for it until the group's timeout, 30 minutes by torch's default for gloo."""
    if timeout is not None and timeout in (default_pg_timeout, default_pg_nccl_timeout):
        warnings.warn(f"the process group's timeout is torch's default ({timeout}): a rank that stops "
                      "answering leaves the other ranks waiting that long before they fail with PeerError. "
                      "Pass dist.init_process_group(..., timeout=datetime.timedelta(seconds=...)), a few "
                      "times the longest wait between ranks (rank 0 compiling the plan at the first "
                      "call included).", stacklevel=4)


def _sending(name: str, peer: int) -> str:
    return f"sending boundary tensor {name!r} to rank {peer}"


def _receiving(name: str, peer: int) -> str:
    return f"waiting for boundary tensor {name!r} from rank {peer}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
