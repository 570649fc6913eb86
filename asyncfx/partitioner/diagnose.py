"""Diagnosis: what capture refuses before tracing, warns about after, and how it explains
a model that neither tracer could follow, in one message that names the construct."""
from __future__ import annotations

import linecache
import os
import re
import sys
import traceback
import warnings
from typing import Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from asyncfx.errors import CaptureError
from asyncfx.integration import check_no_forward_wrappers, check_no_step_cache
from asyncfx.partitioner.empty_weights import fake_weights
from asyncfx.partitioner.traced_state import restoring_traced_state
from asyncfx.program import GraphInput, InputRole

_TORCH_DIR = os.path.dirname(torch.__file__)
_ASYNCFX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_capturable(model: nn.Module) -> None:
    """Refuse what a captured graph cannot stand for: a compiled wrapper, step caching,
    hooks that move or convert weights (checked by ``partition()`` at once and by every capture)."""
    check_not_compiled(model)
    check_no_step_cache(model)
    check_no_forward_wrappers(model)


def check_not_compiled(model: nn.Module) -> None:
    """Refuse a ``torch.compile()`` wrapper: its ``forward(*args, **kwargs)`` hides the
    argument names, and its compiled code would not run in the stages anyway."""
    if _compiled(model):
        raise CaptureError("the model was compiled with torch.compile(); asyncfx captures it with "
                           "torch.export and runs the stages itself (as CUDA graphs on GPUs), so pass "
                           f"the model before compiling: its _orig_mod, a {type(model._orig_mod).__name__}.")


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` is torch.compile()'s wrapper, whose class torch._dynamo defines: no
    model is one before torch.compile imported it (so asyncfx need not import it)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def warn_about_forward_hooks(model: nn.Module) -> None:
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


def warn_about_unnamed_latents(graph: fx.Graph, inputs: list[GraphInput], model_class: str) -> None:
    """A denoiser returns a prediction for each latent it takes: an output shaped like none
    of its latents but like a conditioning input (an audio prediction and its
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


def both_failed_message(model: nn.Module, export_error: Exception, trace_error: Exception) -> str:
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
            f"{type(export_error).__name__}: {summary(export_error)}; the torch.fx.symbolic_trace "
            f"fallback failed too{_at(trace_error)} with {type(trace_error).__name__}: "
            f"{summary(trace_error)}. " + advice)


def check_call_runs(model: nn.Module, args: tuple, kwargs: dict,
                    tensors: Sequence[tuple[str, InputRole, torch.Tensor]]) -> None:
    """Where tracing failed: refuse, in one line, a call the model's own forward refuses (a
    wrong dtype, channel count or batch size), which no tracer could capture and whose
    trace errors would bury the cause. The model runs once on copies of the arguments,
    with no gradients, its Python state put back (``traced_state``) and fake tensors for
    weights it was built without; its forward hooks run."""
    copies = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
    try:
        with (torch.no_grad(), restoring_traced_state(model, warn=False),
              fake_weights(model, *copies) as (eager_args, eager_kwargs)):
            model(*eager_args, **eager_kwargs)
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the model's own code
        raise CaptureError(_call_failed_message(model, error, tensors)) from error


def _call_failed_message(model: nn.Module, error: Exception,
                         tensors: Sequence[tuple[str, InputRole, torch.Tensor]]) -> str:
    given = ", ".join(f"{name} {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
                      for name, _, t in tensors)
    return (f"{type(model).__name__} cannot run on this call's arguments: its forward fails{_at(error)} "
            f"with {type(error).__name__}: {summary(error)}. The call gives {given}; pass the shapes and "
            "dtypes the model takes (the latent's channels, one batch size for every argument).")


def _at(error: BaseException) -> str:
    construct = _failing_construct(error)
    return f" at {construct}" if construct else ""


def summary(error: Exception) -> str:
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


