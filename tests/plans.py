"""A hand-made StagePlan whose numbers are easy to check by hand."""
from __future__ import annotations

from asyncfx.plan import BoundaryTensor, PlanInput, StageInfo, StagePlan


def hand_plan(stage_ms=(10.0, 12.0, 8.0), measured=True) -> StagePlan:
    """Three stages; stage 0 makes ``a`` (read by 1) halfway through and ``skip`` (read by 1
    and 2) at its end, stage 1 makes ``b`` (read by 2) at its end. Latent: float32 1x4x8x8
    = 1,024 bytes."""
    names = [["n0", "a", "skip"], ["n1", "b"], ["n2", "out"]]
    stages = [StageInfo(index=k, nodes=nodes, first_module=f"block{k}", last_module=f"block{k}",
                        replicated_nodes=1, param_bytes=100, estimated_cost=ms / 1e3,
                        measured_seconds=ms / 1e3 if measured else None)
              for k, (nodes, ms) in enumerate(zip(names, stage_ms))]
    boundaries = [
        BoundaryTensor("skip", 0, [1, 2], [1, 64, 8, 8], "torch.float32", 16_000_000, "down.0", 1.0),
        BoundaryTensor("a", 0, [1], [1, 8, 8, 8], "torch.float32", 1_000_000, "down.1", 0.5),
        BoundaryTensor("b", 1, [2], [1, 8, 8, 8], "torch.float32", 2_000_000, "mid", 1.0),
    ]
    inputs = [PlanInput("sample", "latent", [1, 4, 8, 8], "torch.float32"),
              PlanInput("timestep", "timestep", [], "torch.int64")]
    return StagePlan(fingerprint="f" * 16, model_class="HandMade", inputs=inputs, stages=stages,
                     boundaries=boundaries, cost="measure", cost_unit="seconds", total_param_bytes=300,
                     link="cpu", predicted_round=max(stage_ms) / 1e3, sequential_cost=0.028,
                     measured_sequential=0.027 if measured else None)
