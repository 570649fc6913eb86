"""What weights a process holds: each stage it runs on its device, and nothing else.

Stage modules read the model's own tensors (a split keeps them, it never copies). An
executor places the stages it runs on their devices (``placed``): a stage already there
is shared with the model; one elsewhere is copied there; the tensors of a model built
without weights (on the meta device) are loaded from the program's weight source, only
those the stage reads.

The original model's tensors that its stages read and no stage of this process holds
are then released (``release_unheld``; when, the denoiser's note on weights says): their
storage is freed in place, as FSDP frees unsharded parameters, so every object that
shares them (the capture's graph, the other stages' modules) lets go at once and each
device or rank keeps only its stages' weights. A released tensor keeps its shape and
dtype; ``without_data`` tells it from a real one.
"""
from __future__ import annotations

import copy
import ctypes
from typing import Iterable, Iterator

import torch
from torch import fx, nn

from asyncfx.errors import WeightsReleasedError
from asyncfx.module_tensors import put_tensor, tensor_at
from asyncfx.program import WeightSource


def placed(module: nn.Module, device: torch.device | None, source: WeightSource | None) -> nn.Module:
    """The stage module a slot computes with on ``device`` (None: where it is).

    Example:
        >>> module = placed(program.stages[0].module, torch.device("cuda:1"), program.weights)
    """
    empty = {name: tensor for name, tensor in stage_tensors(module) if without_data(tensor)}
    if not empty:
        if device is None or on_device(module, device):
            return module  # shared: inference only reads the weights
        return copy.deepcopy(module).to(device)  # moving a shared module would move the caller's weights
    if source is None:
        raise WeightsReleasedError(
            f"this stage reads {len(empty)} tensor(s) without data ({_names(empty)}): the model was built "
            "on the meta device or its weights were released after an earlier plan was built, and nothing "
            "says where to load them from. Pass weights=<the model's saved directory or .safetensors file> "
            "to asyncfx.partition(), or partition(..., release_weights=False) to keep a built model's "
            "weights for later captures.")
    device = device or torch.device("cpu")
    stage = copy.deepcopy(module)  # tensors without data copy for free
    for name, tensor in source.load(empty, device).items():
        put_tensor(stage, name, tensor)
    return stage.to(device)


def stage_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a module holds, by name: a graph's ``get_attr`` targets (parameters,
    buffers and constants), else its parameters and buffers."""
    if isinstance(module, fx.GraphModule):
        for target in dict.fromkeys(n.target for n in module.graph.nodes if n.op == "get_attr"):
            value = tensor_at(module, target)
            if isinstance(value, torch.Tensor):
                yield target, value
        return
    yield from module.named_parameters()
    yield from module.named_buffers()


def without_data(tensor: torch.Tensor) -> bool:
    """Whether a tensor has a shape but no data: on the meta device, or released."""
    return tensor.is_meta or (tensor.numel() > 0 and tensor.untyped_storage().nbytes() == 0)


def holds_no_data(module: nn.Module) -> bool:
    """Whether any tensor the module holds is without data."""
    return any(without_data(tensor) for _, tensor in stage_tensors(module))


def on_device(module: nn.Module, device: torch.device) -> bool:
    """Whether every tensor the module holds is on ``device`` (any index of its type
    where it names none; an empty module is)."""
    return all(t.device.type == device.type and (device.index is None or t.device.index == device.index)
               for t in [*module.parameters(), *module.buffers()])


def release_unheld(model: nn.Module, read: Iterable[nn.Module], held: Iterable[nn.Module]) -> int:
    """Free the storage of every parameter and buffer of ``model`` that a module in
    ``read`` (the stages of every plan) reads and none in ``held`` (the stages this
    process runs) holds; the bytes freed. Tensors no stage reads (an adapter switched off)
    are kept: a later capture may read them again.

    Example:
        >>> release_unheld(unet, [s.module for s in program.stages], executor.modules())
        1923441664
    """
    stage_storages = _storages(read)
    kept = _storages(held)
    freed, seen = 0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        key = _storage_key(tensor)
        if without_data(tensor) or key not in stage_storages or key in kept or key in seen:
            continue
        seen.add(key)
        storage = tensor.untyped_storage()
        freed += storage.nbytes()
        storage.resize_(0)
    if freed:
        _return_free_pages()
    return freed


def _return_free_pages() -> None:
    """Hand the heap's free pages back to the system: glibc keeps freed blocks of the
    sizes weights have in its heap, where they still count as the process's memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # another C library, whose allocator returns memory by itself
    libc.malloc_trim(0)


def _storages(modules: Iterable[nn.Module]) -> dict[tuple, int]:
    """The distinct storages that ``modules`` hold with data, and their bytes."""
    return {_storage_key(t): t.untyped_storage().nbytes() for module in modules
            for _, t in stage_tensors(module) if not without_data(t)}


def held_bytes(modules: Iterable[nn.Module]) -> int:
    """The bytes of the distinct storages that ``modules`` hold with data."""
    return sum(_storages(modules).values())


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.device, tensor.untyped_storage().data_ptr()


def _names(tensors: dict[str, torch.Tensor]) -> str:
    shown = ", ".join(list(tensors)[:3])
    return shown + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
