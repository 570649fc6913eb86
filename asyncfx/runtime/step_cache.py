"""Step caches: at some steps, modules of the model are not computed; what they made
at an earlier step is reused, or forecast from it, instead.

A step cache is a *policy*: for each cached module (or chain of blocks, see
``chain_skip``), a rule says at which calls of a stream it is computed and, at the
others, what stands for its outputs. Rules decide each call as it comes, from its place
in its stream (and, where a rule says so, the sampler's timestep then), so every stage,
device and rank takes the same decisions without talking; only the first-block cache
decides from values, in one stage, which the others then read. Each stage applies the
rules to the modules whose outputs it computes, on what it remembers of them itself:
the values stay where the stage runs. A run follows the decisions of its *origin*
(``StageRun.origin``), the call whose stage-0 run what it reads comes from: at a
parallel step stage ``k`` works on the values that entered stage 0 ``k`` steps earlier,
and computes or skips as that call decided, as the model with the cache computes that
call. (Deciding by the current call instead would have a later stage compute, with one
step staleness, from exactly the calls an earlier stage skipped.)

The rules are ``asyncfx.cache_rules``'s; ``asyncfx.cache_hooks.step_cache_rules`` reads
them from diffusers' hooks.

Example:
    >>> cache, decided = StepCache([asyncfx.cache_rules.ReuseEvery("blocks.0.attn", period=2)]), {}
    >>> [cache.step(call, decided).decided[call]["blocks.0.attn"] for call in range(4)]
    [True, False, True, False]
"""
from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from asyncfx.cache_rules import Rule, SkipChain
from asyncfx.errors import PlanError
from asyncfx.cache_hooks import step_cache_rules
from asyncfx.program import StageEditor
from asyncfx.runtime.chain_skip import ChainPart, chain_part, check_decided


class StepCache:
    """The rules of a model's step cache, and the stage copies that apply them.

    ``step(call)`` decides a call; ``CacheCall`` runs one stage for it. Stage copies are
    made through the program's ``StageEditor`` once per stage module and set of
    substituted modules, and kept while the stage module lives.
    """

    def __init__(self, rules: Iterable[Rule]):
        self.rules: dict[str, Rule] = {rule.module: rule for rule in rules}
        self._found: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._variants: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # stage threads make their copies at once

    def step(self, call: int, decided: dict[int, dict[str, bool | None]]) -> "CacheStep":
        """Decide call ``call`` of a stream (0: its first), into ``decided``, the stream's
        decisions by call, which the runs of this and later calls follow (None: the stage
        of a chain's first block decides, ``chain_skip``)."""
        decided[call] = {module: rule.computes(call) for module, rule in self.rules.items()}
        return CacheStep(self, decided)

    def outputs_in(self, stage: nn.Module, editor: StageEditor) -> dict[str, tuple[str, ...]]:
        """The cached modules whose outputs ``stage`` computes, with their value names."""
        return self._in(stage, editor)[0]

    def chains_in(self, stage: nn.Module, editor: StageEditor) -> list[ChainPart]:
        """The parts of skipped chains in ``stage``."""
        return self._in(stage, editor)[1]

    def _in(self, stage: nn.Module,
            editor: StageEditor) -> tuple[dict[str, tuple[str, ...]], list[ChainPart]]:
        with self._lock:
            if stage not in self._found:
                modules = {module: editor.module_outputs(stage, module)
                           for module, rule in self.rules.items() if not isinstance(rule, SkipChain)}
                parts = [chain_part(rule, stage, editor) for rule in self.rules.values()
                         if isinstance(rule, SkipChain)]
                self._found[stage] = ({module: names for module, names in modules.items() if names},
                                      [part for part in parts if part is not None])
            return self._found[stage]

    def deciding_stages(self, stages: Sequence[nn.Module], editor: StageEditor) -> dict[str, int]:
        """For each chain decided from values (first-block cache), the stage that decides it:
        the one holding its first block."""
        return {part.rule.module: index for index, stage in enumerate(stages)
                for part in self.chains_in(stage, editor) if part.first is not None}

    def variant(self, stage: nn.Module, editor: StageEditor, substituted: tuple[str, ...],
                kept: tuple[str, ...], bypassed: tuple[tuple[str, str, bool], ...] = ()) -> nn.Module:
        return self._copy(stage, (substituted, kept, bypassed),
                          lambda: editor.substituting(stage, substituted, kept, bypassed))

    def computing(self, stage: nn.Module, editor: StageEditor, names: tuple[str, ...]) -> nn.Module:
        return self._copy(stage, names, lambda: editor.computing(stage, names))

    def _copy(self, stage: nn.Module, key: tuple, make: Callable[[], nn.Module]) -> nn.Module:
        """The copy of ``stage`` kept under ``key``, made by ``make`` the first time."""
        with self._lock:
            copies = self._variants.setdefault(stage, {})
            if key not in copies:
                copies[key] = make()
            return copies[key]


