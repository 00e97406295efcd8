"""Triton attention kernels against the plain-torch reference, run by Triton's CPU interpreter.

Shapes are small so the interpreter stays quick. The same comparisons at real shapes on a GPU
live in ``test_triton_attention_gpu.py`` (which must not run interpreted).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

# Must be set before triton is imported: @triton.jit picks the interpreter at decoration time.
os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

import numpy as np
import torch
from triton.runtime import interpreter

from mini_vllm.engine import triton_attention as ta
from mini_vllm.engine.attention import (
    AttentionMetadata,
    build_metadata,
    check_gpu_head_dim,
    paged_attention_reference,
    store_kv_reference,
)
from mini_vllm.engine.errors import ConfigError

if not ta.INTERPRETED:
    pytest.fail(
        "mini_vllm.engine.triton_attention was imported before TRITON_INTERPRET=1 was set, so its kernels "
        "are compiled for a GPU; set TRITON_INTERPRET in conftest.py or run this file on its own",
        pytrace=False,
    )

TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}

# A mixed batch: a prefill after a cached prefix, a fresh prefill, decodes (one at a block
# boundary, one with a single token), a sequence with no new tokens, lengths off block multiples.
MIXED_QUERY_LENS = [37, 20, 1, 1, 0, 1, 5]
MIXED_SEQ_LENS = [53, 20, 17, 1, 9, 40, 32]


class Case:
    """Random q, paged caches (non-contiguous shuffled blocks) and metadata for one batch."""

    def __init__(
        self,
        query_lens: list[int],
        seq_lens: list[int],
        num_heads: int = 4,
        num_kv_heads: int = 2,
        head_dim: int = 64,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        guard: bool = False,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + 5  # spare blocks hold garbage that must never be read
        order = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables: list[list[int]] = []
        for n in blocks_per_seq:
            self.tables.append(order[:n])
            order = order[n:]
        slots = [
            table[p // block_size] * block_size + p % block_size
            for q_len, seq_len, table in zip(query_lens, seq_lens, self.tables, strict=True)
            for p in range(seq_len - q_len, seq_len)
        ]
        self.meta = build_metadata(query_lens, seq_lens, self.tables, slots)
        num_tokens = sum(query_lens)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype)
        self.query = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(dtype)
        self.key = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(dtype)
        self.value = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(dtype)
        if guard:  # every head followed by NaN lanes: see with_guard_lanes
            self.k_cache, self.v_cache = with_guard_lanes(self.k_cache), with_guard_lanes(self.v_cache)
            self.query = with_guard_lanes(self.query)
            self.key, self.value = with_guard_lanes(self.key), with_guard_lanes(self.value)
        self.scale = head_dim**-0.5
        store_kv_reference(self.key, self.value, self.k_cache, self.v_cache, self.meta.slot_mapping)

    def reference(self, query: torch.Tensor | None = None, meta: AttentionMetadata | None = None) -> torch.Tensor:
        return paged_attention_reference(
            self.query if query is None else query, self.k_cache, self.v_cache, meta or self.meta, self.scale
        )


def poisoned(like: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write fails the comparison."""
    return torch.full_like(like, float("nan"))


# What a store target's guard lanes hold: exact in every dtype, no kernel computes it, and it is
# not NaN, which is what the guards of the tensors a kernel reads hold (a NaN copied over a NaN
# would not show).
STORE_GUARD = 1280.0


