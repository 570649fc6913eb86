"""Capture a denoiser as a flat torch.fx graph with known input roles.

``torch.export.export(..., strict=False)`` is the primary path: it works for diffusers
UNets and transformers whose forward has shape-dependent Python control flow.
``torch.fx.symbolic_trace`` is the fallback for simple modules that export rejects.
Either way the result is a :class:`Captured`: a GraphModule whose placeholders are the
model's tensor inputs, flattened, and whose output is a flat tuple, plus what is needed
to bind calls to it and rebuild the model's own output type.

Note (data-dependent sizes): a value whose size depends on tensor values (boolean-mask
indexing, ``nonzero``; GLM-Image zeroes the dropped prior embeddings with
``x[mask] *= 0``) keeps torch.export's symbolic size in the graph. Cuts never cross it
(``cuts.cut_positions``) and the cost estimate counts it at its bound; the graph runs on
real tensors, where every size is known. Only the outputs need fixed shapes: an output
whose size export could not prove fixed (FramePack's last latent tokens, after prompt
tokens picked by a mask) takes the size one run of the example gives it, checked at
every call (``passes.pin_shapes``).
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import linecache
import logging
import os
import re
import time
import traceback
import warnings
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch._dynamo.eval_frame import OptimizedModule

from asyncfx.errors import ArgumentsError, CaptureError, InputMismatchError
from asyncfx.module_attributes import ACCELERATE_HOOK, diffusers_hook_names
from asyncfx.partitioner.containers import (check_objects_are_registered, unregistered_input_error,
                                            unregistered_output_error, watching_argument_writes)
from asyncfx.partitioner.traced_state import restoring_traced_state
from asyncfx.passes.classify import classify
from asyncfx.passes.functionalise import functionalise, in_place_ops
from asyncfx.passes.meta import VALUE, ValueClass, has_data_dependent_size
from asyncfx.passes.pin_shapes import pin_output_shapes

logger = logging.getLogger(__name__)

#: Argument names taken as the latent when ``latent=`` is not given, in order.
LATENT_NAMES = ("sample", "hidden_states", "x")
#: Argument names taken as the timestep (or noise level) when ``timestep=`` is not given, in order.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")

_TORCH_DIR = os.path.dirname(torch.__file__)
_ASYNCFX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InputRole(str, enum.Enum):
    """What an input of the denoiser is to a sampler."""

    LATENT = "latent"        # the noisy sample x_s, new every step
    TIMESTEP = "timestep"    # t_s, new every step
    CONDITION = "condition"  # constant over a generation: text embeddings, labels, ids

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """One tensor input of a captured graph, in placeholder order."""

    name: str                 # argument path, e.g. "added_cond_kwargs.text_embeds"
    placeholder: str          # its placeholder in captured and stage graphs
    role: InputRole
    shape: tuple[int, ...]
    dtype: str                # e.g. "torch.float32"

    def describe(self) -> str:
        return f"{self.name} ({self.role}, {self.dtype.removeprefix('torch.')}{list(self.shape)})"


class CallInterface:
    """How calls to a model map to a flat graph's inputs and back to the model's output.

    Shared by :class:`Captured` and the staged model split from it.
    """

    def __init__(self, *, inputs: list[GraphInput], binder: "_Binder", leaf_constants: list[Any],
                 leaf_names: list[str], in_spec: pytree.TreeSpec, out_spec: pytree.TreeSpec,
                 model_class: str, written_arguments: Sequence[str] = ()):
        self.inputs = inputs
        self.model_class = model_class
        #: arguments the call writes into (a cache it fills), which the graph cannot do
        self.written_arguments = tuple(written_arguments)
        self._binder = binder
        self._leaf_constants = leaf_constants   # per flat leaf: a constant, or _TENSOR
        self._leaf_names = leaf_names
        self._in_spec = in_spec
        self._out_spec = out_spec

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The graph's positional inputs for a model call, checked against the capture."""
        bound = self._binder.bind(args, kwargs)
        leaves, spec = pytree.tree_flatten(bound)
        if spec != self._in_spec:
            names = self._binder.leaf_names(bound)
            if names == self._leaf_names:  # the same leaves: a registered object's constants differ
                raise InputMismatchError(
                    f"{self.model_class} is called with the arguments it was captured with, {names}, "
                    "but objects among them hold other non-tensor values (numbers, strings) than at "
                    "capture; those are baked into the graph, so capture again for the new values.")
            raise InputMismatchError(
                f"{self.model_class} was captured with the arguments "
                f"{self._leaf_names} but is called with "
                f"{names}; pass arguments structured as at capture, or "
                "capture again with asyncfx.capture(model, args, kwargs) for the new call.")
        tensors = []
        for index, (leaf, captured) in enumerate(zip(leaves, self._leaf_constants)):
            if captured is _TENSOR:
                tensors.append(leaf)
            elif not _same_constant(leaf, captured):
                name = self._leaf_names[index]
                raise InputMismatchError(
                    f"argument {name!r} of {self.model_class} was {captured!r} at capture and is "
                    f"{leaf!r} now; non-tensor arguments are baked into the graph, so pass "
                    "the captured value or capture again with the new one.")
        for given, expected in zip(tensors, self.inputs):
            check_input(given, expected, self.model_class)
        return tensors

    def unflatten(self, values: Sequence[Any]) -> Any:
        """The model's own output (tuple, tensor or diffusers output class) from flat values."""
        return pytree.tree_unflatten(list(values), self._out_spec)


