"""WeightFiles: a model's tensors read from its safetensors files one by one, by name.

A model too large for one device is built without weights (on the meta device, as
``accelerate.init_empty_weights()`` or ``torch.device("meta")`` build it), captured and
compiled from shapes alone, and each device or rank then loads only the tensors of its
own stages from the files (``partition(model, n, weights=path)``). A safetensors file
starts with a JSON header giving each tensor's dtype, shape and byte range, so a tensor
is read alone, straight into memory of its own, with plain reads rather than a memory
map: no process ever holds the whole model, not even as file pages counted in its
resident memory.

``path`` is one of:
- a diffusers model directory (what ``save_pretrained`` writes): its
  ``*.safetensors.index.json`` for sharded weights, else its one ``*.safetensors`` file;
- an index file ``*.safetensors.index.json`` (its ``weight_map`` names the shards);
- one ``*.safetensors`` file (a state dict saved with ``safetensors.torch.save_file``).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, Mapping, NamedTuple

import torch

from asyncfx.errors import WeightsError

#: The dtypes safetensors names, as torch knows them.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Entry(NamedTuple):
    """Where one tensor lies: its file, dtype, shape and byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class WeightFiles:
    """The tensors of a model's safetensors files (``asyncfx.program.WeightSource``).

    ``loaded_bytes`` counts the bytes read so far (as stored in the files).

    Example:
        >>> unet.save_pretrained("unet_dir")
        >>> files = WeightFiles("unet_dir")
        >>> loaded = files.load({"conv_in.weight": empty_unet.conv_in.weight}, torch.device("cpu"))
        >>> files.loaded_bytes == loaded["conv_in.weight"].nbytes
        True
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries = _entries(_files(self.path))
        self.loaded_bytes = 0

    def __repr__(self) -> str:
        return f"WeightFiles({str(self.path)!r}, {len(self.entries)} tensors)"

    def load(self, wanted: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors named by ``wanted``'s keys, on ``device``, each with the shape and
        dtype of its value (a tensor without data: on the meta device, or released)."""
        missing = sorted(name for name in wanted if name not in self.entries)
        if missing:
            raise WeightsError(f"{self.path} holds no tensor named {', '.join(map(repr, missing[:5]))}"
                               f"{' and others' if len(missing) > 5 else ''}: are these the weights of "
                               "this model (same class and config)? Pass the model's own saved directory "
                               "or file as weights=.")
        loaded: dict[str, torch.Tensor] = {}
        for file in sorted({self.entries[name].file for name in wanted}):
            with open(file, "rb") as opened:
                for name in (n for n in wanted if self.entries[n].file == file):
                    tensor = _read(opened, self.entries[name])
                    self.loaded_bytes += tensor.nbytes
                    loaded[name] = _fitted(name, tensor, wanted[name], file).to(device)
        return loaded


def _read(opened: BinaryIO, entry: Entry) -> torch.Tensor:
    """One tensor, read from its byte range into memory of its own."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    opened.seek(entry.start)
    if opened.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != entry.end - entry.start:
        raise WeightsError(f"{entry.file} ends inside a tensor: it is truncated; save the model again.")
    return tensor


def _fitted(name: str, tensor: torch.Tensor, like: torch.Tensor, file: Path) -> torch.Tensor:
    """The loaded tensor in the dtype the model has for it, refused if its shape differs."""
    if tensor.shape != like.shape:
        raise WeightsError(f"{file} holds {name!r} with shape {list(tensor.shape)}, but the model has "
                           f"{list(like.shape)}: the files are another model's (or another config's) "
                           "weights. Build the model from the config saved with them.")
    return tensor if tensor.dtype == like.dtype else tensor.to(like.dtype)


def _files(path: Path) -> list[Path]:
    """The safetensors files ``path`` names: itself, a directory's, or an index's shards."""
    if not path.exists():
        raise WeightsError(f"weights={str(path)!r} does not exist; pass the directory the model was "
                           "saved to (save_pretrained) or a .safetensors file.")
    if path.is_dir():
        path = _weights_file_in(path)
    if path.name.endswith(".safetensors.index.json"):
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{path} has no 'weight_map'; is it a safetensors index?")
        return sorted({path.parent / shard for shard in weight_map.values()})
    if path.suffix == ".safetensors":
        return [path]
    raise WeightsError(f"weights={str(path)!r} is neither a .safetensors file nor a safetensors index; "
                       "save the weights with save_pretrained (safe_serialization, the default) or "
                       "safetensors.torch.save_file.")


def _entries(files: list[Path]) -> dict[str, Entry]:
    """Where each tensor of the files lies (their headers read, nothing else)."""
    entries: dict[str, Entry] = {}
    for file in files:
        with open(file, "rb") as opened:
            try:
                (length,) = struct.unpack("<Q", opened.read(8))
                header = json.loads(opened.read(length))
            except (struct.error, ValueError) as exc:
                raise WeightsError(f"{file} is not a safetensors file ({exc}).") from exc
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise WeightsError(f"{file} stores {name!r} as {info['dtype']}, which asyncfx cannot read.")
            start, end = info["data_offsets"]
            entries[name] = Entry(file, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + start,
                                  8 + length + end)
    return entries


def _weights_file_in(directory: Path) -> Path:
    """A model directory's index file, else its one safetensors file."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    files = sorted(directory.glob("*.safetensors"))
    found = indexes or files
    if len(found) == 1:
        return found[0]
    if not found:
        raise WeightsError(f"{directory} holds no .safetensors file; save the model there with "
                           "save_pretrained (safe_serialization, the default).")
    raise WeightsError(f"{directory} holds several weight files ({', '.join(f.name for f in found)}); "
                       "pass the one to load (a variant such as .fp16, or the index) as weights=.")