def with_guard_lanes(data: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """``data`` as a view into a wider tensor whose lanes past head_dim hold ``fill``.

    A head that is no power of two is walked in more lanes than it has. A kernel that loads a
    lane past head_dim gets NaN into its result, and one that stores there changes a guard lane
    (``assert_guards_intact``). The guard (head_dim + 16 lanes) covers every padded lane,
    wherever the head sits in the tensor.
    """
    head_dim = data.shape[-1]
    wide = torch.full((*data.shape[:-1], 2 * head_dim + 16), fill, dtype=data.dtype)
    wide[..., :head_dim] = data
    return wide[..., :head_dim]


def guard_lanes(view: torch.Tensor) -> torch.Tensor:
    """The NaN lanes behind a ``with_guard_lanes`` view."""
    head_dim, width = view.shape[-1], view.stride(-2)
    return view.as_strided((*view.shape[:-1], width - head_dim), view.stride(), view.storage_offset() + head_dim)


def assert_guards_intact(*views: torch.Tensor) -> None:
    """Each store target's guard lanes still hold STORE_GUARD: nothing was written past head_dim."""
    for view in views:
        assert (guard_lanes(view) == STORE_GUARD).all(), "a kernel wrote a lane past head_dim"


def decode_meta(case: Case) -> AttentionMetadata:
    """One new token per sequence of ``case`` (its last), as a decode-only step."""
    n = case.meta.num_seqs
    return build_metadata([1] * n, case.meta.seq_lens_list, case.tables, [0] * n)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[expected.dtype])


# --------------------------------------------------------------------------- store_kv


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 8])
def test_store_kv_matches_reference_and_skips_padding(dtype: torch.dtype, block_size: int) -> None:
    case = Case([5, 1, 3], [21, 9, 3], num_kv_heads=3, head_dim=32, block_size=block_size, dtype=dtype)
    # Padding tokens (slot -1) interleaved with real ones; K/V as strided views of a fused qkv.
    slots = case.meta.slot_mapping.tolist()
    slots = torch.tensor(slots[:2] + [-1] + slots[2:] + [-1, -1], dtype=torch.int64)
    fused = torch.randn(len(slots), 3 * 3 * 32).to(dtype)
    key = fused[:, 3 * 32 : 6 * 32].view(-1, 3, 32)
    value = fused[:, 6 * 32 :].view(-1, 3, 32)
    assert not key.is_contiguous()
    expected_k, expected_v = case.k_cache.clone(), case.v_cache.clone()
    store_kv_reference(key, value, expected_k, expected_v, slots)
    ta.store_kv_triton(key, value, case.k_cache, case.v_cache, slots)
    assert torch.equal(case.k_cache, expected_k)
    assert torch.equal(case.v_cache, expected_v)


@pytest.mark.timeout(120)
def test_store_kv_casts_to_cache_dtype() -> None:
    case = Case([4], [4], num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    key, value = torch.randn(4, 2, 16), torch.randn(4, 2, 16)  # fp32 into a bf16 cache
    expected_k, expected_v = case.k_cache.clone(), case.v_cache.clone()
    store_kv_reference(key, value, expected_k, expected_v, case.meta.slot_mapping)
    ta.store_kv_triton(key, value, case.k_cache, case.v_cache, case.meta.slot_mapping)
    # Within one bf16 ulp: the interpreter rounds fp32 -> bf16 toward zero where the GPU (and
    # torch) round to nearest even. The GPU test checks this exactly.
    torch.testing.assert_close(case.k_cache, expected_k, atol=0, rtol=2**-7)
    torch.testing.assert_close(case.v_cache, expected_v, atol=0, rtol=2**-7)


# --------------------------------------------------------------------------- prefill


def test_prefill_schedule_covers_every_token_once() -> None:
    starts = [0, 5, 5, 6, 23, 24]  # q_lens 5, 0, 1, 17, 1
    schedule = ta.build_prefill_schedule(starts, tokens_per_tile=4, device="cpu")
    assert schedule.tile_map.dtype == torch.int32
    assert schedule.tile_map.tolist() == [[0, 0], [0, 4], [2, 0], [3, 0], [3, 4], [3, 8], [3, 12], [3, 16], [4, 0]]
    assert ta.build_prefill_schedule([0], 4, "cpu").num_tiles == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (4, 4), (4, 1)])
