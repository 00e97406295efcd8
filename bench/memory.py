"""``mini-vllm bench memory``: how much of the KV memory holds real tokens, paged against contiguous.

No model and no device. The engine's own policy objects (``Scheduler`` and ``BlockManager``, with
real ``Request`` and ``Sequence`` records) are driven by the engine's own step loop
(``engine.step_loop``), serial as on the CPU: schedule a step, then land it through the engine's
own ``engine.landing.land_step`` (publish full blocks to the prefix cache, fork ``n > 1`` samples
after the prefill, place the token, finish a sequence at ``max_tokens`` / ``max_model_len`` and free
its blocks). Where the engine would run the model, made-up token ids are landed instead: KV memory
depends only on lengths, arrival order and the policies, so every block count is the engine's own.

Four measurements:

1. Waste over time. OFFLINE-256 with a pool large enough that nothing is ever preempted, so the
   schedule is the same for every block size, prefix caching on (the engine's default). Each step,
   after scheduling, every scheme's footprint for the running requests is split into live KV
   (tokens whose keys and values are written) and waste: *reserved but unused* (a contiguous
   reservation's room for tokens still to come, and the part that will never be written),
   *internal fragmentation* (the unused tail of each paged sequence's last block), and, apart, what
   *sharing* saved (blocks referenced by several sequences, counted once instead of per holder).
   Schemes: paged blocks of each size (the block manager's own counts) and two contiguous
   reservations per request, ``max_model_len`` or the exact final length ``prompt + max_tokens``.
2. Requests at once in one fixed KV budget, through the same scheduler: paged blocks of each size
   (and 16 with prefix caching on), against contiguous reservations of ``max_model_len`` and of the
   exact final length (a block manager whose blocks are one token and whose first allocation takes
   the whole reservation; it never fragments, so it is the contiguous schemes' best case).
3. Prefix caching: requests sharing a long system prompt, arriving one per step and all at once;
   hits, hit rate and evictions from ``BlockManager.statistics()``, and the memory sharing saved,
   against the same run uncached. OFFLINE-256's prompts are random, so measurement 1 shares nothing;
   this one shows what sharing is worth.
4. Parallel sampling: ``n`` samples forked from one prefill (copy-on-write), against ``n``
   independent requests.

The clock is the engine step: "mean" is the mean over steps; "token-weighted" divides the sums over
steps (a share of the memory-time product).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import attrs

from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.bench.env import cpu_name, git_revision
from mini_vllm.engine.block_manager import BlockManager, BlockStats
from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.landing import land_step
from mini_vllm.engine.model_runner import ModelOutput
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.scheduler import Scheduler, SchedulerOutput
from mini_vllm.engine.sequence import Request, SeqStatus, Sequence
from mini_vllm.engine.step_loop import StepLoop
from mini_vllm.engine.workloads import offline_256
from mini_vllm.transport.flags import EXIT_ERROR

# ---- the configuration -------------------------------------------------------------------------------


def _positive(_: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen
class KvBenchConfig:
    """What ``bench memory`` replays. Defaults: OFFLINE-256 with the engine's default limits."""

    num_requests: int = attrs.field(default=256, validator=_positive)  # the first N of OFFLINE-256
    max_model_len: int = attrs.field(default=2048, validator=_positive)
    block_sizes: tuple[int, ...] = attrs.field(default=(8, 16, 32, 256), converter=tuple)
    max_num_seqs: int = attrs.field(default=256, validator=_positive)
    max_num_batched_tokens: int = attrs.field(default=8192, validator=_positive)
    vocab_size: int = attrs.field(default=151936, validator=_positive)  # qwen3-0.6b's, as bench throughput
    pool_tokens: int = attrs.field(default=65536, validator=_positive)  # the fixed budget of measurement 2
    pool_block_size: int = attrs.field(default=16, validator=_positive)  # the block size run with prefix caching there
    prefix_requests: int = attrs.field(default=50, validator=_positive)
    prefix_len: int = attrs.field(default=512, validator=_positive)
    suffix_min: int = attrs.field(default=64, validator=_positive)
    suffix_max: int = attrs.field(default=256, validator=_positive)
    prefix_max_tokens: int = attrs.field(default=128, validator=_positive)
    prefix_block_size: int = attrs.field(default=16, validator=_positive)
    fork_requests: int = attrs.field(default=32, validator=_positive)
    fork_n: int = attrs.field(default=4, validator=_positive)
    fork_block_size: int = attrs.field(default=16, validator=_positive)
    series_points: int = attrs.field(default=256, validator=_positive)  # per-step series kept in the JSON, at most

    def __attrs_post_init__(self) -> None:
        if not self.block_sizes:
            raise ConfigError("block_sizes must name at least one block size")
        for bs in self.block_sizes:
            _positive(None, attrs.fields(KvBenchConfig).block_sizes, bs)
        if len(set(self.block_sizes)) != len(self.block_sizes):
            raise ConfigError(f"block_sizes must not repeat a size, got {list(self.block_sizes)}")
        if self.num_requests > 256:
            raise ConfigError(f"num_requests must be <= 256 (OFFLINE-256 has 256 requests), got {self.num_requests}")
        if self.max_model_len <= 1024:
            raise ConfigError(f"max_model_len must be > 1024 (OFFLINE-256 prompts reach 1024 tokens), got {self.max_model_len}")
        if self.pool_tokens < self.max_model_len:
            raise ConfigError(
                f"pool_tokens ({self.pool_tokens}) must hold at least one max_model_len ({self.max_model_len}) reservation"
            )
        for bs in (*self.block_sizes, self.pool_block_size):
            if bs > self.pool_tokens:
                raise ConfigError(f"block size {bs} is larger than pool_tokens ({self.pool_tokens})")
        if self.suffix_min > self.suffix_max:
            raise ConfigError(f"suffix_min ({self.suffix_min}) must be <= suffix_max ({self.suffix_max})")
        if self.prefix_len + self.suffix_max + self.prefix_max_tokens > self.max_model_len:
            raise ConfigError(
                f"prefix_len + suffix_max + prefix_max_tokens ({self.prefix_len + self.suffix_max + self.prefix_max_tokens}) "
                f"must be <= max_model_len ({self.max_model_len})"
            )
        if self.series_points < 2:
            raise ConfigError(f"series_points must be >= 2 (the first and the last step), got {self.series_points}")


