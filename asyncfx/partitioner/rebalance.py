"""Re-cutting a plan from the stage times the runtime measures.

A cost model prices the nodes before anything runs (FLOPs and bytes on a roofline, or
a profile) and can be far off where the stages run: on CPUs a stage of many small or
memory-bound operations takes longer than its FLOPs say. The runtime times every stage
where it runs it (one after another at warm-up steps, all at once at parallel steps;
``runtime.executor.StageTimes``). A plan whose measured balance (slowest stage over the
mean) is worse than ``1 + TOLERANCE``, with the slowest stage at least
``MIN_SAVING_SECONDS`` above the mean, is cut again: each stage's node costs are scaled
by what was measured (``refine.corrected_scale``), the cuts are searched again, and the
runtime runs the new plan from its next warm-up step on. Measurements of each new plan
correct the costs further. A plan that measures slower than an earlier one measured the
same way is replaced by that one, and re-cutting ends there, when the corrected costs
cut the graph no other way, when a plan measures balanced with its stages running at
once (parallel steps), or after ``MAX_RECUTS`` re-cuts. A finished plan is final: the
runtime then releases the weights no stage of its process reads.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import NamedTuple, Sequence

from asyncfx.partitioner.cost_model import CostModel
from asyncfx.partitioner.make_plan import plan_from_cuts
from asyncfx.partitioner.refine import corrected_scale, plan_positions
from asyncfx.partitioner.search import search_cuts
from asyncfx.plan import StagePlan

logger = logging.getLogger(__name__)

#: How far above perfect balance (max/mean of the stage times, 1.0) a plan may measure.
TOLERANCE = 0.05
#: A re-cut is worth its cost (splitting again, new stage copies) only where the slowest
#: stage takes at least this much longer than the mean at every step.
MIN_SAVING_SECONDS = 1e-3
#: Re-cuts of one capture at most.
MAX_RECUTS = 4


class _Measured(NamedTuple):
    slowest: float
    parallel: bool
    plan: StagePlan
    model: CostModel


@dataclasses.dataclass
class Rebalancer:
    """The plan a capture runs and the cost model it was cut with, corrected by what the
    runtime measures of it.

    Example:
        >>> rebalancer = Rebalancer(model, plan)
        >>> better = rebalancer.observe([0.30, 0.10], parallel=True)   # None: keep the plan
    """

    model: CostModel
    plan: StagePlan
    recuts: int = 0
    finished: bool = False
    best: _Measured | None = None

    def observe(self, seconds: Sequence[float], parallel: bool) -> StagePlan | None:
        """The plan to run from now on, given the measured seconds of each stage of the
        current one (``parallel``: all stages ran at once), or None to keep it."""
        if self.finished:
            return None
        plan = self.plan
        for stage, measured_seconds in zip(plan.stages, seconds):
            stage.measured_seconds = float(measured_seconds)
        earlier = self.best
        if (earlier is not None and earlier.plan is not plan and earlier.parallel == parallel
                and max(seconds) > earlier.slowest * (1 + TOLERANCE)):
            return self._back_to(earlier, seconds)
        if earlier is None or earlier.parallel != parallel or max(seconds) < earlier.slowest:
            self.best = _Measured(max(seconds), parallel, plan, self.model)
        measured = balance(seconds)
        if measured <= 1 + TOLERANCE or max(seconds) - statistics.mean(seconds) < MIN_SAVING_SECONDS:
            self.finished = parallel  # balanced where it counts: the plan is final
            return None
        if self.recuts >= MAX_RECUTS:
            self.finished = True
            return None
        return self._recut(seconds, parallel, measured)

    def _recut(self, seconds: Sequence[float], parallel: bool, measured: float) -> StagePlan | None:
        plan = self.plan
        predicted = balance(self.model.predict(plan_positions(plan)).stage_compute)
        corrected = self.model.rescaled(corrected_scale(self.model, plan_positions(plan), seconds))
        cuts = search_cuts(corrected, plan.n_stages)
        if [c.position for c in cuts] == plan_positions(plan):
            self.finished = True
            logger.info("%s: plan kept: stages measured %s, max/mean %.3f, and the costs corrected by "
                        "them cut the graph no other way", plan.model_class, _seconds(seconds), measured)
            return None
        new = plan_from_cuts(corrected, cuts)
        expected = balance([s.estimated_cost for s in new.stages])
        note = (f"re-cut {self.recuts + 1}: stages measured {_seconds(seconds)} "
                f"({'all at once' if parallel else 'one after another'}), max/mean {measured:.3f} where "
                f"{predicted:.3f} was predicted; the new cuts are predicted at max/mean {expected:.3f}")
        new.notes = [*plan.notes, note]
        logger.info("%s: %s", plan.model_class, note)
        self.recuts += 1
        self.plan, self.model = new, corrected
        return new

    def _back_to(self, earlier: _Measured, seconds: Sequence[float]) -> StagePlan:
        note = (f"back to an earlier plan: the last re-cut measured {_seconds(seconds)}, its slowest stage "
                f"slower than the earlier plan's {earlier.slowest * 1e3:.1f} ms")
        earlier.plan.notes = [*earlier.plan.notes, note]
        logger.info("%s: %s", self.plan.model_class, note)
        self.finished = True
        self.plan, self.model = earlier.plan, earlier.model
        return earlier.plan


def balance(stage_costs: Sequence[float]) -> float:
    """The slowest stage over the mean: 1.0 is perfectly balanced.

    Example:
        >>> balance([3.0, 1.0])
        1.5
    """
    mean = statistics.mean(stage_costs)
    return max(stage_costs) / mean if mean > 0 else 1.0


def _seconds(seconds: Sequence[float]) -> str:
    return " / ".join(f"{s * 1e3:.1f}" for s in seconds) + " ms"
