"""``mini-vllm bench kv-memory``: the KV memory a workload needs, paged against contiguous reservations.

No model and no device. The engine's own policy objects (``Scheduler`` and ``BlockManager``, with
real ``Request`` and ``Sequence`` records) are driven step by step without look-ahead, as the
scheduler actor drives the engine on the CPU: schedule a step, then land it. Landing mirrors
``LLMEngine.process``: publish full blocks to the prefix cache, fork ``n > 1`` samples after the
prefill, append the sampled token, finish a sequence at ``max_tokens`` / ``max_model_len`` and free
its blocks. Where the engine would run the model, a made-up token id is written instead: KV memory
depends only on lengths, arrival order and the policies, so every block count is the engine's own
(``tests/test_bench_kv.py`` checks the replay against ``LLMEngine`` step by step).

Four measurements:

1. OFFLINE-256 with a pool large enough that nothing is ever preempted, so the schedule is the same
   for every block size. Each step, after scheduling, it reads the live KV (tokens whose keys and
   values the cache holds), what the paged blocks hold (``used_blocks * block_size``), and what two
   contiguous schemes would reserve for the same running requests: ``max_model_len`` each, or
   ``prompt + max_tokens`` each. Internal fragmentation is the unused tail of each sequence's last
   block (held minus live).
2. The same workload in a fixed pool: paged blocks of 16 (prefix caching off, then on) against
   one block of ``max_model_len`` per request (which is exactly a contiguous ``max_model_len``
   reservation), through the same scheduler: requests running at a time, steps, preemptions,
   tokens computed (recomputation included) and tokens a readmitted sequence took from the cache.
3. Prefix caching: requests sharing a long system prompt, arriving one per step and all at once;
   hits, hit rate and evictions from ``BlockManager.statistics()``, against the same run uncached.
4. Parallel sampling: ``n`` samples forked from one prefill (copy-on-write), against ``n``
   independent requests.

The clock is the engine step: "mean" is the mean over steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import attrs

from engine.block_manager import BlockManager, BlockStats
from engine.errors import ConfigError
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import PLACEHOLDER, Request, SeqStatus, Sequence
from engine.workloads import offline_256

# ---- the configuration -------------------------------------------------------------------------------


def _positive(_: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen
class KvBenchConfig:
    """What ``bench kv-memory`` replays. Defaults: OFFLINE-256 with the engine's default limits."""

    num_requests: int = attrs.field(default=256, validator=_positive)  # the first N of OFFLINE-256
    max_model_len: int = attrs.field(default=2048, validator=_positive)
    block_sizes: tuple[int, ...] = attrs.field(default=(8, 16, 32), converter=tuple)
    max_num_seqs: int = attrs.field(default=256, validator=_positive)
    max_num_batched_tokens: int = attrs.field(default=8192, validator=_positive)
    vocab_size: int = attrs.field(default=151936, validator=_positive)  # qwen3-0.6b's, as bench throughput
    pool_tokens: int = attrs.field(default=65536, validator=_positive)  # the fixed pool of measurement 2
    pool_block_size: int = attrs.field(default=16, validator=_positive)
    prefix_requests: int = attrs.field(default=50, validator=_positive)
    prefix_len: int = attrs.field(default=512, validator=_positive)
    suffix_min: int = attrs.field(default=64, validator=_positive)
    suffix_max: int = attrs.field(default=256, validator=_positive)
    prefix_max_tokens: int = attrs.field(default=128, validator=_positive)
    prefix_block_size: int = attrs.field(default=16, validator=_positive)
    fork_requests: int = attrs.field(default=32, validator=_positive)
    fork_n: int = attrs.field(default=4, validator=_positive)
    fork_block_size: int = attrs.field(default=16, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if not self.block_sizes:
            raise ConfigError("block_sizes must name at least one block size")
        for bs in self.block_sizes:
            _positive(None, attrs.fields(KvBenchConfig).block_sizes, bs)
        if self.num_requests > 256:
            raise ConfigError(f"num_requests must be <= 256 (OFFLINE-256 has 256 requests), got {self.num_requests}")
        if self.max_model_len <= 1024:
            raise ConfigError(f"max_model_len must be > 1024 (OFFLINE-256 prompts reach 1024 tokens), got {self.max_model_len}")
        if self.pool_tokens < self.max_model_len:
            raise ConfigError(
                f"pool_tokens ({self.pool_tokens}) must hold at least one max_model_len ({self.max_model_len}) reservation"
            )
        if self.suffix_min > self.suffix_max:
            raise ConfigError(f"suffix_min ({self.suffix_min}) must be <= suffix_max ({self.suffix_max})")
        if self.prefix_len + self.suffix_max + self.prefix_max_tokens > self.max_model_len:
            raise ConfigError(
                f"prefix_len + suffix_max + prefix_max_tokens ({self.prefix_len + self.suffix_max + self.prefix_max_tokens}) "
                f"must be <= max_model_len ({self.max_model_len})"
            )


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
        self._started: set[int] = set()  # sequences scheduled since their (re)admission

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
        return seq

    def run(self, requests: Seq[ReplayRequest], observe: Observer | None = None) -> ReplaySummary:
        pending = sorted(requests, key=lambda r: r.arrival_step)  # stable: equal steps keep their order
        nxt = 0
        step = 0
        while nxt < len(pending) or self.scheduler.has_work():
            while nxt < len(pending) and pending[nxt].arrival_step <= step:
                self.add(pending[nxt])
                nxt += 1
            out = self.scheduler.schedule()
            if not out.seqs:
                if nxt == len(pending):
                    raise RuntimeError(
                        f"nothing can be scheduled and nothing else will arrive: the pool of "
                        f"{self.block_manager.num_blocks} blocks cannot hold the next sequence"
                    )
                step = max(step + 1, pending[nxt].arrival_step)  # idle until the next arrival
                continue
            if observe is not None:
                observe(self, out)
            self._land(out)
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

    def _land(self, out: SchedulerOutput) -> None:
        """``LLMEngine.process`` with a made-up token in place of the sampled one."""
        bm, scheduler = self.block_manager, self.scheduler
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
            if seq.status is SeqStatus.RUNNING:
                bm.cache_full_blocks(seq.seq_id, seq.token_ids, s.end)
            if not s.num_samples:
                continue
            targets = [seq]
            for k in range(1, s.num_samples):  # the prompt is done: fork the other samples, sharing its blocks
                child = self._new_sequence(seq.request, k, [*seq.token_ids[: s.end], PLACEHOLDER])
                if seq.status is SeqStatus.RUNNING:
                    child.num_computed_tokens = s.end
                    bm.fork(seq.seq_id, child.seq_id)
                    scheduler.add_running(child)
                    self._started.add(child.seq_id)  # it shares its parent's blocks; nothing came from the cache
                else:
                    scheduler.add(child)
                targets.append(child)
            for target in targets:
                self._land_token(target, s.end)

    def _land_token(self, seq: Sequence, index: int) -> None:
        if seq.token_ids[index] != PLACEHOLDER:
            raise RuntimeError(f"sequence {seq.seq_id}: token {index} landed twice")
        seq.token_ids[index] = (seq.seq_id * 1_000_003 + index) % 1_000_000_007  # distinct per sequence
        self.output_tokens += 1
        if index + 1 - seq.num_prompt_tokens >= seq.request.params.max_tokens or index + 1 >= self.max_model_len:
            seq.finish_reason = "length"
            del seq.token_ids[index + 1 :]
            self.scheduler.remove(seq)


# ---- measurement 1: memory per step -------------------------------------------------------------------


class MemoryTrace:
    """An observer: per step, the live KV, what the blocks hold, and what reservations would take."""

    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self.steps = 0
        self.peak: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.seq_steps = 0  # running sequences summed over steps
        self.max_tail = 0  # the largest unused tail of any sequence's last block, at any step
        self.peak_step_held: dict[str, int] = {}  # every figure at the step where the blocks held the most

    def __call__(self, replay: PolicyReplay, out: SchedulerOutput) -> None:
        bm = replay.block_manager
        bs = bm.block_size
        live = reserve_prompt = 0
        for seq in replay.scheduler.running:
            computed = seq.num_computed_tokens
            live += computed
            tail = len(bm.tables[seq.seq_id]) * bs - computed
            if tail > self.max_tail:
                self.max_tail = tail
            reserve_prompt += min(seq.num_prompt_tokens + seq.request.params.max_tokens, self.max_model_len)
        running = len(replay.scheduler.running)
        held = bm.statistics().used_blocks * bs
        figures = {
            "running": running,
            "live_tokens": live,
            "held_tokens": held,
            "internal_fragmentation_tokens": held - live,
            "reserved_max_model_len_tokens": running * self.max_model_len,
            "reserved_prompt_plus_max_tokens": reserve_prompt,
        }
        if held > self.peak.get("held_tokens", -1):
            self.peak_step_held = dict(figures)
        for key, value in figures.items():
            self.peak[key] = max(self.peak.get(key, value), value)
            self.total[key] = self.total.get(key, 0) + value
        self.steps += 1
        self.seq_steps += running

    def mean(self, key: str) -> float:
        return self.total[key] / self.steps if self.steps else 0.0


@attrs.frozen
class PagedRun:
    block_size: int
    num_blocks: int
    steps: int
    preemptions: int
    peak_running: int
    mean_running: float
    peak_live_tokens: int
    mean_live_tokens: float
    peak_held_tokens: int
    mean_held_tokens: float
    peak_internal_fragmentation_tokens: int
    mean_internal_fragmentation_tokens: float
    internal_fragmentation_fraction: float  # of what the blocks hold, over the run
    mean_tail_tokens_per_seq: float
    max_tail_tokens_per_seq: int
    peak_reserved_max_model_len_tokens: int
    mean_reserved_max_model_len_tokens: float
    peak_reserved_prompt_plus_max_tokens: int
    mean_reserved_prompt_plus_max_tokens: float
    at_peak_held: dict[str, int]  # every figure at the step where the blocks held the most


def offline_requests(config: KvBenchConfig) -> list[ReplayRequest]:
    return [
        ReplayRequest(tuple(r.prompt_token_ids), r.output_len)
        for r in offline_256(config.vocab_size, config.num_requests)
    ]


def unbounded_blocks(requests: Seq[ReplayRequest], block_size: int, max_model_len: int) -> int:
    """Blocks for every request's every sample at full length at once: no preemption can happen."""
    seqs = sum(r.n for r in requests)
    return seqs * -(-max_model_len // block_size) + 1


def run_paged(config: KvBenchConfig, requests: Seq[ReplayRequest], block_size: int) -> PagedRun:
    num_blocks = unbounded_blocks(requests, block_size, config.max_model_len)
    bm = BlockManager(num_blocks, block_size, False, namespace="bench-kv")
    replay = PolicyReplay(bm, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                          max_model_len=config.max_model_len)
    trace = MemoryTrace(config.max_model_len)
    summary = replay.run(requests, trace)
    bm.check_invariants()
    mean_held = trace.mean("held_tokens")
    return PagedRun(
        block_size=block_size,
        num_blocks=num_blocks,
        steps=summary.steps,
        preemptions=summary.preemptions,
        peak_running=trace.peak["running"],
        mean_running=trace.mean("running"),
        peak_live_tokens=trace.peak["live_tokens"],
        mean_live_tokens=trace.mean("live_tokens"),
        peak_held_tokens=trace.peak["held_tokens"],
        mean_held_tokens=mean_held,
        peak_internal_fragmentation_tokens=trace.peak["internal_fragmentation_tokens"],
        mean_internal_fragmentation_tokens=trace.mean("internal_fragmentation_tokens"),
        internal_fragmentation_fraction=trace.mean("internal_fragmentation_tokens") / mean_held if mean_held else 0.0,
        mean_tail_tokens_per_seq=trace.total["internal_fragmentation_tokens"] / trace.seq_steps if trace.seq_steps else 0.0,
        max_tail_tokens_per_seq=trace.max_tail,
        peak_reserved_max_model_len_tokens=trace.peak["reserved_max_model_len_tokens"],
        mean_reserved_max_model_len_tokens=trace.mean("reserved_max_model_len_tokens"),
        peak_reserved_prompt_plus_max_tokens=trace.peak["reserved_prompt_plus_max_tokens"],
        mean_reserved_prompt_plus_max_tokens=trace.mean("reserved_prompt_plus_max_tokens"),
        at_peak_held=trace.peak_step_held,
    )


# ---- measurement 2: one fixed pool, two ways to carve it --------------------------------------------------


@attrs.frozen
class PoolRun:
    policy: str
    block_size: int
    num_blocks: int
    prefix_caching: bool
    steps: int
    preemptions: int
    tokens_computed: int  # recomputation after preemption included
    tokens_reused: int  # a preempted sequence may find its own blocks still cached
    prefix_hits: int  # BlockManager's count: hits of admitted sequences
    peak_running: int
    mean_running: float  # sequences holding KV, per step


def run_pool(
    config: KvBenchConfig, requests: Seq[ReplayRequest], policy: str, block_size: int, caching: bool = False
) -> PoolRun:
    num_blocks = config.pool_tokens // block_size
    bm = BlockManager(num_blocks, block_size, caching, namespace="bench-kv")
    replay = PolicyReplay(bm, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                          max_model_len=config.max_model_len)
    trace = MemoryTrace(config.max_model_len)
    summary = replay.run(requests, trace)
    bm.check_invariants()
    return PoolRun(policy, block_size, num_blocks, caching, summary.steps, summary.preemptions,
                   summary.tokens_computed, summary.tokens_reused, summary.blocks.prefix_hits, trace.peak["running"],
                   trace.mean("running"))


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


def prefix_requests(config: KvBenchConfig, staggered: bool) -> list[ReplayRequest]:
    rng = random.Random(2)
    prefix = [rng.randrange(config.vocab_size) for _ in range(config.prefix_len)]
    out = []
    for i in range(config.prefix_requests):
        suffix = [rng.randrange(config.vocab_size) for _ in range(rng.randint(config.suffix_min, config.suffix_max))]
        out.append(ReplayRequest(tuple(prefix + suffix), config.prefix_max_tokens, 1, i if staggered else 0))
    return out


class _UsedBlocks:
    def __init__(self) -> None:
        self.peak = 0
        self.total = 0
        self.steps = 0

    def __call__(self, replay: PolicyReplay, out: SchedulerOutput) -> None:
        used = replay.block_manager.statistics().used_blocks
        self.peak = max(self.peak, used)
        self.total += used
        self.steps += 1


def run_prefix(config: KvBenchConfig, staggered: bool, caching: bool) -> PrefixRun:
    requests = prefix_requests(config, staggered)
    bs = config.prefix_block_size
    bm = BlockManager(unbounded_blocks(requests, bs, config.max_model_len), bs, caching, namespace="bench-kv")
    replay = PolicyReplay(bm, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                          max_model_len=config.max_model_len)
    used = _UsedBlocks()
    summary = replay.run(requests, used)
    bm.check_invariants()
    stats = summary.blocks
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
        peak_used_blocks=used.peak,
        mean_used_blocks=used.total / used.steps if used.steps else 0.0,
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


def run_fork(config: KvBenchConfig, forked: bool) -> ForkRun:
    base = offline_requests(attrs.evolve(config, num_requests=min(config.fork_requests, 256)))
    if forked:
        requests = [attrs.evolve(r, n=config.fork_n) for r in base]
    else:
        requests = [r for r in base for _ in range(config.fork_n)]
    bs = config.fork_block_size
    bm = BlockManager(unbounded_blocks(requests, bs, config.max_model_len), bs, False, namespace="bench-kv")
    replay = PolicyReplay(bm, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                          max_model_len=config.max_model_len)
    used = _UsedBlocks()
    summary = replay.run(requests, used)
    bm.check_invariants()
    return ForkRun("fork" if forked else "independent", summary.steps, summary.cow_copies, summary.output_tokens,
                   used.peak, used.total / used.steps if used.steps else 0.0)


# ---- the whole benchmark -------------------------------------------------------------------------------------


def run_kv_memory(config: KvBenchConfig) -> dict[str, Any]:
    """Every measurement; returns the JSON record (without the machine and command, see ``run``)."""
    started = time.perf_counter()
    requests = offline_requests(config)
    paged = [run_paged(config, requests, bs) for bs in config.block_sizes]
    pool = [
        run_pool(config, requests, f"paged, blocks of {config.pool_block_size}", config.pool_block_size),
        run_pool(config, requests, f"paged, blocks of {config.pool_block_size}, prefix caching",
                 config.pool_block_size, caching=True),
        run_pool(config, requests, f"contiguous, max_model_len ({config.max_model_len}) per request",
                 config.max_model_len),
    ]
    prefix = [run_prefix(config, staggered, caching) for staggered in (True, False) for caching in (True, False)]
    fork = [run_fork(config, True), run_fork(config, False)]
    return {
        "benchmark": "kv-memory",
        "workload": "OFFLINE-256" if config.num_requests == 256 else f"OFFLINE-256[:{config.num_requests}]",
        "config": attrs.asdict(config),
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "output_tokens": sum(r.max_tokens for r in requests),
        "paged": [attrs.asdict(p) for p in paged],
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
    ("--pool-tokens", "pool_tokens", "the fixed KV pool (in tokens) for the paged vs contiguous comparison"),
    ("--pool-block-size", "pool_block_size", "the paged block size in that comparison"),
    ("--prefix-requests", "prefix_requests", "requests sharing one system prompt"),
    ("--prefix-len", "prefix_len", "the shared system prompt's length"),
    ("--suffix-min", "suffix_min", "shortest distinct suffix"),
    ("--suffix-max", "suffix_max", "longest distinct suffix"),
    ("--prefix-max-tokens", "prefix_max_tokens", "tokens each of those requests generates"),
    ("--prefix-block-size", "prefix_block_size", "the block size for the prefix-caching runs"),
    ("--fork-requests", "fork_requests", "OFFLINE-256 requests run with n samples"),
    ("--fork-n", "fork_n", "samples per request (n)"),
    ("--fork-block-size", "fork_block_size", "the block size for the parallel-sampling runs"),
)


def add_bench_kv(bench_subparsers: Any) -> None:
    """Add ``kv-memory`` to the ``bench`` command's subparsers."""
    defaults = KvBenchConfig()
    p = bench_subparsers.add_parser(
        "kv-memory",
        help="KV memory of OFFLINE-256: paged blocks against contiguous reservations (CPU, no model)",
        description="Replay OFFLINE-256 through the engine's scheduler and block manager (no model, seconds on "
        "the CPU) and measure KV memory: contiguous reservations, paged blocks, internal fragmentation, "
        "prefix caching and copy-on-write forks. Prints a table and writes JSON.",
    )
    p.add_argument("--block-sizes", type=int, nargs="+", default=list(defaults.block_sizes),
                   help=f"paged block sizes to measure (default: {' '.join(map(str, defaults.block_sizes))})")
    for flag, field, text in _FLAGS:
        p.add_argument(flag, type=int, default=getattr(defaults, field), help=f"{text} (default: {getattr(defaults, field)})")
    p.add_argument("--output", default=None, help="the JSON file (default: docs/benchmarks/kv-memory-YYYYMMDD.json)")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> KvBenchConfig:
    fields = {field: getattr(args, field) for _, field, _ in _FLAGS}
    return KvBenchConfig(block_sizes=tuple(args.block_sizes), **fields)


def command_line(config: KvBenchConfig, output: str | None) -> str:
    """The command that reproduces this run: the flags whose values differ from the defaults."""
    defaults = KvBenchConfig()
    parts = ["mini-vllm", "bench", "kv-memory"]
    if config.block_sizes != defaults.block_sizes:
        parts += ["--block-sizes", *map(str, config.block_sizes)]
    for flag, field, _ in _FLAGS:
        if getattr(config, field) != getattr(defaults, field):
            parts += [flag, str(getattr(config, field))]
    if output is not None:
        parts += ["--output", output]
    return " ".join(parts)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                                cwd=Path(__file__).resolve().parent)
        revision = commit.stdout.strip() or "unknown"
    except OSError:
        revision = "unknown"
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "attrs": attrs.__version__, "mini-vllm": revision}


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except ConfigError as exc:
        print(f"mini-vllm bench kv-memory: error: {exc}", file=sys.stderr)
        return 2
    now = dt.datetime.now(dt.UTC)
    record = {
        "command": command_line(config, args.output),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        **run_kv_memory(config),
    }
    print_table(record)
    path = Path(args.output) if args.output else Path("docs/benchmarks") / f"kv-memory-{now.strftime('%Y%m%d')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


