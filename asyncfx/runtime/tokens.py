"""Tokens for the call clock's facts: how the denoiser says that a call's conditioning
is the same as the previous call's (the same live objects, or equal values), without the
clock, a pure function, knowing about tensors."""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch

from asyncfx.runtime.timesteps import same_values


class Same:
    """A clock token equal to another for the same live object (held weakly where it can be:
    a tensor, which a later object could otherwise never reuse the address of)."""

    __slots__ = ("ref",)

    def __init__(self, value: Any):
        try:
            self.ref = weakref.ref(value)
        except TypeError:  # a list of timesteps: held as it is
            self.ref = lambda: value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same) and other.ref() is self.ref() and self.ref() is not None

    __hash__ = None  # type: ignore[assignment]


class Equal:
    """A clock token equal to another for tensors of equal values (same objects first)."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Equal) and len(other) == len(self)
                and all(map(same_values, self.tensors, other.tensors)))

    __hash__ = None  # type: ignore[assignment]
