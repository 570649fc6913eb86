"""The ``node.meta`` keys asyncfx passes write, and the value classes of the classify pass.

Each key has exactly one owning pass; other code only reads it.
"""
from __future__ import annotations

import enum

#: fx node kinds that compute something (the others are inputs, weights and the output).
COMPUTE_OPS = ("call_function", "call_method", "call_module")

#: Written by ``classify``: the node's :class:`ValueClass`.
VALUE_CLASS = "asyncfx_value_class"
#: Written by ``estimate_cost``: floating-point operations of the node (int).
FLOPS = "asyncfx_flops"
#: Written by ``estimate_cost``: bytes the node reads and writes (int).
BYTES = "asyncfx_bytes"
#: Written by ``profile_nodes``: median measured seconds of the node on its device (float).
MEASURED_SECONDS = "asyncfx_measured_seconds"
#: Written by ``capture`` (``torch.export`` writes it itself): the node's value, a fake or
#: meta tensor (or a pytree of them) carrying shape and dtype.
VALUE = "val"


class ValueClass(enum.IntEnum):
    """How often a value changes during one generation, ordered so that a node's class
    is the largest class among its inputs."""

    #: Depends only on inputs constant over a generation (text embeddings, class
    #: labels, position ids) and on constants (weights). Computed once per generation.
    STATIC = 0
    #: Depends on the timestep (and static values) but not on the latent. Recomputed
    #: locally every step by each stage that needs it; never sent between stages.
    STEP = 1
    #: Depends on the latent. Cut into stages; crosses stage boundaries one step stale.
    LATENT = 2

    def __str__(self) -> str:
        return self.name.lower()
