"""LocalExecutor: one process, one worker thread per device slot.

With batch groups (``Program.split``) the slots are the groups' in turn: group g's stage
k runs in slot ``g * S + k`` (S slots a group) on its share of the batch, with its own
boundary values; all groups' runs of a round are handed out at once.

Each slot holds its own copy of its stage (on its device) and computes on its own
thread; on CUDA also on its own stream, with each boundary output copied to the other
devices that read it, on a copy stream, the moment the stage makes it (see the note on
sending). Values are versioned (``BoundaryStore``), so a step writes new buffers while
the stages of the same step read the previous version: double buffering by
construction. On CPU the workers are threads that share memory; K workers on C cores
get C/K intra-op threads each (all C at warm-up steps, one stage at a time; see the note
on threads). On CUDA each stage replays as a CUDA graph once warmed up (``cuda_graphs``),
but not under a step cache, and a slot may have its own stream (an SM partition,
``green.py``). Workers compute under the caller's autocast (thread-local state).

Note (threads): a worker sets its count with ``torch.set_num_threads`` in its own thread;
OpenMP's count is per thread, so the caller's and other threads' stay as they were, but
the same call sets MKL's, which is process-wide: a computation elsewhere in the process
while CPU workers switch may run its matrix products on another count of threads, and
differ from a run alone by float rounding (about 1e-6), never by more. Pin
``torch.set_num_threads`` once and call the model from one thread where bitwise
reproducibility across threads matters.

Note (hand-off): the caller hands a round's runs to their workers through C queues and wakes
once, when the last run delivered (or one failed): a ``_Round`` latch, not a result queue
read per run (waking a thread costs the caller CPU time, which the GPUs wait for).

Note (sending): the stage graph reports each boundary tensor as it is made (send hooks,
``hooks.py``). Run eagerly, the hook records an event on the compute stream and queues
the copies behind it on the copy stream, so they overlap the rest of the stage. A CUDA
graph does not run Python, so while a stage is captured the hook records an *external*
event instead, which becomes a node of the graph; after each replay the worker queues
the copies behind those events, reading the buffers the graph writes, and they still
start when the graph reaches each tensor, not when it ends. The next replay overwrites
those buffers, so a worker waits for its copies before it reports the step done.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from asyncfx.errors import AsyncFXError
from asyncfx.runtime.cuda_graphs import GraphedStage, check_cuda_graphs_option
from asyncfx.program import Program, StageSpec
from asyncfx.runtime.executor import (BoundaryStore, Executor, InputsFor, cache_call, group_inputs,
                                      joined_results, resolved, stage_arguments)
from asyncfx.runtime.hooks import with_send_hooks
from asyncfx.runtime.stage_weights import placed
from asyncfx.runtime.step_cache import CacheCall, call_stage
from asyncfx.schedule import Mode, StageRun, StepSchedule
from asyncfx.timing import RunTimer


class LocalExecutor(Executor):
    """Stages on ``devices`` (one per slot: stage k on slot k, stride 2's extra last-stage
    run on slot N; with batch groups, each group's slots in turn), each driven by its own
    thread. On CUDA a stage's stream first waits
    for the caller's current stream, which wrote its inputs (the sampler's step).
    ``streams`` optionally gives each slot the CUDA stream to compute on (SM partitions);
    ``cuda_graphs`` (default: on for CUDA slots) replays each stage as a CUDA graph after
    its first calls.

    Example:
        >>> executor = LocalExecutor(program, ["cpu", "cpu"])
        >>> outputs = executor.step(schedule(3, 2, warmup=1), inputs_for, store)
        >>> executor.close()
    """

    def __init__(self, program: Program, devices: Sequence[str | torch.device], threads: int | None = None, *,
                 streams: Sequence[Any] | None = None, cuda_graphs: bool | None = None):
        super().__init__(program)
        self.devices = [torch.device(d) for d in devices]
        groups = program.n_groups
        if len(self.devices) < program.n_stages * groups or len(self.devices) % groups:
            raise ValueError(f"{program.n_stages} stages in {groups} batch group(s) need a multiple of "
                             f"{groups} devices, at least {program.n_stages * groups}, got "
                             f"{len(self.devices)}.")
        self.slots_per_group = len(self.devices) // groups
        streams = list(streams) if streams is not None else [None] * len(self.devices)
        if len(streams) != len(self.devices):
            raise ValueError(f"streams lists {len(streams)} streams for {len(self.devices)} slots.")
        use_graphs = check_cuda_graphs_option(cuda_graphs) is not False
        cpu_slots = sum(d.type == "cpu" for d in self.devices)
        self._all_threads = torch.get_num_threads()
        threads = threads or max(1, self._all_threads // max(cpu_slots, 1))
        capture_lock = threading.Lock()  # workers capture their graphs one at a time
        consumers = [self._consumer_devices(group) for group in range(groups)]
        self._workers = [_Worker(slot, self._slot_module(slot), device, threads,
                                 destinations=_destinations(self.stage(slot).outputs,
                                                            consumers[slot // self.slots_per_group], device),
                                 stream=streams[slot], cuda_graph=use_graphs and device.type == "cuda",
                                 capture_lock=capture_lock, name=self._slot_name(slot))
                         for slot, device in enumerate(self.devices)]
        for worker in self._workers:
            worker.start()
        # workers hold their stages (weights, graphs): stop them when the executor goes away
        self._stop = weakref.finalize(self, _stop_workers, list(self._workers))

    def stage(self, slot: int) -> StageSpec:
        return self.program.stage_in_slot(slot % self.slots_per_group)

    def _slot_name(self, slot: int) -> str:
        group, own = divmod(slot, self.slots_per_group)
        name = f"stage {min(own, self.program.n_stages - 1)} (slot {slot})"
        return name if self.program.n_groups == 1 else f"{name} of batch group {group}"

    def _slot_module(self, slot: int) -> nn.Module:
        return placed(self.stage(slot).module, self.devices[slot], self.program.weights)

    def _consumer_devices(self, group: int) -> dict[str, set[torch.device]]:
        consumers: dict[str, set[torch.device]] = {}
        first = group * self.slots_per_group
        for slot, device in enumerate(self.devices[first:first + self.slots_per_group], start=first):
            for name in self.stage(slot).inputs:
                if name not in self.program.graph_inputs:
                    consumers.setdefault(name, set()).add(device)
        return consumers

    def slot_modules(self) -> list[nn.Module]:
        """The module each slot computes with (for inspecting what each device holds)."""
        return [worker.module for worker in self._workers]

    def modules(self) -> list[nn.Module]:
        return self.slot_modules()

    def graphed_slots(self) -> list[bool]:
        """Whether each slot now replays its stage as a CUDA graph."""
        return [worker.graphed is not None and worker.graphed.graphed for worker in self._workers]

    def step(self, plan: StepSchedule, inputs_for: InputsFor,
             store: BoundaryStore) -> dict[int, tuple[torch.Tensor, ...]]:
        if not self._stop.alive:
            raise AsyncFXError("this local executor was closed and its workers have stopped; make a new "
                               "one (an AsyncDenoiser does so by itself at its next call).")
        groups = range(self.program.n_groups)
        results: list[dict[int, tuple[torch.Tensor, ...]]] = [{} for _ in groups]
        autocast = _caller_autocast()
        if plan.mode is Mode.SEQUENTIAL:  # one stage at a time, its groups at once
            for run in plan.runs:
                self._run_round([(g, run) for g in groups], inputs_for, store, results, autocast,
                                max(1, self._all_threads // len(groups)), plan)
        elif plan.runs:
            self._run_round([(g, run) for g in groups for run in plan.runs], inputs_for, store, results,
                            autocast, None, plan)
        if plan.mode is not Mode.CACHED:
            self.finish(plan, store)
        return joined_results(self.program.split, results)

    def _run_round(self, runs: Sequence[tuple[int, StageRun]], inputs_for: InputsFor, store: BoundaryStore,
                   results: list[dict[int, tuple[torch.Tensor, ...]]], autocast: Any,
                   threads: int | None, plan: StepSchedule) -> None:
        """Hand ``runs`` (batch group, run) to their workers at once, wait for all of them
        (or the first error) and keep what they made."""
        handed = _Round(len(runs))
        for group, run in runs:
            self._dispatch(handed, group, run, inputs_for, store, autocast, threads, plan)
        handed.wait()
        if handed.error is not None:
            (group, run), error = handed.error
            step = run.gives if run.gives is not None else run.writes
            worker = self._workers[group * self.slots_per_group + run.slot]
            error.add_note(f"raised in {worker.stage_name} on {worker.device} "
                           f"(asyncfx local executor, step {step}); "
                           "call reset() on the denoiser before sampling again.")
            raise error
        for group, run in runs:
            outputs, copies, timer = handed.made[group, run]
            own = store.group(group)
            self.times.record(run.stage, timer, parallel=threads is None)
            self.record(run, outputs, own, results[group])
            if run.writes is not None and copies:
                own.put(run.writes, copies)

    def _dispatch(self, handed: _Round, group: int, run: StageRun, inputs_for: InputsFor,
                  store: BoundaryStore, autocast: Any, threads: int | None, plan: StepSchedule) -> None:
        worker = self._workers[group * self.slots_per_group + run.slot]
        inputs = group_inputs(self.program.split, inputs_for, group)
        own = store.group(group)
        args = stage_arguments(self.program, run, inputs, worker.reader(own), deferred=True,
                               cache=cache_call(self.program, plan, run, own))
        written = ()
        if worker.device.type == "cuda":
            names, graph_inputs = self.program.stages[run.stage].inputs, self.program.graph_inputs
            written = _recorded_on_current_streams([a for a, n in zip(args, names) if n in graph_inputs])
        worker.tasks.put((handed, (group, run), args, written, threads, autocast))

    def close(self) -> None:
        self._stop()


def _stop_workers(workers: Sequence[_Worker]) -> None:
    """Stop the workers and wait for them: at interpreter exit (an executor nobody
    closed), a worker thread still ending while the process tears down aborts it."""
    for worker in workers:
        worker.tasks.put(None)
    for worker in workers:
        if worker is not threading.current_thread():
            worker.join(timeout=5)


class _Round:
    """Runs handed to the workers at once: each worker delivers what its run made (or the
    error it raised), and the caller wakes once, when every run delivered or one failed.
    Runs of a round the caller gave up on (after an error) deliver into it unread."""

    def __init__(self, runs: int):
        self.made: dict[tuple[int, StageRun], tuple[Any, dict[str, torch.Tensor], RunTimer | None]] = {}
        self.error: tuple[tuple[int, StageRun], BaseException] | None = None
        self._left, self._woken = runs, False
        self._lock = threading.Lock()
        self._done = threading.Lock()
        self._done.acquire()

    def deliver(self, key: tuple[int, StageRun], outputs: Any, copies: dict[str, torch.Tensor],
                timer: RunTimer | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if error is None:
                self.made[key] = (outputs, copies, timer)
            elif self.error is None:
                self.error = (key, error)
            self._left -= 1
            wake = not self._woken and (self._left == 0 or self.error is not None)
            self._woken |= wake
        if wake:
            self._done.release()

    def wait(self) -> None:
        self._done.acquire()


def _copy_key(name: str, device: torch.device) -> str:
    return f"{name}@{device}"


def _destinations(outputs: Sequence[str], consumers: dict[str, set[torch.device]],
                  device: torch.device) -> dict[str, list[torch.device]]:
    """The other devices each boundary output of a slot on ``device`` must be copied to."""
    destinations = {name: sorted((d for d in consumers.get(name, ()) if d != device), key=str)
                    for name in outputs}
    return {name: devices for name, devices in destinations.items() if devices}


def _read(store: BoundaryStore, name: str, version: int, device: torch.device) -> torch.Tensor:
    """The copy already made on ``device`` if there is one, else the producer's tensor."""
    copied = _copy_key(name, device)
    return store.get(copied, version) if store.has(copied, version) else store.get(name, version)