def test_prefill_mixed_batch_matches_reference(dtype: torch.dtype, num_heads: int, num_kv_heads: int) -> None:
    case = Case(MIXED_QUERY_LENS, MIXED_SEQ_LENS, num_heads, num_kv_heads, dtype=dtype, seed=1)
    out = ta.prefill_attention_triton(
        case.query, case.k_cache, case.v_cache, case.meta, case.scale, poisoned(case.query)
    )
    assert_close(out, case.reference())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("block_size", "block_m", "block_n", "head_dim"),
    [
        (32, 16, 16, 64),  # key tile smaller than a cache block; several query tiles per sequence
        (8, 32, 32, 32),  # key tile spans several cache blocks
        (16, 16, 64, 128),
    ],
)
def test_prefill_tile_shapes(block_size: int, block_m: int, block_n: int, head_dim: int) -> None:
    case = Case(MIXED_QUERY_LENS, MIXED_SEQ_LENS, head_dim=head_dim, block_size=block_size, seed=2)
    out = ta.prefill_attention_triton(
        case.query,
        case.k_cache,
        case.v_cache,
        case.meta,
        case.scale,
        poisoned(case.query),
        block_m=block_m,
        block_n=block_n,
    )
    assert_close(out, case.reference())


@pytest.mark.timeout(120)
def test_prefill_strided_query_and_reused_schedule() -> None:
    case = Case([9, 1, 30], [9, 26, 47], seed=3)
    # The model hands over q as a view of a fused qkv projection.
    fused = torch.cat([case.query.flatten(1), torch.randn(case.query.shape[0], 2 * 2 * 64)], dim=1)
    query = fused[:, : 4 * 64].view(-1, 4, 64)
    assert not query.is_contiguous()
    tokens = ta.prefill_tokens_per_tile(4, 2, block_m=32)
    schedule = ta.build_prefill_schedule(case.meta.query_start_loc_list, tokens, "cpu")
    for _ in range(2):  # one schedule, several layers
        out = ta.prefill_attention_triton(
            query, case.k_cache, case.v_cache, case.meta, case.scale, poisoned(case.query), schedule=schedule
        )
        assert_close(out, case.reference())


