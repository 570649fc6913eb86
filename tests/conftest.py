"""Shared fixtures: the tiny model zoo, captured once per test session."""
from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree

import asyncfx
from asyncfx.zoo.tiny import ZOO


@functools.lru_cache(maxsize=None)
def zoo_example(name: str):
    """``(model, args, kwargs)`` for a zoo model, built once."""
    return ZOO[name]()


@functools.lru_cache(maxsize=None)
def zoo_captured(name: str) -> asyncfx.Captured:
    model, args, kwargs = zoo_example(name)
    return asyncfx.capture(model, args, kwargs)


def leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tuple, dataclass or tensor), in order."""
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def assert_same_output(got: Any, expected: Any) -> None:
    """Same output type and bitwise-equal tensors."""
    assert type(got) is type(expected)
    got_leaves, expected_leaves = leaves(got), leaves(expected)
    assert len(got_leaves) == len(expected_leaves)
    for g, e in zip(got_leaves, expected_leaves):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