class Captured(nn.Module):
    """A model captured as a flat, classified fx graph; callable exactly like the model.

    ``graph_module`` takes the tensor inputs listed in ``inputs`` positionally (its
    placeholders carry the same names) and returns a flat tuple; calling the Captured binds
    arguments like the model's forward, checks them against the captured ones and rebuilds
    the model's output type. Every node carries its value class (``passes.meta``).

    Example:
        >>> model, args, kwargs = asyncfx.zoo.tiny.sd_unet()
        >>> captured = asyncfx.capture(model, args, kwargs)
        >>> captured.latent_input.name
        'sample'
        >>> out = captured(*args, **kwargs)          # same type and values as model(...)
    """

    def __init__(self, graph_module: fx.GraphModule, interface: CallInterface, method: str):
        super().__init__()
        self.graph_module = graph_module
        self.interface = interface
        self.method = method
        self.fingerprint = graph_fingerprint(graph_module, interface.inputs)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def inputs(self) -> list[GraphInput]:
        return self.interface.inputs

    @property
    def model_class(self) -> str:
        return self.interface.model_class

    @property
    def latent_input(self) -> GraphInput:
        """The latent, or the first of them (Z-Image takes a list, one tensor per sample)."""
        return next(i for i in self.inputs if i.role is InputRole.LATENT)

    @property
    def timestep_input(self) -> GraphInput | None:
        return next((i for i in self.inputs if i.role is InputRole.TIMESTEP), None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        written = self.interface.written_arguments
        if written:
            raise CaptureError(
                f"{self.model_class}.forward writes into its argument(s) {', '.join(map(repr, written))} "
                "(a cache it fills) at calls like the captured one, and a graph cannot write into its "
                "arguments; call the original model for them (the denoiser partition() returns does "
                "so by itself).")
        flat = self.interface.flatten(args, kwargs)
        return self.interface.unflatten(self.graph_module(*flat))


_TENSOR = object()  # marks a tensor leaf in Captured._leaf_constants


def check_input(given: Any, expected: GraphInput, model_class: str) -> None:
    """Raise InputMismatchError unless ``given`` is a tensor shaped like ``expected``."""
    if not isinstance(given, torch.Tensor):
        raise InputMismatchError(
            f"input {expected.name!r} of {model_class} must be a tensor like at capture "
            f"({expected.describe()}), got {type(given).__name__}.")
    if tuple(given.shape) != expected.shape or str(given.dtype) != expected.dtype:
        raise InputMismatchError(
            f"input {expected.name!r} of {model_class} is "
            f"{str(given.dtype).removeprefix('torch.')}{list(given.shape)} but the graph was "
            f"captured for {expected.dtype.removeprefix('torch.')}{list(expected.shape)}; "
            "shapes are specialised, so capture again with inputs of the new shape.")


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # objects without a usable == (compared by identity then)
        return a is b


class _Binder:
    """Binds call arguments to the forward signature: defaults applied, scalar timestep
    made a tensor, so that every call flattens to the same pytree as the capture."""

    def __init__(self, signature: inspect.Signature, timestep_name: str | None):
        self.signature = signature
        self.timestep_name = timestep_name
        params = list(signature.parameters.values())
        self._positional = [p.name for p in params if p.kind in (
            p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._var_positional = _variadic(signature, inspect.Parameter.VAR_POSITIONAL) or "args"

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ArgumentsError(f"{exc}: the arguments do not fit forward{self.signature}.") from exc
        bound.apply_defaults()
        value = _arguments_by_name(bound).get(self.timestep_name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # A Python number would be baked into the graph as a constant; diffusers
            # turns it into an int64 / float64 tensor itself, so this changes nothing.
            _set_argument(bound, self.timestep_name, torch.tensor(
                value, dtype=torch.int64 if isinstance(value, int) else torch.float64))
        return tuple(bound.args), dict(bound.kwargs)

    def leaf_names(self, bound: tuple[tuple, dict]) -> list[str]:
        """A readable name for each flat leaf of bound arguments, e.g.
        ``added_cond_kwargs.time_ids`` or ``kv_cache.layers[0].key``."""
        paths, _ = pytree.tree_flatten_with_path(bound)
        return [self._name(path) for path, _ in paths]

    def _name(self, path: tuple) -> str:
        head, key, *rest = path
        if head.idx == 0:  # positional argument
            i = key.idx
            name = (self._positional[i] if i < len(self._positional)
                    else f"{self._var_positional}[{i - len(self._positional)}]")
        else:
            name = str(key.key)
        for part in rest:
            name += f".{part.key}" if isinstance(part, pytree.MappingKey) else pytree.keystr((part,))
        return name


def top_level_name(leaf_name: str) -> str:
    return leaf_name.split(".")[0].split("[")[0]


#: ``latent=``: one argument's name, or several (LTX-2 denoises a video and an audio latent).
LatentOption = str | Sequence[str] | None


def latent_arguments(latent: LatentOption) -> tuple[str, ...]:
    """``latent=`` as a tuple of names (empty when not given), or a clear error.

    Example:
        >>> latent_arguments(["hidden_states", "audio_hidden_states"])
        ('hidden_states', 'audio_hidden_states')
    """
    if latent is None:
        return ()
    names: tuple = (latent,) if isinstance(latent, str) else ()
    if isinstance(latent, (list, tuple)):
        names = tuple(latent)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise CaptureError(f"latent={latent!r} must name the noisy-sample argument, or list the names of "
                           "several (e.g. latent=['hidden_states', 'audio_hidden_states']).")
    return names


def _assign_roles(names: list[str], is_tensor: list[bool], latent: LatentOption,
                  timestep_name: str | None, model_class: str) -> list[InputRole | None]:
    tensor_names = [n for n, t in zip(names, is_tensor) if t]
    if not tensor_names:
        raise CaptureError(f"{model_class} was called without any tensor argument; pass the "
                           "latent as a tensor in the example inputs.")
    latent_names = _latent_names(tensor_names, latent, model_class)
    if timestep_name in latent_names:
        raise CaptureError(f"{timestep_name!r} of {model_class} cannot be both the latent and the timestep; "
                           "name the latent with latent=.")
    roles: list[InputRole | None] = []
    for name, tensor in zip(names, is_tensor):
        if not tensor:
            roles.append(None)
        elif name in latent_names:
            roles.append(InputRole.LATENT)
        elif name == timestep_name:
            roles.append(InputRole.TIMESTEP)
        else:
            roles.append(InputRole.CONDITION)
    return roles


def _latent_names(tensor_names: list[str], latent: LatentOption, model_class: str) -> list[str]:
    """The tensor leaves that are latents: those of the arguments ``latent`` names (a leaf
    of one, or all of its tensors: Z-Image takes a list with one latent per sample), else
    the first of the usual names, else the first tensor argument.

    Example:
        >>> _latent_names(["x[0]", "x[1]", "t"], None, "ZImageTransformer2DModel")
        ['x[0]', 'x[1]']
    """
    if latent is not None:
        return [leaf for name in latent_arguments(latent)
                for leaf in _leaves_named(tensor_names, name, model_class)]
    by_name = [n for n in tensor_names if top_level_name(n) in LATENT_NAMES]
    if not by_name:
        return [tensor_names[0]]
    argument = min((top_level_name(n) for n in by_name), key=LATENT_NAMES.index)
    return [n for n in by_name if top_level_name(n) == argument]


def _leaves_named(tensor_names: list[str], name: str, model_class: str) -> list[str]:
    matches = [n for n in tensor_names if n == name] or [n for n in tensor_names if top_level_name(n) == name]
    if not matches:
        raise CaptureError(f"latent={name!r} names no tensor argument of {model_class}; "
                           f"tensor arguments are {tensor_names}.")
    return matches


def _variadic(signature: inspect.Signature, kind: Any) -> str | None:
    """The name of the ``*args`` (``kind=VAR_POSITIONAL``) or ``**kwargs`` parameter."""
    return next((p.name for p in signature.parameters.values() if p.kind is kind), None)


def _arguments_by_name(bound: inspect.BoundArguments) -> dict[str, Any]:
    """The bound arguments by name: those ``**kwargs`` took by their keys, those ``*args``
    took as ``args[i]`` (as the graph inputs are named)."""
    var_positional = _variadic(bound.signature, inspect.Parameter.VAR_POSITIONAL)
    var_keyword = _variadic(bound.signature, inspect.Parameter.VAR_KEYWORD)
    named = {k: v for k, v in bound.arguments.items() if k not in (var_positional, var_keyword)}
    extra = {f"{var_positional}[{i}]": v for i, v in enumerate(bound.arguments.get(var_positional, ()))}
    return {**extra, **bound.arguments.get(var_keyword, {}), **named}


def _set_argument(bound: inspect.BoundArguments, name: str, value: Any) -> None:
    """Replace the argument ``_arguments_by_name`` calls ``name``."""
    var_positional = _variadic(bound.signature, inspect.Parameter.VAR_POSITIONAL)
    index = re.fullmatch(rf"{re.escape(var_positional)}\[(\d+)\]", name) if var_positional else None
    if name in bound.arguments:
        bound.arguments[name] = value
    elif index is not None:
        items = list(bound.arguments[var_positional])
        items[int(index.group(1))] = value
        bound.arguments[var_positional] = tuple(items)
    else:
        var_keyword = _variadic(bound.signature, inspect.Parameter.VAR_KEYWORD)
        bound.arguments[var_keyword] = {**bound.arguments[var_keyword], name: value}


def check_not_compiled(model: nn.Module) -> None:
    """Refuse a ``torch.compile()`` wrapper: its ``forward(*args, **kwargs)`` hides the
    argument names, and its compiled code would not run in the stages anyway."""
    if isinstance(model, OptimizedModule):
        raise CaptureError("the model was compiled with torch.compile(); asyncfx captures it with "
                           "torch.export and runs the stages itself (as CUDA graphs on GPUs), so pass "
                           f"the model before compiling: its _orig_mod, a {type(model._orig_mod).__name__}.")


def check_no_step_cache(model: nn.Module) -> None:
    """Refuse a model that reuses its earlier calls' results (diffusers' ``enable_cache``:
    first-block cache, FasterCache, TaylorSeer...): its hooks decide at each call what to
    skip, and a captured graph runs what the capture's call ran, at every call."""
    if getattr(model, "is_cache_enabled", False) is True:
        config = type(getattr(model, "_cache_config", None)).__name__
        raise CaptureError(f"{type(model).__name__} has step caching enabled ({config}): it skips blocks "
                           "at a step by reusing earlier steps' outputs, which a captured graph cannot do "
                           "(it would compute every block at every step). asyncfx reuses the previous "
                           "step's values across stages instead; call model.disable_cache() before "
                           "partitioning.")


def check_no_forward_wrappers(model: nn.Module) -> None:
    """Refuse hooks that wrap a module's forward to move or convert its weights, or to
    choose what to compute, at each call: accelerate's (``_hf_hook``: model or sequential
    CPU offloading, ``device_map``) and diffusers' hook registries (``_diffusers_hook``:
    group offloading, layerwise casting, caching, layer skipping). A captured graph keeps
    the weights where the stages are and computes what the capture's call computed."""
    for name, module in model.named_modules():
        accelerate = getattr(module, ACCELERATE_HOOK, None)
        wrappers = [f"accelerate's {type(accelerate).__name__}"] if accelerate is not None else []
        wrappers += [f"diffusers' {hook!r} hook" for hook in diffusers_hook_names(module)]
        if wrappers:
            where = f"{type(model).__name__}.{name}" if name else type(model).__name__
            raise CaptureError(
                f"{where} has {', '.join(wrappers)} wrapping its forward: such hooks move or convert "
                "weights, or choose what to compute, at each call, which a captured graph cannot do "
                "(asyncfx puts each stage's weights on its device itself). Remove them before "
                "partitioning: no enable_model_cpu_offload() or group offloading (pipe.remove_all_hooks() "
                "undoes model offloading), no layerwise casting, no step caching.")


def _warn_about_forward_hooks(model: nn.Module) -> None:
    """Forward hooks run once, while tracing: the graph computes what they return, but what
    else they do (keeping activations, logging, measuring) will not happen at each call."""
    hooked = [name or type(model).__name__ for name, module in model.named_modules()
              if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        shown = ", ".join(hooked[:5]) + (f" and {len(hooked) - 5} more" if len(hooked) > 5 else "")
        warnings.warn(f"{type(model).__name__} has forward hooks on {shown}: they run once, while the model "
                      "is captured, and the graph computes what they return, but nothing else they do "
                      "(keeping activations, logging) will happen at later calls. Remove them before "
                      "partitioning, or call the original model where they must run.", stacklevel=3)


def check_capturable(model: nn.Module) -> None:
    """Refuse what a captured graph cannot stand for: a compiled wrapper, step caching,
    hooks that move or convert weights (checked by ``partition()`` at once and by every capture)."""
    check_not_compiled(model)
    check_no_step_cache(model)
    check_no_forward_wrappers(model)


def check_argument_names(model: nn.Module, latent: LatentOption = None,
                         timestep: str | None = None) -> None:
    """Refuse ``latent=`` or ``timestep=`` naming no argument of the model's forward, before
    its first call (a forward that takes ``**kwargs`` may take any name)."""
    signature = inspect.signature(model.forward)
    parameters = signature.parameters
    named = [("latent", name) for name in latent_arguments(latent)] + [("timestep", timestep)]
    if _variadic(signature, inspect.Parameter.VAR_KEYWORD) is not None:
        return
    for option, name in named:
        if name is not None and top_level_name(name) not in parameters:
            raise CaptureError(f"{option}={name!r} names no argument of "
                               f"{type(model).__name__}.forward{signature}.")


def _timestep_name(signature: inspect.Signature, args: tuple, kwargs: dict, latent: LatentOption,
                   timestep: str | None, model_class: str) -> str | None:
    """``timestep`` if given (it must name a tensor or number argument), else the first
    of TIMESTEP_NAMES bound to a tensor or a number (not the latent)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(f"example inputs do not fit {model_class}.forward"
                           f"{signature}: {exc}") from exc
    arguments = _arguments_by_name(bound)
    latents = latent_arguments(latent)
    candidates = [name for name, value in arguments.items() if name not in latents and (
        isinstance(value, torch.Tensor) or isinstance(value, (int, float)) and not isinstance(value, bool))]
    if timestep is None:
        return next((name for name in TIMESTEP_NAMES if name in candidates), None)
    if timestep not in candidates:
        raise CaptureError(f"timestep={timestep!r} names none of the tensor or number arguments of "
                           f"{model_class} that are not the latent: {candidates} (positional "
                           f"arguments are named as in {model_class}.forward{signature}).")
    return timestep


def capture(model: nn.Module, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
            *, latent: LatentOption = None, timestep: str | None = None) -> Captured:
    """Capture ``model`` called with ``args``/``kwargs`` as a flat fx graph.

    ``latent`` names the argument that is the noisy sample when it is not called
    ``sample``, ``hidden_states`` or ``x`` (default: else the first tensor argument), or
    lists several (LTX-2 denoises ``hidden_states`` and ``audio_hidden_states`` together).
    Each tensor of a latent argument that is a list (Z-Image's) is a latent input.
    ``timestep`` names the timestep (or noise level) argument when it is not called
    ``timestep``, ``timesteps``, ``t``, ``sigma`` or ``sigmas``: without one, the
    denoiser can tell generations apart only by their conditioning.
    Shapes are specialised: other shapes need another capture.

    Example:
        >>> model, args, kwargs = asyncfx.zoo.tiny.sdxl_unet()
        >>> captured = asyncfx.capture(model, args, kwargs)
        >>> [str(i.role) for i in captured.inputs]
        ['latent', 'timestep', 'condition', 'condition', 'condition']
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(model).__name__}; "
                           "wrap a plain function in a Module.")
    check_capturable(model)
    _warn_about_forward_hooks(model)
    started = time.perf_counter()
    args, kwargs = tuple(args), dict(kwargs or {})
    model_class = type(model).__name__
    signature = inspect.signature(model.forward)
    timestep_name = _timestep_name(signature, args, kwargs, latent, timestep, model_class)
    binder = _Binder(signature, timestep_name)
    bound_args, bound_kwargs = binder.bind(args, kwargs)
    leaves, in_spec = pytree.tree_flatten((bound_args, bound_kwargs))
    names = binder.leaf_names((bound_args, bound_kwargs))
    check_objects_are_registered(leaves, names, model_class)
    is_tensor = [isinstance(v, torch.Tensor) for v in leaves]
    roles = _assign_roles(names, is_tensor, latent, timestep_name, model_class)

    graph_module, out_spec, method, written = _trace(model, bound_args, bound_kwargs, leaves, names,
                                                     is_tensor)
    tensor_inputs = [(name, role, leaf) for name, role, leaf in zip(names, roles, leaves)
                     if role is not None]
    placeholders = _name_placeholders(graph_module, [name for name, _, _ in tensor_inputs])
    graph_module = _pinned_outputs(graph_module, [leaf for _, _, leaf in tensor_inputs], model_class)
    inputs = [GraphInput(name, placeholder, role, tuple(leaf.shape), str(leaf.dtype))
              for (name, role, leaf), placeholder in zip(tensor_inputs, placeholders)]
    classify(graph_module.graph, {i.placeholder: _ROLE_CLASS[i.role] for i in inputs})
    _warn_about_unnamed_latents(graph_module.graph, inputs, model_class)
    constants = [_TENSOR if tensor else leaf for leaf, tensor in zip(leaves, is_tensor)]
    interface = CallInterface(inputs=inputs, binder=binder, leaf_constants=constants, leaf_names=names,
                              in_spec=in_spec, out_spec=out_spec, model_class=model_class,
                              written_arguments=written)
    captured = Captured(graph_module, interface, method)
    if written:
        logger.info("%s.forward writes into %s at calls like this one: they run the original model",
                    model_class, ", ".join(written))
    logger.info("captured %s with %s in %.1f s: %d nodes; inputs %s", model_class, method,
                time.perf_counter() - started, len(graph_module.graph.nodes),
                ", ".join(i.describe() for i in inputs))
    return captured


def _warn_about_unnamed_latents(graph: fx.Graph, inputs: list[GraphInput], model_class: str) -> None:
    """A denoiser returns a prediction for each latent it takes: an output shaped like none
    of its latents but like a conditioning input (LTX-2's audio prediction and its
    ``audio_hidden_states``) says that input is a latent too, to be named."""
    values = [getattr(node, "meta", {}).get("val") for node in graph.output_node().args[0]]
    latent_shapes = {i.shape for i in inputs if i.role is InputRole.LATENT}
    unmatched = {tuple(v.shape) for v in values if isinstance(v, torch.Tensor)} - latent_shapes
    suspects = [i.name for i in inputs if i.role is InputRole.CONDITION and i.shape in unmatched]
    if suspects:
        latents = [i.name for i in inputs if i.role is InputRole.LATENT]
        warnings.warn(f"{model_class} returns a tensor shaped like its input(s) {suspects}, which are taken "
                      "as conditioning, and like none of its latents: if the model denoises them too (a "
                      "second latent, as LTX-2's audio), name every latent, e.g. "
                      f"latent={[*latents, *suspects]!r}, so that they are read one step stale like "
                      "the others instead of being recomputed in every stage.", stacklevel=3)


_ROLE_CLASS = {InputRole.LATENT: ValueClass.LATENT, InputRole.TIMESTEP: ValueClass.STEP,
               InputRole.CONDITION: ValueClass.STATIC}


def _name_placeholders(gm: fx.GraphModule, names: list[str]) -> list[str]:
    """Name each placeholder after its input (``added_cond_kwargs.time_ids`` ->
    ``added_cond_kwargs_time_ids``) so stage graphs and plans read in the model's terms.
    Returns the names given (fx adds a suffix to reserved names such as ``input``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise CaptureError(f"captured graph has {len(placeholders)} inputs for {len(names)} "
                           "tensor arguments; please report this model.")
    by_name = {n.name: n for n in gm.graph.nodes}
    for node, name in zip(placeholders, names):
        wanted = re.sub(r"\W", "_", name)
        holder = by_name.get(wanted)
        if holder is not None and holder is not node:  # free the name first
            holder._rename(f"{wanted}_node")
        node._rename(wanted)
        node.target = node.name
    gm.recompile()
    return [n.name for n in placeholders]


def _trace(model: nn.Module, args: tuple, kwargs: dict, leaves: list[Any], names: list[str],
           is_tensor: list[bool]) -> tuple[fx.GraphModule, pytree.TreeSpec, str, list[str]]:
    """The graph, its output structure, the method that made it, and the arguments the
    call writes into (see ``containers.watching_argument_writes``)."""
    try:
        with restoring_traced_state(model), watching_argument_writes(model) as written:
            graph_module, out_spec = _export(model, args, kwargs, is_tensor, type(model).__name__)
        return graph_module, out_spec, "export", written
    except CaptureError:
        raise
    except Exception as export_error:
        object_error = (unregistered_output_error(export_error, type(model).__name__)
                        or unregistered_input_error(export_error, leaves, names, type(model).__name__))
        if object_error is not None:  # symbolic_trace cannot take or return such an object either
            raise object_error from export_error
        try:
            with restoring_traced_state(model):
                gm, out_spec = _symbolic_trace(model, leaves, names, is_tensor)
        except Exception as trace_error:
            raise CaptureError(_both_failed_message(model, export_error, trace_error)) from export_error
        return gm, out_spec, "symbolic_trace", []  # its arguments are tensors


def _export(model: nn.Module, args: tuple, kwargs: dict, is_tensor: list[bool],
            model_class: str) -> tuple[fx.GraphModule, pytree.TreeSpec]:
    exported = torch.export.export(model, args, kwargs, strict=False)
    unlifted = exported.module()
    graph = unlifted.graph
    mutated = sorted(set(exported.graph_signature.buffers_to_mutate.values()) | _mutated_state(graph))
    if mutated:
        raise CaptureError(
            f"{model_class}.forward writes to buffers or inputs {mutated}; a denoiser must not "
            "change state while sampling. Call model.eval() (batch norm in training mode "
            "updates running statistics) or keep the state outside the model.")
    if in_place_ops(graph):  # e.g. FreeU's masks and slice assignments
        unlifted = _functionalised(exported, model_class)
        graph = unlifted.graph
    graph.set_codegen(fx.graph.CodeGen())  # flat positional inputs, flat tuple output
    _remove_checks(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, tensor in zip(placeholders, is_tensor):
        if not tensor:
            if node.users:
                raise CaptureError(f"non-tensor input {node.name} of {model_class} is still used "
                                   "in the exported graph; pass it as a tensor instead.")
            graph.erase_node(node)
    output = graph.output_node()
    output.args = (tuple(output.args[0]),)
    gm = fx.GraphModule(unlifted, graph, class_name=f"Captured{model_class}")
    gm.graph.lint()
    gm.recompile()
    return gm, exported.call_spec.out_spec


def _pinned_outputs(gm: fx.GraphModule, tensors: list[torch.Tensor], model_class: str) -> fx.GraphModule:
    """``gm`` with each output whose size export could not prove fixed pinned to the size a
    run on the example gives it (see the note on data-dependent sizes): one more forward,
    made only for such graphs."""
    outputs = gm.graph.output_node().args[0]
    if not any(isinstance(n, fx.Node) and has_data_dependent_size(n.meta.get(VALUE)) for n in outputs):
        return gm
    with torch.no_grad():
        observed = gm(*tensors)
    return pin_output_shapes(gm, observed, model_class)


def _mutated_state(graph: fx.Graph) -> set[str]:
    """Weights, buffers and inputs that an in-place op writes to."""
    written = set()
    for node in in_place_ops(graph):
        for argument, value in zip(node.target._schema.arguments, node.args):
            is_write = argument.alias_info is not None and argument.alias_info.is_write
            if is_write and isinstance(value, fx.Node) and value.op in ("get_attr", "placeholder"):
                written.add(str(value.target))
    return written


def _functionalised(exported: torch.export.ExportedProgram, model_class: str) -> fx.GraphModule:
    """The module of ``exported`` with its in-place writes to intermediates made new
    values (see ``passes.functionalise``), or a clear error where torch cannot do it."""
    writes = sorted({str(node.target.overloadpacket.__name__) for node in in_place_ops(exported.graph)})
    try:
        return functionalise(exported).module()
    except Exception as exc:
        reason = _summary(exc).rstrip(".")
        raise CaptureError(f"{model_class}.forward writes to intermediate values in place "
                           f"({', '.join(writes)}), which asyncfx must turn into new values to split the "
                           f"graph, and torch could not: {type(exc).__name__}: {reason}. Write those "
                           "values out of place (torch.where, torch.cat, or a new tensor).") from exc


def _remove_checks(graph: fx.Graph) -> None:
    """Drop export's guard module call and assertion ops (ops that return nothing): input
    checks are done by Captured itself, and a check must not pin a cut."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op == "output":
            continue
        schema = getattr(node.target, "_schema", None)
        is_guard = node.op == "call_module" and str(node.target) == "_guards_fn"
        if is_guard or (schema is not None and not schema.returns):
            graph.erase_node(node)


def _symbolic_trace(model: nn.Module, leaves: list[Any], names: list[str],
                    is_tensor: list[bool]) -> tuple[fx.GraphModule, pytree.TreeSpec]:
    nested = [n for n, t in zip(names, is_tensor) if t and n != top_level_name(n)]
    if nested:
        raise CaptureError(f"symbolic tracing needs tensors as top-level arguments; {nested} "
                           "are nested in containers.")
    concrete = {n: v for n, v, t in zip(names, leaves, is_tensor) if not t}
    tracer = fx.Tracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    writes = _traced_writes_in_place(graph)
    if writes:
        raise CaptureError(f"the model writes to intermediate values in place ({', '.join(writes)}), which "
                           "a symbolically traced graph cannot keep through a split; write them out of "
                           "place (x = x * 2 rather than x *= 2, torch.where rather than slice "
                           "assignment, inplace=False)")
    placeholders = {n.target.lstrip("*"): n for n in graph.nodes if n.op == "placeholder"}
    tensor_names = [n for n, t in zip(names, is_tensor) if t]
    for name, node in placeholders.items():  # constants are specialised, not inputs
        if name not in tensor_names:
            _erase_specialised_input(graph, node)
    output = graph.output_node()
    flat, out_spec = pytree.tree_flatten(_mutable(output.args[0]))
    output.args = (tuple(flat),)
    gm = fx.GraphModule(tracer.root, graph, class_name=f"Captured{type(model).__name__}")
    gm.graph.lint()
    gm.recompile()
    _record_values(gm, [v for v, t in zip(leaves, is_tensor) if t])
    return gm, out_spec


def _traced_writes_in_place(graph: fx.Graph) -> list[str]:
    """Nodes of a symbolically traced graph that write in place: trailing-underscore
    methods and functions (``mul_``, ``torch.relu_``) and calls with inplace=True (slice
    assignment does not trace at all)."""
    writes = []
    for node in graph.nodes:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        in_place = (node.kwargs.get("inplace") is True
                    or (node.op in ("call_method", "call_function") and isinstance(name, str)
                        and name.endswith("_") and not name.endswith("__")))
        if in_place:
            writes.append(node.name)
    return writes


def _mutable(value: Any) -> Any:
    """fx stores node arguments as immutable dicts and lists; the model returned plain ones."""
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_mutable(v) for v in value)
    return value


def _erase_specialised_input(graph: fx.Graph, placeholder: fx.Node) -> None:
    """Remove a constant argument's placeholder and the checks fx traced on it."""
    doomed, stack = {placeholder}, list(placeholder.users)
    while stack:
        node = stack.pop()
        if node.op == "output":
            raise CaptureError(f"the output depends on non-tensor argument {placeholder.name}; "
                               "pass it as a tensor.")
        if node not in doomed:
            doomed.add(node)
            stack.extend(node.users)
    for node in reversed([n for n in graph.nodes if n in doomed]):
        graph.erase_node(node)


def _record_values(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> None:
    """Give every node of a symbolically traced graph a meta-device ``val`` like export does."""

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = super().run_node(node)
            node.meta[VALUE] = pytree.tree_map_only(
                torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                            device="meta"), result)
            return result

    with torch.no_grad():
        Recorder(gm).run(*inputs)


def _both_failed_message(model: nn.Module, export_error: Exception, trace_error: Exception) -> str:
    untraceable = re.search(r"model attribute: (?:(\S+)\.)?lifted_tensor", str(export_error))
    if "data-dependent" in str(export_error) or "SymInt" in str(export_error):  # x.tolist() read
        advice = ("A forward that branches on a tensor's value (if x.sum() > 0, x.item(), "
                  "x.tolist()) cannot be captured: branch on shapes or Python arguments instead, use "
                  "torch.where or torch.cond, or move the data-dependent part out of the denoiser.")
    elif untraceable:
        module = f"module {untraceable.group(1)!r}" if untraceable.group(1) else type(model).__name__
        advice = (f"{module} makes a tensor in forward in a way torch.export cannot follow (typically "
                  "a write through `tensor.data`): compute it with plain torch operations, or once "
                  "outside forward as a buffer (some models do so only for inputs of the size in "
                  "their config).")
    else:
        advice = ("Check that the example inputs are what the model expects (shapes, dtypes, "
                  "which arguments are tensors), or change the construct named above.")
    return (f"cannot capture {type(model).__name__}: torch.export failed{_at(export_error)} with "
            f"{type(export_error).__name__}: {_summary(export_error)}; the torch.fx.symbolic_trace "
            f"fallback failed too{_at(trace_error)} with {type(trace_error).__name__}: "
            f"{_summary(trace_error)}. " + advice)


def _at(error: BaseException) -> str:
    construct = _failing_construct(error)
    return f" at {construct}" if construct else ""


def _summary(error: Exception) -> str:
    """The error's message in one line: its first line, and its last where the first only
    opens a value written over several lines (``Attention(`` ... ``) argument after **
    must be a mapping, not NoneType``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    if len(lines) > 1 and lines[0].endswith(("(", "[", "{")):
        return f"{lines[0]}...{lines[-1]}"
    return lines[0]


def _failing_construct(error: BaseException) -> str | None:
    """``file:line in function: source`` of the innermost frame in user code."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _ASYNCFX_DIR)) and "<" not in f.filename]
    if not frames:
        return None
    frame = frames[-1]
    source = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    return f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}: `{source}`"


def graph_fingerprint(gm: fx.GraphModule, inputs: Sequence[GraphInput]) -> str:
    """A hash of the graph's structure, targets, value shapes and inputs.

    Plans store it; applying a plan to another graph is then a clear error.
    """
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    digest = hashlib.sha256()
    for graph_input in inputs:
        digest.update(repr(dataclasses.astuple(graph_input)).encode())
    for node in gm.graph.nodes:
        args = pytree.tree_map_only(fx.Node, lambda n: f"%{index[n]}", (node.args, node.kwargs))
        value = node.meta.get(VALUE)
        shape = pytree.tree_map_only(torch.Tensor, lambda t: (tuple(t.shape), str(t.dtype)), value)
        digest.update(f"{node.op}|{_target_name(node)}|{args}|{shape}\n".encode())
    return digest.hexdigest()[:16]


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, (str, torch._ops.OpOverload)):
        return str(target)
    return getattr(target, "__qualname__", repr(target))
