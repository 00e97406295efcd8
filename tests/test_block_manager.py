"""Block manager invariants under random operation sequences, and prefix-caching rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mini_vllm.engine.block_manager import BlockManager

BS = 4


def test_prefix_lookup_stops_at_first_miss_and_never_covers_last_token() -> None:
    bm = BlockManager(16, BS, True, "m")
    tokens = list(range(12))  # 3 full blocks
    assert bm.match_prefix(1, tokens) == 0
    assert bm.allocate(1, 12) == []
    bm.cache_full_blocks(1, tokens, 12)
    bm.free(1)
    # Same 12 tokens: the last token must be recomputed, so only 2 blocks (8 tokens) are reused.
    assert bm.match_prefix(2, tokens) == 8
    # Differs in the second block: only the first block hits, even though the third matches.
    other = tokens[:4] + [99, 5, 6, 7] + tokens[8:] + [50]
    assert bm.match_prefix(3, other) == 4
    bm.check_invariants()


def test_namespaces_never_share() -> None:
    a, b = BlockManager(8, BS, True, "model-a"), BlockManager(8, BS, True, "model-b")
    tokens = list(range(9))
    a.match_prefix(1, tokens)
    a.allocate(1, 9)
    a.cache_full_blocks(1, tokens, 8)
    assert a._chain(None, tuple(tokens[:4])) != b._chain(None, tuple(tokens[:4]))


def test_hash_collision_is_a_miss_not_wrong_output() -> None:
    bm = BlockManager(8, BS, True, "m")
    tokens = [1, 2, 3, 4, 5]
    bm.match_prefix(1, tokens)
    bm.allocate(1, 5)
    bm.cache_full_blocks(1, tokens, 4)
    bm.free(1)
    # Forge a collision: make another prefix's hash point at the cached block.
    forged = [9, 9, 9, 9, 9]
    bm._by_hash[bm._chain(None, (9, 9, 9, 9))] = next(iter(bm._content))
    assert bm.match_prefix(2, forged) == 0


def test_lru_eviction_prefers_never_used_blocks_then_oldest_cached() -> None:
    bm = BlockManager(4, BS, True, "m")
    for sid, base in ((1, 0), (2, 100)):
        toks = [base + i for i in range(5)]
        bm.match_prefix(sid, toks)
        bm.allocate(sid, 5)
        bm.cache_full_blocks(sid, toks, 4)
    bm.free(1)
    bm.free(2)
    s = bm.statistics()
    assert (s.free_blocks, s.cached_blocks) == (2, 2)
    bm.match_prefix(3, [7] * 9)
    assert bm.allocate(3, 9) is not None  # 3 blocks: 2 free ones first, then evicts seq 1's (older)
    assert bm.statistics().evictions == 1
    assert bm.match_prefix(4, [100, 101, 102, 103, 104]) == 4  # seq 2's block survived
    assert bm.match_prefix(5, [0, 1, 2, 3, 4]) == 0


def test_allocate_fails_cleanly_when_full() -> None:
    bm = BlockManager(2, BS, False, "m")
    bm.match_prefix(1, [1] * 8)
    assert bm.allocate(1, 8) == []
    bm.match_prefix(2, [2])
    assert bm.allocate(2, 1) is None
    assert bm.tables[2] == []
    bm.check_invariants()


ops = st.lists(
    st.tuples(st.sampled_from(["new", "grow", "fork", "free", "cache"]), st.integers(0, 7), st.integers(1, 40)),
    max_size=80,
)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None)
@given(ops=ops, caching=st.booleans())
def test_random_operations_keep_invariants(ops: list[tuple[str, int, int]], caching: bool) -> None:
    bm = BlockManager(12, BS, caching, "m")
    tokens: dict[int, list[int]] = {}
    computed: dict[int, int] = {}
    next_id = 100
    for op, sid, n in ops:
        live = sorted(tokens)
        if op == "new" and sid not in tokens:
            toks = [(sid * 7 + i) % 5 for i in range(n)]  # few distinct values: many shared prefixes
            tokens[sid] = toks
            computed[sid] = bm.match_prefix(sid, toks)
            if computed[sid] >= len(toks):
                raise RuntimeError("the last token must never come from the cache")
        elif op == "grow" and live:
            s = live[sid % len(live)]
            target = min(len(tokens[s]), computed[s] + n)
            if bm.allocate(s, target) is not None:
                computed[s] = target
        elif op == "cache" and live:
            s = live[sid % len(live)]
            if len(bm.tables[s]) * BS >= computed[s]:
                bm.cache_full_blocks(s, tokens[s], computed[s])
        elif op == "fork" and live:
            s = live[sid % len(live)]
            bm.fork(s, next_id)
            tokens[next_id], computed[next_id] = list(tokens[s]), computed[s]
            next_id += 1
        elif op == "free" and live:
            s = live[sid % len(live)]
            bm.free(s)
            del tokens[s], computed[s]
        bm.check_invariants()
    for s in list(tokens):
        bm.free(s)
    bm.check_invariants()
    stats = bm.statistics()
    assert stats.used_blocks == 0
    assert stats.free_blocks + stats.cached_blocks == 12


def test_hits_count_once_when_a_failed_admission_is_retried() -> None:
    bm = BlockManager(4, BS, True, "m")
    tokens = list(range(9))  # 2 full blocks + 1 token
    bm.match_prefix(1, tokens)
    bm.allocate(1, 9)
    bm.cache_full_blocks(1, tokens, 8)
    bm.free(1)  # two cached blocks, two free
    hog = [50] * 8
    bm.match_prefix(2, hog)
    bm.allocate(2, 8)  # takes the two free blocks
    for _ in range(3):  # admission of the same prompt fails (needs a third block) and is retried
        assert bm.match_prefix(3, tokens) == 8
        assert bm.allocate(3, 9) is None
        bm.free(3)
    assert bm.statistics().prefix_hits == 0
    bm.free(2)
    assert bm.match_prefix(3, tokens) == 8
    assert bm.allocate(3, 9) is not None
    stats = bm.statistics()
    # Queries: seq 1's 2 blocks, the hog's 1, and seq 3's 2 once (not once per failed try).
    assert (stats.prefix_hits, stats.prefix_queries) == (2, 5)
