"""Paged attention in Triton: cache writes, varlen prefill, and split-K (flash-decoding) decode.

The cache layout, metadata and semantics are those of ``mini_vllm.engine.attention`` (whose plain-torch
functions are the ground truth these kernels are tested against). Three kernels:

* ``store_kv_triton``: one program per new token writes all its kv heads into the paged cache.
* ``prefill_attention_triton``: one launch for a whole mixed batch. The grid is
  ``(query tiles of all sequences, kv heads)``; a small int32 tile map (built on the host from
  ``query_start_loc``) tells each program which sequence and which of its new tokens it owns.
  A tile's ``BLOCK_M`` rows are ``tokens_per_tile`` tokens x the ``group`` query heads that share
  one kv head, so each K/V tile is loaded once for the whole GQA group. Keys are walked in
  ``BLOCK_N`` tiles through the block table with an online softmax (fp32 accumulators), up to
  the last key the tile's latest query may see. A one-token tile (a decode row of a mixed
  step) is computed as the decode kernel computes a row: its ``group`` heads in a 16-row tile.
* ``decode_attention_triton``: one query per sequence, so a single program per (sequence, kv
  head) would leave most of the GPU idle on long contexts. The context is split into
  ``num_splits`` partitions, grid ``(batch, kv heads, num_splits)``, each writing a normalized
  partial output and its log-sum-exp; a second kernel, grid ``(batch, heads)``, merges them.
  Partition bounds are computed in the kernel from the ``seq_lens`` tensor, so the grid and
  scratch shapes depend only on batch size, heads, head_dim and ``num_splits``: the call is
  CUDA-graph capturable. Empty partitions (and padded rows with ``seq_len == 0``) are handled.

Any head size up to ``GPU_MAX_HEAD_DIM`` works: ``tl.arange`` needs a power of two and
``tl.dot`` at least 16, so the head dimension is walked in ``BLOCK_D = max(16, next power of
two)`` lanes, the extra ones masked on every load and store (loaded as zeros, so they add exactly
nothing to q.k, and never written). The cache keeps the true head_dim. When ``BLOCK_D ==
HEAD_DIM`` the lane test is a constexpr branch that compiles away: power-of-two heads run the
same code as before.

Softmax uses ``exp2`` with the scale pre-multiplied by log2(e). fp32 inputs use IEEE dot
products (not TF32) so that fp32 stays an exactness path. Kernels also run under
``TRITON_INTERPRET=1`` on CPU tensors.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch
import triton
import triton.language as tl

from mini_vllm.engine.attention import GPU_MAX_HEAD_DIM, AttentionMetadata
from mini_vllm.engine.triton_norm import dependent_launch, dependent_launch_entry

LOG2E = 1.4426950408889634
DEFAULT_NUM_SPLITS = 8


# --------------------------------------------------------------------------- kernels
# Kernel arguments are left unannotated: Triton reads annotations as specialization hints.


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST only under the interpreter, whose tl.dot multiplies bf16 bit patterns as integers;
    # operands were already rounded to the input dtype, so fp32 here matches the GPU's math.
    if UPCAST:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        res = tl.dot(a, b, input_precision=PRECISION)
    return res


@triton.jit
def _lanes(ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The mask of a ``[rows, BLOCK_D]`` tile whose rows pass ``ok``: a padded head's lanes past
    HEAD_DIM are off. For a power-of-two head the lane test is not even compiled."""
    if BLOCK_D == HEAD_DIM:
        return ok[:, None]
    else:
        return ok[:, None] & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]