@pytest.mark.timeout(120)
def test_prefill_schedule_with_a_device_tile_count() -> None:
    """A CUDA graph's schedule: a buffer sized for the largest step whose rows past
    ``tile_count`` are stale. Here the count leaves out the last real tile, and the stale rows
    repeat every real tile: the left-out tile's tokens must stay unwritten, all others exact."""
    case = Case(MIXED_QUERY_LENS, MIXED_SEQ_LENS, seed=6)
    tokens = ta.prefill_tokens_per_tile(4, 2, block_m=32)
    starts = case.meta.query_start_loc_list
    real = ta.prefill_tile_map(starts, tokens)
    capacity = ta.max_prefill_tiles(case.query.shape[0], len(MIXED_QUERY_LENS), tokens)
    assert capacity > len(real)
    stale = np.concatenate([real, np.tile(real[::-1], (capacity // len(real) + 1, 1))])[:capacity]
    count = torch.tensor([len(real) - 1], dtype=torch.int32)
    schedule = ta.PrefillSchedule(torch.from_numpy(np.ascontiguousarray(stale)), tokens, count)
    out = ta.prefill_attention_triton(
        case.query, case.k_cache, case.v_cache, case.meta, case.scale, poisoned(case.query), schedule=schedule
    )
    seq, first = (int(v) for v in real[-1])
    left_out = slice(starts[seq] + first, min(starts[seq] + first + tokens, starts[seq + 1]))
    assert out[left_out].isnan().all()
    keep = torch.ones(out.shape[0], dtype=torch.bool)
    keep[left_out] = False
    assert_close(out[keep], case.reference()[keep])


def test_prefill_tile_map_longest_first() -> None:
    starts = [0, 5, 5, 6, 23, 24]  # q_lens 5, 0, 1, 17, 1
    seq_lens = [5, 3, 40, 17, 9]  # cached 0, 3, 39, 0, 8
    tile_map = ta.prefill_tile_map(starts, 4, seq_lens)
    # Keys read: seq 0 tiles 4, 5; seq 2 40; seq 3 4, 8, 12, 16, 17; seq 4 9.
    assert tile_map.tolist() == [[2, 0], [3, 16], [3, 12], [3, 8], [4, 0], [3, 4], [0, 4], [0, 0], [3, 0]]
    unordered = ta.prefill_tile_map(starts, 4)
    assert sorted(map(tuple, tile_map.tolist())) == sorted(map(tuple, unordered.tolist()))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 40], ids=["d64", "d40-padded"])
def test_prefill_tile_order_changes_no_bit(dtype: torch.dtype, head_dim: int) -> None:
    """Tiles ordered longest first compute what the tiles in sequence order compute, bit for bit
    (chunks with cached keys and one-token rows included)."""
    case = Case(MIXED_QUERY_LENS, MIXED_SEQ_LENS, head_dim=head_dim, dtype=dtype, seed=7)
    starts = case.meta.query_start_loc_list
    tokens = ta.prefill_tokens_per_tile(4, 2, block_m=32)
    outs = []
    for lens in (None, case.meta.seq_lens_list):
        schedule = ta.build_prefill_schedule(starts, tokens, "cpu", lens)
        outs.append(ta.prefill_attention_triton(
            case.query, case.k_cache, case.v_cache, case.meta, case.scale, poisoned(case.query), block_n=16,
            schedule=schedule,
        ))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(outs[0].view(bits), outs[1].view(bits))
    assert_close(outs[1], case.reference())


def test_max_prefill_tiles_bounds_every_split() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_seqs = int(rng.integers(1, 20))
        lens = rng.integers(1, 50, num_seqs)
        starts = np.concatenate([[0], np.cumsum(lens)])
        for tokens in (1, 3, 16, 32):
            assert len(ta.prefill_tile_map(starts, tokens)) <= ta.max_prefill_tiles(int(lens.sum()), num_seqs, tokens)


# --------------------------------------------------------------------------- decode


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("num_splits", "block_n"), [(1, 64), (3, 64), (3, 16), (8, 16), (32, 64)])
def test_decode_matches_reference(dtype: torch.dtype, num_splits: int, block_n: int) -> None:
    # Short sequences next to a long one: with several splits most of their partitions are empty
    # (seq_len 5, 8 splits of 16 keys: only split 0 has keys).
    seq_lens = [1, 5, 16, 17, 33, 70, 130]
    case = Case([1] * len(seq_lens), seq_lens, dtype=dtype, seed=4)
    out = ta.decode_attention_triton(
        case.query,
        case.k_cache,
        case.v_cache,
        case.meta.seq_lens,
        case.meta.block_tables,
        case.scale,
        num_splits,
        poisoned(case.query),
        block_n=block_n,
    )
    assert_close(out, case.reference())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_order_changes_no_bit(num_splits: int) -> None:
    # The order only renumbers programs (longest context first, every kv head of a row together):
    # each row, the padded one included, must come out bit for bit as without it.
    seq_lens = [5, 130, 17, 70, 1, 33]
    case = Case([1] * len(seq_lens), seq_lens, num_heads=6, num_kv_heads=3, dtype=torch.float32, seed=11)
    query = torch.cat([case.query, torch.randn(1, 6, 64)])
    lens = torch.tensor([*seq_lens, 0], dtype=torch.int32)
    tables = torch.cat([case.meta.block_tables, torch.zeros(1, case.meta.block_tables.shape[1], dtype=torch.int32)])
    args = (query, case.k_cache, case.v_cache, lens, tables, case.scale, num_splits)
    plain = ta.decode_attention_triton(*args, poisoned(query), block_n=16)
    assert_close(plain[:-1], case.reference())
    longest_first = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
    for order in (longest_first, torch.arange(7, dtype=torch.int32).flip(0), torch.tensor([3, 0, 6, 1, 5, 2, 4], dtype=torch.int32)):
        out = ta.decode_attention_triton(*args, poisoned(query), block_n=16, order=order)
        assert torch.equal(out, plain), order.tolist()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 1), (6, 2)])
def test_decode_head_groups(num_heads: int, num_kv_heads: int) -> None:
    seq_lens = [3, 40, 64]
    case = Case([1] * 3, seq_lens, num_heads, num_kv_heads, head_dim=32, block_size=8, seed=5)
    args = (case.query, case.k_cache, case.v_cache, case.meta.seq_lens, case.meta.block_tables, case.scale)
    out = ta.decode_attention_triton(*args, num_splits=2, out=poisoned(case.query), block_n=16)
    assert_close(out, case.reference())


