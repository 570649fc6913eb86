"""AsyncDenoiser: the drop-in module ``asyncfx.partition()`` returns.

It is called exactly like the original denoiser. It counts the calls of a generation,
asks the schedule what each stage computes, hands that to an executor, and returns the
last stage's output in the model's own type. A new generation (the timestep moves back
against the direction of the generation's first two steps: up for most pipelines, down
for those whose timesteps count up) resets the step counts and the boundary buffers;
``reset()`` does it explicitly. A call with new shapes goes to a capture of its own,
whose streams start with warm-up (see the note on shapes).

Note (conditioning that changes): inputs other than the latent and the timestep may
change from one step to the next within a generation (ControlNet and T2I-Adapter
residuals are computed from each step's latent), so a change of them is not a new
generation: every stage reads them fresh at every call. Only a model without a timestep
input, which leaves no other signal, takes new conditioning as a new generation. A
generation that starts past the timestep where the previous one stopped (image to image
after an interrupted run) needs ``reset()``.

Note (converting): ``.to()``, ``.half()``, ``.cuda()`` and the like (``pipe.to(...)``
included) convert the original model, and the next call captures and splits it again,
since the stages were specialised to the old dtype and device. Devices the stages run on
are the ones ``partition()`` chose; only the original model (warm-up steps before the
first compile, capture) moves.

Note (editing): the stages are captured from the model as it was; a model edited after
``partition()`` is captured again when the next generation starts: a LoRA loaded, fused
or re-weighted, new weights loaded, FreeU switched on, other attention processors set,
or anything else that changes its modules, tensors or their attributes (found by
``model_state.state_signature``, about 10 ms for SDXL's UNet). Stage copies on
other devices would otherwise keep the old weights, and new modules and settings would
be missing from the graph. The state is taken again after the model's first call of its
own (a warm-up step): what a forward makes for itself at its first call (Z-Image's
rotary table), which the capture's trace left unmade, is not an edit.

Note (shapes): a call with other shapes, dtypes or non-tensor arguments than the
capture is captured anew. Earlier captures are kept as spares (with their executors,
up to ``MAX_SPARES``), so a pipeline that alternates kinds of call (SD3's skip-layer
guidance: an extra call without classifier-free guidance at some steps; GLM-Image: a
call that fills a cache, then conditional and unconditional calls that read it or not)
switches back without capturing again. A switch does not start a new generation: each
capture keeps its own streams, and a stream goes on from where it was if it was called
at the previous step (its buffers are one step stale, as the schedule says); one that
missed a step starts over with warm-up.

Note (two calls per step): pipelines that run the conditional and unconditional
passes as separate calls call the denoiser twice with the same timestep. The i-th call
of a capture with a given timestep belongs to its stream i; each stream keeps its own
step count and boundary buffers, so each sees exactly the staleness the schedule
prescribes. A scheduler that lists a timestep twice in a row (Heun's corrections,
PNDM's first steps) makes such a second call too.

Note (timesteps): a call is at its timestep tensor's element farthest from zero (one per
sample, or one per token: Wan 2.2's image-to-video pipeline gives the conditioning
frame's tokens 0). Stride 2 computes the next step ahead, so each stream finds where its
first call is among the scheduler's timesteps (listed once each): at the scheduler's own
step index where it keeps one (a model that takes over part-way, like Wan 2.2's second
expert, starts there), else at its begin index plus the stream's start. A conditioning
input equal to the timestep at the call (LTX-2's ``sigma=timestep``) is the timestep
under another name, and moves with it (stride 2, ``time_shift``).

Note (filling calls): a call that writes into its arguments (GLM-Image's pipeline first
fills a KV cache with the reference image's keys and values, at timestep 0) cannot run
as a graph; the capture lists what it writes into (``written_arguments``). Such calls
run the original model and are not steps: they neither count in a generation nor tell
which way its timesteps move. Calls like that at different timesteps are denoising steps
that gain nothing from the stages, and are warned about.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import operator
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from asyncfx.errors import ArgumentsError, AsyncFXError, InputMismatchError
from asyncfx.module_attributes import (ACCELERATE_HOOK, DIFFUSERS_HOOKS, MODULE_REGISTRIES,
                                       diffusers_hook_names)
from asyncfx.runtime.executor import BoundaryStore, Executor
from asyncfx.runtime.model_state import state_signature
from asyncfx.runtime.schedule import Mode, schedule


logger = logging.getLogger(__name__)

#: Calls with one timestep that are separate streams: most pipelines make one or two per
#: step (conditional and unconditional passes as separate calls), video pipelines that
#: denoise overlapping frame windows one per window. More calls with the same timestep
#: are taken for one-step generations, each a new one (else each would open a stream and
#: keep its buffers for good).
MAX_CALLS_PER_STEP = 16
#: Earlier captures kept for calls that fit them again (see the note on shapes); each may
#: hold an executor with its stage copies.
MAX_SPARES = 3
#: A model without a timestep input that starts this many generations in a row because
#: a one-number-per-sample input changed is warned about: that input is likely its timestep.
RESTARTS_BEFORE_WARNING = 3
#: A timestep tensor with more elements than this (one per token) is reduced on its device.
MANY_TIMESTEPS = 64

#: ``build(model, args, kwargs)``: capture ``model`` for inputs like these; how calls bind to
#: the capture, and how to make its executor.
Build = Callable[[Any, tuple, dict], tuple["CallInterfaceLike", "MakeExecutor"]]
#: What the denoiser builds while it runs; a copy starts without it (``__deepcopy__``).
RUNTIME_STATE = ("_now", "_spares", "_generation", "_restarts", "_filled_at", "_warned_filling")
#: The denoiser's own attributes (set on it even where the model has one of the name).
OWN_ATTRIBUTES = frozenset({"_build", "n_stages", "warmup", "stride", "time_shift", "scheduler", "rebuild",
                            "convertible", "training", *RUNTIME_STATE})

#: ``make_executor(plan)``: the executor for the captured graph, and its plan (``plan`` if
#: given, e.g. compiled before the last executor was closed; else compiled now).
MakeExecutor = Callable[[Any], tuple[Executor, Any]]


class SchedulerError(AsyncFXError, ValueError):
    """Stride 2 needs the sampler's timesteps and did not get them."""


