"""The compiler as the runtime sees it (``asyncfx.program.Frontend``): ``partition()``'s
denoiser captures through it at a model's first call, and lowers at the last warm-up
step, compiling a plan unless one was given."""
from __future__ import annotations

import dataclasses

from torch import nn

from asyncfx.partitioner.binding import LatentOption
from asyncfx.partitioner.capture import capture
from asyncfx.partitioner.captured import Captured
from asyncfx.partitioner.compile import compile
from asyncfx.partitioner.device import DeviceSpec
from asyncfx.partitioner.lower import lower
from asyncfx.plan import StagePlan
from asyncfx.program import CallSpec, Program


@dataclasses.dataclass(frozen=True)
class PartitionFrontend:
    """Captures with ``latent``/``timestep``, compiles ``n_stages`` stages with ``cost`` and
    ``link`` (or takes ``plan``). ``rank_zero_decides``: under torch.distributed, rank 0
    compiles and every rank takes its plan (measured costs would differ per rank).

    Example:
        >>> frontend = PartitionFrontend(n_stages=2)
        >>> program = frontend.capture(model, args, kwargs).lower()
    """

    n_stages: int
    cost: str = "flops"
    link: str | DeviceSpec = "cpu"
    latent: LatentOption = None
    timestep: str | None = None
    plan: StagePlan | None = None
    rank_zero_decides: bool = False

    def capture(self, model: nn.Module, args: tuple, kwargs: dict) -> CapturedCall:
        captured = model if isinstance(model, Captured) else capture(
            model, args, kwargs, latent=self.latent, timestep=self.timestep)
        return CapturedCall(self, captured, (args, kwargs))

    def compile(self, captured: Captured, example: tuple[tuple, dict]) -> StagePlan:
        if self.plan is not None:
            return self.plan
        if not self.rank_zero_decides:
            return compile(captured, self.n_stages, cost=self.cost, link=self.link, example_inputs=example)
        import torch.distributed as dist

        box = [compile(captured, self.n_stages, cost=self.cost, link=self.link, example_inputs=example).to_dict()
               if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return StagePlan.from_dict(box[0])


@dataclasses.dataclass(frozen=True)
class CapturedCall:
    """A capture for the runtime (``asyncfx.program.Lowering``): its call spec, and the
    program made from it on demand."""

    frontend: PartitionFrontend
    captured: Captured
    example: tuple[tuple, dict]

    @property
    def call(self) -> CallSpec:
        return self.captured.call

    def lower(self) -> Program:
        return lower(self.captured, self.frontend.compile(self.captured, self.example))