@pytest.mark.timeout(120)
def test_decode_padded_rows_are_zero() -> None:
    # CUDA-graph padding: rows past the real batch have seq_len 0 and must not produce NaN.
    case = Case([1, 1], [7, 20], seed=6)
    query = torch.cat([case.query, torch.randn(2, 4, 64)])
    seq_lens = torch.tensor([7, 20, 0, 0], dtype=torch.int32)
    tables = torch.cat([case.meta.block_tables, torch.zeros(2, case.meta.block_tables.shape[1], dtype=torch.int32)])
    out = ta.decode_attention_triton(
        query, case.k_cache, case.v_cache, seq_lens, tables, case.scale, 4, poisoned(query)
    )
    assert_close(out[:2], case.reference())
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


@pytest.mark.timeout(120)
def test_decode_reads_lengths_from_tensors_only() -> None:
    # Graph replay changes only tensor contents: same buffers, new lengths and block tables.
    case = Case([1, 1, 1], [10, 33, 2], seed=7)
    seq_lens, tables = case.meta.seq_lens.clone(), case.meta.block_tables.clone()
    out = poisoned(case.query)
    args = (case.query, case.k_cache, case.v_cache, seq_lens, tables, case.scale, 4, out)
    ta.decode_attention_triton(*args, block_n=16)
    assert_close(out, case.reference())

    new_lens = [12, 5, 40]
    new_tables = [[4], [0], [3, 1, 2]]  # blocks are random data: any assignment will do
    seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
    tables.zero_()
    for i, t in enumerate(new_tables):
        tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    out.fill_(float("nan"))
    ta.decode_attention_triton(*args, block_n=16)
    expected = case.reference(meta=build_metadata([1, 1, 1], new_lens, new_tables, [0, 0, 0]))
    assert_close(out, expected)


# --------------------------------------------------------------------------- dispatch and end to end


@pytest.mark.timeout(120)
@pytest.mark.parametrize("decode_only", [True, False])
def test_paged_attention_dispatch(monkeypatch: pytest.MonkeyPatch, decode_only: bool) -> None:
    case = Case(MIXED_QUERY_LENS, MIXED_SEQ_LENS, seed=8)
    meta = decode_meta(case) if decode_only else case.meta
    query = torch.randn(meta.num_seqs, 4, 64) if decode_only else case.query
    called: list[str] = []
    for name in ("decode_attention_triton", "prefill_attention_triton"):
        real = getattr(ta, name)
        monkeypatch.setattr(ta, name, lambda *a, _real=real, _name=name, **k: called.append(_name) or _real(*a, **k))
    out = ta.paged_attention_triton(query, case.k_cache, case.v_cache, meta, case.scale, num_splits=3)
    assert called == ["decode_attention_triton" if decode_only else "prefill_attention_triton"]
    assert_close(out, case.reference(query, meta))


@pytest.mark.timeout(120)
def test_decode_only_step_with_idle_sequence_uses_prefill() -> None:
    # max_query_len 1 but one sequence has no new token: rows no longer map 1:1 to sequences.
    case = Case([1, 0, 1], [12, 30, 41], seed=9)
    out = ta.paged_attention_triton(case.query, case.k_cache, case.v_cache, case.meta, case.scale)
    assert_close(out, case.reference())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_store_then_attend_end_to_end(dtype: torch.dtype) -> None:
    case = Case(MIXED_QUERY_LENS, MIXED_SEQ_LENS, dtype=dtype, seed=10)
    expected = case.reference()
    # Scribble over the new tokens' slots, then write them back with the Triton store.
    valid = case.meta.slot_mapping
    flat_k = case.k_cache.view(-1, *case.k_cache.shape[2:])
    flat_v = case.v_cache.view(-1, *case.v_cache.shape[2:])
    flat_k[valid] = 100.0
    flat_v[valid] = -100.0
    ta.store_kv_triton(case.key, case.value, case.k_cache, case.v_cache, case.meta.slot_mapping)
    out = ta.paged_attention_triton(case.query, case.k_cache, case.v_cache, case.meta, case.scale)
    assert_close(out, expected)


