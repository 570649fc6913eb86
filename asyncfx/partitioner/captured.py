"""Captured: a model as a flat, classified fx graph, callable like the model.

A :class:`Captured` holds the graph and the :class:`CallInterface` that binds calls to
it: a call is bound like the model's forward, flattened, checked against the capture
(shapes, dtypes, the values of non-tensor arguments, which are baked into the graph),
and the graph's flat output is rebuilt as the model's own output type. Its ``call``
is the interface as the runtime sees it (``asyncfx.program.CallSpec``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from asyncfx.errors import CaptureError, InputMismatchError
from asyncfx.partitioner.binding import Binder
from asyncfx.passes.meta import VALUE
from asyncfx.program import CallSpec, GraphInput, InputRole, TensorSpec


#: Call layouts whose tensor positions are remembered (see the note on the fast path).
MAX_LAYOUTS = 8
#: Python values that may stand beside tensors in a call with a remembered layout.
_SCALARS = (type(None), bool, int, float, str)


class CallInterface:
    """How calls to a model map to a flat graph's inputs and back to the model's output.

    Shared by :class:`Captured` and the staged model split from it.

    Note (fast path): binding a call to the signature and flattening it as a pytree take
    tens of microseconds, at every denoising step. A call whose arguments are tensors and
    plain scalars only has a *layout* (how many positional arguments, which keywords,
    which scalar values) that decides where each of its tensors lands among the graph's
    inputs; the first call of a layout goes the full way, and later calls of the same
    layout take their tensors from the remembered positions (shapes and dtypes are still
    checked at every call).
    """

    def __init__(self, *, inputs: list[GraphInput], binder: Binder, leaf_constants: list[Any],
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
        self._layouts: dict[tuple, list[int]] = {}  # layout -> argument index of each tensor input
        self._dtypes = [getattr(torch, i.dtype.removeprefix("torch.")) for i in inputs]

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The graph's positional inputs for a model call, checked against the capture."""
        layout = _layout(args, kwargs)
        positions = self._layouts.get(layout) if layout is not None else None
        if positions is None:
            tensors = self._flatten(args, kwargs)
            if layout is not None and len(self._layouts) < MAX_LAYOUTS:
                self._remember(layout, args, kwargs)
            return tensors
        values = (*args, *kwargs.values())
        tensors = [values[i] for i in positions]
        for given, expected, dtype in zip(tensors, self.inputs, self._dtypes):
            if given.shape != expected.shape or given.dtype is not dtype:
                check_input(given, expected, self.model_class)
        return tensors

    def _remember(self, layout: tuple, args: tuple, kwargs: dict) -> None:
        """Where each tensor input of calls of ``layout`` comes from: the call bound again
        with each tensor argument replaced by a marker (not for a layout whose binding makes
        tensors of its own, as a number given as the timestep)."""
        markers = [object() if isinstance(v, torch.Tensor) else v for v in (*args, *kwargs.values())]
        marked_args, marked_kwargs = tuple(markers[:len(args)]), dict(zip(kwargs, markers[len(args):]))
        index = {id(m): i for i, m in enumerate(markers)}
        leaves = pytree.tree_leaves(self._binder.bind(marked_args, marked_kwargs))
        positions = [index.get(id(leaf)) for leaf, c in zip(leaves, self._leaf_constants) if c is _TENSOR]
        if None not in positions and len(positions) == len(self.inputs):
            self._layouts[layout] = positions

    def _flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
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
        if self._out_spec.is_leaf():  # a model that returns one tensor
            return values[0]
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
        self.call = CallSpec(model_class=interface.model_class, inputs=tuple(interface.inputs),
                             outputs=output_specs(graph_module.graph), flatten=interface.flatten,
                             unflatten=interface.unflatten, written_arguments=interface.written_arguments)

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
        """The latent, or the first of them (a model may take a list, one tensor per sample)."""
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


def _layout(args: tuple, kwargs: dict) -> tuple | None:
    """The layout of a call of tensors and plain scalars (see the note on the fast path),
    None for a call with anything else."""
    entries = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            entries.append(None)
        elif isinstance(value, _SCALARS):
            entries.append((type(value), value))
        else:
            return None
    return len(args), tuple(kwargs), tuple(entries)


def check_input(given: Any, expected: GraphInput, model_class: str) -> None:
    """Raise InputMismatchError unless ``given`` is a tensor shaped like ``expected``."""
    if not isinstance(given, torch.Tensor):
        raise InputMismatchError(
            f"input {expected.name!r} of {model_class} must be a tensor like at capture "
            f"({expected.describe()}), got {type(given).__name__}.")
    if tuple(given.shape) != tuple(expected.shape) or str(given.dtype) != expected.dtype:
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


def output_specs(graph: fx.Graph) -> tuple[TensorSpec | None, ...]:
    """The shape and dtype of each flat output (None for one that is not a tensor)."""
    values = [n.meta.get(VALUE) if isinstance(n, fx.Node) else n for n in graph.output_node().args[0]]
    return tuple(TensorSpec(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in values)


def graph_fingerprint(gm: fx.GraphModule, inputs: Sequence[GraphInput]) -> str:
    """A hash of the graph's structure, targets, value shapes and inputs.

    Plans store it; applying a plan to another graph is then a clear error.
    """
    index = {node: f"%{i}" for i, node in enumerate(gm.graph.nodes)}
    lines = [repr(dataclasses.astuple(graph_input)) for graph_input in inputs]
    for node in gm.graph.nodes:
        args = fx.node.map_arg((node.args, node.kwargs), index.__getitem__)
        lines.append(f"{node.op}|{_target_name(node)}|{args}|{_shapes(node.meta.get(VALUE))}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def _shapes(value: Any) -> Any:
    """``value`` with each tensor replaced by its shape and dtype (plain tuples and lists
    walked here, any other structure by pytree)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype)
    if type(value) in (tuple, list):
        return type(value)(_shapes(item) for item in value)
    return pytree.tree_map_only(torch.Tensor, _shapes, value)


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, (str, torch._ops.OpOverload)):
        return str(target)
    return getattr(target, "__qualname__", repr(target))
