"""Triton attention kernels against the reference at real shapes, compiled for a CUDA GPU.

Llama-8B-like heads (32 query / 8 kv heads, head_dim 128), contexts up to 4096 tokens, batch
64; and heads that are no power of two (24 to 192, 12 query heads on 4 kv heads) at contexts up
to 2048. Skipped without CUDA. Must run compiled: ``test_triton_attention.py`` sets TRITON_INTERPRET
for the whole process, so run this file in its own pytest process, e.g.
``pytest tests/test_triton_attention_gpu.py -m gpu``.

The reference (``mini_vllm.engine.attention``) runs on CPU copies: it is the ground truth and is plain,
loop-per-sequence torch.
"""

from __future__ import annotations

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

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        ta.INTERPRETED, reason="kernels are interpreted (TRITON_INTERPRET set): run this file in its own process"
    ),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])


class Case:
    """Random q, paged caches with shuffled blocks, and metadata, on the GPU and as CPU copies."""

    def __init__(
        self,
        query_lens: list[int],
        seq_lens: list[int],
        dtype: torch.dtype,
        seed: int = 0,
        spare_blocks: int = 64,
        *,
        num_heads: int = NUM_HEADS,
        num_kv_heads: int = NUM_KV_HEADS,
        head_dim: int = HEAD_DIM,
        guard: bool = False,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + spare_blocks
        order = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables: list[list[int]] = []
        for n in blocks_per_seq:
            self.tables.append(order[:n])
            order = order[n:]
        slots = [
            table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            for q_len, seq_len, table in zip(query_lens, seq_lens, self.tables, strict=True)
            for p in range(seq_len - q_len, seq_len)
        ]
        self.meta_cpu = build_metadata(query_lens, seq_lens, self.tables, slots)
        self.meta = build_metadata(query_lens, seq_lens, self.tables, slots, device="cuda")
        shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
        num_tokens = sum(query_lens)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype).cuda()
        self.v_cache = torch.randn(shape, generator=gen).to(dtype).cuda()
        self.query = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(dtype).cuda()
        self.key = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(dtype).cuda()
        self.value = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(dtype).cuda()
        if guard:  # every head followed by NaN lanes: see with_guard_lanes
            self.k_cache, self.v_cache = with_guard_lanes(self.k_cache), with_guard_lanes(self.v_cache)
            self.query = with_guard_lanes(self.query)
            self.key, self.value = with_guard_lanes(self.key), with_guard_lanes(self.value)
        self.scale = head_dim**-0.5
        store_kv_reference(self.key, self.value, self.k_cache, self.v_cache, self.meta.slot_mapping)

    def reference(self, query: torch.Tensor | None = None, meta_cpu: AttentionMetadata | None = None) -> torch.Tensor:
        q = (self.query if query is None else query).cpu()
        return paged_attention_reference(
            q, self.k_cache.cpu(), self.v_cache.cpu(), meta_cpu or self.meta_cpu, self.scale
        )


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def with_guard_lanes(data: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """``data`` as a view into a wider tensor whose lanes past head_dim hold ``fill`` (NaN: a padded
    lane a kernel loads poisons its result; for a store target another value, see guards_intact)."""
    head_dim = data.shape[-1]
    wide = torch.full((*data.shape[:-1], 2 * head_dim + 16), fill, dtype=data.dtype, device=data.device)
    wide[..., :head_dim] = data
    return wide[..., :head_dim]


# What a store target's guard lanes hold: exact in every dtype, and no kernel computes it.
STORE_GUARD = 1280.0


def guards_intact(view: torch.Tensor) -> bool:
    """Whether the lanes behind a ``with_guard_lanes(..., STORE_GUARD)`` view still hold STORE_GUARD."""
    head_dim, width = view.shape[-1], view.stride(-2)
    guard = view.as_strided((*view.shape[:-1], width - head_dim), view.stride(), view.storage_offset() + head_dim)
    return bool((guard == STORE_GUARD).all())


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.cpu().float(), expected.float(), **TOL[expected.dtype])


