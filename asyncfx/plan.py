"""StagePlan: the contract between the compiler and the runtime.

A plain dataclass that round-trips through JSON: which latent nodes form each stage,
the tensors that cross stage boundaries, the graph inputs and their roles, and the
cost the compiler predicted. Nothing in it refers to Python objects, so a plan can be
compiled offline, saved, inspected and loaded by another process.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from asyncfx.errors import PlanError
from asyncfx.artifact import load_json, save_json
from asyncfx.schema import SchemaError, from_json

PLAN_FORMAT = "asyncfx.StagePlan"
PLAN_VERSION = 1


@dataclasses.dataclass
class PlanInput:
    """A tensor input of the graph: its placeholder name, role, shape and dtype."""

    name: str
    role: str
    shape: list[int]
    dtype: str

    def describe(self) -> str:
        """``sample (latent, float16[2, 4, 64, 64])``, as ``GraphInput.describe`` says it."""
        return f"{self.name} ({self.role}, {_tensor_type(self.dtype, self.shape)})"


@dataclasses.dataclass
class BoundaryTensor:
    """A latent value produced by one stage and read by later ones (one step stale)."""

    name: str               # the producing node, also the placeholder name in consumers
    producer: int
    consumers: list[int]
    shape: list[int]
    dtype: str
    bytes: int
    module: str             # module path of the producing node, "" at top level
    made_at: float = 1.0    # share of its stage's compute done when it is made (cost model)


@dataclasses.dataclass
class StageInfo:
    """One stage: its latent nodes (in order) and what the compiler knows about it."""

    index: int
    nodes: list[str]        # own latent nodes, topological order
    first_module: str
    last_module: str
    replicated_nodes: int   # step/static nodes this stage recomputes for itself
    param_bytes: int        # parameters and buffers the stage holds
    estimated_cost: float   # predicted compute, in the plan's cost unit
    cut_reason: str = ""    # why the cut before this stage sits where it does
    measured_seconds: float | None = None  # the stage module timed as a whole


@dataclasses.dataclass
class StagePlan:
    """How a captured graph is cut into stages.

    Example:
        >>> plan = asyncfx.compile(model, 2, example_inputs=(args, kwargs))
        >>> plan.n_stages
        2
        >>> plan.save("plan.json"); asyncfx.StagePlan.load("plan.json") == plan
        True
        >>> print(plan.summary())
    """

    fingerprint: str
    model_class: str
    inputs: list[PlanInput]
    stages: list[StageInfo]
    boundaries: list[BoundaryTensor]
    cost: str                      # "flops", "measure" or "uniform"
    cost_unit: str                 # what estimated_cost counts: "seconds" or "nodes"
    total_param_bytes: int
    link: str = "cpu"              # the DeviceSpec the cost model priced transfers with
    predicted_round: float = 0.0   # predicted time of one round (all stages), cost unit
    sequential_cost: float = 0.0   # predicted time of the whole model on one device, cost unit
    measured_sequential: float | None = None  # the whole model timed on one device, seconds
    devices: list[str] | None = None
    groups: int = 1                # batch groups, each running every stage on its share of the batch
    whole_batch_cost: float = 0.0  # predicted time of the whole batch on one device (groups only), cost unit
    notes: list[str] = dataclasses.field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def layout(self) -> str:
        """``"GxN"``: G batch groups, each running the N stages (costs are per group)."""
        return f"{self.groups}x{self.n_stages}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stage plan") -> "StagePlan":
        """The plan in ``data`` (a plan's JSON), checked against the plan's fields and for
        stages and boundaries that fit together; a PlanError names what is wrong."""
        try:
            plan = from_json(cls, data)
        except SchemaError as exc:
            raise PlanError(f"{source} is malformed: {exc}; compile it again.") from None
        problem = plan.inconsistency()
        if problem:
            raise PlanError(f"{source} is malformed: {problem}; compile it again.")
        return plan

    def inconsistency(self) -> str:
        """What makes the stages and boundaries not fit together ("" when they do)."""
        if not self.stages:
            return "it has no stages"
        if self.groups < 1:
            return f"groups is {self.groups}, not a positive number of batch groups"
        seen: set[str] = set()
        for k, stage in enumerate(self.stages):
            if stage.index != k:
                return f"stages[{k}] has index {stage.index}"
            if not stage.nodes:
                return f"stages[{k}] has no nodes"
            twice = seen.intersection(stage.nodes)
            if twice:
                return f"node {sorted(twice)[0]!r} is in two stages"
            seen.update(stage.nodes)
        for b in self.boundaries:
            if not 0 <= b.producer < self.n_stages or not b.consumers or not all(
                    b.producer < c < self.n_stages for c in b.consumers):
                return (f"boundary {b.name!r} is made by stage {b.producer} for stages {b.consumers}, "
                        f"which {self.n_stages} stages cannot hold")
        return ""

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON (atomically: a failed write leaves no partial file)."""
        save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StagePlan":
        return cls.from_dict(load_json(path, "stage plan", PLAN_FORMAT, PLAN_VERSION,
                                       "make one with asyncfx.compile() or `asyncfx compile`."),
                             f"stage plan {os.fspath(path)!r}")

    def summary(self) -> str:
        """A readable table of stages and boundary tensors."""
        total_cost = sum(s.estimated_cost for s in self.stages) or 1.0
        layout = (f"layout {self.layout}: {self.groups} batch groups of " if self.groups > 1 else "")
        lines = [f"StagePlan for {self.model_class}: {layout}{self.n_stages} stage(s), cost={self.cost} "
                 f"({self.cost_unit}), link={self.link}, graph {self.fingerprint}",
                 "inputs: " + ", ".join(i.describe() for i in self.inputs)]
        measured = [s.measured_seconds for s in self.stages if s.measured_seconds is not None]
        rows = [("stage", "first module", "last module", "nodes", "+repl", "params",
                 "predicted", "share") + (("measured", "error") if measured else ())]
        for s in self.stages:
            row = (str(s.index), s.first_module or "(top)", s.last_module or "(top)",
                   str(len(s.nodes)), str(s.replicated_nodes), format_bytes(s.param_bytes),
                   self.format_cost(s.estimated_cost), f"{s.estimated_cost / total_cost:.1%}")
            if measured:
                error = f"{s.estimated_cost / s.measured_seconds - 1:+.0%}" if s.measured_seconds else "-"
                row += (self.format_cost(s.measured_seconds), error)
            rows.append(row)
        lines += _table(rows)
        lines.append(f"predicted round (slowest stage or late transfer): "
                     f"{self.format_cost(self.predicted_round)}")
        if self.whole_batch_cost:
            lines.append(f"whole batch on one device: predicted {self.format_cost(self.whole_batch_cost)} "
                         f"(the rest of this table is one group's)")
        if self.sequential_cost:
            lines.append(f"whole model on one device: predicted {self.format_cost(self.sequential_cost)}"
                         + (f", measured {self.measured_sequential * 1e3:.3f} ms"
                            if self.measured_sequential is not None else ""))
        if measured:
            lines.append(f"measured slowest stage {self.format_cost(max(measured))}, balance "
                         f"max/mean {max(measured) / (sum(measured) / len(measured)):.3f}")
        replicated = sum(s.param_bytes for s in self.stages) - self.total_param_bytes
        lines.append(f"parameters: {format_bytes(self.total_param_bytes)} in the model, "
                     f"{format_bytes(replicated)} replicated across stages")
        if self.boundaries:
            lines.append("boundary tensors (each read one step stale by its consumers):")
            rows = [("tensor", "producer", "made at", "consumers", "shape", "dtype", "bytes", "module")]
            for b in self.boundaries:
                rows.append((b.name, str(b.producer), f"{b.made_at:.0%}", ",".join(map(str, b.consumers)),
                             "x".join(map(str, b.shape)), b.dtype.removeprefix("torch."),
                             format_bytes(b.bytes), b.module or "(top)"))
            lines += _table(rows)
            lines.append("bytes into each stage: " + ", ".join(
                f"{k}: {format_bytes(self.bytes_into(k))}" for k in range(self.n_stages))
                + " (partition(forecast=...) keeps three versions of each: twice as many bytes again "
                  "per stage)")
        reasons = [f"  cut before stage {s.index}: {s.cut_reason}" for s in self.stages if s.cut_reason]
        if reasons:
            lines += ["why the cuts sit where they do:"] + reasons
        lines += self.notes
        return "\n".join(lines)

    def format_cost(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value * 1e3:.3f} ms" if self.cost_unit == "seconds" else f"{value:.4g}"

    def bytes_into(self, stage: int) -> int:
        """Bytes of boundary tensors the stage receives each step."""
        return sum(b.bytes for b in self.boundaries if stage in b.consumers)


def format_bytes(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units)."""
    unit = "B"
    for bigger in ("KB", "MB", "GB"):
        if abs(n) < 1000:
            break
        n, unit = n / 1000, bigger
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def _tensor_type(dtype: str, shape: list[int]) -> str:
    return f"{dtype.removeprefix('torch.')}[{', '.join(map(str, shape))}]"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