class CompiledDenoiserError(AsyncFXError, RuntimeError):
    """torch.compile was asked to trace an AsyncDenoiser."""


@dataclasses.dataclass
class CallInterfaceLike:
    """What the denoiser needs to bind calls: flatten checked inputs, rebuild outputs,
    and the placeholder names and roles of the graph inputs."""

    flatten: Callable[[tuple, dict], list[torch.Tensor]]
    unflatten: Callable[[Sequence[Any]], Any]
    names: list[str]          # placeholder name of each flat input
    roles: list[str]          # "latent", "timestep" or "condition"
    written_arguments: Sequence[str] = ()  # arguments the call writes into (note on filling calls)


@dataclasses.dataclass
class TimestepMap:
    """How the timesteps a pipeline passes relate to its scheduler's (stride 2 computes
    the next one ahead): ``passed = a * scheduled + b``, fitted from the first two calls
    of a generation. Most pipelines pass the scheduler's (a = 1, b = 0); Flux's pass
    t / 1000, Lumina's 1 - t / 1000.

    Example:
        >>> line = TimestepMap()
        >>> line.observe(1000.0, 1.0), line.observe(800.0, 0.8)
        (True, True)
        >>> round(line.predict(600.0), 6)
        0.6
    """

    points: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (scheduled, passed)
    guessed: bool = False  # a timestep was predicted before two calls were seen

    def line(self) -> tuple[float, float]:
        """``(a, b)``: the fit through two calls, else through one call and zero."""
        if len(self.points) == 2:
            (s0, p0), (s1, p1) = self.points
            a = (p1 - p0) / (s1 - s0)
            return a, p0 - a * s0
        if self.points and self.points[0][0] != 0:
            return self.points[0][1] / self.points[0][0], 0.0
        return 1.0, 0.0

    def predict(self, scheduled: float) -> float:
        self.guessed |= len(self.points) < 2
        a, b = self.line()
        return a * scheduled + b

    def observe(self, scheduled: float, passed: float) -> bool:
        """Record a call; False if it contradicts the fit (or a guess already used)."""
        if len(self.points) < 2 and not self.guessed:
            if not self.points or self.points[0][0] != scheduled:
                self.points.append((scheduled, passed))
            return True
        a, b = self.line()
        return math.isclose(passed, a * scheduled + b, rel_tol=1e-3, abs_tol=1e-6)


@dataclasses.dataclass
class _Generation:
    """Where the calls are in the current generation, across captures."""

    step: int = -1                   # the current step (calls with one timestep share one)
    timestep: float | None = None    # its timestep
    direction: float | None = None   # +1 or -1: how the timestep moved at the last step
    calls: int = 0                   # calls at the current step, all captures together
    conditions: list[torch.Tensor] | None = None  # only for a model without a timestep input