# --------------------------------------------------------------------------- head sizes that are no power of two
# tl.arange needs a power of two and tl.dot at least 16: these heads are walked in padded lanes
# (8 and 12 in 16, 24 in 32, 40 in 64, 80 and 96 in 128). Every tensor a kernel reads or writes
# has NaN guard lanes behind each head (with_guard_lanes): a padded lane that is loaded poisons the
# result, one that is stored shows in the guard.

PADDED_HEAD_DIMS = [8, 12, 24, 40, 80, 96]
# GQA groups that are no power of two either: 3 query heads per kv head, and 5 heads on 1 kv head.
ODD_GROUPS = pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 2), (5, 1)], ids=["3-per-kv", "5-on-1"])


class MemoryWatch:
    """Every address the interpreted kernels load or store (mask on), checked against the tensors
    they were given: nothing outside them (a scratch buffer's last row read past its end; refused
    before the access, which could crash the process), and nothing in a guard lane (a padded lane
    loaded, even one whose value is then thrown away).

    Wraps the interpreter's memory primitives (``interpreter._interpreter.load``/``store``) and
    the step that hands it each launch's tensors (``GridExecutor._init_args_hst``).
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.accesses: list[np.ndarray] = []  # the start address of every access
        self.storages: set[tuple[int, int]] = set()  # (first byte, end) of each kernel argument

    def load(self, ptrs: np.ndarray, mask: np.ndarray, other: np.ndarray, dtype: Any) -> np.ndarray:
        self._record(ptrs, mask, np.dtype(dtype).itemsize)
        return self.backend.load(ptrs, mask, other, dtype)

    def store(self, ptrs: np.ndarray, value: np.ndarray, mask: np.ndarray) -> None:
        self._record(ptrs, mask, value.dtype.itemsize)
        return self.backend.store(ptrs, value, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def record_storages(self, args: tuple[list[Any], dict[str, Any]]) -> None:
        for arg in [*args[0], *args[1].values()]:
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                self.storages.add((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))

    def _record(self, ptrs: np.ndarray, mask: np.ndarray, size: int) -> None:
        addrs = ptrs[np.broadcast_to(mask, ptrs.shape)].astype(np.int64)
        starts, ends = (np.array(col, dtype=np.int64) for col in zip(*sorted(self.storages), strict=True))
        owner = np.searchsorted(starts, addrs, side="right") - 1  # storages never overlap
        inside = (owner >= 0) & (addrs + size <= ends[np.maximum(owner, 0)])
        if not inside.all():
            raise AssertionError(f"{int((~inside).sum())} accesses fall outside every tensor the kernel was given")
        self.accesses.append(addrs)

    def check(self, *guarded: torch.Tensor) -> None:
        """Fails unless kernels ran, and none of their accesses touched a guard lane of ``guarded``."""
        assert self.accesses, "no kernel ran under the watch"
        addrs = np.concatenate(self.accesses)
        guards = np.sort(np.concatenate([_element_addresses(guard_lanes(view)) for view in guarded]))
        hits = guards[np.minimum(np.searchsorted(guards, addrs), len(guards) - 1)] == addrs
        assert not hits.any(), f"{int(hits.sum())} accesses touch lanes past head_dim"


def _element_addresses(t: torch.Tensor) -> np.ndarray:
    """The address of every element of a strided CPU tensor."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return (t.data_ptr() + offsets.flatten() * t.element_size()).numpy()


@pytest.fixture
def memory_watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryWatch]:
    executor = getattr(interpreter, "GridExecutor", None)
    if not hasattr(interpreter, "_interpreter") or not hasattr(executor, "_init_args_hst"):
        pytest.fail("Triton's interpreter has changed: MemoryWatch needs _interpreter and GridExecutor._init_args_hst")
    watch = MemoryWatch(interpreter._interpreter)
    original = executor._init_args_hst

    def init_args(self: Any, args_dev: Any, kwargs: Any) -> Any:
        hst = original(self, args_dev, kwargs)
        watch.record_storages(hst)
        return hst

    monkeypatch.setattr(interpreter, "_interpreter", watch)
    monkeypatch.setattr(executor, "_init_args_hst", init_args)
    yield watch


def guarded_out(like: torch.Tensor) -> torch.Tensor:
    """A NaN output buffer with STORE_GUARD guard lanes."""
    return with_guard_lanes(poisoned(like), STORE_GUARD)