def random_lens(gen: torch.Generator, n: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


@pytest.mark.timeout(300)
@DTYPES
def test_store_kv_gpu(dtype: torch.dtype) -> None:
    case = Case([512] * 8, [4096] * 8, dtype)
    slots = case.meta.slot_mapping.clone()
    slots[::7] = -1  # padding tokens are skipped
    expected_k, expected_v = case.k_cache.clone(), case.v_cache.clone()
    key, value = case.key.float() * 3, case.value.float() * 3  # fp32 into the cache dtype: rounding must match
    store_kv_reference(key, value, expected_k, expected_v, slots)
    ta.store_kv_triton(key, value, case.k_cache, case.v_cache, slots)
    assert torch.equal(case.k_cache, expected_k)
    assert torch.equal(case.v_cache, expected_v)


@pytest.mark.timeout(600)
@DTYPES
def test_prefill_mixed_batch_gpu(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    # Four prefills (two with a long cached prefix) and 60 decodes, up to 4096 tokens of context.
    prefill_q = [1024, 777, 300, 64]
    prefill_seq = [4096, 777, 2048, 1000]
    decode_seq = random_lens(gen, 60, 1, 4096)
    case = Case(prefill_q + [1] * 60, prefill_seq + decode_seq, dtype, seed=1)
    out = ta.prefill_attention_triton(
        case.query, case.k_cache, case.v_cache, case.meta, case.scale, poisoned(case.query)
    )
    assert_close(out, case.reference())


@pytest.mark.timeout(600)
@DTYPES
@pytest.mark.parametrize("num_splits", [1, 8, 16])
def test_decode_gpu(dtype: torch.dtype, num_splits: int) -> None:
    gen = torch.Generator().manual_seed(2)
    seq_lens = [1, 2, 17, 4096] + random_lens(gen, 60, 1, 4096)
    case = Case([1] * 64, seq_lens, dtype, seed=2)
    out = ta.decode_attention_triton(
        case.query,
        case.k_cache,
        case.v_cache,
        case.meta.seq_lens,
        case.meta.block_tables,
        case.scale,
        num_splits,
        poisoned(case.query),
    )
    assert_close(out, case.reference())


@pytest.mark.timeout(600)
def test_paged_attention_dispatch_gpu() -> None:
    gen = torch.Generator().manual_seed(3)
    case = Case([1] * 64, random_lens(gen, 64, 1, 4096), torch.bfloat16, seed=3)
    out = ta.paged_attention_triton(case.query, case.k_cache, case.v_cache, case.meta, case.scale, num_splits=8)
    assert_close(out, case.reference())


@pytest.mark.timeout(600)
def test_decode_cuda_graph_replay() -> None:
    """Capture once, then replay with new lengths and block tables written into the same buffers."""
    gen = torch.Generator().manual_seed(4)
    batch, real, num_splits, max_blocks = 64, 60, 16, 4096 // BLOCK_SIZE
    case = Case([1] * real, random_lens(gen, real, 1, 4096), torch.bfloat16, seed=4, spare_blocks=64)
    num_blocks = case.k_cache.shape[0]
    query = torch.zeros(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)

    def step() -> None:
        ta.decode_attention_triton(query, case.k_cache, case.v_cache, seq_lens, tables, case.scale, num_splits, out)

    step()  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for trial in range(3):
        lens = random_lens(gen, real, 1, 4096)
        if trial == 1:
            lens[0] = 4096
        # Fresh random blocks (reads only, so sequences may share them).
        new_tables = [torch.randint(num_blocks, (-(-n // BLOCK_SIZE),), generator=gen).tolist() for n in lens]
        meta_cpu = build_metadata([1] * real, lens, new_tables, [0] * real)
        query.normal_()
        seq_lens.zero_()  # rows past ``real`` stay padding: seq_len 0
        seq_lens[:real] = meta_cpu.seq_lens.cuda()
        tables.zero_()
        tables[:real, : meta_cpu.block_tables.shape[1]] = meta_cpu.block_tables.cuda()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out[:real], case.reference(query[:real], meta_cpu))
        assert torch.equal(out[real:].cpu(), torch.zeros(batch - real, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- heads that are no power of two


@pytest.mark.timeout(600)
@DTYPES
@pytest.mark.parametrize("head_dim", [24, 40, 80, 96, 192])
def test_padded_heads_gpu(dtype: torch.dtype, head_dim: int) -> None:
    """Compiled, at real lengths: store, a mixed prefill batch and split decode for heads walked in
    padded lanes (24 in 32, 80 and 96 in 128, 192 in 256), 12 query heads on 4 kv heads (groups of
    3), every tensor with NaN lanes behind each head and every output with guard lanes."""
    gen = torch.Generator().manual_seed(head_dim)
    prefill_q, prefill_seq = [512, 300, 64], [2048, 300, 1000]
    decode_seq = random_lens(gen, 29, 1, 2048)
    heads = {"num_heads": 12, "num_kv_heads": 4, "head_dim": head_dim}
    case = Case(prefill_q + [1] * 29, prefill_seq + decode_seq, dtype, seed=head_dim, guard=True, **heads)

    slots = case.meta.slot_mapping.clone()
    slots[::7] = -1
    k_cache = with_guard_lanes(case.k_cache, STORE_GUARD)
    v_cache = with_guard_lanes(case.v_cache, STORE_GUARD)
    expected_k, expected_v = case.k_cache.clone(), case.v_cache.clone()
    store_kv_reference(case.key, case.value, expected_k, expected_v, slots)
    ta.store_kv_triton(case.key, case.value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert guards_intact(k_cache) and guards_intact(v_cache)

    out = with_guard_lanes(poisoned(case.query), STORE_GUARD)
    ta.prefill_attention_triton(case.query, case.k_cache, case.v_cache, case.meta, case.scale, out)
    assert_close(out, case.reference())
    assert guards_intact(out)

    # The next step: one query per sequence, through the split kernel and the reduce.
    seq_lens = case.meta_cpu.seq_lens_list
    decode_cpu = build_metadata([1] * len(seq_lens), seq_lens, case.tables, [0] * len(seq_lens))
    decode = build_metadata([1] * len(seq_lens), seq_lens, case.tables, [0] * len(seq_lens), device="cuda")
    query = with_guard_lanes(torch.randn((len(seq_lens), 12, head_dim), generator=gen).to(dtype).cuda())
    out = with_guard_lanes(poisoned(query), STORE_GUARD)
    tables = decode.block_tables
    ta.decode_attention_triton(query, case.k_cache, case.v_cache, decode.seq_lens, tables, case.scale, 8, out)
    assert_close(out, case.reference(query, decode_cpu))
    assert guards_intact(out)