@dataclasses.dataclass
class _Stream:
    """One stream of calls of one capture (see the note on two calls per step); its step
    ``s`` is step ``start + s`` of the generation."""

    start: int = 0
    last: int = 0   # the generation step of its last call
    scheduler_index: int | None = None  # stride 2: its first call's place in the scheduler's timesteps
    scheduled: list[float] | None = None  # stride 2: their values from there on (see _sampler_timesteps)
    step: int = 0
    timesteps: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    cached: dict[int, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    timestep_map: TimestepMap = dataclasses.field(default_factory=TimestepMap)
    store: BoundaryStore = dataclasses.field(default_factory=BoundaryStore)


@dataclasses.dataclass
class _Build:
    """One capture of the model and what was built from it (all None before the first)."""

    interface: CallInterfaceLike | None = None
    make_executor: MakeExecutor | None = None
    executor: Executor | None = None
    plan: Any = None
    signature: int | None = None  # the model's state when it was captured (note on editing)
    module_dicts: list[dict] = dataclasses.field(default_factory=list)  # the model's modules' __dict__s
    settled: bool = False  # signed again after the model's first call of its own (note on editing)
    streams: list[_Stream] = dataclasses.field(default_factory=list)
    step: int = -1   # the generation step of its last call
    calls: int = 0   # its calls at that step
    why_empty: str = "its first call"  # why a build without a capture has none (logged)


class AsyncDenoiser(nn.Module):
    """A denoiser whose stages run concurrently on one-step-stale inputs.

    Built by :func:`asyncfx.partition`; see there for the options.

    Example:
        >>> pipe.unet = asyncfx.partition(pipe.unet, n_devices=2)
        >>> image = pipe(prompt_embeds=embeds, num_inference_steps=20).images[0]
    """

    def __init__(self, model: nn.Module, build: Build, *, n_stages: int, warmup: int, stride: int = 1,
                 time_shift: bool = False, scheduler: Any = None, rebuild: bool = True,
                 convertible: bool = True):
        super().__init__()
        object.__setattr__(self, "_model", model)  # read attributes from it; do not own it
        object.__setattr__(self, "__module__", type(model).__module__)  # see __class__
        self._build = build
        self.n_stages, self.warmup, self.stride = n_stages, warmup, stride
        self.time_shift, self.scheduler = time_shift, scheduler
        self.rebuild = rebuild  # re-capture on new input shapes (not with a user's plan)
        self.convertible = convertible  # .to() may convert the model and re-capture it
        self._start_runtime_state()

    def _start_runtime_state(self) -> None:
        """Nothing captured, no generation (the attributes named in RUNTIME_STATE)."""
        self._now = _Build()
        self._spares: list[_Build] = []  # earlier captures, the latest first (note on shapes)
        self._generation = _Generation()
        self._restarts = 0  # calls in a row that restarted because a timestep-like input changed
        self._filled_at: float | None = None  # the last call writing into its arguments was at
        self._warned_filling = False  # about such calls at several timesteps (note on filling calls)

    def __deepcopy__(self, memo: dict) -> AsyncDenoiser:
        """A denoiser of a deep copy of the model, with the same options (and hooks), captured
        anew at its first call: captures, workers and buffers belong to the original.

        Example:
            >>> twin = copy.deepcopy(pipe.unet)       # e.g. to load other weights into it
            >>> twin.original_model is pipe.unet.original_model
            False
        """
        twin = AsyncDenoiser.__new__(AsyncDenoiser)
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self._options(), memo))  # the model, its scheduler, hooks
        twin._start_runtime_state()
        return twin

    def __copy__(self) -> AsyncDenoiser:
        """A denoiser of the same model with the same options, captured anew at its first call."""
        twin = AsyncDenoiser.__new__(AsyncDenoiser)
        twin.__dict__.update(self._options())
        twin._start_runtime_state()
        return twin

    def _options(self) -> dict[str, Any]:
        """Everything but what the denoiser builds while it runs (RUNTIME_STATE)."""
        return {name: value for name, value in self.__dict__.items() if name not in RUNTIME_STATE}

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"an AsyncDenoiser (of {type(self._model).__name__}) cannot be pickled or saved with "
                        "torch.save: it holds worker threads and device streams. Save the model "
                        "(.original_model, or its state_dict()) and the plan (.plan.save(path)), and "
                        "partition again after loading: asyncfx.partition(model, plan=path).")

    # -- attributes the pipelines read come from the original model -----------------
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The original model's class, as a transparent proxy reports it (``type()`` stays
        AsyncDenoiser): libraries that pick what to do by a component's class treat the
        denoiser as the model. diffusers' pipeline-level LoRA calls (``pipe.fuse_lora()``,
        ``set_adapters()``, ``unload_lora_weights()``) skip components that are not a
        ``ModelMixin``, and ``pipe.save_pretrained()`` saves the model in its place.

        Example:
            >>> isinstance(pipe.unet, UNet2DConditionModel), type(pipe.unet).__name__
            (True, 'AsyncDenoiser')
        """
        model = self.__dict__.get("_model")
        return type(self) if model is None else type(model)

    def _get_name(self) -> str:
        return type(self).__name__

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_model"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        """An attribute the original model has, and the denoiser does not, is set on the model
        (``pipe.unet.encoder_hid_proj = None``, as ``unload_ip_adapter()`` does): read through
        the denoiser, it is the model's. Others, new ones included, are the denoiser's."""
        model = self.__dict__.get("_model")
        if model is None or self._is_own(name) or not hasattr(model, name):
            super().__setattr__(name, value)
        else:
            setattr(model, name, value)

    def _is_own(self, name: str) -> bool:
        return (name in self.__dict__ or name in OWN_ATTRIBUTES or hasattr(type(self), name)
                or any(name in self.__dict__.get(registry, ()) for registry in MODULE_REGISTRIES))

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def original_model(self) -> nn.Module:
        return self._model

    def named_modules(self, memo: set[nn.Module] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        """The original model's modules, by their names in it (and so its parameters and
        buffers): pipelines look layers up in ``pipe.unet`` by name (perturbed-attention
        guidance sets its processors on the self-attention layers it finds)."""
        return self._model.named_modules(memo, prefix, remove_duplicate)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        """The original model's children (and so ``children()``), as ``named_modules``."""
        return self._model.named_children()

    def apply(self, fn: Callable[[nn.Module], None]) -> AsyncDenoiser:
        """Apply ``fn`` to the original model's modules (an edit is captured again at the next
        generation: see the note on editing)."""
        self._model.apply(fn)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The original model's state dict, under its own keys (what ``pipe.unet.state_dict()``
        and peft's ``get_peft_model_state_dict(pipe.unet)`` save).

        Example:
            >>> pipe.unet.state_dict().keys() == unet.state_dict().keys()
            True
        """
        return self._model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """Load into the original model; the next generation captures the new weights (see the
        note on editing)."""
        return self._model.load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> AsyncDenoiser:
        """Set the original model's mode (a graph captured in another mode is captured
        again at the next generation: see the note on editing)."""
        self._model.train(mode)
        self.training = mode
        return self

    @property
    def interface(self) -> CallInterfaceLike | None:
        """How calls bind to the current capture (None before the first call)."""
        return self._now.interface

    @property
    def executor(self) -> Executor | None:
        """What runs the stages (None until the last warm-up step builds it)."""
        return self._now.executor

    @property
    def plan(self) -> Any:
        """The StagePlan of the current capture (None until it is compiled)."""
        return self._now.plan

    def extra_repr(self) -> str:
        """What ``print(pipe.unet)`` shows: the model, the options and how far it is built."""
        if self.interface is None:
            state = "not captured yet (at the first call)"
        elif self.executor is None:
            state = "captured; stages built at the last warm-up step"
        else:
            state = f"running on {_running_on(self.executor)}"
        return (f"{type(self._model).__name__}, n_stages={self.n_stages}, warmup={self.warmup}, "
                f"stride={self.stride}: {state}")

    def reset(self) -> None:
        """Forget the current generation: the next call is step 0 of a new one."""
        self._generation = _Generation()
        for build in (self._now, *self._spares):
            build.streams, build.step, build.calls = [], -1, 0

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> AsyncDenoiser:
        """``.to()`` and friends: convert the original model and capture it again at the
        next call (see the note on converting); a no-op conversion keeps the stages."""
        if not _would_change(self._model, fn):
            return self
        if not self.convertible:
            raise AsyncFXError("this denoiser was partitioned from a captured graph, which is specialised to "
                               "the dtype and device it was captured with; convert the model first, then "
                               "capture and partition it again.")
        self._model._apply(fn)
        self._drop_spares()
        self.close()
        self._now = _Build(why_empty="the model was converted (.to() and the like)")
        self.reset()
        return self

    def close(self) -> None:
        """Stop the executors' workers and free what they hold; the next call starts new ones
        from the same plan (workers also stop when the denoiser is garbage collected)."""
        for build in (self._now, *self._spares):
            if build.executor is not None:
                build.executor.close()
                build.executor = None

    def build(self, args: tuple, kwargs: dict, *, compile_now: bool = False,
              keep_current: bool = False, reason: str | None = None) -> None:
        """Capture for inputs like ``args``/``kwargs``; compile and split now, or at the
        last warm-up step (see the note on lazy compilation in ``forward``).
        ``keep_current`` keeps the current capture as a spare (see the note on shapes);
        ``reason`` says why, in the log."""
        logger.info("capturing %s: %s", type(self._model).__name__, reason or self._now.why_empty)
        # a capture that fails keeps the old build
        interface, make_executor = self._build(self._model, args, kwargs)
        current = self._now
        if keep_current and current.interface is not None:
            self._keep_spare(current)
        else:
            self._drop_spares()
            self.close()
        signature = state_signature(self._model) if self.convertible else None
        self._now = _Build(interface, make_executor, signature=signature,
                           module_dicts=[module.__dict__ for module in self._model.modules()])
        if compile_now:
            self._compile()

    def _settle(self, build: _Build) -> None:
        """Take the model's state again after its first call since the capture: what a forward
        keeps for itself (a table made at its first call, which tracing left unmade) is
        not an edit."""
        if not build.settled and build.signature is not None:
            build.signature = state_signature(self._model)
        build.settled = True

    def _keep_spare(self, build: _Build) -> None:
        """Keep ``build`` as the latest spare; the oldest beyond ``MAX_SPARES`` goes."""
        self._spares.insert(0, build)
        for dropped in self._spares[MAX_SPARES:]:
            if dropped.executor is not None:
                dropped.executor.close()
        del self._spares[MAX_SPARES:]

    def _drop_spares(self) -> None:
        for spare in self._spares:
            if spare.executor is not None:
                spare.executor.close()
        self._spares = []

    def _switch_to_spare(self, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        """The call's flat inputs if a spare capture fits them (the latest that does), now
        the current one."""
        for index, spare in enumerate(self._spares):
            try:
                flat = spare.interface.flatten(args, kwargs)
            except InputMismatchError:
                continue
            del self._spares[index]
            self._spares.insert(0, self._now)
            self._now = spare
            logger.debug("switched back to an earlier capture of %s, which fits this call",
                         type(self._model).__name__)
            return flat
        return None

    def _compile(self) -> None:
        now = self._now
        if now.executor is None:
            now.executor, now.plan = now.make_executor(now.plan)
            logger.info("running %d stage(s) of %s on %s", now.plan.n_stages, type(self._model).__name__,
                        _running_on(now.executor))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            _refuse_compile(self)
        if torch.is_grad_enabled():
            _check_no_input_wants_gradients(self, args, kwargs)
        if ACCELERATE_HOOK in self.__dict__:
            _refuse_offloading(self)
        if self.interface is not None:
            _refuse_hooks_added_since_capture(self)
        # Note (lazy compilation): the first call only captures the model. Warm-up steps
        # compute exactly what the original model computes, so until the last warm-up
        # step the original model answers, and the cost model, the split and the
        # executor are built at that step, which is the first to need stage buffers.
        if self.interface is None:
            self.build(args, kwargs)
        named = self._bind(args, kwargs)
        if self.interface.written_arguments:  # see the note on filling calls
            self._check_filling_call(named)
            output = self._model(*args, **kwargs)
            self._settle(self._now)
            return output
        self._follow_generation(named)
        stream = self._stream_for(self._now)
        if self._generation.step == 0 and stream.step == 0 and self._model_edited():
            self.build(args, kwargs, reason="the model was edited since its capture (modules, tensors or "
                       "attributes: a LoRA, new weights, FreeU, attention processors...)")
            named = self._bind(args, kwargs)
            stream = self._stream_for(self._now)
        step = stream.step
        stream.timesteps[step] = named[self._timestep_name] if self._timestep_name else None
        total = None
        if self.stride == 2:
            timesteps = self._sampler_timesteps(stream)
            total = len(timesteps)
            self._check_timestep(stream, step, timesteps)
        step_plan = schedule(step, self.n_stages, warmup=self.warmup, stride=self.stride,
                             time_shift=self.time_shift, total_steps=total)
        if self.executor is None and step_plan.mode is Mode.SEQUENTIAL and step < self.warmup - 1:
            stream.step += 1
            output = self._model(*args, **kwargs)
            self._settle(self._now)
            return output
        self._compile()
        if step_plan.mode is Mode.CACHED:
            outputs = stream.cached.pop(step)
        else:
            results = self.executor.step(step_plan, self._inputs_for(named, stream, step), stream.store)
            outputs = results.pop(step)
            stream.cached = results
        stream.step += 1
        latent = named[self._latent_name]
        return self.interface.unflatten([o.to(latent.device) if isinstance(o, torch.Tensor) else o
                                         for o in outputs])

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The call's graph inputs by placeholder name, from the capture that fits it: the
        current one, a spare, or a new one (see the note on shapes)."""
        try:
            flat = self.interface.flatten(args, kwargs)
        except ArgumentsError:
            raise  # a mistake in the call: a new capture would not fit it either
        except InputMismatchError as mismatch:
            if not self.rebuild:
                raise
            flat = self._switch_to_spare(args, kwargs)  # back to the previous shapes
            if flat is None:  # new shapes: a new graph
                self.build(args, kwargs, keep_current=True,
                           reason=f"the call differs from the capture: {mismatch}")
                flat = self.interface.flatten(args, kwargs)
        return dict(zip(self.interface.names, flat))

    # -- streams and generations ----------------------------------------------------
    @property
    def _latent_name(self) -> str:
        return self.interface.names[self.interface.roles.index("latent")]

    @property
    def _timestep_name(self) -> str | None:
        roles = self.interface.roles
        return self.interface.names[roles.index("timestep")] if "timestep" in roles else None

    def _follow_generation(self, named: Mapping[str, torch.Tensor]) -> None:
        """Place the call in the generation: another call of the current step, the next
        step, or step 0 of a new generation."""
        t = timestep_value(named[self._timestep_name]) if self._timestep_name else None
        conditions = None
        if t is None:  # no timestep to tell generations apart: new conditioning is a new one
            conditions = [named[n] for n, r in zip(self.interface.names, self.interface.roles)
                          if r == "condition"]
        if self._starts_generation(t, conditions):
            self._check_restarts(named, conditions)
            self.reset()
            logger.debug("a new generation starts at timestep %s: warm-up again", t)
        else:
            self._restarts = 0
        generation = self._generation
        if t is None or t != generation.timestep:
            if t is not None and generation.timestep is not None:
                generation.direction = 1.0 if t > generation.timestep else -1.0
            generation.step += 1
            generation.calls = 0
        generation.timestep, generation.conditions = t, conditions
        generation.calls += 1

    def _check_restarts(self, named: Mapping[str, torch.Tensor],
                        conditions: list[torch.Tensor] | None) -> None:
        """Warn when a model without a timestep input restarts at call after call because
        inputs no bigger than one number per sample change: most likely its timestep,
        under a name capture() does not know, and every call runs sequentially."""
        if conditions is None or self._generation.conditions is None:
            return
        names = [n for n, r in zip(self.interface.names, self.interface.roles) if r == "condition"]
        changed = [n for n, a, b in zip(names, self._generation.conditions, conditions)
                   if not _same_tensors([a], [b])]
        batch = named[self._latent_name].shape[0] if named[self._latent_name].dim() else 1
        if not changed or any(named[n].numel() > batch for n in changed):
            self._restarts = 0
            return
        self._restarts += 1
        if self._restarts == RESTARTS_BEFORE_WARNING:
            warnings.warn(
                f"input {changed[0]!r} of {type(self._model).__name__} changed at each of the last "
                f"{RESTARTS_BEFORE_WARNING} calls, and the model has no input asyncfx knows as the "
                "timestep, so each call started a new generation and ran as the original model (no "
                f"speedup). If {changed[0]!r} is the timestep or noise level, pass "
                f"timestep={changed[0]!r} to asyncfx.partition().", stacklevel=6)  # the denoiser's caller

    def _check_filling_call(self, named: Mapping[str, torch.Tensor]) -> None:
        """Warn once when calls that write into their arguments come at another timestep
        than before: they are denoising steps then, which all run the original model."""
        if self._timestep_name is None or self._warned_filling:
            return
        t = timestep_value(named[self._timestep_name])
        before, self._filled_at = self._filled_at, t
        if before is not None and t != before:
            self._warned_filling = True
            written = ", ".join(map(repr, self.interface.written_arguments))
            warnings.warn(
                f"{type(self._model).__name__} writes into {written} at calls at timestep "
                f"{before:g} and then {t:g}: such calls run the original model, since a graph "
                "cannot write into its arguments, so these steps gain nothing from the stages. Have "
                "forward return what it writes (registered with asyncfx.register_tensor_container()) "
                "rather than fill an argument.", stacklevel=5)  # the denoiser's caller

    def _stream_for(self, build: _Build) -> _Stream:
        """The stream of ``build`` the call belongs to: the i-th call of the capture at
        this step is its stream i; a stream not called at the previous step starts over."""
        step = self._generation.step
        if build.step != step:
            build.step, build.calls = step, 0
        index = build.calls
        build.calls += 1
        if index < len(build.streams) and build.streams[index].last == step - 1:
            stream = build.streams[index]
        else:
            stream = _Stream(start=step)
            build.streams[index:index + 1] = [stream]
        stream.last = step
        return stream

    def _model_edited(self) -> bool:
        """Whether the model was edited since it was captured (checked as each stream of
        the generation's first step starts: one-step generations, e.g. SD-Turbo's, are
        streams of one step; a new capture drops the spares, captured before too; see the
        note on editing)."""
        signature = self._now.signature
        return signature is not None and state_signature(self._model) != signature

    def _starts_generation(self, t: float | None, conditions: list[torch.Tensor] | None) -> bool:
        """A timestep that moves back against the way the first two steps of this
        generation moved (most pipelines count down; Lumina's count up), or the same
        timestep more often than any pipeline calls per step; without a timestep, new
        conditioning."""
        generation = self._generation
        if t is None:
            return (conditions is not None and generation.conditions is not None
                    and not _same_tensors(generation.conditions, conditions))
        if generation.timestep is None:
            return False
        if t == generation.timestep:
            return generation.calls >= MAX_CALLS_PER_STEP
        return generation.direction is not None and (t - generation.timestep) * generation.direction < 0

    def _sampler_timesteps(self, stream: _Stream) -> list[float]:
        """The scheduler's timesteps from the stream's first call on, read at that call.
        A timestep listed twice in a row (Heun's correction, PNDM's first steps) is listed
        once: its second call is another stream (see the note on two calls per step)."""
        if stream.scheduled is None:
            timesteps = getattr(self.scheduler, "timesteps", None)
            if timesteps is None:
                raise SchedulerError("stride=2 needs the sampler's timesteps: pass scheduler=pipe.scheduler "
                                     "to asyncfx.partition() (after set_timesteps, its .timesteps list the "
                                     "steps).")
            distinct, place = _distinct(torch.as_tensor(timesteps).flatten().tolist())
            stream.scheduler_index = self._scheduler_index(stream, place)
            stream.scheduled = distinct[stream.scheduler_index:]
        return stream.scheduled

    def _scheduler_index(self, stream: _Stream, place: list[int]) -> int:
        """Where a stream starting now is among the scheduler's distinct timesteps (``place``
        maps the index of each listed one there): the scheduler's own step index where it
        keeps one (it counts the steps taken in this generation, also those another model
        made: Wan 2.2's second expert starts part-way), else its begin index (image-to-image
        pipelines start part-way) plus the stream's start in this generation."""
        if not place:
            return 0  # no timesteps at all: the call's check says so
        taken = getattr(self.scheduler, "step_index", None)  # None until the first step() call
        if taken is not None:
            return place[min(int(taken), len(place) - 1)]
        begin = getattr(self.scheduler, "begin_index", None) or 0
        return place[min(begin, len(place) - 1)] + stream.start

    def _check_timestep(self, stream: _Stream, step: int, timesteps: Sequence[Any]) -> None:
        """Stride 2 takes the next step's timestep from the scheduler, so the calls must
        follow it: each call's timestep is ``a * timesteps[step] + b`` (``TimestepMap``)."""
        given = self._generation.timestep
        if given is None:
            return  # the model takes no timestep
        fix = ("stride=2 computes the next step's timestep from the scheduler, so it must be the "
               "scheduler the pipeline samples with: pass scheduler=pipe.scheduler to "
               "asyncfx.partition() (again after replacing pipe.scheduler).")
        index = stream.scheduler_index + step  # among the scheduler's distinct timesteps
        previous = stream.timesteps.get(step - 1)
        if previous is not None and previous.numel() > 1 and not torch.equal(
                _other_levels(previous), _other_levels(stream.timesteps[step])):
            raise SchedulerError(
                f"stride=2 computes the next step with a timestep tensor whose elements at this step's "
                f"timestep move to the next one and whose others stay (Wan 2.2's image-to-video pipeline "
                f"keeps its conditioning frame's at 0), but the call at step {index} of the scheduler's "
                f"timesteps changed the others too; use stride=1 for this pipeline.")
        if step >= len(timesteps):
            raise SchedulerError(f"this call would be step {index} of the scheduler's timesteps but it lists "
                                 f"only {stream.scheduler_index + len(timesteps)}; {fix}")
        scheduled = float(timesteps[step])
        if not stream.timestep_map.observe(scheduled, given):
            a, b = stream.timestep_map.line()
            guess = (" (with warmup=0 the first round had to guess the next timestep from one call; "
                     "warmup >= 1 fits it from two)" if len(stream.timestep_map.points) < 2 else "")
            raise SchedulerError(f"the call at step {index} of the scheduler's timesteps got timestep "
                                 f"{given:g} but they give {a * scheduled + b:g} "
                                 f"({a:g} x {scheduled:g} + {b:g}, as the earlier calls did){guess}; {fix}")

    def _inputs_for(self, named: Mapping[str, torch.Tensor], stream: _Stream,
                    step: int) -> Callable[[int], Mapping[str, torch.Tensor]]:
        copies = self._timestep_copies(named) if self.stride == 2 or self.time_shift else []

        def inputs_for(timestep_index: int) -> Mapping[str, torch.Tensor]:
            if timestep_index == step or self._timestep_name is None:
                return named
            moved = self._timestep(named, stream, timestep_index)
            return {**named, **{name: moved for name in (self._timestep_name, *copies)}}
        return inputs_for

    def _timestep_copies(self, named: Mapping[str, torch.Tensor]) -> list[str]:
        """Conditioning inputs that are the call's timestep under another name (LTX-2's
        pipeline passes ``sigma=timestep``): where the timestep moves, they move with it."""
        if self._timestep_name is None:
            return []
        timestep = named[self._timestep_name]
        return [name for name, role in zip(self.interface.names, self.interface.roles)
                if role == "condition" and _same_tensors([named[name]], [timestep])]

    def _timestep(self, named: Mapping[str, torch.Tensor], stream: _Stream, index: int) -> torch.Tensor:
        if index in stream.timesteps:  # time_shift: an earlier call's timestep
            return stream.timesteps[index]
        scheduled = self._sampler_timesteps(stream)[index]
        given = named[self._timestep_name]  # its elements at this call's timestep move on
        predicted = torch.full_like(given, stream.timestep_map.predict(scheduled))
        return torch.where(given == self._generation.timestep, predicted, given)