def _recorded_on_current_streams(tensors: Sequence[torch.Tensor]) -> list[Any]:
    """An event on the caller's current stream of each CUDA device ``tensors`` live on.

    The caller writes the graph inputs on its own stream (the sampler's step, a
    ``torch.full_like`` timestep) and nothing synchronises it before dispatch, so each
    stage's stream waits on these events before reading them."""
    events = []
    for device in {t.device for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return events


def _caller_autocast() -> tuple[tuple[str, torch.dtype], ...]:
    """The caller's autocast regions, by device type. Autocast is thread-local state, which
    the workers do not inherit, and the stages were captured under it: they run under it."""
    return tuple((device_type, torch.get_autocast_dtype(device_type)) for device_type in ("cpu", "cuda")
                 if torch.is_autocast_enabled(device_type))


def _autocast(regions: Sequence[tuple[str, torch.dtype]]) -> contextlib.ExitStack:
    """Enter the caller's autocast regions in a worker (without the cast cache, which CUDA
    graph capture does not support)."""
    stack = contextlib.ExitStack()
    for device_type, dtype in regions:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=False))
    return stack


class _Worker(threading.Thread):
    """One slot: takes ``(round, (group, run), args, written events, threads, autocast)`` from
    ``tasks``, computes the run on ``device`` and delivers what it made to its round.
    ``destinations`` names the boundary outputs to copy to other devices (CUDA only: CPU
    slots share memory)."""

    def __init__(self, slot: int, module: nn.Module, device: torch.device, threads: int, *,
                 destinations: dict[str, list[torch.device]] | None = None,
                 stream: Any = None, cuda_graph: bool = False, capture_lock: Any = None, name: str = ""):
        super().__init__(name=f"asyncfx-stage-slot-{slot}", daemon=True)
        self.slot, self.module, self.device, self.threads = slot, module, device, threads
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.destinations = destinations or {}
        self.stream, self.cuda_graph, self.stage_name = stream, cuda_graph, name
        self.capture_lock = capture_lock
        self.graphed: GraphedStage | None = None

    def reader(self, store: BoundaryStore) -> Callable[[str, int], torch.Tensor]:
        """How this slot reads a boundary value: the copy made on its device where there is
        one (CUDA), else the producer's tensor (CPU slots share memory)."""
        if self.device.type != "cuda":
            return store.get
        return lambda name, version: _read(store, name, version, self.device)

    def run(self) -> None:
        cuda = self.device.type == "cuda"
        compute = (self.stream or torch.cuda.Stream(self.device)) if cuda else None
        sender = _Sender(self.destinations, torch.cuda.Stream(self.device)) if cuda else None
        runnable = self.module
        if sender is not None and self.destinations:
            runnable = with_send_hooks(self.module, list(self.destinations), sender.made)
        if self.cuda_graph:
            self.graphed = GraphedStage(runnable, name=self.stage_name, stream=compute,
                                        capture_lock=self.capture_lock)
        while True:
            task = self.tasks.get()
            if task is None:
                return
            handed, key, args, written, threads, autocast = task
            run = key[1]
            if not cuda and torch.get_num_threads() != (threads or self.threads):
                torch.set_num_threads(threads or self.threads)
            try:
                with _autocast(autocast):
                    if compute is None:
                        with torch.no_grad(), RunTimer(self.device) as timer:  # CPU slots copy nothing
                            args = [resolved(a.to(self.device)) for a in args]
                            outputs, copies = call_stage(runnable, args), {}
                    else:
                        outputs, copies, timer = self._compute(runnable, run, args, written, compute, sender)
                handed.deliver(key, outputs, copies, timer)
            except BaseException as exc:  # reported to the caller, which re-raises it
                handed.deliver(key, None, {}, error=exc)

    def _compute(self, runnable: nn.Module, run: StageRun, args: list[torch.Tensor], written: Sequence[Any],
                 compute: Any, sender: _Sender) -> tuple[Any, dict[str, torch.Tensor], RunTimer | None]:
        """The run on the slot's stream; its timer is None for the calls that warm up and
        capture a CUDA graph (they time the capture, not the stage)."""
        sender.begin(stores=run.writes is not None)
        steady = self.graphed is None or self.graphed.graphed or self.graphed.failure is not None
        with torch.no_grad(), torch.cuda.device(self.device), torch.cuda.stream(compute):
            for event in written:
                compute.wait_event(event)
            args = [resolved(a.to(self.device, non_blocking=True)) for a in args]
            with RunTimer(self.device) as timer:
                if self.graphed is None or isinstance(args[-1], CacheCall):  # a step cache: not graphed
                    outputs = call_stage(runnable, args)
                else:
                    outputs = self.graphed(args)
            if self.graphed is not None and self.graphed.graphed:  # replayed: the hooks did not run
                sender.replayed()
        compute.synchronize()
        sender.copier.synchronize()  # the next replay overwrites what the copies read
        return outputs, sender.end(), timer if steady else None


