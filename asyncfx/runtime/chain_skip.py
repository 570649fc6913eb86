"""A skipped chain of blocks (``cache_rules.SkipChain``: MagCache, first-block cache), stage
by stage.

At a skipped call the chain's results are its arguments plus the residual it added at
its last computed call. Cut into stages (cuts never split a block whose call the capture
recorded), the chain's part in each stage is skipped the same way with the residual of
that part, which the stage keeps itself: the parts' residuals add up to the chain's, so
no stage needs another's values. A first-block cache decides from values: the stage
holding the first block computes it first (``computing``), compares its residual with
the one at the last computed call, and writes the decision where the stream's other
stages read it (the decisions by call, ``CacheStep.decided``).

Example:
    >>> part = chain_part(rule, stage_module, editor)
    >>> part.blocks, part.bypassed
    (('single_transformer_blocks.0',), (('slice_6', 'add_15', True), ('slice_5', 'add_11', False)))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from asyncfx.cache_rules import ChainBlock, SkipChain
from asyncfx.errors import PlanError
from asyncfx.program import BlockCall, StageEditor


@dataclasses.dataclass(frozen=True)
class ChainPart:
    """A chain's part in one stage: its skipped blocks here, the values that stand in for
    their results at a skipped call (``(result, argument, plus a residual)``), and, in the
    stage of a first block that decides, the values that decision reads."""

    rule: SkipChain
    blocks: tuple[str, ...]
    bypassed: tuple[tuple[str, str, bool], ...]
    first: "FirstBlock | None" = None

    @property
    def offsets(self) -> tuple[tuple[str, str, bool], ...]:
        return tuple(b for b in self.bypassed if b[2])

    @property
    def kept(self) -> tuple[str, ...]:
        """The values a computed call keeps to measure the residuals."""
        return tuple(name for result, argument, _ in self.offsets for name in (result, argument))

    def remember(self, memory: dict[str, Any], kept: Sequence[torch.Tensor], call: int) -> None:
        memory["residuals"] = tuple(kept[i] - kept[i + 1] for i in range(0, len(kept), 2))
        memory["call"] = call

    def residuals(self, memory: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        return memory["residuals"]


@dataclasses.dataclass(frozen=True)
class FirstBlock:
    """The first block of a chain that decides from values, in its stage: what its call
    makes that the stage reads on (``outputs``), and its hidden argument and result."""

    outputs: tuple[str, ...]
    argument: str
    result: str

    @property
    def computed(self) -> tuple[str, ...]:
        return (*self.outputs, self.argument, self.result)

    def decide(self, rule: SkipChain, values: Sequence[torch.Tensor], memory: dict[str, Any]) -> bool:
        """Whether the call computes the chain, from the first block's values (in the
        order of ``computed``); remembers the residual of a computed call."""
        residual = values[-1] - values[-2]
        computes = rule.policy.computes(residual, memory.get("first_residual"))
        if computes:
            memory["first_residual"] = residual
        return computes


def chain_part(rule: SkipChain, stage: nn.Module, editor: StageEditor) -> ChainPart | None:
    """The part of ``rule``'s chain in ``stage``: None where it holds neither a skipped
    block nor a deciding first block.

    Example:
        >>> chain_part(rule, first_stage, editor).first.argument   # a first-block cache
        'linear'
    """
    skipped = rule.blocks[rule.skipped_from:]
    calls = [(block, editor.block_call(stage, block.path)) for block in skipped]
    here = [(block, call) for block, call in calls if call is not None]
    head = editor.block_call(stage, rule.blocks[0].path) if rule.decided_by_values else None
    if not here and head is None:
        return None
    _check_recorded(rule, [call for _, call in here] + ([head] if head is not None else []))
    _check_consecutive(rule, [block for block, _ in here], skipped)
    bypassed = _bypassed(rule, here[0], here[-1]) if here else ()
    first = _first_block(rule, stage, editor, head) if head is not None else None
    return ChainPart(rule, tuple(block.path for block, _ in here), bypassed, first)


def _first_block(rule: SkipChain, stage: nn.Module, editor: StageEditor, call: BlockCall) -> FirstBlock:
    head = rule.blocks[0]
    return FirstBlock(editor.module_outputs(stage, head.path),
                      _value(call, "arguments", head.hidden_argument),
                      _value(call, "results", head.hidden_result or 0))


def _bypassed(rule: SkipChain, first: tuple[ChainBlock, BlockCall],
              last: tuple[ChainBlock, BlockCall]) -> tuple[tuple[str, str, bool], ...]:
    """The last block's results stood in for by the first block's arguments: hidden
    states plus their residual, the encoder's plus theirs where the rule says so (a
    result no one reads is left alone)."""
    (first_block, first_call), (last_block, last_call) = first, last
    bypassed = []
    hidden = last_call.results.get(last_block.hidden_result or 0)
    if hidden is None:
        raise PlanError(f"block {last_block.path} of the chain {rule.module} is split between two stages, "
                        "and the step cache skips whole blocks: the plan was cut without the cache. Enable "
                        "the cache before partitioning (cuts then fall between blocks), or make the plan "
                        "again with it enabled.")
    bypassed.append((hidden, _value(first_call, "arguments", first_block.hidden_argument), True))
    if last_block.encoder_result is not None and last_block.encoder_result in last_call.results:
        encoder = _value(first_call, "arguments", first_block.encoder_argument)
        bypassed.append((last_call.results[last_block.encoder_result], encoder, rule.encoder_residual))
    return tuple(bypassed)


def _value(call: BlockCall, kind: str, key: str | int) -> str:
    values = getattr(call, kind)
    if key not in values:
        raise PlanError(f"the capture recorded no tensor {kind[:-1]} {key!r} of {call.path}'s call, which "
                        "the step cache skipping its chain of blocks carries over it: the block takes or "
                        "returns it in a form the cache does not know. Call model.disable_cache(), or use "
                        "PyramidAttentionBroadcastConfig or TaylorSeerCacheConfig.")
    return values[key]


def _check_recorded(rule: SkipChain, calls: list[BlockCall]) -> None:
    """The capture recorded the blocks' calls only where the cache was on the model then."""
    if calls and not any(call.arguments or call.results for call in calls):
        raise PlanError(f"the step cache skipping the chain {rule.module} was enabled after the model was "
                        "captured, and a capture records the calls of a chain's blocks only when the cache "
                        "is on the model then. Enable it before the first call of the partitioned model "
                        "(before partition(), or right after), or partition the model again.")


def _check_consecutive(rule: SkipChain, here: list[ChainBlock], skipped: tuple[ChainBlock, ...]) -> None:
    if here and list(skipped).index(here[-1]) - list(skipped).index(here[0]) + 1 != len(here):
        raise PlanError(f"a stage holds blocks {here[0].path} and {here[-1].path} of the chain {rule.module} "
                        "but not all those between: its blocks are not called in their order. Call "
                        "model.disable_cache(), or use PyramidAttentionBroadcastConfig.")


def check_decided(rule: SkipChain, decision: bool | None, call: int) -> bool:
    """A stage's decision for a chain at ``call``, which the first block's stage made.

    Example:
        >>> check_decided(rule, decided[call][rule.module], call)
        True
    """
    if decision is None:
        raise PlanError(f"no decision for the chain {rule.module} at call {call}: the stage of its first "
                        "block decides from values, and under torch.distributed that stage runs on another "
                        "rank. Use executor='local' (or 'serial'), or MagCacheConfig, whose schedule every "
                        "rank reads itself.")
    return decision