def _running_on(executor: Executor) -> str:
    """The executor and its devices, e.g. ``LocalExecutor on cuda:0, cuda:1``."""
    devices = getattr(executor, "devices", None)
    return type(executor).__name__ + (f" on {', '.join(str(d) for d in devices)}" if devices else "")


@torch.compiler.disable
def _refuse_compile(denoiser: AsyncDenoiser) -> None:
    """Raised outside the trace (dynamo calls a disabled function eagerly), so that the
    error reaches the caller instead of sending dynamo back to running forward eagerly."""
    raise CompiledDenoiserError(
        f"torch.compile() cannot trace an AsyncDenoiser (of {type(denoiser.original_model).__name__}): "
        "its stages run on worker threads and devices, replayed as CUDA graphs on GPUs. Call the "
        "denoiser uncompiled (pipe.unet = asyncfx.partition(model, ...), with no torch.compile "
        "or .compile() after it).")


def _refuse_offloading(denoiser: AsyncDenoiser) -> None:
    """accelerate's hooks (``pipe.enable_model_cpu_offload()`` after partitioning) move the
    whole denoiser to the execution device before each call and back after the next
    component's: each move would convert the model and capture it again."""
    raise AsyncFXError(
        f"this AsyncDenoiser (of {type(denoiser.original_model).__name__}) is wrapped by accelerate's "
        f"{type(denoiser.__dict__[ACCELERATE_HOOK]).__name__} (pipe.enable_model_cpu_offload() or "
        "enable_sequential_cpu_offload()), which moves it between devices around every call; asyncfx "
        "keeps each stage on its own device. Call pipe.remove_all_hooks(), and move the rest of the "
        "pipeline to its device with pipe.to(...).")


