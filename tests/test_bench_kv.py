"""``bench memory``: its figures are consistent (the replay lands tokens through the engine's own
``engine.landing.land_step``), and the command's flags, files and errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import attrs
import pytest

from mini_vllm.bench.memory import (
    WASTE_PARTS,
    KvBenchConfig,
    SchemeMemory,
    add_bench_kv,
    draw_memory,
    offline_requests,
    prefix_requests,
    run_fork,
    run_offline,
    run_pool,
    run_pools,
    run_prefix,
    sample_steps,
)
from mini_vllm.engine.errors import ConfigError

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
    series_points=100_000,  # keep every step, so every step's figures are checked
)


def _waste(s: SchemeMemory, i: int) -> float:
    return sum(s.series[part][i] for part in WASTE_PARTS)


def test_waste_shares_add_up_and_order_the_schemes() -> None:
    config = attrs.evolve(SMALL, block_sizes=(1, 8, 16, 32, 256))
    run = run_offline(config, offline_requests(config))
    by_name = {s.scheme: s for s in run.schemes}
    reserve_max, exact = by_name["contiguous, max_model_len (2048)"], by_name["contiguous, exact final length"]
    paged = {s.block_size: s for s in run.schemes if s.block_size is not None}
    assert list(by_name) == ["contiguous, max_model_len (2048)", "contiguous, exact final length",
                             *(f"paged, blocks of {bs}" for bs in (1, 8, 16, 32, 256))]
    assert run.preemptions == 0 and run.series["step"] == list(range(run.steps))
    running, live = run.series["running"], run.series["live_tokens"]
    for s in run.schemes:
        fp = s.series["footprint_tokens"]
        for i in range(run.steps):
            # Every scheme holds the same live KV (nothing is shared here); the rest is its waste, part by part.
            assert fp[i] - _waste(s, i) == live[i]
            assert s.series["waste_share"][i] == pytest.approx(_waste(s, i) / fp[i], abs=1e-5)
            assert s.series["shared_saved"][i] == 0  # OFFLINE-256's prompts are random: no block is shared
        assert sum(s.shares_token_weighted.values()) == pytest.approx(s.waste_share_token_weighted)
        assert sum(s.shares_mean.values()) == pytest.approx(s.waste_share_mean)
        assert s.mean_footprint_tokens == pytest.approx(s.mean_live_tokens + sum(s.mean_tokens[p] for p in WASTE_PARTS))
        assert s.mean_live_tokens == pytest.approx(run.mean_live_tokens)
        assert s.saved_by_sharing_share == 0.0
        assert 0 <= s.waste_share_mean <= s.waste_share_peak < 1
    for i in range(run.steps):
        assert reserve_max.series["footprint_tokens"][i] == running[i] * config.max_model_len
        assert exact.series["reserved_never"][i] == running[i]  # the last sampled token is never fed back
        assert reserve_max.series["reserved_future"][i] == exact.series["reserved_future"][i]
        # max_model_len >= exact length >= blocks of one token, at every step.
        assert reserve_max.series["waste_share"][i] >= exact.series["waste_share"][i] >= paged[1].series["waste_share"][i]
        for small, large in ((1, 8), (8, 16), (16, 32), (32, 256)):  # each size divides the next: never less waste
            assert paged[small].series["internal"][i] <= paged[large].series["internal"][i]
        for bs, s in paged.items():
            assert s.series["internal"][i] <= running[i] * (bs - 1)  # under one block per sequence
            assert s.series["reserved_future"][i] == s.series["reserved_never"][i] == 0  # blocks are taken as needed
    assert paged[1].waste_share_peak == 0.0 and paged[1].max_tail_tokens_per_seq == 0
    for bs in (8, 16, 32, 256):
        s = paged[bs]
        assert s.max_tail_tokens_per_seq is not None and s.max_tail_tokens_per_seq < bs
        assert s.mean_tail_tokens_per_seq is not None and 0 < s.mean_tail_tokens_per_seq < bs
    for average in ("waste_share_mean", "waste_share_token_weighted"):
        values = [getattr(s, average) for s in (reserve_max, exact, paged[32], paged[16], paged[8], paged[1])]
        assert values == sorted(values, reverse=True) and values[0] > values[1] > values[2]
    assert exact.shares_token_weighted["internal"] == paged[16].shares_token_weighted["reserved_future"] == 0


def test_sampled_series_keep_the_first_and_last_step() -> None:
    assert sample_steps(5, 10) == [0, 1, 2, 3, 4]
    for steps, points in ((1030, 256), (257, 256), (1000, 2), (99, 7)):
        picks = sample_steps(steps, points)
        assert picks[0] == 0 and picks[-1] == steps - 1 and len(picks) <= points
        assert picks == sorted(set(picks))
    run = run_offline(attrs.evolve(SMALL, series_points=16, block_sizes=(16,)), offline_requests(SMALL))
    assert len(run.series["step"]) <= 16 and run.series["step"][-1] == run.steps - 1
    assert all(len(v) == len(run.series["step"]) for s in run.schemes for v in s.series.values())


def test_a_fixed_budget_fits_more_requests_paged_than_reserved() -> None:
    requests = offline_requests(SMALL)
    runs = {p.policy: p for p in run_pools(SMALL, requests)}
    reserve_max = runs["contiguous, max_model_len (2048) each"]
    exact = runs["contiguous, exact final length each"]
    paged = runs["paged, blocks of 16"]
    no_recompute = sum(len(r.prompt_token_ids) + r.max_tokens - 1 for r in requests)  # the last token is never fed
    assert reserve_max.peak_running == SMALL.pool_tokens // SMALL.max_model_len  # one reservation per request
    # A reservation covers the whole request: nothing is ever preempted, nothing computed twice.
    for contiguous in (reserve_max, exact):
        assert contiguous.preemptions == 0 and contiguous.tokens_computed == no_recompute
    finals = sorted(len(r.prompt_token_ids) + r.max_tokens for r in requests)
    assert exact.peak_running <= max(k for k in range(len(finals) + 1) if sum(finals[:k]) <= SMALL.pool_tokens)
    assert reserve_max.mean_running < exact.mean_running < paged.mean_running
    assert paged.steps < exact.steps < reserve_max.steps
    assert paged.tokens_computed >= no_recompute  # preempted sequences compute again
    assert paged.preemptions > 0, "the budget was meant to be too small for paging to fit everyone"
    assert {f"paged, blocks of {bs}" for bs in SMALL.block_sizes} <= set(runs)
    # With the prefix cache on, a preempted sequence takes back those of its blocks not yet evicted.
    cached = runs["paged, blocks of 16, prefix caching"]
    assert cached.tokens_reused > 0
    assert cached.tokens_reused % 16 == 0 and cached.tokens_reused <= cached.prefix_hits * 16
    assert paged.tokens_reused == 0
    assert run_pool(SMALL, requests, "paged, blocks of 16", 16) == paged  # deterministic


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
    # Sharing: the running requests hold the prefix once; each other holder saves a whole prefix.
    assert burst.saved_by_sharing_share == 0.0 and tight.saved_by_sharing_share > 0  # no hit, nothing shared
    assert uncached.peak_saved_by_sharing_tokens == 0 and uncached.saved_by_sharing_share == 0.0
    assert staggered.peak_saved_by_sharing_tokens > 0 and staggered.peak_saved_by_sharing_tokens % SMALL.prefix_len == 0
    assert 0 < staggered.saved_by_sharing_share < 1 and 0 < staggered.saved_by_sharing_share_mean < 1
    assert 0 < staggered.waste_share < 1 / 2


def test_forked_samples_share_the_prompt_and_copy_one_partial_block() -> None:
    forked, independent = run_fork(SMALL, True), run_fork(SMALL, False)
    requests = offline_requests(KvBenchConfig(num_requests=SMALL.fork_requests))
    assert forked.output_tokens == independent.output_tokens == SMALL.fork_n * sum(r.max_tokens for r in requests)
    assert forked.peak_used_blocks < independent.peak_used_blocks
    partial = sum(1 for r in requests if len(r.prompt_token_ids) % SMALL.fork_block_size)
    assert forked.cow_copies == (SMALL.fork_n - 1) * partial
    assert independent.cow_copies == 0
    assert 0 < forked.saved_by_sharing_share < 1 and independent.saved_by_sharing_share == 0.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mini-vllm bench")
    add_bench_kv(parser.add_subparsers(dest="bench_command", required=True))
    return parser


SMALL_FLAGS = [
    "--num-requests", "12", "--pool-tokens", "8192", "--prefix-requests", "6", "--prefix-len", "64",
    "--suffix-min", "4", "--suffix-max", "20", "--prefix-max-tokens", "8", "--fork-requests", "4", "--fork-n", "2",
]


def test_memory_and_its_old_name_parse_alike() -> None:
    new = _parser().parse_args(["memory", "--block-sizes", "8", "256", "--plot", "w.png"])
    old = _parser().parse_args(["kv-memory", "--block-sizes", "8", "256", "--plot", "w.png"])
    assert new.func is old.func
    assert {k: v for k, v in vars(new).items() if k != "bench_command"} == {
        k: v for k, v in vars(old).items() if k != "bench_command"}
    defaults = _parser().parse_args(["memory"])
    assert defaults.block_sizes == [8, 16, 32, 256] and defaults.plot is None and defaults.output is None


def test_command_prints_a_table_and_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "memory.json"
    args = _parser().parse_args(["memory", *SMALL_FLAGS, "--block-sizes", "16", "32", "--output", str(out)])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert "paged, blocks of 16" in table and "paged, blocks of 32" in table and "prefix caching" in table
    assert "contiguous, exact final length" in table and "vLLM paper" in table
    record = json.loads(out.read_text())
    assert record["benchmark"] == "memory" and record["workload"] == "OFFLINE-256[:12]"
    assert record["command"].startswith("mini-vllm bench memory --block-sizes 16 32 --num-requests 12")
    assert [s["block_size"] for s in record["offline"]["schemes"]] == [None, None, 16, 32]
    assert record["machine"]["cpus"] >= 1 and record["date"]
    assert {p["arrival"] for p in record["prefix_caching"]} == {"staggered", "burst"}
    png = out.with_suffix(".png")  # next to the JSON by default
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert f"wrote {png}" in captured.err
    # --plot chooses the picture's path; the JSON alone is enough to draw it again.
    elsewhere = tmp_path / "pictures" / "waste.png"
    assert draw_memory(record, elsewhere) and elsewhere.read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_the_picture_is_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure raises ImportError
    out = tmp_path / "memory.json"
    args = _parser().parse_args(["memory", *SMALL_FLAGS, "--block-sizes", "16", "--output", str(out),
                                 "--plot", str(tmp_path / "w.png")])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "pip install 'mini-vllm[bench]'" in err
    assert len([line for line in err.splitlines() if "skipped" in line]) == 1
    assert out.exists() and not (tmp_path / "w.png").exists()
    assert json.loads(out.read_text())["command"].endswith(f"--plot {tmp_path / 'w.png'}")


def test_bad_flags_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["memory", "--prefix-len", "2000", "--output", str(tmp_path / "x.json")])
    assert args.func(args) == 2
    assert "prefix_len + suffix_max + prefix_max_tokens" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ConfigError, match="block_sizes"):
        KvBenchConfig(block_sizes=(16, 0))
    with pytest.raises(ConfigError, match="must not repeat"):
        KvBenchConfig(block_sizes=(16, 16))
    with pytest.raises(ConfigError, match="pool_tokens"):
        KvBenchConfig(pool_tokens=1024)
    with pytest.raises(ConfigError, match="series_points"):
        KvBenchConfig(series_points=1)
