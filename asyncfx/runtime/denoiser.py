"""AsyncDenoiser: the drop-in module ``asyncfx.partition()`` returns.

It is called exactly like the original denoiser, and each call goes
guard -> bind -> place -> schedule -> execute:

- guard (``guards.py``): refuse what the stages cannot run;
- bind (``captures.py``): the capture that fits the call, and its flat graph inputs;
- place (``clock.py``): the call's generation, step and stream, from facts about it;
- schedule (``asyncfx.schedule``): what each stage computes at the stream's step;
- execute: the original model for the first warm-up steps, then the executor; the
  last stage's output comes back in the model's own type.

Note (converting): ``.to()``, ``.half()``, ``.cuda()`` and the like (``pipe.to(...)``
included) convert the original model, and the next call captures and splits it again,
since the stages were specialised to the old dtype and device. Devices the stages run on
are the ones ``partition()`` chose; only the original model (warm-up steps before the
first compile, capture) moves.

Note (weights): the original model's weights that the stages read and no stage of this
process holds are released (``release_weights``; ``stage_weights.release_unheld``).
Under torch.distributed each rank keeps only its stage's weights from its first stage
on (a re-cut brings it its new nodes' weights from the ranks holding them,
``peer_weights``); the local executor on GPUs keeps only the stages' copies on their
devices once the plan is final; on CPU workers the stages share the model's weights and
nothing is released; weights no stage reads (an adapter switched off) are kept. The
original model then answers for its config, attributes and modules but computes
nothing: calling it raises WeightsReleasedError, as does anything needing a new capture
(other shapes, an edited or converted model). Warm-up steps run through the stages. A
model built without weights (on the meta device, ``weights=``) never runs either: its
stages load their weights from its files, at every capture.

Note (step caches): under a step cache asyncfx applies (``runtime.step_cache``) the stages
run from the first step, each skipping its cached modules as the rules say; the rules are
read from the model's hooks whenever they change (``enable_cache()``, ``disable_cache()``):
one scan of its modules at each call serves this and the refusal of other hooks.

Note (filling calls): a call that writes into its arguments (a pipeline may first fill
a KV cache with a reference image's keys and values) cannot run as a graph; the capture
lists what it writes into (``written_arguments``). Such calls run the original model
and are not steps: the call clock never sees them. Calls like that at different
timesteps are denoising steps that gain nothing from the stages, and are warned about.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from asyncfx.errors import AsyncFXError, GenerationWarning, WeightsReleasedError
from asyncfx.integration import NamedCalls, hooks_signature, scheduled_timesteps
from asyncfx.program import CallSpec, Frontend, Layout, Program
from asyncfx.runtime.captures import Capture, CaptureCache, Launch, first_tensor, running_on
from asyncfx.runtime.clock import ClockState, CallFacts, Placement, advance, reset
from asyncfx.runtime.guards import OneCallAtATime, check_call
from asyncfx.runtime.progress import Progress
from asyncfx.runtime.proxy import ModelProxy
from asyncfx.runtime.step_cache import CacheWatch
from asyncfx.runtime.original_model import (BUILT_WITHOUT, RELEASED, no_new_captures, refuse_conversion,
                                            release, why_without_weights, would_change)
from asyncfx.runtime.timesteps import inputs_for, same_values, timestep_value
from asyncfx.runtime.tokens import Equal, Same
from asyncfx.schedule import Mode, SequentialSteps, schedule
from asyncfx.plan import StagePlan

logger = logging.getLogger(__name__)

#: A model without a timestep input that starts this many generations in a row because
#: a one-number-per-sample input changed is warned about: that input is likely its timestep.
RESTARTS_BEFORE_WARNING = 3
#: Warm-up steps before the last that a plan to be re-cut runs through the stages, in
#: the first generation: one to warm them up, one to time them.
TIMED_WARMUP_STEPS = 2


class AsyncDenoiser(NamedCalls, ModelProxy):
    """A denoiser whose stages run concurrently on one-step-stale inputs.

    Built by :func:`asyncfx.partition`; see there for the options.

    Example:
        >>> pipe.unet = asyncfx.partition(pipe.unet, n_devices=2)
        >>> image = pipe(prompt_embeds=embeds, num_inference_steps=20).images[0]
    """

    RUNTIME_STATE = frozenset({"_captures", "_clock", "_calls", "_restarts", "_filled_at", "_warned",
                               "_rebalanced_at", "_without_weights", "_step_caches", "call_context"})
    OWN_ATTRIBUTES = frozenset({"_frontend", "_launch", "n_devices", "given_layout", "warmup", "stride",
                                "time_shift", "forecast", "sequential", "switch_below", "scheduler",
                                "rebuild", "convertible", "release_weights", "progress", "training"})

    def __init__(self, model: nn.Module, frontend: Frontend, launch: Launch, *, n_devices: int, warmup: int,
                 stride: int = 1, time_shift: bool = False, scheduler: Any = None, rebuild: bool = True,
                 convertible: bool = True, release_weights: bool = True, forecast: float = 0.0,
                 sequential: SequentialSteps = SequentialSteps(), switch_below: float = 0.0,
                 layout: Layout | None = None, progress: Progress = Progress(enabled=False)):
        super().__init__(model)
        self._frontend, self._launch = frontend, launch
        self.n_devices, self.warmup, self.stride, self.sequential = n_devices, warmup, stride, sequential
        self.given_layout = layout  # None: chosen at the first call
        self.time_shift, self.scheduler, self.forecast = time_shift, scheduler, forecast
        self.switch_below = switch_below  # warm-up goes on while the prediction changes this much
        self.rebuild = rebuild  # re-capture on new input shapes (not with a user's plan)
        self.convertible = convertible  # .to() may convert the model and re-capture it
        self.release_weights = release_weights  # see the note on weights
        self.progress = progress  # a line on stderr for each slow piece of work
        self.start_runtime_state()

    def start_runtime_state(self) -> None:
        """Nothing captured, no generation (the attributes named in RUNTIME_STATE)."""
        self._captures = CaptureCache(self._frontend, rebuild=self.rebuild, signed=self.convertible,
                                      progress=self.progress)
        self._clock = ClockState()
        self._calls = OneCallAtATime()
        self._restarts = 0  # calls in a row that restarted because a timestep-like input changed
        self._filled_at: float | None = None  # the last call writing into its arguments was at
        self._warned: set[str] = set()  # warnings given once
        self._rebalanced_at: dict[int, int] = {}  # capture key -> the generation its plan was last looked at
        self._without_weights = why_without_weights(self._model)  # None while it holds its weights
        self._step_caches = CacheWatch()  # the model's step cache, as its hooks are now
        if self._without_weights == RELEASED:
            self._captures.refusal = no_new_captures(type(self._model).__name__)

    # -- what it is built of --------------------------------------------------------------
    @property
    def interface(self) -> CallSpec | None:
        """How calls bind to the current capture (None before the first call)."""
        return getattr(self._captures.current, "call", None)

    @property
    def layout(self) -> Layout | None:
        """Batch groups x stages of the current capture, or as given (None: chosen at the
        first call, not made yet)."""
        current = self._captures.current
        return self.given_layout if current is None else current.lowering.layout

    @property
    def n_stages(self) -> int | None:
        """The stages of each batch group (None until the layout is chosen)."""
        layout = self.layout
        return None if layout is None else layout.stages

    @property
    def program(self) -> Program | None:
        """The stages of the current capture (None until they are built)."""
        return getattr(self._captures.current, "program", None)

    @property
    def executor(self) -> Any:
        """What runs the stages (None until the last warm-up step builds it)."""
        return getattr(self._captures.current, "executor", None)

    @property
    def plan(self) -> StagePlan | None:
        """The StagePlan of the current capture (None until it is compiled)."""
        program = self.program
        return None if program is None else program.plan

    def captures(self) -> list[Capture]:
        """The current capture, then the earlier ones kept for calls that fit them again."""
        return self._captures.captures()

    def extra_repr(self) -> str:
        """What ``print(pipe.unet)`` shows: the model, the options and how far it is built."""
        if self.interface is None:
            state = "not captured yet (at the first call)"
        elif self.executor is None:
            current = self._captures.current
            step = self._stages_from(current)
            state = ("captured; stages built at the last warm-up step" if step == self.warmup - 1 else
                     f"captured; stages built at warm-up step {step} (timed before the last, to re-cut)")
        else:
            state = f"running on {running_on(self.executor)}"
        layout = f"layout={self.layout}" if self.layout is not None else "layout chosen at the first call"
        return (f"{type(self._model).__name__}, n_devices={self.n_devices}, {layout}, warmup={self.warmup}, "
                f"stride={self.stride}: {state}")

    # -- lifetime -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation: the next call is step 0 of a new one."""
        self._clock = reset(self._clock)

    def close(self) -> None:
        """Stop the executors' workers and free what they hold; the next call starts new ones
        from the same stages (workers also stop when the denoiser is garbage collected)."""
        self._captures.close()

    def build(self, args: tuple, kwargs: dict) -> None:
        """Capture for inputs like ``args``/``kwargs`` and build the stages now (rather than
        at the first call and the last warm-up step)."""
        self._captures.capture(self._model, args, kwargs, reason="the example inputs given to partition()")
        self._captures.current.start(self._launch)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> AsyncDenoiser:
        """``.to()`` and friends: convert the original model and capture it again at the
        next call (see the note on converting); a no-op conversion keeps the stages."""
        if self._without_weights is not None:
            refuse_conversion(self._model, self._without_weights, fn)  # unless it changes nothing
            return self
        if not would_change([*self._model.parameters(), *self._model.buffers()], fn):
            return self
        if not self.convertible:
            raise AsyncFXError("this denoiser was partitioned from a captured graph, which is specialised to "
                               "the dtype and device it was captured with; convert the model first, then "
                               "capture and partition it again.")
        self._model._apply(fn)
        self._captures.forget("the model was converted (.to() and the like)")
        self.reset()
        return self

    # -- a call ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._calls.enter(type(self._model).__name__):
            dicts = getattr(self._captures.current, "module_dicts", None)
            hooks = () if dicts is None else hooks_signature(dicts)  # see the note on step caches
            check_call(self, self._model, dicts if hooks else None, args, kwargs)
            capture, flat = self._captures.bind(self._model, args, kwargs)
            named = dict(zip(capture.call.names, flat))
            if capture.call.written_arguments:
                return self._fill(capture.call, named, args, kwargs)
            capture, named, placement = self._place(capture, named, args, kwargs)
            hooks = hooks if capture.module_dicts is dicts else hooks_signature(capture.module_dicts)
            return self._execute(capture, named, placement, args, kwargs, hooks)

    def _place(self, capture: Capture, named: dict[str, torch.Tensor], args: tuple,
               kwargs: dict) -> tuple[Capture, dict[str, torch.Tensor], Placement]:
        """The call's place in the generation; a model edited since its capture is captured
        again as a generation's first streams start (see the note on editing)."""
        before = self._clock
        facts = self._facts(capture, named)
        self._clock, placement = advance(before, facts)
        if placement.step == 0 and placement.stream_step == 0 and self._captures.edited(self._model):
            capture = self._captures.capture(
                self._model, args, kwargs, reason="the model was edited since its capture (modules, tensors "
                "or attributes: a LoRA, new weights, FreeU, attention processors...)")
            named = dict(zip(capture.call.names, capture.call.flatten(args, kwargs)))
            self._clock, placement = advance(before, self._facts(capture, named))
        if placement.new_generation is not None:
            self._note_generation(before, facts, named, capture.call, placement)
        else:
            self._restarts = 0
        self._check_signal(placement, facts)
        return capture, named, placement

    def _facts(self, capture: Capture, named: Mapping[str, torch.Tensor]) -> CallFacts:
        call = capture.call
        conditions = tuple(Same(named[name]) for name in call.conditions)
        timesteps = scheduled_timesteps(self.scheduler) if self.scheduler is not None else None
        if call.timestep is None:
            return CallFacts(None, capture.key, self.call_context, conditions,
                             values=Equal([named[name] for name in call.conditions]),
                             schedule=None if timesteps is None else Same(timesteps))
        return CallFacts(timestep_value(named[call.timestep]), capture.key, self.call_context, conditions,
                         schedule=None if timesteps is None else Same(timesteps))

    def _execute(self, capture: Capture, named: dict[str, torch.Tensor], placement: Placement,
                 args: tuple, kwargs: dict, hooks: tuple) -> Any:
        call, step = capture.call, placement.stream_step
        stream = capture.stream(placement, self.warmup)
        timestep = named[call.timestep] if call.timestep is not None else None
        stream.times.record(step, timestep, self._clock.timestep,  # stride 2 forecasts the latent ahead
                            named if self.forecast and self.stride == 2 else None)
        total = (stream.times.total_steps(self.scheduler, placement.step - step, step, check=self.stride == 2)
                 if self.stride == 2 or self.sequential.cooldown else None)
        runs = schedule(step, capture.lowering.layout.stages, warmup=stream.warmup, stride=self.stride,
                        time_shift=self.time_shift, total_steps=total, forecast=self.forecast,
                        sequential=self.sequential)
        cache = self._step_caches.current(self._model, hooks, self.stride, capture.lowering.layout.groups)
        if cache is not None:
            runs = runs._replace(cache=cache.step(step, stream.cache_decisions))
        stream.step = step + 1
        if (capture.executor is None and runs.mode is Mode.SEQUENTIAL and step < self._stages_from(capture)
                and cache is None):  # a step cache runs in the stages from the first step
            output = self._model(*args, **kwargs)  # see the note on lazy compilation (captures.py)
            self._captures.settle(self._model)
            if self.switch_below:
                stream.adapt_warmup(step, first_tensor(output), self.switch_below)
            return output
        looked = step == placement.step == self.warmup - 1 and runs.mode is Mode.SEQUENTIAL
        if looked and cache is None:  # a step cache's memory lives in the stages: no re-cut under it
            self._rebalance(capture, placement.generation)
        fresh = capture.executor is None
        executor = capture.start(self._launch)
        if fresh or looked:  # the plan may have become final
            self._release_unheld(capture, refilled=fresh)
        if runs.mode is Mode.CACHED:
            outputs = stream.cached.pop(step)
        else:
            moves = self.stride == 2 or self.time_shift
            given = inputs_for(named, call, stream.times, step, moves, self.forecast)
            results = executor.step(runs, given, stream.store)
            outputs = results.pop(step)
            stream.cached = results
        if self.switch_below and runs.mode is Mode.SEQUENTIAL:
            stream.adapt_warmup(step, outputs[0], self.switch_below)
        device = named[call.latent].device
        return call.unflatten([o.to(device) if isinstance(o, torch.Tensor) and o.device != device else o
                               for o in outputs])

    def _stages_from(self, capture: Capture) -> int:
        """The first warm-up step the stages run at (see the notes on lazy compilation and
        on weights): the first where batch groups split the warm-up steps too."""
        if self._without_weights is not None or capture.lowering.layout.groups > 1:
            return 0
        last = self.warmup - 1
        if capture.program is None and capture.lowering.rebalances and last >= TIMED_WARMUP_STEPS:
            return last - TIMED_WARMUP_STEPS
        return last

    def _rebalance(self, capture: Capture, generation: int) -> None:
        """At the last warm-up step of a stream that started with the generation, once a
        generation: re-cut the plan if its measured stage times call for it (see the note
        on re-cutting in captures.py)."""
        if self._rebalanced_at.get(capture.key) != generation:
            self._rebalanced_at[capture.key] = generation
            capture.rebalance()

    def _release_unheld(self, capture: Capture, refilled: bool) -> None:
        """Release the weights no executor here holds once the plan is final or they can be
        found again (note on weights); ``refilled``: a new executor may have brought some back."""
        if (not self.release_weights or self._without_weights == BUILT_WITHOUT
                or capture.lowering.rebalances and not capture.executor.refills_weights):
            return
        captures = self._captures.captures()
        read = [stage.module for c in captures if c.program is not None for stage in c.program.stages]
        held = [module for c in captures if c.executor is not None for module in c.executor.modules()]
        released_before = self._without_weights == RELEASED
        freed = release(self._model, read, held, refuse_calls=not released_before)
        if freed or released_before and refilled:
            self._without_weights = RELEASED
            self._captures.refusal = no_new_captures(type(self._model).__name__)
            self._captures.sign_again(self._model)  # what was released or refilled is not an edit

    def _fill(self, call: CallSpec, named: Mapping[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """A call that writes into its arguments runs the original model (see the note on
        filling calls); such calls at another timestep than before are warned about once."""
        if self._without_weights is not None:
            raise WeightsReleasedError(
                f"this call writes into {', '.join(map(repr, call.written_arguments))}, which only the "
                f"original {call.model_class} can do, and it {self._without_weights}. Partition a model "
                "built with its weights, with release_weights=False.")
        if call.timestep is not None and "filling" not in self._warned:
            t = timestep_value(named[call.timestep])
            before, self._filled_at = self._filled_at, t
            if before is not None and t != before:
                self._warned.add("filling")
                written = ", ".join(map(repr, call.written_arguments))
                warnings.warn(
                    f"{call.model_class} writes into {written} at calls at timestep {before:g} and then "
                    f"{t:g}: such calls run the original model, since a graph cannot write into its "
                    "arguments, so these steps gain nothing from the stages. Have forward return what it "
                    "writes (registered with asyncfx.register_tensor_container()) rather than fill an "
                    "argument.", stacklevel=5)  # the denoiser's caller
        output = self._model(*args, **kwargs)
        self._captures.settle(self._model)
        return output

    # -- diagnostics ------------------------------------------------------------------------
    def _note_generation(self, before: ClockState, facts: CallFacts, named: Mapping[str, torch.Tensor],
                         call: CallSpec, placement: Placement) -> None:
        """Log a new generation; warn when a model without a timestep input restarts at call
        after call because inputs no bigger than one number per sample change: most likely
        its timestep, under a name capture() does not know, and every call runs
        sequentially."""
        logger.debug("generation %d starts at timestep %s (%s): warm-up again", placement.generation,
                     facts.timestep, placement.new_generation)
        previous, values = before.values, facts.values
        if not (facts.timestep is None and isinstance(previous, Equal) and len(previous) == len(values)):
            return
        changed = [name for name, a, b in zip(call.conditions, previous.tensors, values.tensors)
                   if not same_values(a, b)]
        latent = named[call.latent]
        batch = latent.shape[0] if latent.dim() else 1
        if not changed or any(named[n].numel() > batch for n in changed):
            self._restarts = 0
            return
        self._restarts += 1
        if self._restarts == RESTARTS_BEFORE_WARNING:
            warnings.warn(
                f"input {changed[0]!r} of {call.model_class} changed at each of the last "
                f"{RESTARTS_BEFORE_WARNING} calls, and the model has no input asyncfx knows as the "
                "timestep, so each call started a new generation and ran as the original model (no "
                f"speedup). If {changed[0]!r} is the timestep or noise level, pass "
                f"timestep={changed[0]!r} to asyncfx.partition().", stacklevel=6)  # the denoiser's caller

    def _check_signal(self, placement: Placement, facts: CallFacts) -> None:
        """Warn once where nothing but the timesteps tells a new pipeline call from the next
        step: no conditioning kept as the same objects from step to step, no scheduler."""
        if (placement.stream_step != 1 or placement.stream[2] != 0 or placement.kept_conditions != 0
                or facts.schedule is not None or facts.timestep is None or "signal" in self._warned):
            return
        self._warned.add("signal")
        warnings.warn(
            f"{type(self._model).__name__}'s calls keep no conditioning tensor from one step to the next, "
            "and the denoiser was given no scheduler, so only the timesteps tell a new generation from "
            "the next step: after a generation that stopped early, one that goes on downwards from where "
            "it stopped (image to image) would read its buffers. Pass scheduler=pipe.scheduler to "
            "asyncfx.partition(), or call reset() between such runs.", GenerationWarning, stacklevel=6)
