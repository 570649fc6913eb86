"""capture(): a denoiser as a flat torch.fx graph with known input roles.

The steps, each in a module of its own:

1. bind (``binding``): the example call bound to ``forward``, its leaves named, the
   latent, the timestep and the conditioning told apart;
2. trace (``trace``): ``torch.export`` (or the ``symbolic_trace`` fallback);
3. normalise (``asyncfx.passes``): export's checks removed, flat tensor inputs and a
   flat tuple output, placeholders named after the arguments, outputs of value-dependent
   size pinned;
4. classify (``passes.classify``): every node latent, step or static;
5. diagnose (``diagnose``): warnings about what the graph cannot keep.

The result is a :class:`~asyncfx.partitioner.captured.Captured`.

Note (data-dependent sizes): a value whose size depends on tensor values (boolean-mask
indexing, ``nonzero``, ``x[mask] *= 0``) keeps torch.export's symbolic size in the
graph. Cuts never cross it (``cuts.cut_positions``) and the cost estimate counts it at
its bound; the graph runs on real tensors, where every size is known. Only the outputs
need fixed shapes: an output whose size export could not prove fixed takes the size one
run of the example gives it, checked at every call (``passes.pin_shapes``).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from torch import fx, nn

from asyncfx.errors import CaptureError
from asyncfx.partitioner.binding import BoundCall, LatentOption, bind_call
from asyncfx.partitioner.captured import _TENSOR, CallInterface, Captured
from asyncfx.partitioner.containers import check_objects_are_registered
from asyncfx.partitioner.diagnose import (check_capturable, warn_about_forward_hooks,
                                          warn_about_unnamed_latents)
from asyncfx.partitioner.trace import Traced, trace
from asyncfx.passes.classify import classify
from asyncfx.passes.copy_graph import finish
from asyncfx.passes.flatten_io import flatten_io
from asyncfx.passes.meta import ValueClass
from asyncfx.passes.name_placeholders import name_placeholders
from asyncfx.passes.pin_shapes import pin_output_shapes
from asyncfx.passes.remove_checks import remove_checks
from asyncfx.program import GraphInput, InputRole

logger = logging.getLogger(__name__)

_ROLE_CLASS = {InputRole.LATENT: ValueClass.LATENT, InputRole.TIMESTEP: ValueClass.STEP,
               InputRole.CONDITION: ValueClass.STATIC}


def capture(model: nn.Module, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
            *, latent: LatentOption = None, timestep: str | None = None) -> Captured:
    """Capture ``model`` called with ``args``/``kwargs`` as a flat fx graph.

    ``latent`` names the argument that is the noisy sample when it is not called
    ``sample``, ``hidden_states`` or ``x`` (default: else the first tensor argument), or
    lists several (a model that denoises a video and an audio latent together). Each
    tensor of a latent argument that is a list is a latent input. ``timestep`` names the
    timestep (or noise level) argument when it is not called ``timestep``, ``timesteps``,
    ``t``, ``sigma`` or ``sigmas``: without one, the denoiser can tell generations apart
    only by their conditioning. Shapes are specialised: other shapes need another capture.

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
    warn_about_forward_hooks(model)
    started, model_class = time.perf_counter(), type(model).__name__
    call = bind_call(model, tuple(args), dict(kwargs or {}), latent, timestep)
    check_objects_are_registered(call.leaves, call.names, model_class)
    traced = trace(model, call)
    graph_module, inputs = normalise(traced, call, model_class)
    classify(graph_module.graph, {i.placeholder: _ROLE_CLASS[i.role] for i in inputs})
    warn_about_unnamed_latents(graph_module.graph, inputs, model_class)
    interface = CallInterface(inputs=inputs, binder=call.binder,
                              leaf_constants=[_TENSOR if tensor else leaf
                                              for leaf, tensor in zip(call.leaves, call.is_tensor)],
                              leaf_names=call.names, in_spec=call.in_spec, out_spec=traced.out_spec,
                              model_class=model_class, written_arguments=traced.written)
    if traced.written:
        logger.info("%s.forward writes into %s at calls like this one: they run the original model",
                    model_class, ", ".join(traced.written))
    logger.info("captured %s with %s in %.1f s: %d nodes; inputs %s", model_class, traced.method,
                time.perf_counter() - started, len(graph_module.graph.nodes),
                ", ".join(i.describe() for i in inputs))
    return Captured(graph_module, interface, traced.method)


def normalise(traced: Traced, call: BoundCall, model_class: str) -> tuple[fx.GraphModule, list[GraphInput]]:
    """The traced graph with flat tensor inputs named after the arguments and a flat
    tuple output (outputs of value-dependent size pinned), and its inputs."""
    tensors = call.tensors
    graph = traced.graph_module.graph  # made for this capture alone: the passes below change it
    if traced.method == "export":
        remove_checks(graph)
        flatten_io(graph, call.is_tensor, model_class)
    name_placeholders(graph, [name for name, _, _ in tensors])
    class_name = f"Captured{model_class}" if traced.method == "export" else None
    graph_module = finish(traced.graph_module, graph, class_name=class_name)
    graph_module = pin_output_shapes(graph_module, [leaf for _, _, leaf in tensors], model_class)
    placeholders = [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
    inputs = [GraphInput(name, placeholder, role, tuple(leaf.shape), str(leaf.dtype))
              for (name, role, leaf), placeholder in zip(tensors, placeholders)]
    return graph_module, inputs