# ---- the driver: the engine's policies without the model ---------------------------------------------


@attrs.frozen
class ReplayRequest:
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    n: int = 1
    arrival_step: int = 0  # the step before which it is added (0: before the first)


@attrs.frozen
class ReplaySummary:
    steps: int
    preemptions: int
    cow_copies: int  # copy-on-write block copies the scheduler asked for
    tokens_computed: int  # K/V written, recomputation after preemption included
    prompt_tokens_computed: int  # of which prompt positions (a prefix-cache hit skips these)
    tokens_reused: int  # taken from the prefix cache by admissions that went through
    output_tokens: int
    blocks: BlockStats  # BlockManager.statistics() at the end


Observer = Callable[["PolicyReplay", SchedulerOutput], None]


class PolicyReplay:
    """Runs requests through a real ``Scheduler`` and ``BlockManager``, landing made-up tokens."""

    def __init__(
        self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        self.block_manager = block_manager
        self.scheduler = Scheduler(block_manager, max_num_seqs, max_num_batched_tokens, max_model_len)
        self.max_model_len = max_model_len
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.steps = 0
        self.cow_copies = 0
        self.tokens_computed = 0
        self.prompt_tokens_computed = 0
        self.tokens_reused = 0
        self.output_tokens = 0
        self._next_token = 1 << 32  # made-up token ids, beyond any vocabulary
        self._started: set[int] = set()  # sequences scheduled since their (re)admission
        self.sequences: dict[int, Sequence] = {}  # every sequence by id, for reservations keyed by seq id
        self.loop = StepLoop(pipelined=False)  # the engine's own step loop, serial as on the CPU
        self._observe: Observer | None = None

    def add(self, request: ReplayRequest) -> None:
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ConfigError(f"a prompt of {len(request.prompt_token_ids)} tokens does not fit max_model_len")
        params = SamplingParams(n=request.n, temperature=1.0 if request.n > 1 else 0.0,
                                max_tokens=request.max_tokens, ignore_eos=True)
        arrival = next(self._arrivals)
        req = Request(f"replay-{arrival}", None, list(request.prompt_token_ids), params, 0, arrival)
        self.scheduler.add(self._new_sequence(req, 0, list(request.prompt_token_ids)))

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(next(self._seq_ids), request, index, token_ids, None)
        request.sequences.append(seq)
        self.sequences[seq.seq_id] = seq
        return seq

    def run(self, requests: Seq[ReplayRequest], observe: Observer | None = None) -> ReplaySummary:
        pending = sorted(requests, key=lambda r: r.arrival_step)  # stable: equal steps keep their order
        nxt = 0
        step = 0
        self._observe = observe
        while nxt < len(pending) or self.scheduler.has_work():
            while nxt < len(pending) and pending[nxt].arrival_step <= step:
                self.add(pending[nxt])
                nxt += 1
            if not self.loop.run(self).progressed:
                if nxt == len(pending):
                    raise RuntimeError(
                        f"nothing can be scheduled and nothing else will arrive: the pool of "
                        f"{self.block_manager.num_blocks} blocks cannot hold the next sequence"
                    )
                step = max(step + 1, pending[nxt].arrival_step)  # idle until the next arrival
                continue
            self.steps += 1
            step += 1
        return ReplaySummary(
            steps=self.steps,
            preemptions=self.scheduler.num_preemptions,
            cow_copies=self.cow_copies,
            tokens_computed=self.tokens_computed,
            prompt_tokens_computed=self.prompt_tokens_computed,
            tokens_reused=self.tokens_reused,
            output_tokens=self.output_tokens,
            blocks=self.block_manager.statistics(),
        )

    # ---- what the engine's step loop drives (``engine.step_loop.Steppable``) -----------------------
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def can_schedule_ahead(self) -> bool:
        return False  # the loop is serial here: every step lands before the next is scheduled

    def schedule(self, in_flight: Any = None) -> SchedulerOutput | None:
        out = self.scheduler.schedule()
        if not out.seqs:
            return None
        if self._observe is not None:
            self._observe(self, out)
        return out

    def launch(self, out: SchedulerOutput) -> ModelOutput:
        """Where the engine runs the model: a fresh made-up id per sampled token, so that no two
        sequences' outputs match, as real samples would not (a shared output block would be a
        prefix-cache hit no real run gets)."""
        rows = sum(s.num_samples for s in out.seqs)
        tokens = list(range(self._next_token, self._next_token + rows))
        self._next_token += rows
        return ModelOutput(tokens, None, None)

    def collect(self, output: ModelOutput) -> ModelOutput:
        return output

    def batch_shape(self, out: SchedulerOutput) -> tuple[int, int, bool]:
        return len(out.seqs), sum(s.num_new_tokens for s in out.seqs), False

    def process(self, out: SchedulerOutput, output: ModelOutput) -> list[Any]:
        """Count the step from the schedule, then land it as ``LLMEngine.process`` does."""
        self.cow_copies += len(out.copies)
        for victim in out.preempted:
            self._started.discard(victim.seq_id)
        for s in out.seqs:
            seq = s.seq
            if seq.status is SeqStatus.FINISHED:
                continue
            if seq.seq_id not in self._started:  # its first step since admission: the rest came from the cache
                self._started.add(seq.seq_id)
                self.tokens_reused += s.start
            self.tokens_computed += s.num_new_tokens
            self.prompt_tokens_computed += max(0, min(s.end, seq.num_prompt_tokens) - s.start)
        landed = land_step(out, output, self.scheduler, self._new_sequence, (), self.max_model_len)
        self.output_tokens += landed.generation_tokens
        for s in out.seqs:
            if s.num_samples > 1:  # forked beside a running parent: shares its blocks, nothing came from the cache
                self._started.update(c.seq_id for c in s.seq.request.sequences[1:] if c.status is SeqStatus.RUNNING)
        return []  # no deltas: nobody reads the made-up tokens


# ---- measurement 1: where the memory goes, step by step -------------------------------------------------

# The parts of a footprint that hold no live KV. A contiguous reservation's unused room is either for
# tokens the request will still compute ("future") or never written at all ("never": max_model_len
# beyond the final length, and the last sampled token, which is never fed back); a paged sequence
# wastes only the unused tail of its last block ("internal").
WASTE_PARTS: tuple[str, ...] = ("reserved_future", "reserved_never", "internal")
SHARED = "shared_saved"  # not a waste: what a block shared by several sequences saves against one copy each
CONTIGUOUS_MAX = "contiguous, max_model_len"
CONTIGUOUS_EXACT = "contiguous, exact final length"


def paged_scheme(block_size: int) -> str:
    return f"paged, blocks of {block_size}"


class SchemeTrace:
    """One scheme's footprint for the running requests, and its parts, per step (tokens)."""

    def __init__(self) -> None:
        self.footprint: list[int] = []
        self.parts: dict[str, list[int]] = {part: [] for part in (*WASTE_PARTS, SHARED)}

    def add(self, footprint: int, parts: dict[str, int]) -> None:
        self.footprint.append(footprint)
        for name, values in self.parts.items():
            values.append(parts.get(name, 0))

    def waste(self, step: int) -> int:
        return sum(self.parts[part][step] for part in WASTE_PARTS)


class MemoryTrace:
    """An observer: per step, the running requests' KV in the paged blocks and in two contiguous schemes."""

    def __init__(self, max_model_len: int, contiguous: bool = True) -> None:
        self.max_model_len = max_model_len
        self.contiguous = contiguous  # the contiguous schemes depend on the schedule only: one run needs them
        self.running: list[int] = []
        self.live: list[int] = []  # per sequence: a token in a shared block counts once per holder
        self.paged = SchemeTrace()
        self.reserved_max = SchemeTrace()
        self.reserved_exact = SchemeTrace()
        self.max_tail = 0  # the largest unused tail of any sequence's last block, at any step
        self.tail_total = 0  # tails summed over sequences and steps
        self.seq_steps = 0  # running sequences summed over steps

    @property
    def steps(self) -> int:
        return len(self.running)

    def __call__(self, replay: PolicyReplay, out: SchedulerOutput) -> None:
        bm = replay.block_manager
        bs = bm.block_size
        running = replay.scheduler.running
        if len(bm.tables) != len(running):  # the shares below assume only running sequences hold blocks
            raise RuntimeError(f"{len(bm.tables)} block tables for {len(running)} running sequences")
        live = unshared_blocks = future = never_max = never_exact = 0
        tails: dict[int, int] = {}  # last block id -> unused tail; a forked partial block counts once
        for seq in running:
            computed = seq.num_computed_tokens  # already counts this step's tokens (the scheduler advances it)
            table = bm.tables[seq.seq_id]
            live += computed
            unshared_blocks += len(table)
            tail = len(table) * bs - computed
            if tail:
                tails[table[-1]] = tail
            self.tail_total += tail
            self.max_tail = max(self.max_tail, tail)
            if self.contiguous:
                final = min(seq.num_prompt_tokens + seq.request.params.max_tokens, self.max_model_len)
                future += final - 1 - computed
                never_exact += 1
                never_max += self.max_model_len - final + 1
        held = bm.statistics().used_blocks * bs
        self.running.append(len(running))
        self.live.append(live)
        self.seq_steps += len(running)
        self.paged.add(held, {"internal": sum(tails.values()), SHARED: unshared_blocks * bs - held})
        if self.contiguous:
            n = len(running)
            self.reserved_max.add(n * self.max_model_len, {"reserved_future": future, "reserved_never": never_max})
            self.reserved_exact.add(live + future + never_exact, {"reserved_future": future, "reserved_never": never_exact})


def sample_steps(steps: int, points: int) -> list[int]:
    """At most ``points`` step indices, evenly spread, the first and the last included."""
    if steps <= points:
        return list(range(steps))
    stride = math.ceil((steps - 1) / (points - 1))
    return [*range(0, steps - 1, stride), steps - 1]


@attrs.frozen
class SchemeMemory:
    """One scheme over a run: its footprint for the running requests and how much of it is waste."""

    scheme: str
    block_size: int | None  # None: a contiguous reservation
    peak_footprint_tokens: int
    mean_footprint_tokens: float
    mean_live_tokens: float  # live KV in this footprint; a shared block's tokens count once
    mean_tokens: dict[str, float]  # each waste part and what sharing saved, mean over steps
    waste_share_mean: float  # mean over steps of waste / footprint
    waste_share_token_weighted: float  # waste summed over steps / footprint summed over steps
    waste_share_peak: float  # the largest share at any step
    waste_share_at_peak_footprint: float  # the share at the step with the largest footprint
    shares_mean: dict[str, float]  # each waste part's share of the footprint, mean over steps
    shares_token_weighted: dict[str, float]
    saved_by_sharing_share: float  # token-weighted: saved / (footprint + saved), what sharing took off
    series: dict[str, list[float]]  # per sampled step: footprint, each part, waste_share
    mean_tail_tokens_per_seq: float | None = None  # paged only: unused tail of a sequence's last block
    max_tail_tokens_per_seq: int | None = None


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def summarize(scheme: str, block_size: int | None, trace: SchemeTrace, picks: Seq[int],
              tails: tuple[float, int] | None = None) -> SchemeMemory:
    steps = len(trace.footprint)
    fp = trace.footprint
    waste = [trace.waste(i) for i in range(steps)]
    share = [_ratio(w, f) for w, f in zip(waste, fp, strict=True)]
    total_fp = sum(fp)
    peak_at = max(range(steps), key=fp.__getitem__) if steps else 0
    saved = sum(trace.parts[SHARED])
    series: dict[str, list[float]] = {"footprint_tokens": [fp[i] for i in picks]}
    for part in (*WASTE_PARTS, SHARED):
        series[part] = [trace.parts[part][i] for i in picks]
    series["waste_share"] = [round(share[i], 5) for i in picks]
    return SchemeMemory(
        scheme=scheme,
        block_size=block_size,
        peak_footprint_tokens=max(fp, default=0),
        mean_footprint_tokens=_ratio(total_fp, steps),
        mean_live_tokens=_ratio(total_fp - sum(waste), steps),
        mean_tokens={part: _ratio(sum(trace.parts[part]), steps) for part in (*WASTE_PARTS, SHARED)},
        waste_share_mean=_ratio(sum(share), steps),
        waste_share_token_weighted=_ratio(sum(waste), total_fp),
        waste_share_peak=max(share, default=0.0),
        waste_share_at_peak_footprint=share[peak_at] if steps else 0.0,
        shares_mean={part: _ratio(sum(_ratio(v, f) for v, f in zip(trace.parts[part], fp, strict=True)), steps)
                     for part in WASTE_PARTS},
        shares_token_weighted={part: _ratio(sum(trace.parts[part]), total_fp) for part in WASTE_PARTS},
        saved_by_sharing_share=_ratio(saved, total_fp + saved),
        series=series,
        mean_tail_tokens_per_seq=None if tails is None else tails[0],
        max_tail_tokens_per_seq=None if tails is None else tails[1],
    )


def paged_memory(trace: MemoryTrace, block_size: int, picks: Seq[int]) -> SchemeMemory:
    tails = (_ratio(trace.tail_total, trace.seq_steps), trace.max_tail)
    return summarize(paged_scheme(block_size), block_size, trace.paged, picks, tails)


@attrs.frozen
class OfflineRun:
    """Measurement 1: the schedule (the same for every scheme) and each scheme's memory."""

    steps: int
    preemptions: int
    prefix_caching: bool
    peak_running: int
    mean_running: float
    peak_live_tokens: int
    mean_live_tokens: float
    schemes: list[SchemeMemory]  # the two contiguous reservations, then paged by block size
    series: dict[str, list[int]]  # the sampled steps: step index, running requests, live tokens


def offline_requests(config: KvBenchConfig) -> list[ReplayRequest]:
    return [
        ReplayRequest(tuple(r.prompt_token_ids), r.output_len)
        for r in offline_256(config.vocab_size, config.num_requests)
    ]


def unbounded_blocks(requests: Seq[ReplayRequest], block_size: int, max_model_len: int) -> int:
    """Blocks for every request's every sample at full length at once: no preemption can happen."""
    seqs = sum(r.n for r in requests)
    return seqs * -(-max_model_len // block_size) + 1


def trace_unbounded(config: KvBenchConfig, requests: Seq[ReplayRequest], block_size: int, caching: bool,
                    contiguous: bool = True) -> tuple[ReplaySummary, MemoryTrace]:
    bm = BlockManager(unbounded_blocks(requests, block_size, config.max_model_len), block_size, caching,
                      namespace="bench-memory")
    replay = PolicyReplay(bm, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                          max_model_len=config.max_model_len)
    trace = MemoryTrace(config.max_model_len, contiguous)
    summary = replay.run(requests, trace)
    bm.check_invariants()
    return summary, trace


def run_offline(config: KvBenchConfig, requests: Seq[ReplayRequest], caching: bool = True) -> OfflineRun:
    """Every block size on the same workload; the contiguous schemes from the first run's schedule."""
    paged: list[SchemeMemory] = []
    first: tuple[ReplaySummary, MemoryTrace] | None = None
    picks: list[int] = []
    contiguous: list[SchemeMemory] = []
    for bs in config.block_sizes:
        summary, trace = trace_unbounded(config, requests, bs, caching, contiguous=first is None)
        if first is None:
            first = (summary, trace)
            picks = sample_steps(trace.steps, config.series_points)
            contiguous = [
                summarize(f"{CONTIGUOUS_MAX} ({config.max_model_len})", None, trace.reserved_max, picks),
                summarize(CONTIGUOUS_EXACT, None, trace.reserved_exact, picks),
            ]
        elif (trace.running, trace.live) != (first[1].running, first[1].live) or summary.preemptions:
            # The comparison is only fair if every scheme serves the same requests at the same steps.
            raise RuntimeError(f"blocks of {bs} changed the schedule: the pool was meant to be unbounded")
        paged.append(paged_memory(trace, bs, picks))
    if first is None:
        raise ConfigError("block_sizes must name at least one block size")
    summary, trace = first
    return OfflineRun(
        steps=summary.steps,
        preemptions=summary.preemptions,
        prefix_caching=caching,
        peak_running=max(trace.running, default=0),
        mean_running=_ratio(sum(trace.running), trace.steps),
        peak_live_tokens=max(trace.live, default=0),
        mean_live_tokens=_ratio(sum(trace.live), trace.steps),
        schemes=[*contiguous, *paged],
        series={"step": list(picks), "running": [trace.running[i] for i in picks],
                "live_tokens": [trace.live[i] for i in picks]},
    )


# ---- measurement 2: one fixed budget, carved in blocks or in reservations ------------------------------------


class ReservingBlockManager(BlockManager):
    """A contiguous reservation per sequence behind the block manager's interface: blocks of one token,
    and a sequence's first allocation (its admission) takes its whole reservation. Any free tokens
    will do, so it never fragments: the best case for a contiguous allocator."""

    def __init__(self, num_tokens: int, reservation: Callable[[int], int]) -> None:
        super().__init__(num_tokens, 1, False, namespace="bench-memory")
        self._reservation = reservation

    def allocate(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]] | None:
        if not self.tables.get(seq_id):
            num_tokens = max(num_tokens, self._reservation(seq_id))
        return super().allocate(seq_id, num_tokens)


@attrs.frozen
class PoolRun:
    policy: str
    block_size: int  # 1 for a contiguous reservation (its size is what counts)
    num_blocks: int
    prefix_caching: bool
    steps: int
    preemptions: int
    tokens_computed: int  # recomputation after preemption included
    tokens_reused: int  # a preempted sequence may find its own blocks still cached
    prefix_hits: int  # BlockManager's count: hits of admitted sequences
    peak_running: int
    mean_running: float  # sequences holding KV, per step


def run_pool(config: KvBenchConfig, requests: Seq[ReplayRequest], policy: str, block_size: int,
             caching: bool = False, reservation: Callable[[Sequence], int] | None = None) -> PoolRun:
    """The workload in ``pool_tokens`` of KV: paged blocks, or (``reservation`` given) one reservation each."""
    replay: PolicyReplay | None = None

    def reserve(seq_id: int) -> int:
        if replay is None or reservation is None:
            raise RuntimeError("a reservation was asked for before the replay started")
        return reservation(replay.sequences[seq_id])

    bm: BlockManager
    if reservation is None:
        bm = BlockManager(config.pool_tokens // block_size, block_size, caching, namespace="bench-memory")
    else:
        bm = ReservingBlockManager(config.pool_tokens, reserve)
    replay = PolicyReplay(bm, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                          max_model_len=config.max_model_len)
    trace = MemoryTrace(config.max_model_len, contiguous=False)
    summary = replay.run(requests, trace)
    bm.check_invariants()
    return PoolRun(policy, bm.block_size, bm.num_blocks, caching, summary.steps, summary.preemptions,
                   summary.tokens_computed, summary.tokens_reused, summary.blocks.prefix_hits,
                   max(trace.running, default=0), _ratio(sum(trace.running), trace.steps))


def final_length(max_model_len: int) -> Callable[[Sequence], int]:
    def length(seq: Sequence) -> int:
        return min(seq.num_prompt_tokens + seq.request.params.max_tokens, max_model_len)

    return length


def run_pools(config: KvBenchConfig, requests: Seq[ReplayRequest]) -> list[PoolRun]:
    sizes = sorted({*config.block_sizes, config.pool_block_size})
    mml = config.max_model_len
    return [
        run_pool(config, requests, f"contiguous, max_model_len ({mml}) each", 1, reservation=lambda _: mml),
        run_pool(config, requests, "contiguous, exact final length each", 1, reservation=final_length(mml)),
        *(run_pool(config, requests, paged_scheme(bs), bs) for bs in sizes),
        run_pool(config, requests, f"{paged_scheme(config.pool_block_size)}, prefix caching", config.pool_block_size,
                 caching=True),
    ]


# ---- measurement 3: a shared system prompt --------------------------------------------------------------


@attrs.frozen
class PrefixRun:
    arrival: str  # "staggered" (one request per step) or "burst" (all before the first step)
    prefix_caching: bool
    steps: int
    prefix_queries: int
    prefix_hits: int
    hit_rate: float
    evictions: int
    cached_blocks_at_end: int
    prompt_tokens: int
    prompt_tokens_computed: int
    tokens_reused: int
    peak_used_blocks: int
    mean_used_blocks: float
    waste_share: float  # token-weighted: last-block tails / what the blocks hold
    saved_by_sharing_share: float  # token-weighted: saved / what the same blocks would need unshared
    saved_by_sharing_share_mean: float  # the same, mean over steps
    peak_saved_by_sharing_tokens: int


def prefix_requests(config: KvBenchConfig, staggered: bool) -> list[ReplayRequest]:
    rng = random.Random(2)
    prefix = [rng.randrange(config.vocab_size) for _ in range(config.prefix_len)]
    out = []
    for i in range(config.prefix_requests):
        suffix = [rng.randrange(config.vocab_size) for _ in range(rng.randint(config.suffix_min, config.suffix_max))]
        out.append(ReplayRequest(tuple(prefix + suffix), config.prefix_max_tokens, 1, i if staggered else 0))
    return out


def _saved_share_mean(trace: SchemeTrace) -> float:
    shares = [_ratio(s, f + s) for s, f in zip(trace.parts[SHARED], trace.footprint, strict=True)]
    return _ratio(sum(shares), len(shares))


def run_prefix(config: KvBenchConfig, staggered: bool, caching: bool) -> PrefixRun:
    requests = prefix_requests(config, staggered)
    bs = config.prefix_block_size
    summary, trace = trace_unbounded(config, requests, bs, caching, contiguous=False)
    stats = summary.blocks
    memory = summarize(paged_scheme(bs), bs, trace.paged, [])
    return PrefixRun(
        arrival="staggered" if staggered else "burst",
        prefix_caching=caching,
        steps=summary.steps,
        prefix_queries=stats.prefix_queries,
        prefix_hits=stats.prefix_hits,
        hit_rate=stats.hit_rate,
        evictions=stats.evictions,
        cached_blocks_at_end=stats.cached_blocks,
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        prompt_tokens_computed=summary.prompt_tokens_computed,
        tokens_reused=summary.tokens_reused,
        peak_used_blocks=memory.peak_footprint_tokens // bs,
        mean_used_blocks=memory.mean_footprint_tokens / bs,
        waste_share=memory.waste_share_token_weighted,
        saved_by_sharing_share=memory.saved_by_sharing_share,
        saved_by_sharing_share_mean=_saved_share_mean(trace.paged),
        peak_saved_by_sharing_tokens=max(trace.paged.parts[SHARED], default=0),
    )


# ---- measurement 4: n samples from one prompt ---------------------------------------------------------------


@attrs.frozen
class ForkRun:
    sharing: str  # "fork" (one request, n samples) or "independent" (n requests, one sample each)
    steps: int
    cow_copies: int
    output_tokens: int
    peak_used_blocks: int
    mean_used_blocks: float
    saved_by_sharing_share: float  # token-weighted: saved / what the same blocks would need unshared


def run_fork(config: KvBenchConfig, forked: bool) -> ForkRun:
    base = offline_requests(attrs.evolve(config, num_requests=min(config.fork_requests, 256)))
    if forked:
        requests = [attrs.evolve(r, n=config.fork_n) for r in base]
    else:
        requests = [r for r in base for _ in range(config.fork_n)]
    bs = config.fork_block_size
    summary, trace = trace_unbounded(config, requests, bs, False, contiguous=False)
    memory = summarize(paged_scheme(bs), bs, trace.paged, [])
    return ForkRun("fork" if forked else "independent", summary.steps, summary.cow_copies, summary.output_tokens,
                   memory.peak_footprint_tokens // bs, memory.mean_footprint_tokens / bs, memory.saved_by_sharing_share)


# ---- the whole benchmark -------------------------------------------------------------------------------------


def run_memory(config: KvBenchConfig) -> dict[str, Any]:
    """Every measurement; returns the JSON record (without the machine and command, see ``run``)."""
    started = time.perf_counter()
    requests = offline_requests(config)
    offline = run_offline(config, requests)
    pool = run_pools(config, requests)
    prefix = [run_prefix(config, staggered, caching) for staggered in (True, False) for caching in (True, False)]
    fork = [run_fork(config, True), run_fork(config, False)]
    return {
        "benchmark": "memory",
        "workload": "OFFLINE-256" if config.num_requests == 256 else f"OFFLINE-256[:{config.num_requests}]",
        "config": attrs.asdict(config),
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "output_tokens": sum(r.max_tokens for r in requests),
        "offline": attrs.asdict(offline),
        "fixed_pool": [attrs.asdict(p) for p in pool],
        "prefix_caching": [attrs.asdict(p) for p in prefix],
        "parallel_sampling": {"n": config.fork_n, "requests": config.fork_requests,
                              "runs": [attrs.asdict(f) for f in fork]},
        "seconds": round(time.perf_counter() - started, 2),
    }


# ---- the command ----------------------------------------------------------------------------------------------

_FLAGS: tuple[tuple[str, str, str], ...] = (  # (flag, config field, help)
    ("--num-requests", "num_requests", "the first N requests of OFFLINE-256"),
    ("--max-model-len", "max_model_len", "the contiguous reservation per request, and the length cap"),
    ("--max-num-seqs", "max_num_seqs", "the scheduler's limit on running sequences"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", "the scheduler's token budget per step"),
    ("--vocab-size", "vocab_size", "prompt ids are drawn below this"),
    ("--pool-tokens", "pool_tokens", "the fixed KV budget (in tokens) in which requests at once are counted"),
    ("--pool-block-size", "pool_block_size", "the paged block size also run with prefix caching in that budget"),
    ("--prefix-requests", "prefix_requests", "requests sharing one system prompt"),
    ("--prefix-len", "prefix_len", "the shared system prompt's length"),
    ("--suffix-min", "suffix_min", "shortest distinct suffix"),
    ("--suffix-max", "suffix_max", "longest distinct suffix"),
    ("--prefix-max-tokens", "prefix_max_tokens", "tokens each of those requests generates"),
    ("--prefix-block-size", "prefix_block_size", "the block size for the prefix-caching runs"),
    ("--fork-requests", "fork_requests", "OFFLINE-256 requests run with n samples"),
    ("--fork-n", "fork_n", "samples per request (n)"),
    ("--fork-block-size", "fork_block_size", "the block size for the parallel-sampling runs"),
    ("--series-points", "series_points", "per-step series kept in the JSON, at most this many steps"),
)


def add_bench_kv(bench_subparsers: Any) -> None:
    """Add ``memory`` (alias ``kv-memory``, its first name) to the ``bench`` command's subparsers."""
    defaults = KvBenchConfig()
    p = bench_subparsers.add_parser(
        "memory",
        aliases=["kv-memory"],
        help="how much KV memory holds real tokens: paged blocks against contiguous reservations (CPU, no model)",
        description="Replay OFFLINE-256 through the engine's scheduler and block manager (no model, seconds on "
        "the CPU) and measure the KV memory's waste over time: contiguous reservations (max_model_len, exact "
        "final length) against paged blocks, split into reserved-but-unused and last-block tails; what prefix "
        "caching and copy-on-write forks share; and how many requests run at once in a fixed KV budget. "
        "Prints a table, writes JSON and a PNG (the PNG needs matplotlib: pip install 'mini-vllm[bench]').",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--block-sizes", type=int, nargs="+", default=list(defaults.block_sizes),
                   help=f"paged block sizes to measure (default: {' '.join(map(str, defaults.block_sizes))})")
    for flag, field, text in _FLAGS:
        p.add_argument(flag, type=int, default=getattr(defaults, field), help=f"{text} (default: {getattr(defaults, field)})")
    p.add_argument("--output", default=None,
                   help="the JSON file (default: memory-YYYYMMDD.json in the current directory)")
    p.add_argument("--plot", default=None, metavar="PATH", help="the PNG (default: the JSON file's name, .png)")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> KvBenchConfig:
    fields = {field: getattr(args, field) for _, field, _ in _FLAGS}
    return KvBenchConfig(block_sizes=tuple(args.block_sizes), **fields)


def command_line(config: KvBenchConfig, output: str | None, plot: str | None = None) -> str:
    """The command that reproduces this run: the flags whose values differ from the defaults."""
    defaults = KvBenchConfig()
    parts = ["mini-vllm", "bench", "memory"]
    if config.block_sizes != defaults.block_sizes:
        parts += ["--block-sizes", *map(str, config.block_sizes)]
    for flag, field, _ in _FLAGS:
        if getattr(config, field) != getattr(defaults, field):
            parts += [flag, str(getattr(config, field))]
    if output is not None:
        parts += ["--output", output]
    if plot is not None:
        parts += ["--plot", plot]
    return " ".join(parts)


def machine() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "attrs": attrs.__version__, "mini-vllm": git_revision()}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None  # not installed: the picture is skipped


@interruptible("memory")
def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except ConfigError as exc:
        return fail("memory", str(exc))
    now = dt.datetime.now(dt.UTC)
    path = Path(args.output) if args.output else Path(f"memory-{now.strftime('%Y%m%d')}.json")
    error = unwritable(path, "--output")
    if error:  # before with_suffix, which refuses a name like "."
        return fail("memory", error)
    picture = Path(args.plot) if args.plot else path.with_suffix(".png")
    error = unwritable(picture, "--plot")
    if error:
        return fail("memory", error)
    record = {
        "command": command_line(config, args.output, args.plot),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**machine(), "matplotlib": _version("matplotlib")},
        **run_memory(config),
    }
    print_table(record)
    failed = write_text("memory", path, json.dumps(record, indent=2) + "\n")
    if failed is not None:
        return failed
    print(f"wrote {path}", file=sys.stderr)
    try:
        drawn = draw_memory(record, picture)
    except OSError as exc:
        return fail("memory", f"cannot write {picture}: {exc.strerror or exc}", EXIT_ERROR)
    if drawn:
        print(f"wrote {picture}", file=sys.stderr)
    return 0


# ---- the table ------------------------------------------------------------------------------------------------


def _pct(part: float, whole: float = 1.0) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def print_table(record: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    cfg = record["config"]
    offline = record["offline"]
    schemes = offline["schemes"]

    def w(line: str = "") -> None:
        print(line, file=out)

    w(f"KV memory, {record['workload']}: {record['prompt_tokens']:,} prompt + {record['output_tokens']:,} output tokens; "
      f"max_model_len {cfg['max_model_len']}, max_num_seqs {cfg['max_num_seqs']}, "
      f"{cfg['max_num_batched_tokens']} tokens/step")
    w(f"{offline['steps']} steps, {offline['preemptions']} preemptions, up to {offline['peak_running']} requests "
      f"running ({offline['mean_running']:.1f} on average), prefix caching {'on' if offline['prefix_caching'] else 'off'}")
    w()
    w(f"{'':<38}{'footprint (tokens)':>22}{'wasted share':>22}{'of which (token-weighted)':>34}{'saved by':>10}")
    w(f"{'scheme, running requests only':<38}{'peak':>11}{'mean':>11}{'mean/step':>11}{'tok-wtd':>11}"
      f"{'to come':>10}{'never used':>12}{'tails':>12}{'sharing':>10}")
    for s in schemes:
        tw = s["shares_token_weighted"]
        w(f"{s['scheme']:<38}{s['peak_footprint_tokens']:>11,}{s['mean_footprint_tokens']:>11,.0f}"
          f"{_pct(s['waste_share_mean']):>11}{_pct(s['waste_share_token_weighted']):>11}"
          f"{_pct(tw['reserved_future']):>10}{_pct(tw['reserved_never']):>12}{_pct(tw['internal']):>12}"
          f"{_pct(s['saved_by_sharing_share']) if s['block_size'] else '-':>10}")
    w(f"{'live KV':<38}{offline['peak_live_tokens']:>11,}{offline['mean_live_tokens']:>11,.0f}")
    contiguous = [s for s in schemes if s["block_size"] is None]
    paged = [s for s in schemes if s["block_size"] is not None]
    w()
    w("vLLM paper: contiguous reservation wastes 60-80% of KV memory, paging under 4%. Here, mean over steps "
      "(token-weighted):")
    w("  " + "; ".join(f"{s['scheme']} {_pct(s['waste_share_mean'])} ({_pct(s['waste_share_token_weighted'])})"
                       for s in contiguous + paged))
    w()
    w(f"{'last-block tails, paged':<38}{'mean/seq':>11}{'max/seq':>11}{'mean tokens':>13}")
    for s in paged:
        w(f"{'  blocks of ' + str(s['block_size']):<38}{s['mean_tail_tokens_per_seq']:>11.1f}"
          f"{s['max_tail_tokens_per_seq']:>11}{s['mean_tokens']['internal']:>13,.0f}")
    w()
    w(f"requests at once in a fixed KV budget of {cfg['pool_tokens']:,} tokens, same scheduler:")
    w(f"  {'policy':<46}{'running (mean/peak)':>20}{'steps':>8}{'preemptions':>13}{'tokens computed':>17}"
      f"{'reused from cache':>19}")
    for p in record["fixed_pool"]:
        w(f"  {p['policy']:<46}{p['mean_running']:>13.1f} /{p['peak_running']:>4}{p['steps']:>8}"
          f"{p['preemptions']:>13}{p['tokens_computed']:>17,}"
          f"{format(p['tokens_reused'], ',') if p['prefix_caching'] else '-':>19}")
    w()
    w(f"prefix caching: {cfg['prefix_requests']} requests = one {cfg['prefix_len']}-token prefix + a distinct "
      f"{cfg['suffix_min']}-{cfg['suffix_max']}-token suffix, {cfg['prefix_max_tokens']} tokens out, "
      f"blocks of {cfg['prefix_block_size']}")
    w(f"  {'arrival':<11}{'cache':<6}{'hits / queries':>16}{'hit rate':>10}{'prompt tokens computed':>24}"
      f"{'peak blocks':>13}{'mean blocks':>13}{'saved by sharing':>18}{'tails':>8}")
    for p in record["prefix_caching"]:
        w(f"  {p['arrival']:<11}{'on' if p['prefix_caching'] else 'off':<6}"
          f"{str(p['prefix_hits']) + ' / ' + str(p['prefix_queries']):>16}{_pct(p['hit_rate']):>10}"
          f"{str(p['prompt_tokens_computed']) + ' / ' + str(p['prompt_tokens']):>24}"
          f"{p['peak_used_blocks']:>13,}{p['mean_used_blocks']:>13,.0f}{_pct(p['saved_by_sharing_share']):>18}"
          f"{_pct(p['waste_share']):>8}")
    w()
    ps = record["parallel_sampling"]
    w(f"parallel sampling: the first {ps['requests']} OFFLINE-256 requests, n={ps['n']}, "
      f"blocks of {cfg['fork_block_size']}")
    w(f"  {'':<44}{'peak blocks':>13}{'mean blocks':>13}{'CoW copies':>12}{'steps':>8}{'saved by sharing':>18}")
    for f in ps["runs"]:
        name = "forked after the prefill (shared prompt)" if f["sharing"] == "fork" else f"{ps['n']} independent requests"
        w(f"  {name:<44}{f['peak_used_blocks']:>13,}{f['mean_used_blocks']:>13,.0f}{f['cow_copies']:>12}{f['steps']:>8}"
          f"{_pct(f['saved_by_sharing_share']):>18}")
    w(f"({record['seconds']} s)")


# ---- the picture ------------------------------------------------------------------------------------------------

_PART_LABELS: tuple[tuple[str, str], ...] = (
    ("reserved_future", "reserved, for tokens still to come"),
    ("reserved_never", "reserved, never written"),
    ("internal", "last-block tails (internal fragmentation)"),
)


def draw_memory(record: dict[str, Any], path: Path) -> bool:
    """Waste over time per scheme, its average split into parts, and requests at once in the fixed budget.

    matplotlib is an optional dependency: without it, say so in one line and draw nothing (False).
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        print(f"mini-vllm bench memory: matplotlib is not installed, so the picture {path} was skipped "
              "(pip install 'mini-vllm[bench]' to draw it)", file=sys.stderr)
        return False
    offline = record["offline"]
    schemes = offline["schemes"]
    steps = offline["series"]["step"]
    fig = Figure(figsize=(14, 10), layout="constrained")
    axes = fig.subplot_mosaic([["time", "time"], ["averages", "at_once"]], height_ratios=[1.0, 1.05])
    over_time, averages, at_once = axes["time"], axes["averages"], axes["at_once"]

    running = over_time.twinx()  # why the contiguous waste falls: the short requests leave first
    running.fill_between(steps, offline["series"]["running"], color="0.9", step="mid", zorder=0)
    running.set_ylabel("requests running (grey)", color="0.45")
    running.set_ylim(0, max(offline["series"]["running"], default=1) * 1.05)
    over_time.set_zorder(running.get_zorder() + 1)
    over_time.patch.set_visible(False)
    for s in schemes:
        style = "--" if s["block_size"] is None else "-"
        over_time.plot(steps, [100 * v for v in s["series"]["waste_share"]], style, lw=1.5, label=s["scheme"])
    over_time.axhspan(60, 80, color="tab:red", alpha=0.08, label="vLLM paper: contiguous, 60-80%")
    over_time.axhline(4, color="black", ls=":", lw=1, label="vLLM paper: paged, under 4%")
    over_time.set(xlabel="engine step", ylabel="wasted share of the KV footprint (%)", ylim=(0, 100),
                  xlim=(0, max(steps, default=1)),
                  title=f"{record['workload']}: the share of each scheme's KV footprint (running requests) that holds no token")
    over_time.legend(fontsize=7.5, loc="upper right")
    over_time.grid(alpha=0.3)

    names = [s["scheme"] for s in schemes]
    left = [0.0] * len(schemes)
    for part, label in _PART_LABELS:
        values = [100 * s["shares_token_weighted"][part] for s in schemes]
        averages.barh(names, values, left=left, label=label)
        left = [a + b for a, b in zip(left, values, strict=True)]
    for y, (total, s) in enumerate(zip(left, schemes, strict=True)):
        averages.text(total + 1, y, f"{total:.1f}% (mean/step {100 * s['waste_share_mean']:.1f}%)", va="center", fontsize=8)
    averages.axvspan(60, 80, color="tab:red", alpha=0.08)
    averages.axvline(4, color="black", ls=":", lw=1)
    averages.invert_yaxis()
    averages.set(xlim=(0, 100), xlabel="wasted share, token-weighted over the run (%)", title="average waste, by cause")
    averages.legend(fontsize=7.5, loc="center right")

    pool = record["fixed_pool"]
    labels = [p["policy"] for p in pool]
    at_once.barh(labels, [p["mean_running"] for p in pool], color="tab:blue", label="mean over steps")
    at_once.scatter([p["peak_running"] for p in pool], labels, color="black", marker="|", s=150, zorder=3, label="peak")
    for y, p in enumerate(pool):
        at_once.text(p["peak_running"] + 2, y, f"{p['mean_running']:.1f} / {p['peak_running']}", va="center", fontsize=8)
    at_once.invert_yaxis()
    at_once.set(xlabel="requests running at once", xlim=(0, max(p["peak_running"] for p in pool) * 1.3),
                title=f"in a fixed budget of {record['config']['pool_tokens']:,} tokens of KV")
    at_once.legend(fontsize=7.5, loc="upper right")
    fig.suptitle(f"mini-vllm bench memory, {record['date']}: how much of the KV memory holds real tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv: Seq[str] | None = None) -> int:
    """``python -m mini_vllm.bench.memory`` runs the same command as ``mini-vllm bench memory``."""
    parser = argparse.ArgumentParser(prog="mini-vllm bench")
    add_bench_kv(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["memory", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