# ---- the table ------------------------------------------------------------------------------------------------


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def print_table(record: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    cfg = record["config"]
    paged = record["paged"]
    ref = next((p for p in paged if p["block_size"] == 16), paged[0])

    def w(line: str = "") -> None:
        print(line, file=out)

    w(f"KV memory, {record['workload']}: {record['prompt_tokens']:,} prompt + {record['output_tokens']:,} output tokens; "
      f"max_model_len {cfg['max_model_len']}, max_num_seqs {cfg['max_num_seqs']}, "
      f"{cfg['max_num_batched_tokens']} tokens/step; no preemption ({ref['steps']} steps)")
    w()
    w(f"{'per step, running requests only':<44}{'peak tokens':>13}{'mean tokens':>13}{'live KV share (mean)':>22}")
    live = ref["mean_live_tokens"]
    rows = [
        ("live KV (tokens computed)", ref["peak_live_tokens"], live),
        (f"contiguous, max_model_len ({cfg['max_model_len']}) each", ref["peak_reserved_max_model_len_tokens"],
         ref["mean_reserved_max_model_len_tokens"]),
        ("contiguous, prompt + max_tokens each", ref["peak_reserved_prompt_plus_max_tokens"],
         ref["mean_reserved_prompt_plus_max_tokens"]),
        *((f"paged, blocks of {p['block_size']}", p["peak_held_tokens"], p["mean_held_tokens"]) for p in paged),
    ]
    for name, peak, mean in rows:
        w(f"{name:<44}{peak:>13,}{mean:>13,.0f}{_pct(live, mean):>22}")
    w()
    w(f"{'internal fragmentation (last-block tails)':<44}{'peak tokens':>13}{'mean tokens':>13}"
      f"{'of held':>9}{'mean/seq':>10}{'max/seq':>9}")
    for p in paged:
        w(f"{'  blocks of ' + str(p['block_size']):<44}{p['peak_internal_fragmentation_tokens']:>13,}"
          f"{p['mean_internal_fragmentation_tokens']:>13,.0f}{_pct(p['internal_fragmentation_fraction'], 1):>9}"
          f"{p['mean_tail_tokens_per_seq']:>10.1f}{p['max_tail_tokens_per_seq']:>9}")
    w()
    w(f"one pool of {cfg['pool_tokens']:,} tokens, same scheduler:")
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
      f"{'peak blocks':>13}{'mean blocks':>13}")
    for p in record["prefix_caching"]:
        w(f"  {p['arrival']:<11}{'on' if p['prefix_caching'] else 'off':<6}"
          f"{str(p['prefix_hits']) + ' / ' + str(p['prefix_queries']):>16}{_pct(p['hit_rate'], 1):>10}"
          f"{str(p['prompt_tokens_computed']) + ' / ' + str(p['prompt_tokens']):>24}"
          f"{p['peak_used_blocks']:>13,}{p['mean_used_blocks']:>13,.0f}")
    w()
    ps = record["parallel_sampling"]
    w(f"parallel sampling: the first {ps['requests']} OFFLINE-256 requests, n={ps['n']}, "
      f"blocks of {cfg['fork_block_size']}")
    w(f"  {'':<44}{'peak blocks':>13}{'mean blocks':>13}{'CoW copies':>12}{'steps':>8}")
    for f in ps["runs"]:
        name = "forked after the prefill (shared prompt)" if f["sharing"] == "fork" else f"{ps['n']} independent requests"
        w(f"  {name:<44}{f['peak_used_blocks']:>13,}{f['mean_used_blocks']:>13,.0f}{f['cow_copies']:>12}{f['steps']:>8}")
    w(f"({record['seconds']} s)")


def main(argv: Seq[str] | None = None) -> int:
    """``python -m transport.bench_kv`` runs the same command until ``bench`` registers it."""
    parser = argparse.ArgumentParser(prog="mini-vllm bench")
    add_bench_kv(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["kv-memory", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