def test_padded_head_dim() -> None:
    assert [ta.padded_head_dim(d) for d in (2, 8, 12, 16, 24, 40, 64, 80, 96, 128, 200, 256)] == [
        16, 16, 16, 16, 32, 64, 64, 128, 128, 128, 256, 256
    ]
    # The registers a tile holds go with its padded width: a head of 80 gets the tiles of 128.
    assert ta.tile_sizes(80, torch.bfloat16) == ta.tile_sizes(128, torch.bfloat16) == (128, 32)
    assert ta.tile_sizes(136, torch.bfloat16) == ta.tile_sizes(128, torch.float32) == (32, 32)
    assert ta.decode_block_n(80, torch.bfloat16) == ta.decode_block_n(128, torch.float16) == 64
    assert ta.decode_block_n(136, torch.bfloat16) == ta.decode_block_n(64, torch.float32) == 32


@pytest.mark.timeout(120)
@pytest.mark.parametrize("head_dim", PADDED_HEAD_DIMS)
def test_store_kv_on_padded_heads(head_dim: int, memory_watch: MemoryWatch) -> None:
    case = Case([5, 1, 3], [21, 9, 3], num_kv_heads=3, head_dim=head_dim, block_size=8, seed=head_dim, guard=True)
    slots = torch.tensor(case.meta.slot_mapping.tolist()[:4] + [-1] + case.meta.slot_mapping.tolist()[4:])
    key = with_guard_lanes(torch.randn(len(slots), 3, head_dim))
    value = with_guard_lanes(torch.randn(len(slots), 3, head_dim))
    k_cache, v_cache = with_guard_lanes(case.k_cache, STORE_GUARD), with_guard_lanes(case.v_cache, STORE_GUARD)
    expected_k, expected_v = case.k_cache.clone(), case.v_cache.clone()
    store_kv_reference(key, value, expected_k, expected_v, slots)
    ta.store_kv_triton(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)
    assert_guards_intact(k_cache, v_cache)
    memory_watch.check(key, value, k_cache, v_cache)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("head_dim", PADDED_HEAD_DIMS)
@ODD_GROUPS
def test_prefill_on_padded_heads(head_dim: int, num_heads: int, num_kv_heads: int, memory_watch: MemoryWatch) -> None:
    # A chunk after 16 cached tokens, a fresh prefill, a decode row, an idle sequence, a short
    # prefill; 16-row tiles, so a sequence spans several tiles (5 or 3 tokens each).
    case = Case([13, 6, 1, 0, 3], [29, 6, 17, 9, 3], num_heads, num_kv_heads, head_dim, block_size=8,
                seed=head_dim, guard=True)
    out = guarded_out(case.query)
    ta.prefill_attention_triton(case.query, case.k_cache, case.v_cache, case.meta, case.scale, out, block_m=16)
    assert_close(out, case.reference())
    assert_guards_intact(out)
    memory_watch.check(case.query, case.k_cache, case.v_cache, out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("head_dim", PADDED_HEAD_DIMS)
@ODD_GROUPS
def test_decode_on_padded_heads(head_dim: int, num_heads: int, num_kv_heads: int, memory_watch: MemoryWatch) -> None:
    # Three splits of 16 keys: the 40-token row uses all three (the last one partly), the short
    # rows only the first; a padded graph row (seq_len 0) must come out as zeros.
    seq_lens = [1, 5, 17, 40]
    case = Case([1] * 4, seq_lens, num_heads, num_kv_heads, head_dim, block_size=8, seed=head_dim, guard=True)
    query = with_guard_lanes(torch.cat([case.query, torch.randn(1, num_heads, head_dim)]))
    lens = torch.tensor([*seq_lens, 0], dtype=torch.int32)
    tables = torch.cat([case.meta.block_tables, torch.zeros(1, case.meta.block_tables.shape[1], dtype=torch.int32)])
    out = guarded_out(query)
    ta.decode_attention_triton(query, case.k_cache, case.v_cache, lens, tables, case.scale, 3, out, block_n=16)
    assert_close(out[:4], case.reference())
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))
    assert_guards_intact(out)
    memory_watch.check(query, case.k_cache, case.v_cache, out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [24, 80])