class CacheMemory:
    """What the stages of one stream (one batch group's) remember of their cached modules,
    by (stage, module), and the log of what each run substituted: ``(origin, stage,
    modules)``. A stream's is ``denoiser.captures()[0].streams[key].store.cache_memory``."""

    def __init__(self) -> None:
        self.kept: dict[tuple[int, str], dict[str, Any]] = {}
        self.log: list[tuple[int, int, tuple[str, ...]]] = []


@dataclasses.dataclass(frozen=True)
class CacheStep:
    """A call's part in its runs: the stream's decisions so far, by call."""

    cache: StepCache
    decided: Mapping[int, dict[str, bool | None]]

    def run(self, stage: int, origin: int | None, memory: CacheMemory, editor: StageEditor) -> "CacheCall":
        """The cache's part in a run of ``stage`` whose values come from call ``origin``
        (see the module note), on ``memory``."""
        if origin is None:
            raise PlanError("a step cache needs each run's origin, which stride-2 rounds do not have: "
                            "partition with stride=1.")
        return CacheCall(self.cache, origin, self.decided[origin], stage, memory, editor)


@dataclasses.dataclass(frozen=True)
class CacheCall:
    """The last argument of a stage run under a step cache (``call_stage`` applies it):
    the run follows the decisions of call ``call`` (its origin)."""

    cache: StepCache
    call: int
    computes: dict[str, bool | None]  # written where a chain's first block decides
    stage: int
    memory: CacheMemory
    editor: StageEditor

    def to(self, device: Any, non_blocking: bool = False) -> "CacheCall":
        return self  # its values stay on the stage's device

    def __call__(self, module: nn.Module, args: Sequence[Any]) -> Any:
        cache, call, memory = self.cache, self.call, self.memory.kept
        outputs_of, parts = cache.outputs_in(module, self.editor), cache.chains_in(module, self.editor)
        if not outputs_of and not parts:
            return module(*args)
        substituted = tuple(m for m in outputs_of if not self.computes[m] and (self.stage, m) in memory)
        kept = tuple(m for m in outputs_of if m not in substituted)
        substitutes = {m: cache.rules[m].substitute(memory[self.stage, m], call) for m in substituted}
        names = _names(outputs_of, substituted)
        given = [value for m in substituted for value in substitutes[m]]
        chains = self._chains(module, args, parts)
        kept_names = _names(outputs_of, kept) + tuple(n for part in chains.measured for n in part.kept)
        variant = cache.variant(module, self.editor, names + chains.names, kept_names, chains.bypassed)
        outputs, made = variant(*args, *given, *chains.given, *chains.residuals)
        owners = [(m, cache.rules[m]) for m in kept] + [(p.rule.module, p) for p in chains.measured]
        remembered = _split(made, [len(outputs_of[m]) for m in kept] + [len(p.kept) for p in chains.measured],
                            owners)
        remembered += [((m, cache.rules[m]), substitutes[m]) for m in substituted
                       if cache.rules[m].remembers_substitutes]
        for (key, owner), values in remembered:  # a rule, or a chain's part here
            own = memory.setdefault((self.stage, key), {})
            if own.get("call") != call:  # the first parallel step computes its origin again: kept once
                owner.remember(own, values, call)
        self.memory.log.append((call, self.stage, substituted + chains.skipped))
        return outputs

    def _chains(self, module: nn.Module, args: Sequence[Any], parts: Sequence[ChainPart]) -> "_Chains":
        """What the stage's parts of skipped chains add to its run at this call."""
        chains = _Chains()
        for part in parts:
            if part.first is not None:  # the first block first: the decision reads its residual
                chains.names += part.first.outputs
                chains.given += self._first_block(module, args, part)
            memory = self.memory.kept.get((self.stage, part.rule.module), {})
            computes = check_decided(part.rule, self.computes[part.rule.module], self.call)
            if not computes and "residuals" in memory:
                chains.skipped += part.blocks
                chains.bypassed += part.bypassed
                chains.residuals += part.residuals(memory)
            else:
                chains.measured.append(part)
        return chains

    def _first_block(self, module: nn.Module, args: Sequence[Any], part: ChainPart) -> list[Any]:
        """Compute a deciding chain's first block, decide the call where it is not decided
        yet, and give the block's outputs, which the stage then reads instead."""
        first = part.first
        values = self.cache.computing(module, self.editor, first.computed)(*args)
        if self.computes[part.rule.module] is None:
            memory = self.memory.kept.setdefault((self.stage, "first block of " + part.rule.module), {})
            self.computes[part.rule.module] = first.decide(part.rule, values, memory)
        return list(values[:len(first.outputs)])


