"""Unlift pass: an exported program as a GraphModule that holds its own weights.

``torch.export`` lifts a model's parameters, buffers and constant tensors to graph inputs.
``ExportedProgram.module()`` reads them from attributes again, and also deep-copies every
node's recorded value, adds a guard call that checks the inputs and rebuilds the model's
argument structure around the graph: about a tenth of a small model's capture. A capture
binds and checks calls itself (``Captured``, ``flatten_io``, ``remove_checks``), so
``unlift`` does only the first, on a copy of the graph whose nodes share their recorded
values, and names its ``get_attr`` nodes as ``module()`` names them (saved plans name
nodes). Parameters, buffers (persistent or not) and constants are registered as such.
It takes the program ``torch.export.export`` makes (training IR: in-place writes stay
ops of the graph, no effect tokens); a program with writes to return or effect tokens
needs ``module()``.
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, OutputKind

from asyncfx.module_tensors import tensor_at
from asyncfx.passes.copy_graph import copy_graph, lazy_graph_module


#: The kinds of lifted inputs ``unlift`` reads from attributes.
_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ)


def unlift(exported: ExportedProgram) -> fx.GraphModule:
    """``exported``'s graph, its lifted weights read by ``get_attr`` nodes from the module's
    attributes; its inputs are the flat user inputs and its output the flat user outputs.

    Example:
        >>> module = unlift(torch.export.export(unet, (), kwargs, strict=False))
        >>> [node.op for node in module.graph.nodes][:2]
        ['get_attr', 'get_attr']
    """
    signature = exported.graph_signature
    unexpected = [spec for spec in signature.output_specs if spec.kind is not OutputKind.USER_OUTPUT]
    unexpected += [spec for spec in signature.input_specs
                   if spec.kind not in (*_LIFTED, InputKind.USER_INPUT)]
    if unexpected:
        other = [f"{spec.kind.name} {spec.target or spec.arg}" for spec in unexpected]
        raise ValueError(f"unlift takes a program as torch.export.export makes it, whose outputs are the "
                         f"model's and whose inputs are the model's or its weights; this one has {other}: "
                         "use ExportedProgram.module(), which writes mutations back and removes effect "
                         "tokens")
    graph = copy_graph(exported.graph_module)
    graph.set_codegen(fx.graph.CodeGen())  # flat inputs and outputs, as the exported graph's
    module = lazy_graph_module(nn.Module(), fx.Graph(), "GraphModule")
    for node in graph.find_nodes(op="get_attr") + graph.find_nodes(op="call_module"):
        _put(module, str(node.target), tensor_at(exported.graph_module, str(node.target)))  # subgraphs
    placeholders = graph.find_nodes(op="placeholder")
    for node, spec in zip(placeholders, signature.input_specs, strict=True):
        if spec.kind is not InputKind.USER_INPUT:
            _put(module, str(spec.target), _lifted_value(exported, spec), spec.kind, spec.persistent)
            _read_from_attribute(graph, node, str(spec.target))
    module.graph = graph  # its code made when first run or read
    return module


def _read_from_attribute(graph: fx.Graph, placeholder: fx.Node, target: str) -> None:
    """Replace ``placeholder`` by a ``get_attr`` of ``target`` at its place, with its meta."""
    with graph.inserting_after(placeholder):
        attribute = graph.get_attr(target)
    placeholder.replace_all_uses_with(attribute)
    attribute.meta = placeholder.meta
    graph.erase_node(placeholder)


def _lifted_value(exported: ExportedProgram, spec: InputSpec) -> Any:
    """The tensor (or object) a lifted input stands for."""
    if spec.kind is InputKind.PARAMETER or (spec.kind is InputKind.BUFFER and spec.persistent):
        return exported.state_dict[spec.target]
    return exported.constants[spec.target]


def _put(module: nn.Module, target: str, value: Any, kind: InputKind | None = None,
         persistent: bool | None = None) -> None:
    """Register ``value`` at the dotted ``target`` of ``module`` as a parameter, a buffer
    (``persistent`` or not) or else a plain attribute (constants, objects, submodules),
    making the modules on its path."""
    *path, field = target.split(".")
    for name in path:
        if not hasattr(module, name):
            module.add_module(name, nn.Module())
        module = getattr(module, name)
    if kind is InputKind.PARAMETER:
        module.register_parameter(field, value)
    elif kind is InputKind.BUFFER:
        module.register_buffer(field, value, persistent=bool(persistent))
    else:
        setattr(module, field, value)

