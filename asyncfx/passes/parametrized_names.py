"""Weights a parametrization held while the model was traced, under the model's names.

``torch.nn.utils.parametrize`` moves a parametrized weight to
``<module>.parametrizations.<name>.original``, and a trace reads it from there; once the
parametrizations are removed the model holds it as ``<module>.<name>`` again. The stages
and the weight files name weights as the model does, so the graph's are renamed back.
"""
from __future__ import annotations

from torch import fx

from asyncfx.module_tensors import put_tensor, tensor_at

PARAMETRIZED = ".parametrizations."
ORIGINAL = ".original"


def model_name(target: str) -> str | None:
    """``conv_in.parametrizations.weight.original`` -> ``conv_in.weight`` (None: not one).

    Example:
        >>> model_name("down.0.parametrizations.bias.original"), model_name("down.0.bias")
        ('down.0.bias', None)
    """
    dotted = f".{target}"
    if PARAMETRIZED not in dotted or not dotted.endswith(ORIGINAL):
        return None
    owner, _, rest = dotted.rpartition(PARAMETRIZED)
    return f"{owner}.{rest.removesuffix(ORIGINAL)}".lstrip(".")


def name_as_the_model(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The traced module with each parametrized weight it reads moved to the model's name
    for it, and the graph reading it there."""
    owners = set()
    for node in graph_module.graph.nodes:
        named = model_name(str(node.target)) if node.op == "get_attr" else None
        if named is None:
            continue
        put_tensor(graph_module, named, tensor_at(graph_module, str(node.target)))
        owners.add(str(node.target).rpartition(PARAMETRIZED)[0])
        node.target = named
    for owner in owners:
        module = graph_module.get_submodule(owner) if owner else graph_module
        delattr(module, PARAMETRIZED.strip("."))
    if owners:  # its code made again only where the graph changed
        graph_module.recompile()
    return graph_module