def test_store_then_attend_on_padded_heads(dtype: torch.dtype, head_dim: int) -> None:
    """What one model step does: store the new K/V, attend (prefill kernel, then the next
    token through the decode kernel), at default tile sizes."""
    case = Case([11, 1, 4], [27, 9, 4], 6, 2, head_dim, dtype=dtype, seed=head_dim, guard=True)
    expected = case.reference()
    flat_k = case.k_cache.view(-1, *case.k_cache.shape[2:])
    flat_v = case.v_cache.view(-1, *case.v_cache.shape[2:])
    flat_k[case.meta.slot_mapping] = 100.0  # scribbled over: the Triton store must write them back
    flat_v[case.meta.slot_mapping] = -100.0
    ta.store_kv_triton(case.key, case.value, case.k_cache, case.v_cache, case.meta.slot_mapping)
    out = ta.paged_attention_triton(case.query, case.k_cache, case.v_cache, case.meta, case.scale)
    assert_close(out, expected)
    decode = decode_meta(case)
    query = with_guard_lanes(torch.randn(3, 6, head_dim).to(dtype))
    out = ta.paged_attention_triton(query, case.k_cache, case.v_cache, decode, case.scale, num_splits=2)
    assert_close(out, case.reference(query, decode))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("head_dim", [257, 320, 512])
def test_head_dim_past_the_limit_is_rejected(head_dim: int) -> None:
    query = torch.zeros(2, 4, head_dim)
    cache = torch.zeros(4, 16, 2, head_dim)
    meta = build_metadata([2], [2], [[0]], [0, 1])
    with pytest.raises(ValueError, match=rf"head_dim from 1 to 256, got {head_dim}"):
        ta.prefill_attention_triton(query, cache, cache, meta, 1.0)
    with pytest.raises(ValueError, match=rf"head_dim from 1 to 256, got {head_dim}"):
        ta.decode_attention_triton(query, cache, cache, meta.seq_lens.repeat(2), meta.block_tables.repeat(2, 1), 1.0, 2)


@pytest.mark.parametrize("head_dim", [2, 8, 12, 24, 40, 80, 96, 128, 200, 256])
def test_gpu_head_dim_check_takes_every_even_size_up_to_the_limit(head_dim: int) -> None:
    check_gpu_head_dim(head_dim)  # the load-time check: no error


@pytest.mark.parametrize(
    ("head_dim", "message"),
    [
        (264, r"head_dim is 264, and the GPU attention kernels support head_dim up to 256: run it with --device cpu"),
        (512, r"head_dim is 512, .* up to 256: run it with --device cpu"),
        (25, r"head_dim is 25, and rotary embeddings rotate the two halves of each head: head_dim must be an even"),
        (0, r"head_dim is 0, .* must be an even number >= 2"),
    ],
)
def test_gpu_head_dim_check_refuses_what_the_kernels_cannot_do(head_dim: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_gpu_head_dim(head_dim)


def test_bad_head_layout_is_rejected() -> None:
    cache = torch.zeros(4, 16, 2, 64)
    meta = build_metadata([1], [1], [[0]], [0])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ta.prefill_attention_triton(torch.zeros(1, 3, 64), cache, cache, meta, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        ta.decode_attention_triton(torch.zeros(1, 4, 64), cache, cache, meta.seq_lens, meta.block_tables, 1.0, 0)
    with pytest.raises(ValueError, match="one query per sequence"):
        ta.decode_attention_triton(torch.zeros(2, 4, 64), cache, cache, meta.seq_lens, meta.block_tables, 1.0, 2)
    for bad in (torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)):
        with pytest.raises(ValueError, match="order must be int32"):
            ta.decode_attention_triton(
                torch.zeros(1, 4, 64), cache, cache, meta.seq_lens, meta.block_tables, 1.0, 2, order=bad
            )


def test_num_splits_for() -> None:
    assert ta.num_splits_for(100) == 1
    assert ta.num_splits_for(4096) == 8
    assert ta.num_splits_for(10**6) == 32
