"""Triton attention kernels against the plain-torch reference, run by Triton's CPU interpreter.

Shapes are small so the interpreter stays quick. The same comparisons at real shapes on a GPU
live in ``test_triton_attention_gpu.py`` (which must not run interpreted).
"""

from __future__ import annotations

import os

# Must be set before triton is imported: @triton.jit picks the interpreter at decoration time.
os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

import torch

from mini_vllm.engine import triton_attention as ta
from mini_vllm.engine.attention import (
    AttentionMetadata,
    build_metadata,
    paged_attention_reference,
    store_kv_reference,
)

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
        self.scale = head_dim**-0.5
        store_kv_reference(self.key, self.value, self.k_cache, self.v_cache, self.meta.slot_mapping)

    def reference(self, query: torch.Tensor | None = None, meta: AttentionMetadata | None = None) -> torch.Tensor:
        return paged_attention_reference(
            self.query if query is None else query, self.k_cache, self.v_cache, meta or self.meta, self.scale
        )


def poisoned(like: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write fails the comparison."""
    return torch.full_like(like, float("nan"))


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


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("head_dim", [48, 80, 512])
def test_unsupported_head_dim_is_rejected(head_dim: int) -> None:
    query = torch.zeros(2, 4, head_dim)
    cache = torch.zeros(4, 16, 2, head_dim)
    meta = build_metadata([2], [2], [[0]], [0, 1])
    with pytest.raises(ValueError, match="head_dim"):
        ta.prefill_attention_triton(query, cache, cache, meta, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        ta.decode_attention_triton(query, cache, cache, meta.seq_lens.repeat(2), meta.block_tables.repeat(2, 1), 1.0, 2)


def test_bad_head_layout_is_rejected() -> None:
    cache = torch.zeros(4, 16, 2, 64)
    meta = build_metadata([1], [1], [[0]], [0])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ta.prefill_attention_triton(torch.zeros(1, 3, 64), cache, cache, meta, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        ta.decode_attention_triton(torch.zeros(1, 4, 64), cache, cache, meta.seq_lens, meta.block_tables, 1.0, 0)
    with pytest.raises(ValueError, match="one query per sequence"):
        ta.decode_attention_triton(torch.zeros(2, 4, 64), cache, cache, meta.seq_lens, meta.block_tables, 1.0, 2)


def test_num_splits_for() -> None:
    assert ta.num_splits_for(100) == 1
    assert ta.num_splits_for(4096) == 8
    assert ta.num_splits_for(10**6) == 32