def _refuse_hooks_added_since_capture(denoiser: AsyncDenoiser) -> None:
    """Refuse diffusers hooks put on the model's layers after the capture (capture refuses
    those there before): step caching (``enable_cache()``), and the guiders of modular
    pipelines that skip layers (SkipLayerGuidance, PerturbedAttentionGuidance,
    SmoothedEnergyGuidance), which add them around single calls. The graph would compute
    every layer as captured. Checked at every call: one C-level scan of the modules'
    attribute dicts (40 us for SDXL's 1900 modules)."""
    model = denoiser.original_model
    hooked = diffusers_hooks(model, denoiser._now.module_dicts)
    if not hooked:
        return
    name, hook = hooked[0]
    raise AsyncFXError(
        f"{type(model).__name__}.{name} has diffusers' {hook!r} hook (one of {len(hooked)} on its "
        "layers), put there after the capture: the captured stages cannot apply it, and would "
        "compute every layer as captured. Step caching (model.enable_cache()) and the guiders of "
        "modular pipelines that skip layers (SkipLayerGuidance, PerturbedAttentionGuidance, "
        "SmoothedEnergyGuidance, around single calls) put such hooks there: call "
        "model.disable_cache(), use a guider without them (ClassifierFreeGuidance) or a pipeline "
        "that takes layer skipping as an argument (StableDiffusion3Pipeline's skip_guidance_layers), "
        "or call .original_model.")


