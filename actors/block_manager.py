"""The block manager: splits the KV memory budget between models, and keeps the books.

Each model's blocks are handed out by the engine's ``BlockManager`` policy, synchronously inside
``schedule()``: a block decision is part of a scheduling decision, and a channel round trip per
step would add latency for nothing. What needs one owner across models is the *budget*, so that
is what this actor owns: at start-up it gives every model its share of the device's KV memory
(one GPU or the CPU budget), and afterwards it reports every model's free, used and cached blocks
from the figures each scheduler publishes after every step. Freeing an aborted request's blocks
happens in its scheduler (``engine.abort_request``), before any further step of that model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from mini_vllm.actors.scheduler import SchedulerActor
from mini_vllm.engine.block_manager import BlockStats
from mini_vllm.engine.config import EngineArgs


@attrs.frozen
class KvShare:
    """How one model's KV cache was sized at start-up."""

    model_index: int
    rule: str  # human-readable: where num_kv_blocks came from
    args: EngineArgs  # the engine args after the split


def plan_kv_budget(args: Sequence[EngineArgs]) -> list[KvShare]:
    """Give each of ``len(args)`` models its share of the KV memory.

    An explicit ``num_kv_blocks`` is kept. Otherwise on the CPU each model gets an equal part of
    ``cpu_kv_cache_bytes``; on a GPU, models load one after another and model ``k`` (1-based) of
    ``n`` may fill the device up to ``k/n`` of ``gpu_memory_utilization``, so every model gets an
    equal slice of the budget from which its own weights and activations are paid first.
    """
    n = len(args)
    shares = []
    for k, a in enumerate(args, start=1):
        if a.num_kv_blocks is not None:
            shares.append(KvShare(k - 1, f"num_kv_blocks={a.num_kv_blocks} (given)", a))
        elif a.resolved_device().type == "cuda":
            util = a.gpu_memory_utilization * k / n
            shares.append(
                KvShare(
                    k - 1,
                    f"GPU: up to {util:.3f} of device memory after models 1..{k - 1} (1/{n} each)",
                    attrs.evolve(a, gpu_memory_utilization=util),
                )
            )
        else:
            budget = max(1, a.cpu_kv_cache_bytes // n)
            shares.append(
                KvShare(
                    k - 1,
                    f"CPU: {budget} bytes (1/{n} of {a.cpu_kv_cache_bytes})",
                    attrs.evolve(a, cpu_kv_cache_bytes=budget),
                )
            )
    return shares


@attrs.frozen
class ModelBlocks:
    model: str
    rule: str
    blocks: BlockStats


@attrs.frozen
class BlockManagerStats:
    models: tuple[ModelBlocks, ...]

    @property
    def used_blocks(self) -> int:
        return sum(m.blocks.used_blocks for m in self.models)

    def of(self, model: str) -> BlockStats:
        for m in self.models:
            if m.model == model:
                return m.blocks
        raise KeyError(model)


class BlockManagerActor:
    """The owner of the KV split and the ledger of every model's blocks (see the module docstring)."""

    def __init__(self, schedulers: Mapping[str, SchedulerActor], rules: Mapping[str, str]) -> None:
        self._schedulers = dict(schedulers)
        self._rules = dict(rules)

    def statistics(self) -> BlockManagerStats:
        return BlockManagerStats(
            tuple(
                ModelBlocks(name, self._rules.get(name, ""), s.statistics().blocks)
                for name, s in self._schedulers.items()
            )
        )