@triton.jit
def _attend_one_query(
    q,
    table,
    k_cache,
    v_cache,
    kv_head,
    lo,
    hi,
    scale_log2,
    stride_kc_blk,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_slot,
    stride_vc_head,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One token's query heads of a kv group (``q``, ``[BLOCK_G, BLOCK_D]``, rows past the group
    zero) against keys ``[lo, hi)`` of the sequence whose block-table row is ``table``: returns
    the unnormalized output and the online softmax's running max and sum (base 2). Shared by the
    decode kernel and the prefill kernel's one-token tiles, so both walk the keys the same way."""
    dims = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):  # no iterations for an empty partition
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        blk = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        off = keys % BLOCK_SIZE
        k_ptr = k_cache + blk * stride_kc_blk + off * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(k_ptr[:, None] + dims[None, :], mask=_lanes(key_ok, HEAD_DIM, BLOCK_D), other=0.0)  # [N, D]
        s = _mma(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, UPCAST_DOT) * scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptr = v_cache + blk * stride_vc_blk + off * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(v_ptr[:, None] + dims[None, :], mask=_lanes(key_ok, HEAD_DIM, BLOCK_D), other=0.0)
        acc = acc * alpha[:, None] + _mma(p.to(q.dtype), v.to(q.dtype), DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_kv_kernel(
    key,
    value,
    k_cache,
    v_cache,
    slot_mapping,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kc_blk,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_slot,
    stride_vc_head,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two (no tl.dot here: no minimum)
    BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping + tok)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    # Padding tokens (slot < 0) are skipped through the mask rather than an early return. The slot
    # test is made on a full [heads, dims] tile: a scalar comparison and-ed into the mask comes out
    # as int32 in Triton 3.9's interpreter, which then refuses it as a mask.
    slots = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int32) + slot
    mask = _lanes(heads < NUM_KV_HEADS, HEAD_DIM, BLOCK_D) & (slots >= 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE

    k = tl.load(key + tok * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value + tok * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    k_dst = k_cache + blk * stride_kc_blk + off * stride_kc_slot + heads[:, None] * stride_kc_head
    v_dst = v_cache + blk * stride_vc_blk + off * stride_vc_slot + heads[:, None] * stride_vc_head
    tl.store(k_dst + dims[None, :], k.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_dst + dims[None, :], v.to(v_cache.dtype.element_ty), mask=mask)


# Arguments that change from step to step (the block table's width, the split count) are not
# specialized: Triton would otherwise compile a new variant the first time one is 1 or a multiple
# of 16, in the middle of serving.
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    query,
    k_cache,
    v_cache,
    out,
    tile_map,
    query_start_loc,
    seq_lens,
    block_tables,
    tile_count,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kc_blk,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_slot,
    stride_vc_head,
    stride_bt,
    GROUP: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16 (tl.arange, tl.dot)
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    COUNT_ON_DEVICE: tl.constexpr,  # the grid is a capacity; ``tile_count`` holds how many tiles are real
    ONE_BLOCK_G: tl.constexpr,  # a one-token tile's rows: GROUP padded to a power of two >= 16
    ONE_BLOCK_N: tl.constexpr,  # and its keys per step (the decode kernel's)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    if COUNT_ON_DEVICE:
        if tile >= tl.load(tile_count):  # a CUDA graph's spare program: this step has fewer tiles
            return
    seq = tl.load(tile_map + 2 * tile)
    tile_start = tl.load(tile_map + 2 * tile + 1)  # index of the tile's first new token
    q_begin = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_begin
    seq_len = tl.load(seq_lens + seq)
    cached = seq_len - q_len  # new token i sits at position cached + i
    table = block_tables + seq.to(tl.int64) * stride_bt
    dims = tl.arange(0, BLOCK_D)

    if q_len == 1:
        # A decode row of a mixed step (or a one-token chunk): its GROUP heads in a tile of
        # ONE_BLOCK_G rows, as the decode kernel computes them, instead of BLOCK_M rows of which
        # GROUP are real. The full tile made such a row cost BLOCK_M / GROUP times the matrix
        # work of its keys: compute-bound where the row's K/V read should bound it.
        g = tl.arange(0, ONE_BLOCK_G)
        g_head = kv_head * GROUP + g
        g_ok = g < GROUP
        q_row = q_begin.to(tl.int64)
        q1 = tl.load(
            query + q_row * stride_qt + g_head[:, None] * stride_qh + dims[None, :],
            mask=_lanes(g_ok, HEAD_DIM, BLOCK_D),
            other=0.0,
        )
        acc1, _, l1 = _attend_one_query(
            q1, table, k_cache, v_cache, kv_head, 0, seq_len, scale_log2,
            stride_kc_blk, stride_kc_slot, stride_kc_head, stride_vc_blk, stride_vc_slot, stride_vc_head,
            ONE_BLOCK_G, ONE_BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_SIZE, DOT_PRECISION, UPCAST_DOT,
        )
        acc1 = acc1 / tl.where(l1 > 0.0, l1, 1.0)[:, None]
        tl.store(
            out + q_row * stride_ot + g_head[:, None] * stride_oh + dims[None, :],
            acc1.to(out.dtype.element_ty),
            mask=_lanes(g_ok, HEAD_DIM, BLOCK_D),
        )
        return

    # Row r of the tile is token tile_start + r // GROUP, query head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    tok = tile_start + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS_PER_TILE * GROUP) & (tok < q_len)
    # Padding rows get positions >= seq_len, so they see every key and never produce NaN.
    q_pos = cached + tok
    q_rows = (q_begin + tok).to(tl.int64)
    # Padded lanes load as 0 in q and k, so they add exactly 0 to every q.k.
    q = tl.load(
        query + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=_lanes(row_ok, HEAD_DIM, BLOCK_D),
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Causal: nothing past the tile's last token is visible to any of its rows.
    kv_end = tl.minimum(seq_len, cached + tile_start + TOKENS_PER_TILE)
    for start in range(0, kv_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < kv_end
        # Gather each key's physical block: works for any block_size vs BLOCK_N.
        blk = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        off = keys % BLOCK_SIZE
        k_ptr = k_cache + blk * stride_kc_blk + off * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(k_ptr[:, None] + dims[None, :], mask=_lanes(key_ok, HEAD_DIM, BLOCK_D), other=0.0)  # [N, D]
        s = _mma(q, tl.trans(k.to(q.dtype)), DOT_PRECISION, UPCAST_DOT) * scale_log2
        visible = (keys[None, :] <= q_pos[:, None]) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: avoid inf - inf
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptr = v_cache + blk * stride_vc_blk + off * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(v_ptr[:, None] + dims[None, :], mask=_lanes(key_ok, HEAD_DIM, BLOCK_D), other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + _mma(p.to(q.dtype), v.to(q.dtype), DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
        acc.to(out.dtype.element_ty),
        mask=_lanes(row_ok, HEAD_DIM, BLOCK_D),
    )


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_split_kernel(
    query,
    k_cache,
    v_cache,
    part_out,
    part_lse,
    out,
    seq_lens,
    block_tables,
    order,
    scale_log2,
    num_splits,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kc_blk,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_slot,
    stride_vc_head,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16 (tl.arange, tl.dot)
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DIRECT: tl.constexpr,  # one partition: write the output itself, no partials and no merge
    ORDERED: tl.constexpr,  # ``order`` lists the sequences to start first (the longest contexts)
    USE_PDL: tl.constexpr,
):
    dependent_launch_entry(USE_PDL)
    if ORDERED:
        # The GPU starts programs in grid order, x fastest: numbered this way every kv head of
        # order[0] starts first, then order[1]'s, so the longest contexts do not finish last.
        lin = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
        seq = tl.load(order + lin // tl.num_programs(1))
        kv_head = lin % tl.num_programs(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    # Partition [lo, hi) from the runtime length (never a host value), rounded to BLOCK_N.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    # All query heads of the kv group in one program: each K/V tile is read once per group.
    # BLOCK_G >= 16 because tl.dot needs it; the extra rows are masked.
    g = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + g
    g_ok = g < GROUP
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        query + seq * stride_qb + head[:, None] * stride_qh + dims[None, :],
        mask=_lanes(g_ok, HEAD_DIM, BLOCK_D),
        other=0.0,
    )

    table = block_tables + seq.to(tl.int64) * stride_bt
    acc, m_i, l_i = _attend_one_query(
        q, table, k_cache, v_cache, kv_head, lo, hi, scale_log2,
        stride_kc_blk, stride_kc_slot, stride_kc_head, stride_vc_blk, stride_vc_slot, stride_vc_head,
        BLOCK_G, BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_SIZE, DOT_PRECISION, UPCAST_DOT,
    )

    # Normalized partial output + base-2 log-sum-exp; an empty partition gives (0, -inf).
    has_keys = l_i > 0.0
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if DIRECT:
        # What the merge would compute from a single partition (its weight is exactly 1), rounded
        # the same way: the same bits, one launch and two scratch round trips fewer.
        dst = out + seq * stride_ob + head[:, None] * stride_oh + dims[None, :]
        tl.store(dst, acc.to(out.dtype.element_ty), mask=_lanes(g_ok, HEAD_DIM, BLOCK_D))
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        # Scratch layout: part_lse [B, H, S], part_out [B, H, S, HEAD_DIM], contiguous.
        row = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + split
        tl.store(part_lse + row, lse, mask=g_ok)
        tl.store(part_out + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=_lanes(g_ok, HEAD_DIM, BLOCK_D))


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out,
    part_lse,
    out,
    num_splits,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two (tl.arange)
    USE_PDL: tl.constexpr,
):
    dependent_launch_entry(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    row = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + splits
    lse = tl.load(part_lse + row, mask=split_ok, other=float("-inf"))
    o = tl.load(
        part_out + row[:, None] * HEAD_DIM + dims[None, :], mask=_lanes(split_ok, HEAD_DIM, BLOCK_D), other=0.0
    )

    # Weight each partition by exp(lse - max); empty ones weigh 0. A row with no keys at all
    # (a padded slot with seq_len 0) comes out as zeros rather than NaN.
    m = tl.max(lse, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_ref)
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    dst = out + seq * stride_ob + head * stride_oh + dims
    if BLOCK_D == HEAD_DIM:
        tl.store(dst, res.to(out.dtype.element_ty))
    else:
        tl.store(dst, res.to(out.dtype.element_ty), mask=dims < HEAD_DIM)


# --------------------------------------------------------------------------- host side

# Triton picks interpreter vs compiler when ``@triton.jit`` runs (TRITON_INTERPRET at import);
# read the outcome from the kernel itself so the host side always agrees with it.
INTERPRETED = not isinstance(_prefill_kernel, triton.runtime.JITFunction)


def _fix_interpreter_scalar_index() -> None:
    """Let runtime loop bounds work under ``TRITON_INTERPRET=1`` with numpy >= 2.4.

    Triton 3.6's interpreter keeps scalars as 1-element arrays and converts them with ``int()``,
    which numpy 2.4 rejects (triton-lang/triton#9171), so ``range(lo, hi)`` on loaded values
    fails. This wraps the interpreter's per-launch patching; compiled kernels are untouched.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fixed", False):
        return

    def patched(tensor: type, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))  # type: ignore[attr-defined]

    patched._scalar_index_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _fix_interpreter_scalar_index()


@attrs.frozen
class PrefillSchedule:
    """Which (sequence, first new token) each prefill program handles.

    Depends only on the batch's query lengths and the head layout, so one schedule can be
    built per step and shared by every layer. A CUDA graph's schedule is a fixed-size buffer
    rewritten before each replay: ``tile_count`` (a device int32) then says how many of its rows
    are this step's, and the programs past it return at once.
    """

    tile_map: torch.Tensor  # [num_tiles, 2] int32: (sequence index, first new-token index)
    tokens_per_tile: int
    tile_count: torch.Tensor | None = None  # [1] int32 on the device; None: every row is a tile

    @property
    def num_tiles(self) -> int:
        return self.tile_map.shape[0]


def padded_head_dim(head_dim: int) -> int:
    """The lanes the attention kernels walk one head in (``BLOCK_D``): a power of two for
    ``tl.arange`` and at least 16, the smallest ``tl.dot`` takes. Equals head_dim for the
    power-of-two heads from 16 up, which then run without any lane mask."""
    return max(16, triton.next_power_of_2(head_dim))


def tile_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """The prefill kernel's (BLOCK_M, BLOCK_N). Half types with a padded head up to 128: 128 rows
    by 32 keys (8 warps, 2 stages), which ran a prefill step's attention in half the time of the
    64 x 64 tiles used before on the H200 (docs/gpu-execution.md: 14 prompts of 585 tokens, and 4
    chunks of 2,048 after 1,024 cached; qwen3-0.6b's and llama3-8b's heads). Else 32 x 32, which
    do not spill registers at 8 warps on sm_90. Registers go with the padded head (a head of 80
    holds 128 lanes), so that is what is compared."""
    return (128, 32) if _large_tiles_fit(head_dim, dtype) else (32, 32)


def decode_block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per step of the decode kernel: 64 for half types with a padded head up to 128 (the
    fastest at batch 256 in the H200 sweeps), else 32."""
    return 64 if _large_tiles_fit(head_dim, dtype) else 32


def _large_tiles_fit(head_dim: int, dtype: torch.dtype) -> bool:
    """A half type with a padded head up to 128 lanes: what the larger tiles were sized for."""
    return dtype.itemsize <= 2 and padded_head_dim(head_dim) <= 128


def prefill_tokens_per_tile(num_heads: int, num_kv_heads: int, block_m: int = 64) -> int:
    """New tokens per prefill tile: ``block_m`` rows shared by the ``group`` heads of a kv head."""
    return max(1, block_m // (num_heads // num_kv_heads))


def max_prefill_tiles(num_tokens: int, num_seqs: int, tokens_per_tile: int) -> int:
    """The most tiles ``num_tokens`` new tokens over at most ``num_seqs`` sequences can need:
    each sequence's last tile may be partly empty, so ceil(T / t) plus one per sequence bounds it."""
    return -(-num_tokens // tokens_per_tile) + min(num_seqs, num_tokens)


def prefill_tile_map(
    query_start_loc: list[int] | np.ndarray, tokens_per_tile: int, seq_lens: list[int] | np.ndarray | None = None
) -> np.ndarray:
    """The ``[tiles, 2]`` int32 tile map for ``query_start_loc`` (host prefix sums), vectorized
    with numpy. Sequences with no new tokens get no tiles. With ``seq_lens`` the tiles are ordered
    by the keys they read, most first (ties in sequence order), so that the longest programs start
    first and the grid's last wave is short; the order changes which program computes a tile, not
    what it computes."""
    starts = np.asarray(query_start_loc, dtype=np.int64)
    q_lens = np.diff(starts)
    tiles = -(-q_lens // tokens_per_tile)  # ceil division
    seq_idx = np.repeat(np.arange(len(q_lens), dtype=np.int64), tiles)
    first_tile = np.cumsum(tiles) - tiles  # each sequence's first tile in the flat list
    tile_in_seq = np.arange(int(tiles.sum()), dtype=np.int64) - np.repeat(first_tile, tiles)
    tile_map = np.stack([seq_idx, tile_in_seq * tokens_per_tile], axis=1)
    if seq_lens is not None and len(tile_map) > 1:
        cached = np.asarray(seq_lens, dtype=np.int64) - q_lens
        keys = np.minimum(cached[seq_idx] + tile_map[:, 1] + tokens_per_tile, cached[seq_idx] + q_lens[seq_idx])
        tile_map = tile_map[np.argsort(-keys, kind="stable")]
    return tile_map.astype(np.int32)


def build_prefill_schedule(
    query_start_loc: list[int] | np.ndarray, tokens_per_tile: int, device: torch.device | str,
    seq_lens: list[int] | np.ndarray | None = None,
) -> PrefillSchedule:
    """The tile map of ``query_start_loc`` as a tensor on ``device`` (an eager step's schedule)."""
    tensor = torch.from_numpy(prefill_tile_map(query_start_loc, tokens_per_tile, seq_lens))
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return PrefillSchedule(tile_map=tensor, tokens_per_tile=tokens_per_tile)


def _check_shapes(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Validate layouts shared by the attention kernels; return the GQA group size."""
    head_dim = query.shape[-1]
    if not 1 <= head_dim <= GPU_MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports head_dim from 1 to {GPU_MAX_HEAD_DIM}, got {head_dim}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[-1] != head_dim:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim="
            f"{head_dim}], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    return num_heads // num_kv_heads


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 would silently cost fp32 inputs ~3 digits; half types ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values ``[T, kv_heads, head_dim]`` into their slots; slot < 0 is padding."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"key {tuple(key.shape)}, value {tuple(value.shape)} and cache "
            f"{tuple(k_cache.shape)} do not agree on [kv_heads, head_dim]"
        )
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("key, value and the caches must be contiguous in head_dim")
    if key.numel() == 0:  # no tokens (or an empty head): nothing to write
        return
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
    )


def prefill_attention_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    schedule: PrefillSchedule | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 8,  # the tile sweep's choice at 128 x 32; 4 warps spilled at 64 x 64, head_dim 128 (sm_90)
    num_stages: int = 2,  # as fast as 3 or 4 at 128 x 32 (H200), and fp32 tiles are twice the smem
) -> torch.Tensor:
    """Causal varlen paged attention of ``query`` ``[T, heads, head_dim]`` for any mixed batch.

    The new tokens' K/V must already be in the cache. ``schedule`` (from
    ``build_prefill_schedule``) may be passed to reuse one tile map across layers; otherwise it
    is built from ``meta.query_start_loc_list``. ``block_m`` (tile rows: tokens x GQA group; only
    used when no schedule is given) and ``block_n`` (keys per step) default to ``tile_sizes``;
    ``num_warps`` and ``num_stages`` are there for tuning sweeps (docs/benchmarks/prefill_tiles_sweep.py).
    """
    group = _check_shapes(query, k_cache, v_cache)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if out is None:
        out = torch.empty_like(query)
    default_m, default_n = tile_sizes(head_dim, query.dtype)
    block_n = block_n or default_n
    if schedule is None:
        tokens = prefill_tokens_per_tile(num_heads, num_kv_heads, block_m or default_m)
        schedule = build_prefill_schedule(meta.query_start_loc_list, tokens, query.device)
    if schedule.num_tiles == 0:
        return out
    rows = max(16, triton.next_power_of_2(schedule.tokens_per_tile * group))  # tl.dot needs >= 16
    _prefill_kernel[(schedule.num_tiles, num_kv_heads)](
        query,
        k_cache,
        v_cache,
        out,
        schedule.tile_map,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        schedule.tile_count if schedule.tile_count is not None else schedule.tile_map,  # unread without a count
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        meta.block_tables.stride(0),
        GROUP=group,
        TOKENS_PER_TILE=schedule.tokens_per_tile,
        BLOCK_M=rows,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        DOT_PRECISION=_dot_precision(query.dtype),
        UPCAST_DOT=INTERPRETED,
        COUNT_ON_DEVICE=schedule.tile_count is not None,
        ONE_BLOCK_G=max(16, triton.next_power_of_2(group)),
        ONE_BLOCK_N=decode_block_n(head_dim, query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def decode_attention_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,  # Triton's own default on CUDA; a knob for sweeps (docs/benchmarks/)
    pdl: bool = False,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash-decoding: one query per sequence (``query`` ``[B, heads, head_dim]``); ``pdl``: both
    kernels launched as ``triton_norm.dependent_launch`` says; ``order`` (int32 ``[B]``, a
    permutation of the rows, read on the device) the rows in the order their programs should
    start, longest context first for the shortest tail. It changes no result, only which program
    computes which row.

    Sequence ``b`` attends to its first ``seq_lens[b]`` cached tokens (its own new K/V must be
    stored already). Nothing here reads ``seq_lens`` on the host and every shape depends only on
    ``B``, heads, head_dim and ``num_splits``, so the call can be captured in a CUDA graph and
    replayed with new ``seq_lens``/``block_tables`` contents. Rows with ``seq_lens[b] == 0``
    (graph padding) produce zeros.
    """
    group = _check_shapes(query, k_cache, v_cache)
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if seq_lens.shape[0] != batch or block_tables.shape[0] != batch:
        raise ValueError(
            f"decode needs one query per sequence: query has {batch} rows, seq_lens "
            f"{seq_lens.shape[0]}, block_tables {block_tables.shape[0]}"
        )
    if order is not None and (order.shape != (batch,) or order.dtype != torch.int32 or order.device != query.device):
        raise ValueError(
            f"order must be int32 [{batch}] on {query.device}, got {order.dtype} {list(order.shape)} on {order.device}"
        )
    block_n = block_n or decode_block_n(head_dim, query.dtype)
    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    # Scratch shapes depend only on (B, H, S, D): safe to allocate inside a captured graph. With
    # one partition there is nothing to merge and the kernel writes ``out`` (the scratch unused).
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # not read or written
    else:
        part_out = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=query.device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        part_out,
        part_lse,
        out,
        seq_lens,
        block_tables,
        seq_lens if order is None else order,  # not read without an order
        scale * LOG2E,
        num_splits,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        DOT_PRECISION=_dot_precision(query.dtype),
        UPCAST_DOT=INTERPRETED,
        DIRECT=direct,
        ORDERED=order is not None,
        num_warps=num_warps,  # 8 by default: 4 warps spill at BLOCK_N=64, head_dim 128 (sm_90)
        num_stages=num_stages,
        **dependent_launch(pdl),
    )
    if direct:
        return out
    _decode_reduce_kernel[(batch, num_heads)](
        part_out,
        part_lse,
        out,
        num_splits,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        BLOCK_S=decode_variant(num_splits)[1],
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
        **dependent_launch(pdl),
    )
    return out


def decode_variant(num_splits: int) -> tuple[bool, int]:
    """What a decode call's compiled kernels depend on besides the model's shapes and the launch:
    whether the split kernel writes the output itself (one partition) and the merge's split tile.
    Each distinct value is another compile (the eager warm-up runs one batch of each)."""
    return num_splits == 1, max(2, triton.next_power_of_2(num_splits))


def num_splits_for(max_model_len: int, tokens_per_split: int = 512, max_splits: int = 32) -> int:
    """A fixed split count for a deployment: about one partition per ``tokens_per_split`` tokens."""
    return max(1, min(max_splits, math.ceil(max_model_len / tokens_per_split)))


def paged_attention_triton(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    num_splits: int = DEFAULT_NUM_SPLITS,
    *,
    schedule: PrefillSchedule | None = None,
) -> torch.Tensor:
    """Drop-in for ``paged_attention_reference``: decode-only batches use flash-decoding.

    A step with ``max_query_len == 1`` whose rows map 1:1 to sequences goes to the decode
    kernel; anything else (including a decode step where some sequence has no new token) goes
    to the prefill kernel, with ``schedule`` if the caller built one for the step.
    """
    if meta.max_query_len == 1 and query.shape[0] == meta.seq_lens.shape[0]:
        return decode_attention_triton(query, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale, num_splits)
    return prefill_attention_triton(query, k_cache, v_cache, meta, scale, schedule=schedule)