class _Sender:
    """Copies boundary outputs to the other devices that read them as the stage makes
    them (see the note on sending); ``made`` is the stage's send hook."""

    def __init__(self, destinations: dict[str, list[torch.device]], copier: Any):
        self.destinations, self.copier = destinations, copier
        self.marks: dict[str, tuple[Any, torch.Tensor]] = {}  # events and buffers of the captured graph
        self._copies: dict[str, torch.Tensor] | None = None   # None: this run's outputs are not kept

    def begin(self, *, stores: bool) -> None:
        self._copies = {} if stores else None

    def end(self) -> dict[str, torch.Tensor]:
        copies, self._copies = self._copies or {}, None
        return copies

    def made(self, name: str, tensor: torch.Tensor) -> None:
        if torch.cuda.is_current_stream_capturing():
            event = torch.cuda.Event(external=True)  # a node of the graph, waited on after replays
            event.record()
            self.marks[name] = (event, tensor)
        elif self._copies is not None:
            event = torch.cuda.Event()
            event.record()
            self._copy(name, tensor, event)

    def replayed(self) -> None:
        if self._copies is not None:
            for name, (event, tensor) in self.marks.items():
                self._copy(name, tensor, event)

    def _copy(self, name: str, tensor: torch.Tensor, made: Any) -> None:
        self.copier.wait_event(made)
        with torch.cuda.stream(self.copier):
            for device in self.destinations[name]:  # a real copy even to the same device
                copied = torch.empty_like(tensor, device=device).copy_(tensor, non_blocking=True)
                self._copies[_copy_key(name, device)] = copied
