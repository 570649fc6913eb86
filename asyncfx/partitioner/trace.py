"""Tracing: the model as an fx graph, by ``torch.export.export(..., strict=False)``, or by
``torch.fx.symbolic_trace`` for simple modules that export rejects.

export follows diffusers UNets and transformers, whose forward has shape-dependent
Python control flow; symbolic_trace cannot, so it is only the fallback. A forward that
writes to its weights, buffers or inputs is refused (a denoiser must not change state
while sampling); writes to intermediate values are made new values (``passes.view_writes``,
else ``passes.functionalise``). Where export fails because the model itself refuses the
call (a wrong dtype, channel count or batch size), the error says so in one line; when both
tracers fail otherwise, it names where and why each did (``diagnose``). diffusers'
layerwise casting is traced as casts in the graph (``integration.layerwise_casts_in_graph``);
its step caches are passed over (every module is computed), the runtime applies them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from asyncfx.errors import CaptureError
from asyncfx.cache_hooks import chained_blocks
from asyncfx.integration import layerwise_casts_in_graph, step_caches_passed_over
from asyncfx.partitioner.binding import BoundCall, top_level_name
from asyncfx.partitioner.containers import (unregistered_input_error, unregistered_output_error,
                                            watching_argument_writes)
from asyncfx.partitioner.diagnose import both_failed_message, check_call_runs, summary
from asyncfx.partitioner.empty_weights import fake_weights, with_meta_weights
from asyncfx.partitioner.traced_state import restoring_traced_state
from asyncfx.passes.block_calls import tag_block_calls
from asyncfx.passes.copy_graph import copy_graph
from asyncfx.passes.parametrized_names import name_as_the_model
from asyncfx.passes.functionalise import functionalise, in_place_ops
from asyncfx.passes.meta import VALUE
from asyncfx.passes.pin_shapes import has_outputs_to_pin
from asyncfx.passes.unlift import unlift
from asyncfx.passes.view_writes import rewrite_view_writes


@dataclasses.dataclass
class Traced:
    """What tracing made: the graph (export's module, with the model's argument structure,
    or symbolic_trace's, already flat; made for this trace alone, so the capture changes
    it in place), its output structure, the method, and the arguments the call writes
    into (see ``containers.watching_argument_writes``)."""

    graph_module: fx.GraphModule
    out_spec: pytree.TreeSpec
    method: str                  # "export" or "symbolic_trace"
    written: list[str]


def trace(model: nn.Module, call: BoundCall) -> Traced:
    """The model traced on the bound example call: torch.export, else symbolic_trace.
    Export records where in the source each node was made (``node.stack_trace``, about a
    third of its time; see ``recording_stack_traces``) only for a graph with an output of
    value-dependent size, whose pin's error names that line: it exports such a model again,
    right after the first export found the output.

    Example:
        >>> trace(unet, bind_call(unet, args, kwargs, None, None)).method
        'export'
    """
    # the casts of diffusers' layerwise casting as graph nodes; step caches left to the runtime
    with layerwise_casts_in_graph(model), step_caches_passed_over(model):
        return _traced(model, call, stack_traces=False) or _traced(model, call, stack_traces=True)


def _traced(model: nn.Module, call: BoundCall, stack_traces: bool) -> Traced | None:
    """The trace, or None where export found an output to pin without recording source lines."""
    args, kwargs, leaves, names, is_tensor = call.args, call.kwargs, call.leaves, call.names, call.is_tensor
    try:
        with (restoring_traced_state(model), watching_argument_writes(model) as written,
              fake_weights(model, args, kwargs) as (traced_args, traced_kwargs),
              recording_stack_traces(stack_traces)):
            exported = _export(model, traced_args, traced_kwargs, type(model).__name__, chained_blocks(model),
                               stack_traces)
        if exported is None:
            return None
        graph_module, out_spec = exported
        return Traced(with_meta_weights(name_as_the_model(graph_module), model), out_spec, "export", written)
    except CaptureError:
        raise
    except Exception as export_error:
        object_error = (unregistered_output_error(export_error, type(model).__name__)
                        or unregistered_input_error(export_error, leaves, names, type(model).__name__))
        if object_error is not None:  # symbolic_trace cannot take or return such an object either
            raise object_error from export_error
        check_call_runs(model, args, kwargs, call.tensors)  # else the call, not tracing, is at fault
        try:
            with restoring_traced_state(model):
                gm, out_spec = _symbolic_trace(model, leaves, names, is_tensor)
        except Exception as trace_error:
            raise CaptureError(both_failed_message(model, export_error, trace_error)) from export_error
        return Traced(gm, out_spec, "symbolic_trace", [])  # its arguments are tensors


#: torch's logger of fake-tensor kernels, and what it logs (with a traceback, as an error) when
#: an op fails on fake tensors while exporting: the capture reports that failure itself.
FAKE_TENSOR_LOGGER, META_FAILURE = "torch._subclasses.fake_tensor", "failed while attempting to run meta"


@contextlib.contextmanager
def _failures_reported_by_the_capture() -> Iterator[None]:
    """Around this thread's export: torch's log record of an op failing on fake tensors is
    dropped (other records, and other threads', pass), for the capture's error is one line."""
    thread = threading.get_ident()

    def keep(record: logging.LogRecord) -> bool:
        return record.thread != thread or not record.getMessage().startswith(META_FAILURE)

    logger = logging.getLogger(FAKE_TENSOR_LOGGER)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@contextlib.contextmanager
def recording_stack_traces(record: bool) -> Iterator[None]:
    """Tracing inside records (or not) the source line of each node it makes: torch.fx's
    switch for it (``torch.fx.config.do_not_emit_stack_traces``), set for the trace and put
    back. A capture reads the lines only to say where an output's size comes from."""
    before = fx.config.do_not_emit_stack_traces
    fx.config.do_not_emit_stack_traces = not record
    try:
        yield
    finally:
        fx.config.do_not_emit_stack_traces = before


def _export(model: nn.Module, args: tuple, kwargs: dict, model_class: str, blocks: tuple[str, ...],
            stack_traces: bool) -> tuple[fx.GraphModule, pytree.TreeSpec] | None:
    """export's module of the model, its in-place writes to intermediates made new values;
    writes to weights, buffers or inputs are refused. The calls of ``blocks`` are recorded
    in the graph (``passes.block_calls``). None: an output to pin, and no source lines."""
    # torch's switch to lazy GraphModules (see passes.copy_graph) is process-wide: graphs another
    # thread makes meanwhile are lazy too, which changes only when their code is generated
    with _failures_reported_by_the_capture(), _use_lazy_graph_module(True):
        exported = torch.export.export(model, args, kwargs, strict=False,
                                       preserve_module_call_signature=blocks)
    if not stack_traces and has_outputs_to_pin(exported.graph):
        return None
    tag_block_calls(exported, model, blocks)
    signature = exported.graph_signature  # writes it returns (unlift takes none), then writes in place
    _refuse_writes(model_class, {*signature.buffers_to_mutate.values(),
                                 *signature.user_inputs_to_mutate.values()})
    unlifted = unlift(exported)
    graph = unlifted.graph
    _refuse_writes(model_class, _mutated_state(graph))
    if in_place_ops(graph):  # e.g. FreeU's masks and slice assignments
        _check_no_blocks_recorded(model_class, blocks)
        unlifted = _without_view_writes(unlifted) or _functionalised(exported, model_class)
    return unlifted, exported.call_spec.out_spec


def _without_view_writes(unlifted: fx.GraphModule) -> fx.GraphModule | None:
    """``unlifted`` with its writes into slices of its own tensors made new values
    (``passes.view_writes``), or None where it has other writes (torch rewrites those)."""
    graph = copy_graph(unlifted)
    if not rewrite_view_writes(graph):
        return None
    unlifted.graph = graph  # its attributes kept as they are, its code made again
    return unlifted


def _refuse_writes(model_class: str, mutated: set[str]) -> None:
    """A clear error where the forward writes to any of ``mutated`` (weights, buffers, inputs)."""
    if mutated:
        raise CaptureError(
            f"{model_class}.forward writes to buffers or inputs {sorted(mutated)}; a denoiser must not "
            "change state while sampling. Call model.eval() (batch norm in training mode "
            "updates running statistics) or keep the state outside the model.")


def _check_no_blocks_recorded(model_class: str, blocks: tuple[str, ...]) -> None:
    """torch's rewrite of in-place writes drops the module calls an export recorded."""
    if blocks:
        raise CaptureError(f"{model_class}.forward writes to intermediate values in place, which asyncfx "
                           "rewrites as new values, and the step cache on it skips a chain of blocks "
                           f"({blocks[0]}, ...), whose calls the capture must record: torch cannot keep them "
                           "through that rewrite. Call model.disable_cache() or enable a cache of single "
                           "modules (PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig), or remove the "
                           "in-place writes (model.disable_freeu() where FreeU is on).")


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
        return functionalise(exported).module()  # torch's unlift: it also removes effect tokens
    except Exception as exc:
        reason = summary(exc).rstrip(".")
        raise CaptureError(f"{model_class}.forward writes to intermediate values in place "
                           f"({', '.join(writes)}), which asyncfx must turn into new values to split the "
                           f"graph, and torch could not: {type(exc).__name__}: {reason}. Write those "
                           "values out of place (torch.where, torch.cat, or a new tensor).") from exc


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


