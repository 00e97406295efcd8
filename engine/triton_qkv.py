"""The attention block's prologue in one Triton launch: q/k RMSNorm, rotary, and the KV cache write.

Between the qkv projection and attention a decoder layer used to launch ``rms_norm_triton`` on q
and on k (Qwen3-style q/k norms), ``rotary_triton`` on both, then ``store_kv_triton``: four small
memory-bound kernels (two for Llama-style models), each a few microseconds of a decode step, 32
times over in a CUDA graph of llama3-8b. ``qkv_prologue_triton`` does all of it in one launch.

Launch layout: grid ``(tokens / BLOCK_T, heads + kv_heads)``; a program takes one head of
``BLOCK_T`` tokens (``prologue_tiles``: 4 in small steps, 16 in large ones; one token a program
had left the kernel bound by the latency of its loads, at a fifth of the bandwidth).
A program of a query head normalizes and rotates it and writes it back in place, into the qkv
buffer's q columns; a program of a kv head normalizes and rotates that key and writes it and the
matching value head into each token's cache slot (none for slot < 0, graph padding). Per head
rather than per token, so that a decode step of one token still spreads over ``heads + kv_heads``
programs. The q/k norm's sum of squares is ``triton_norm.pairwise_row_sum``, the order that
``rms_norm_triton`` sums a head's row in: a fixed tree, not ``tl.sum``, whose order follows the
tile's layout (and a different order moves a bf16 rounding now and then).

Every other operation is elementwise and written exactly as in ``rms_norm_triton`` (normalize in
fp32, round to the dtype, scale, round), ``rotary_triton`` (each product and the sum rounded with
the same ``round_to``) and ``store_kv_triton`` (a cast to the cache's dtype), so the results are
bit for bit those of the three kernels in a row, for any even head size up to ``GPU_MAX_HEAD_DIM``
(halves padded to a power of two and masked). Nothing reads a device value on the host and every
shape depends only on the token count: the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mini_vllm.engine.attention import GPU_MAX_HEAD_DIM

# The rotary kernel's own rounding (integer round-to-nearest-even for bf16), shared rather than
# copied: bit-equality with rotary_triton holds by construction.
from mini_vllm.engine.triton_norm import dependent_launch, dependent_launch_entry, pairwise_row_sum, round_to

# Not float16: compiled for the H200, its rotary rounding (a plain fp16 round trip, which the
# compiler may fold) left about a tenth of q one rounding away from rotary_triton's in the GPU
# test (2026-12-01), though the interpreter agreed. float16 models keep the separate kernels.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


# Kernel arguments are left unannotated: Triton reads annotations as specialization hints.
@triton.jit(do_not_specialize=["n_tokens"])
def _qkv_prologue_kernel(
    qkv,
    positions,
    cos,
    sin,
    q_weight,
    k_weight,
    k_cache,
    v_cache,
    slot_mapping,
    n_tokens,
    stride_t,
    stride_h,  # head_dim, passed at run time like rms_norm_triton's row stride (same alignment facts)
    stride_cos,
    stride_kc_blk,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_slot,
    stride_vc_head,
    n_cols,  # head_dim again: the norm divides by a runtime count and masks with it, as rms_norm does
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # HALF rounded up to a power of two (tl.arange needs one), masked
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two: the norm's and v's tile
    BLOCK_T: tl.constexpr,  # tokens a program takes (of one head)
    BLOCK_SIZE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    IS_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dependent_launch_entry(USE_PDL)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)  # 0..NUM_HEADS-1: query heads; then the kv heads
    t_ok = toks < n_tokens
    rows = qkv + toks.to(tl.int64)[:, None] * stride_t  # [BLOCK_T, 1]
    row = rows + head * stride_h
    d = tl.arange(0, BLOCK_HALF)[None, :]
    # Roles as full tiles, not scalars and-ed into masks (those come out as int32 in the
    # interpreter, which then refuses them as masks; see _store_kv_kernel).
    heads = tl.zeros([BLOCK_T, BLOCK_HALF], dtype=tl.int32) + head
    half_ok = t_ok[:, None] & (d < HALF)
    kv = tl.maximum(head - NUM_HEADS, 0)
    # Every load first, in dependency order, then the arithmetic: the loads are in flight together
    # instead of one chain after another (the position before its cos/sin, the slot, the value
    # head). Nothing is loaded from memory a store below writes (q's columns are read here, before
    # their store); the order of the arithmetic is unchanged.
    pos = tl.load(positions + toks, mask=t_ok, other=0).to(tl.int64)[:, None]
    slot = tl.load(slot_mapping + toks, mask=t_ok, other=-1).to(tl.int64)[:, None]
    x1 = tl.load(row + d, mask=half_ok, other=0.0)
    x2 = tl.load(row + HALF + d, mask=half_ok, other=0.0)
    lanes = tl.arange(0, BLOCK_D)[None, :]
    v_heads = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32) + head
    v_ok = (lanes < 2 * HALF) & (v_heads >= NUM_HEADS) & (slot >= 0)
    value = tl.load(rows + (NUM_HEADS + NUM_KV_HEADS + kv) * stride_h + lanes, mask=v_ok)
    c_raw = tl.load(cos + pos * stride_cos + d, mask=half_ok, other=0.0)
    s_raw = tl.load(sin + pos * stride_cos + d, mask=half_ok, other=0.0)
    ty = x1.dtype
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    if HAS_NORM:
        v32 = tl.load(row + lanes, mask=t_ok[:, None] & (lanes < n_cols), other=0.0).to(tl.float32)
        weight = tl.where(head < NUM_HEADS, q_weight, k_weight)
        w1 = tl.load(weight + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(weight + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        # rms_norm_triton's row, lane for lane and summed in the same pairwise order.
        mean_sq = pairwise_row_sum(v32 * v32, BLOCK_T, BLOCK_D) / n_cols
        inv = (1.0 / tl.sqrt(mean_sq + eps))[:, None]
        f1 = (w1 * (f1 * inv).to(ty).to(tl.float32)).to(ty).to(tl.float32)
        f2 = (w2 * (f2 * inv).to(ty).to(tl.float32)).to(ty).to(tl.float32)

    # rotary_triton's arithmetic (see _rotary_kernel): the table is cat(freqs, freqs), both halves
    # share cos/sin, rounded to the dtype; each product and the sum rounded to the dtype.
    c = round_to(c_raw, ty, IS_BF16)
    s = round_to(s_raw, ty, IS_BF16)
    o1 = round_to(round_to(f1 * c, ty, IS_BF16) + round_to(-f2 * s, ty, IS_BF16), ty, IS_BF16).to(ty)
    o2 = round_to(round_to(f2 * c, ty, IS_BF16) + round_to(f1 * s, ty, IS_BF16), ty, IS_BF16).to(ty)

    # A query head goes back into its own columns. No element is read after it is overwritten:
    # the norm's row loads all feed the sum, which every store waits for, and each half element is
    # stored by the thread that loaded it (of replicated threads, Triton lets one store).
    q_ok = half_ok & (heads < NUM_HEADS)
    tl.store(row + d, o1, mask=q_ok)
    tl.store(row + HALF + d, o2, mask=q_ok)

    # A kv head: the rotated key and the value head into the token's slot, none for slot < 0.
    k_ok = half_ok & (heads >= NUM_HEADS) & (slot >= 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    k_dst = k_cache + blk * stride_kc_blk + off * stride_kc_slot + kv * stride_kc_head
    tl.store(k_dst + d, o1.to(k_cache.dtype.element_ty), mask=k_ok)
    tl.store(k_dst + HALF + d, o2.to(k_cache.dtype.element_ty), mask=k_ok)
    v_dst = v_cache + blk * stride_vc_blk + off * stride_vc_slot + kv * stride_vc_head
    tl.store(v_dst + lanes, value.to(v_cache.dtype.element_ty), mask=v_ok)


# Steps of at least this many tokens take the large tile (another compiled variant).
LARGE_TILE_MIN_TOKENS = 128


def prologue_tiles(tokens: int) -> tuple[int, int]:
    """(tokens a program takes, warps) for a step of ``tokens``. One program per (token, head) is
    bound by the latency of its loads, not by the bandwidth; a tile of several tokens keeps more
    loads in flight per program. From the H200 sweep (docs/benchmarks/prologue-tiles-20261203-dbf3951.json):
    16 x 4 was the fastest or within 3 % of it from 128 tokens up on both models' heads (qwen3-0.6b
    8,190 tokens 122 -> 72 µs, llama3-8b 200 -> 78), 4 x 4 at 1 and 16 (2.3-2.7 µs)."""
    return (4, 4) if tokens < LARGE_TILE_MIN_TOKENS else (16, 4)


def _check_norm_weights(
    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float | None, head_dim: int, dtype: torch.dtype
) -> bool:
    """Whether the q/k norms are on; refuses half a pair, a missing eps and mismatched weights."""
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come as a pair: give both weights or neither")
    if q_norm is None or k_norm is None:
        return False
    if eps is None or not eps >= 0.0:
        raise ValueError(f"eps must be a float >= 0 when q/k norm weights are given, got {eps}")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w.shape != (head_dim,) or w.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous [head_dim={head_dim}] weight, got {tuple(w.shape)}")
        if w.dtype != dtype:  # as rms_norm_triton: the scale is applied in the input's dtype
            raise ValueError(f"{name} ({w.dtype}) and qkv ({dtype}) must share a dtype")
    return True


def _check_inputs(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> None:
    """Shapes, layouts, dtypes and devices; only tensor metadata is read (graph capturable)."""
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"qkv must be bfloat16 or float32 (float16 runs the separate kernels), got {qkv.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if not 2 <= head_dim <= GPU_MAX_HEAD_DIM or head_dim % 2:
        raise ValueError(
            f"rotary rotates the two halves of each head: head_dim must be even, from 2 to {GPU_MAX_HEAD_DIM}, "
            f"got {head_dim}"
        )
    if num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads must be a positive multiple of num_kv_heads ({num_kv_heads}), got {num_heads}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(
            f"qkv must be a row-major [T, (num_heads={num_heads} + 2 * num_kv_heads={num_kv_heads}) * "
            f"head_dim={head_dim}] = [T, {width}] tensor, got {tuple(qkv.shape)} with strides {qkv.stride()}"
        )
    tokens = qkv.shape[0]
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (tokens,) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer [T={tokens}] tensor, got {t.dtype} {tuple(t.shape)}")
        if tokens > 1 and t.stride(0) != 1:  # the kernel reads element i at offset i
            raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != head_dim or t.dtype != torch.float32 or t.stride(1) != 1:
            raise ValueError(
                f"{name} must be the float32 [max_positions, head_dim={head_dim}] rotary table, got "
                f"{t.dtype} {tuple(t.shape)}"
            )
    if cos.stride(0) != sin.stride(0):
        raise ValueError(f"cos and sin must share a row stride, got {cos.stride(0)} and {sin.stride(0)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    tensors = (("positions", positions), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache),
               ("slot_mapping", slot_mapping))
    for name, t in tensors:
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device}, qkv on {qkv.device}: all inputs must share a device")


def qkv_prologue_triton(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    num_heads: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float | None = None,
    tiles: tuple[int, int] | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Normalize (with ``q_norm``/``k_norm`` weights, both or neither) and rotate q and k of the qkv
    projection's output, write k and v into the cache, in one launch; return q ``[T, heads, head_dim]``.

    ``qkv`` is ``[T, (num_heads + 2 * kv_heads) * head_dim]`` row-major (as ``qkv_proj`` returns
    it); kv_heads and head_dim are the caches' ``[blocks, block_size, kv_heads, head_dim]``.
    ``cos``/``sin`` are the fp32 ``[positions, head_dim]`` tables (``RotaryEmbedding``: each row is
    ``cat(freqs, freqs)``, so only its first half is read); every position must index them (not
    checked: that would read the device). A token with slot < 0
    writes nothing to the cache (graph padding). q is rotated in place: the result is a view of
    qkv's q columns whose row stride is qkv's; qkv's k and v columns are left as they were.
    Equal bit for bit to ``rms_norm_triton`` on q and k (when weights are given), then
    ``rotary_triton``, then ``store_kv_triton``, whatever the tiles. ``tiles`` overrides
    ``prologue_tiles`` (sweeps); ``pdl``: launched as ``triton_norm.dependent_launch`` says.
    """
    _check_inputs(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    has_norm = _check_norm_weights(q_norm, k_norm, eps, head_dim, qkv.dtype)
    tokens = qkv.shape[0]
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    if tokens == 0:
        return q
    half = head_dim // 2
    block_t, warps = tiles or prologue_tiles(tokens)
    _qkv_prologue_kernel[(triton.cdiv(tokens, block_t), num_heads + num_kv_heads)](
        qkv,
        positions,
        cos,
        sin,
        q_norm if q_norm is not None else qkv,  # unused without the norm
        k_norm if k_norm is not None else qkv,
        k_cache,
        v_cache,
        slot_mapping,
        tokens,
        qkv.stride(0),
        head_dim,
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        head_dim,
        eps if eps is not None else 0.0,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_T=block_t,
        BLOCK_SIZE=k_cache.shape[1],
        HAS_NORM=has_norm,
        IS_BF16=qkv.dtype == torch.bfloat16,
        num_warps=warps,
        enable_fp_fusion=False,  # as the separate kernels (triton_norm.NO_FP_FUSION)
        **dependent_launch(pdl),
    )
    return q
