"""Profiles: measured per-node costs of a captured graph, saved as JSON artifacts."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import torch
from torch import nn

from asyncfx.artifact import load_json, save_json
from asyncfx.schema import SchemaError, from_json
from asyncfx.errors import PlanError
from asyncfx.partitioner.binding import LatentOption
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.cost_graph import CostGraph, build_cost_graph
from asyncfx.partitioner.examples import as_captured, split_example_inputs
from asyncfx.passes.profile import profile_nodes, timing_device

PROFILE_FORMAT = "asyncfx.Profile"
PROFILE_VERSION = 1


@dataclasses.dataclass
class Profile:
    """Measured node costs plus the graph facts cut search needs, keyed by node name and
    the graph fingerprint. Compile plans from it offline with ``asyncfx compile``.

    Example:
        >>> prof = asyncfx.profile(model, example_inputs=(args, kwargs))
        >>> prof.save("profile.json")
        >>> plan = asyncfx.compile(model, 4, example_inputs=(args, kwargs), cost="measure",
        ...                        profile=asyncfx.Profile.load("profile.json"))
    """

    graph: CostGraph
    device: str                   # where the nodes were timed, e.g. "cpu" or "cuda:0"
    threads: int                  # torch intra-op threads while timing
    warmup: int
    repeats: int
    model: str | None = None      # how the command line built the model, if it did

    @property
    def fingerprint(self) -> str:
        return self.graph.fingerprint

    def node_seconds(self) -> dict[str, float]:
        return {n.name: n.measured_seconds for n in [*self.graph.nodes, *self.graph.side_nodes]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON (atomically: a failed write leaves no partial file)."""
        save_json(path, {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        data = load_json(path, "profile", PROFILE_FORMAT, PROFILE_VERSION,
                         "make one with `asyncfx profile` or asyncfx.profile().")
        try:
            return from_json(cls, data)
        except SchemaError as exc:
            raise PlanError(f"profile {os.fspath(path)!r} is malformed: {exc}; profile again.") from None


def profile(model_or_captured: nn.Module, example_inputs: Any, *, warmup: int = 2, repeats: int = 5,
            latent: LatentOption = None, timestep: str | None = None) -> Profile:
    """Time every node of the model on the device its inputs live on.

    Example:
        >>> prof = asyncfx.profile(model, (args, kwargs), repeats=5)
        >>> sorted(prof.node_seconds().items(), key=lambda kv: -kv[1])[:3]   # slowest nodes
    """
    captured = as_captured(model_or_captured, example_inputs, latent, timestep)
    args, kwargs = split_example_inputs(example_inputs)
    return profile_captured(captured, captured.interface.flatten(args, kwargs), warmup=warmup,
                            repeats=repeats)


def profile_captured(captured: Captured, flat_inputs: Sequence[torch.Tensor], *, warmup: int = 2,
                     repeats: int = 5, model: str | None = None, on_run: Callable[[], None] | None = None,
                     on_cost_graph: Callable[[], None] | None = None) -> Profile:
    """The profile of a capture timed on ``flat_inputs``; ``on_run`` is called after each run,
    ``on_cost_graph`` before the cost graph is built (seconds for a large model)."""
    profile_nodes(captured.graph_module, flat_inputs, warmup=warmup, repeats=repeats, on_run=on_run)
    if on_cost_graph is not None:
        on_cost_graph()
    device = str(timing_device(flat_inputs))
    return Profile(graph=build_cost_graph(captured), device=device, threads=torch.get_num_threads(),
                   warmup=warmup, repeats=repeats, model=model)