def diffusers_hooks(model: nn.Module, module_dicts: Sequence[dict]) -> list[tuple[str, str]]:
    """``(module name, hook name)`` of every diffusers hook on ``model``'s modules, whose
    attribute dicts are ``module_dicts``; fast when there are none (one C-level scan).

    Example:
        >>> diffusers_hooks(unet, [m.__dict__ for m in unet.modules()])
        []
    """
    if not any(map(operator.contains, module_dicts, itertools.repeat(DIFFUSERS_HOOKS))):
        return []
    if not any(getattr(d[DIFFUSERS_HOOKS], "hooks", None) for d in module_dicts if DIFFUSERS_HOOKS in d):
        return []  # registries whose hooks were removed
    return [(name, hook) for name, module in model.named_modules() for hook in diffusers_hook_names(module)]


def _check_no_input_wants_gradients(denoiser: AsyncDenoiser, args: tuple, kwargs: dict) -> None:
    """Refuse inputs that require grad (gradient guidance): the stages run without autograd,
    and each reads the others' outputs from the previous step, so no gradient with respect
    to this call's inputs would reach through them."""
    wanting = [leaf for leaf in pytree.tree_leaves((args, kwargs))
               if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    if wanting:
        raise AsyncFXError(
            f"an input of this AsyncDenoiser (of {type(denoiser.original_model).__name__}) requires grad, "
            "but the stages run without autograd: each reads the other stages' outputs from the previous "
            "step, so gradients with respect to this call's inputs cannot flow through them. Call it "
            "under torch.no_grad() with inputs that do not require grad, as pipelines do, or call "
            ".original_model where gradients are needed (e.g. gradient guidance).")


def timestep_value(timestep: torch.Tensor) -> float:
    """The timestep a call is at: its timestep tensor's element farthest from zero (Wan
    2.2's image-to-video pipeline passes one per token, 0 for the conditioning frame's).

    Example:
        >>> timestep_value(torch.tensor([0.0, 0.0, 937.5, 937.5]))
        937.5
    """
    flat = timestep.detach().flatten()
    if flat.numel() <= MANY_TIMESTEPS:  # one per sample: a single copy to the host, as item() makes
        return float(max(flat.tolist(), key=abs))
    return float(flat[flat.abs().argmax()].item())


def _distinct(timesteps: list[float]) -> tuple[list[float], list[int]]:
    """The timesteps with each run of equal ones listed once, and for each listed timestep
    its place among them.

    Example:
        >>> _distinct([901.0, 801.0, 801.0, 701.0])  # PNDM's first steps
        ([901.0, 801.0, 701.0], [0, 1, 1, 2])
    """
    distinct: list[float] = []
    place: list[int] = []
    for t in timesteps:
        if not distinct or t != distinct[-1]:
            distinct.append(t)
        place.append(len(distinct) - 1)
    return distinct, place


def _other_levels(timestep: torch.Tensor) -> torch.Tensor:
    """The timestep tensor with its elements at the call's timestep zeroed."""
    return torch.where(timestep == timestep_value(timestep), torch.zeros_like(timestep), timestep)


def _would_change(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``fn`` (a conversion of ``nn.Module._apply``) changes the dtype, device or
    layout of the model's tensors, probed on its first floating-point tensor (conversions
    to another dtype leave integer tensors alone), its first other tensor and its first
    4-d one (``memory_format=torch.channels_last`` changes only those)."""
    tensors = [*model.parameters(), *model.buffers()]
    probes = [next((t for t in tensors if t.is_floating_point()), None),
              next((t for t in tensors if not t.is_floating_point()), None),
              next((t for t in tensors if t.dim() == 4), None)]
    for tensor in (t for t in probes if t is not None):
        converted = fn(tensor)
        if _layout(converted) != _layout(tensor):
            return True
    return False


def _layout(tensor: torch.Tensor) -> tuple:
    return tensor.dtype, tensor.device, tensor.stride()


def _same_tensors(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:
            continue
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
            return False
    return True
