"""``bench kv-memory``: the policy replay is faithful to the engine, and its figures are consistent."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import attrs
import pytest

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.block_manager import BlockManager
from engine.errors import ConfigError
from engine.scheduler import SchedulerOutput
from transport.bench_kv import (
    KvBenchConfig,
    PolicyReplay,
    ReplayRequest,
    add_bench_kv,
    offline_requests,
    prefix_requests,
    run_fork,
    run_paged,
    run_pool,
    run_prefix,
)

pytestmark = pytest.mark.timeout(60)

SMALL = KvBenchConfig(
    num_requests=24,
    pool_tokens=8192,
    prefix_requests=10,
    prefix_len=128,
    suffix_min=8,
    suffix_max=40,
    prefix_max_tokens=16,
    fork_requests=6,
    fork_n=3,
)


def test_paged_holds_less_than_reservations_and_fragmentation_is_a_partial_block() -> None:
    requests = offline_requests(SMALL)
    runs = {bs: run_paged(SMALL, requests, bs) for bs in SMALL.block_sizes}
    r8, r16, r32 = runs[8], runs[16], runs[32]
    # The pool is unbounded: the schedule is the same whatever the block size.
    assert {r.preemptions for r in runs.values()} == {0}
    assert len({(r.steps, r.peak_live_tokens, r.mean_live_tokens, r.peak_running) for r in runs.values()}) == 1
    # A multiple of 32 is a multiple of 16 and of 8: smaller blocks never hold more.
    assert r8.peak_live_tokens <= r8.peak_held_tokens <= r16.peak_held_tokens <= r32.peak_held_tokens
    assert r8.mean_live_tokens <= r8.mean_held_tokens <= r16.mean_held_tokens <= r32.mean_held_tokens
    for r in runs.values():
        assert r.peak_held_tokens <= r.peak_reserved_prompt_plus_max_tokens <= r.peak_reserved_max_model_len_tokens
        assert r.mean_held_tokens <= r.mean_reserved_prompt_plus_max_tokens <= r.mean_reserved_max_model_len_tokens
        assert r.peak_reserved_max_model_len_tokens == r.peak_running * SMALL.max_model_len
        # Internal fragmentation is the tail of each sequence's last block: under one block per sequence.
        assert r.max_tail_tokens_per_seq < r.block_size
        assert 0 < r.mean_tail_tokens_per_seq < r.block_size
        assert r.mean_internal_fragmentation_tokens == pytest.approx(r.mean_held_tokens - r.mean_live_tokens)
        assert r.internal_fragmentation_fraction == pytest.approx(r.mean_internal_fragmentation_tokens / r.mean_held_tokens)
        snap = r.at_peak_held
        assert snap["held_tokens"] == r.peak_held_tokens
        assert snap["held_tokens"] - snap["live_tokens"] < r.block_size * snap["running"]
    assert r8.mean_tail_tokens_per_seq < r16.mean_tail_tokens_per_seq < r32.mean_tail_tokens_per_seq


def test_fixed_pool_fits_more_requests_paged_than_reserved() -> None:
    requests = offline_requests(SMALL)
    paged = run_pool(SMALL, requests, "paged", 16)
    contiguous = run_pool(SMALL, requests, "contiguous", SMALL.max_model_len)
    no_recompute = sum(len(r.prompt_token_ids) + r.max_tokens - 1 for r in requests)  # the last token is never fed
    assert contiguous.num_blocks == SMALL.pool_tokens // SMALL.max_model_len
    assert contiguous.peak_running == contiguous.num_blocks  # one reservation per request, never more
    assert contiguous.preemptions == 0 and contiguous.tokens_computed == no_recompute
    assert paged.tokens_computed >= no_recompute  # preempted sequences compute again
    assert paged.mean_running > contiguous.mean_running
    assert paged.steps < contiguous.steps
    assert paged.preemptions > 0, "the pool was meant to be too small for paging to fit everyone"
    # With the prefix cache on, a preempted sequence takes back those of its blocks not yet evicted.
    cached = run_pool(SMALL, requests, "paged, cached", 16, caching=True)
    assert cached.tokens_reused > 0
    assert cached.tokens_reused % 16 == 0 and cached.tokens_reused <= cached.prefix_hits * 16
    assert paged.tokens_reused == 0


def test_prefix_cache_hits_are_exactly_the_shared_blocks() -> None:
    bs = SMALL.prefix_block_size
    prompts = [r.prompt_token_ids for r in prefix_requests(SMALL, staggered=True)]
    queries = sum((len(p) - 1) // bs for p in prompts)  # full blocks, the last token excluded
    staggered = run_prefix(SMALL, staggered=True, caching=True)
    # One request per step: each later one finds the first one's whole prefix cached.
    assert staggered.prefix_hits == (SMALL.prefix_requests - 1) * (SMALL.prefix_len // bs)
    assert staggered.prefix_queries == queries
    assert staggered.hit_rate == pytest.approx(staggered.prefix_hits / queries)
    assert staggered.prompt_tokens_computed == staggered.prompt_tokens - staggered.prefix_hits * bs
    assert staggered.tokens_reused == staggered.prefix_hits * bs  # no admission failed after its lookup
    uncached = run_prefix(SMALL, staggered=True, caching=False)
    assert (uncached.prefix_hits, uncached.prefix_queries) == (0, 0)
    assert uncached.prompt_tokens_computed == uncached.prompt_tokens
    assert staggered.peak_used_blocks < uncached.peak_used_blocks
    # All at once: requests admitted in the first step find nothing cached yet (blocks are published
    # when a step lands). Here every prompt fits the first step's token budget: no hit at all.
    assert staggered.prompt_tokens <= SMALL.max_num_batched_tokens
    burst = run_prefix(SMALL, staggered=False, caching=True)
    assert burst.prefix_hits == 0 and burst.steps < staggered.steps
    # With a smaller budget the burst is admitted over several steps: the later ones hit.
    tight = run_prefix(attrs.evolve(SMALL, max_num_batched_tokens=320), staggered=False, caching=True)
    assert 0 < tight.prefix_hits < staggered.prefix_hits
    assert tight.prefix_hits % (SMALL.prefix_len // bs) == 0  # whole prefixes hit, or none
    assert tight.evictions == staggered.evictions == 0  # the pool is large enough


def test_forked_samples_share_the_prompt_and_copy_one_partial_block() -> None:
    forked, independent = run_fork(SMALL, True), run_fork(SMALL, False)
    requests = offline_requests(KvBenchConfig(num_requests=SMALL.fork_requests))
    assert forked.output_tokens == independent.output_tokens == SMALL.fork_n * sum(r.max_tokens for r in requests)
    assert forked.peak_used_blocks < independent.peak_used_blocks
    partial = sum(1 for r in requests if len(r.prompt_token_ids) % SMALL.fork_block_size)
    assert forked.cow_copies == (SMALL.fork_n - 1) * partial
    assert independent.cow_copies == 0


def _engine_trace(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[int, ...]]:
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    trace = []
    while engine.has_unfinished_requests():
        batch = engine.schedule()
        assert batch is not None
        s = engine.block_manager.statistics()
        trace.append((batch.scheduled.num_tokens, len(batch.scheduled.copies), s.used_blocks, s.cached_blocks))
        engine.process(batch, engine.execute(batch))
    return trace


def test_replay_matches_the_engine_step_for_step(demo_model_dir: Path) -> None:
    """The replay drives the scheduler and block manager exactly as LLMEngine does: same blocks every step,
    with prefix hits, chunked prefill, preemption and an n > 1 fork in play."""
    rng = random.Random(7)
    shared = [rng.randrange(3, 250) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 250) for _ in range(rng.randint(5, 50))] for _ in range(6)]
    max_tokens = [rng.randint(8, 40) for _ in prompts]
    ns = [1, 3, 1, 1, 2, 1]
    params = [SamplingParams(n=n, temperature=1.0, seed=1, max_tokens=m, ignore_eos=True) for n, m in zip(ns, max_tokens, strict=True)]
    args = dict(num_kv_blocks=24, block_size=8, max_model_len=160, max_num_batched_tokens=64, max_num_seqs=8)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(demo_model_dir), device="cpu", **args))
    want = _engine_trace(engine, prompts, params)
    assert engine.statistics().num_preemptions > 0, "the pool was meant to be too small"
    assert engine.block_manager.statistics().prefix_hits > 0 and any(copies for _, copies, _, _ in want)

    bm = BlockManager(24, 8, True, namespace="replay")
    replay = PolicyReplay(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=160)
    got: list[tuple[int, ...]] = []

    def observe(r: PolicyReplay, out: SchedulerOutput) -> None:
        s = r.block_manager.statistics()
        got.append((out.num_tokens, len(out.copies), s.used_blocks, s.cached_blocks))

    summary = replay.run([ReplayRequest(tuple(p), m, n) for p, m, n in zip(prompts, max_tokens, ns, strict=True)], observe)
    assert got == want
    assert summary.preemptions == engine.statistics().num_preemptions
    e = engine.block_manager.statistics()
    assert (summary.blocks.prefix_hits, summary.blocks.prefix_queries) == (e.prefix_hits, e.prefix_queries)
    assert summary.output_tokens == sum(n * m for n, m in zip(ns, max_tokens, strict=True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mini-vllm bench")
    add_bench_kv(parser.add_subparsers(dest="bench_command", required=True))
    return parser


SMALL_FLAGS = [
    "--num-requests", "12", "--pool-tokens", "8192", "--prefix-requests", "6", "--prefix-len", "64",
    "--suffix-min", "4", "--suffix-max", "20", "--prefix-max-tokens", "8", "--fork-requests", "4", "--fork-n", "2",
]


def test_command_prints_a_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kv.json"
    args = _parser().parse_args(["kv-memory", *SMALL_FLAGS, "--block-sizes", "16", "32", "--output", str(out)])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "paged, blocks of 16" in table and "paged, blocks of 32" in table and "prefix caching" in table
    record = json.loads(out.read_text())
    assert record["workload"] == "OFFLINE-256[:12]"
    assert record["command"].startswith("mini-vllm bench kv-memory --block-sizes 16 32 --num-requests 12")
    assert [p["block_size"] for p in record["paged"]] == [16, 32]
    assert record["machine"]["cpus"] >= 1 and record["date"]
    assert {p["arrival"] for p in record["prefix_caching"]} == {"staggered", "burst"}


def test_bad_flags_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["kv-memory", "--prefix-len", "2000", "--output", str(tmp_path / "x.json")])
    assert args.func(args) == 2
    assert "prefix_len + suffix_max + prefix_max_tokens" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ConfigError, match="block_sizes"):
        KvBenchConfig(block_sizes=(16, 0))
    with pytest.raises(ConfigError, match="pool_tokens"):
        KvBenchConfig(pool_tokens=1024)