@dataclasses.dataclass
class _Chains:
    """The parts of skipped chains in one run: the values they give the stage (``names``,
    ``given``), the blocks skipped and the values standing in for their results, and the
    parts computed, whose residuals are measured."""

    names: tuple[str, ...] = ()
    given: list[Any] = dataclasses.field(default_factory=list)
    skipped: tuple[str, ...] = ()
    bypassed: tuple[tuple[str, str, bool], ...] = ()
    residuals: list[Any] = dataclasses.field(default_factory=list)
    measured: list[ChainPart] = dataclasses.field(default_factory=list)


class CacheWatch:
    """The step cache of a model as its hooks are now: read again when they change (a
    cache enabled, disabled or configured anew, before or after ``partition()``)."""

    def __init__(self) -> None:
        self._signature: tuple = ()
        self._cache: StepCache | None = None

    def current(self, model: nn.Module, signature: tuple, stride: int, groups: int = 1) -> StepCache | None:
        """The cache of ``model``, whose diffusers hooks are now ``signature``
        (``integration.hooks_signature``), None without one; refused with ``stride`` 2
        (``check_stride``), and one that decides from values with batch groups
        (``check_groups``)."""
        if signature != self._signature:
            rules = step_cache_rules(model)
            self._signature, self._cache = signature, StepCache(rules) if rules else None
        if self._cache is not None:
            check_stride(type(model).__name__, len(self._cache.rules), stride)
            check_groups(type(model).__name__, self._cache.rules.values(), groups)
        return self._cache


def check_stride(model_class: str, cached_modules: int, stride: int) -> None:
    """Refuse a step cache with stride 2, whose rounds compute two steps' stages at one
    call: a cache decides per step."""
    if cached_modules and stride == 2:
        raise PlanError(f"{model_class} has a step cache enabled ({cached_modules} cached modules), and "
                        "stride=2 rounds compute two steps' stages at one call, while the cache decides "
                        "per step. Partition with stride=1, or call model.disable_cache().")


def check_groups(model_class: str, rules: Iterable[Rule], groups: int) -> None:
    """Refuse a cache that decides from values (first-block cache) with batch groups: each
    group would decide from its share of the batch, where the model decides from all of it."""
    if groups > 1 and any(isinstance(rule, SkipChain) and rule.decided_by_values for rule in rules):
        raise PlanError(f"{model_class} has a first-block cache, which decides from the whole batch's values "
                        f"whether to skip a step, and layout {groups}x... splits the batch over {groups} "
                        "groups of devices, each of which would decide from its share alone. Partition with "
                        "layout='1xN', or use MagCacheConfig.")


def _split(values: Sequence[Any], counts: Sequence[int],
           owners: Sequence[Any]) -> list[tuple[Any, Sequence[Any]]]:
    """``values`` cut into consecutive runs of ``counts``, each with its owner."""
    runs, start = [], 0
    for owner, count in zip(owners, counts):
        runs.append((owner, values[start:start + count]))
        start += count
    return runs


def _names(outputs_of: Mapping[str, tuple[str, ...]], modules: Sequence[str]) -> tuple[str, ...]:
    return tuple(name for m in modules for name in outputs_of[m])


def call_stage(module: nn.Module, args: Sequence[Any]) -> Any:
    """Run a stage on its arguments, through the step cache where the last one says so.

    Example:
        >>> outputs = call_stage(stage_module, stage_arguments(program, run, inputs, store.get))
    """
    if args and isinstance(args[-1], CacheCall):
        return args[-1](module, args[:-1])
    return module(*args)
