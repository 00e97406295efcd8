"""Fused RMSNorm (optionally with the residual add before it), rotary and SiLU-multiply in Triton.

The eager model spends ~7 small kernels per RMSNorm (cast, square, mean, rsqrt, multiply, cast,
scale) and one more for the residual add; at decode batch sizes each is a full pass over a small
tensor plus a launch. One program per row does it all in one pass. The arithmetic mirrors
``mini_vllm.engine.model.RMSNorm`` rounding for rounding (normalize in fp32, round to the input dtype, then
scale and round again; the residual sum rounded to the input dtype first); only the order of
the mean's fp32 sum differs, so results agree with the eager path to within one rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def dependent_launch_entry(USE_PDL: tl.constexpr):
    """First statement of a kernel launched with ``dependent_launch(True)``: such a kernel may
    start while the one before it on the stream still runs, so it waits for that one here, before
    it touches memory, and at once lets the next one start the same way (programmatic dependent
    launch, sm_90 and newer). Waiting first in every such kernel keeps the order transitive: the
    one before has itself waited for its predecessor before it could end."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


def dependent_launch(pdl: bool) -> dict[str, bool]:
    """Launch keywords for a kernel that starts with ``dependent_launch_entry``: with ``pdl`` its
    launch may overlap the end of the kernel before it (what it saves is the gap between the two,
    about a microsecond); without, a plain launch. Only on CUDA devices of compute capability 9.0+
    (the GPU runner checks) and never under the interpreter, which has no such instructions."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}


# NO_FP_FUSION: the norm, rotary and qkv prologue kernels are compiled with ``enable_fp_fusion=False``.
# With it on, the compiler may turn a product and a sum into one fused multiply-add (one rounding
# instead of two) in one kernel and not in another, depending on the tile: the prologue at 4 tokens
# a program left fp32 q one rounding from the separate kernels in 13-15 % of its elements on the
# H200 (2026-12-03), where eager torch, which multiplies and adds in separate kernels, rounds twice.

# Rows up to this wide (a head's, for q/k norms) are summed by ``pairwise_row_sum``, in at most
# PAIRWISE_LEVELS halvings.
PAIRWISE_MAX_WIDTH = 256
PAIRWISE_LEVELS = tl.constexpr(PAIRWISE_MAX_WIDTH.bit_length() - 1)


@triton.jit
def _sum_adjacent_pairs(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """[ROWS, WIDTH] -> [ROWS, WIDTH // 2]: lanes 2i and 2i + 1 of each row added."""
    a, b = tl.split(tl.reshape(x, (ROWS, WIDTH // 2, 2)))
    return a + b


@triton.jit
def pairwise_row_sum(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """The fp32 sum of each row of ``x`` [ROWS, WIDTH] (WIDTH a power of two, at most
    ``PAIRWISE_MAX_WIDTH``) as a fixed tree: adjacent lanes, then adjacent pairs, and so on.
    ``tl.sum`` adds in an order that follows the tile's layout, which the compiler picks from the
    shape and the warps; this order is the code's, so a row comes out bit for bit the same whether a
    program holds one row (``rms_norm_triton``) or many tokens' heads (``qkv_prologue_triton``)."""
    for level in tl.static_range(PAIRWISE_LEVELS):  # unrolled: each level halves the width
        if (WIDTH >> level) >= 2:
            x = _sum_adjacent_pairs(x, ROWS, WIDTH >> level)
    return tl.reshape(x, (ROWS,))


@triton.jit
def _rms_norm_kernel(
    x,
    residual,
    weight,
    out,
    res_out,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PAIRWISE: tl.constexpr,  # BLOCK <= PAIRWISE_MAX_WIDTH
    USE_PDL: tl.constexpr,
):
    dependent_launch_entry(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    v = tl.load(x + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual + row * stride_r + cols, mask=ok, other=0.0)
        v = (v.to(tl.float32) + r.to(tl.float32)).to(out.dtype.element_ty)  # rounded like a + b
        tl.store(res_out + row * stride_ro + cols, v, mask=ok)
    v32 = v.to(tl.float32)
    if PAIRWISE:  # a head's row: summed as qkv_prologue_triton sums its q/k norms
        mean_sq = pairwise_row_sum(tl.reshape(v32 * v32, (1, BLOCK)), 1, BLOCK) / n_cols
    else:
        mean_sq = tl.sum(v32 * v32, axis=0) / n_cols
    normed = (v32 * (1.0 / tl.sqrt(mean_sq + eps))).to(out.dtype.element_ty)
    w = tl.load(weight + cols, mask=ok, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + row * stride_o + cols, y, mask=ok)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(norm(x + residual), x + residual)`` with a residual, else ``(norm(x), None)``; ``pdl``:
    launched as ``dependent_launch`` says.

    ``x`` may have any leading shape; the last dimension is normalized.
    """
    if x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty_like(x2)
    rows = x2.shape[0]
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty_like(x2)
    else:
        r2, res_out = x2, out  # unused by the kernel
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            n, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(n),
            PAIRWISE=triton.next_power_of_2(n) <= PAIRWISE_MAX_WIDTH,
            num_warps=norm_warps(n),
            enable_fp_fusion=False,  # see NO_FP_FUSION
            **dependent_launch(pdl),
        )
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else None)


def norm_warps(n: int) -> int:
    """Warps a program of ``rms_norm_triton`` takes for rows of ``n``. Two for rows of a head (at
    most 256, summed pairwise, so the warps do not change the result)."""
    return 2 if n <= 256 else 4 if n <= 2048 else 8


@triton.jit
def round_to(x, ty: tl.constexpr, IS_BF16: tl.constexpr):
    """Round fp32 ``x`` to ``ty`` and back. For bf16 in integer arithmetic (round to nearest even):
    on the H200 the compiler dropped a plain ``.to(bf16).to(fp32)`` round trip inside the rotary
    sum, which left a fifth of the outputs one rounding away from the eager ops."""
    if IS_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(ty).to(tl.float32)


@triton.jit
def _rotary_kernel(
    x,
    positions,
    cos,
    sin,
    stride_t,
    stride_h,
    stride_cos,
    num_heads,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HALF rounded up to a power of two (tl.arange needs one), masked
    BLOCK_H: tl.constexpr,
    IS_BF16: tl.constexpr,
):
    tok = tl.program_id(0)
    pos = tl.load(positions + tok).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    base = x + tok.to(tl.int64) * stride_t + heads[:, None] * stride_h
    ok = h_ok[:, None] & d_ok[None, :]
    x1 = tl.load(base + d[None, :], mask=ok, other=0.0)
    x2 = tl.load(base + HALF + d[None, :], mask=ok, other=0.0)
    ty = x1.dtype
    # The table is cat(freqs, freqs): both halves share cos/sin; rounded to x's dtype as eager does.
    c = round_to(tl.load(cos + pos * stride_cos + d, mask=d_ok, other=0.0), ty, IS_BF16)[None, :]
    s = round_to(tl.load(sin + pos * stride_cos + d, mask=d_ok, other=0.0), ty, IS_BF16)[None, :]
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    # Eager: x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype.
    # The sum is rounded here too, so the final cast is exact (value already representable).
    o1 = round_to(round_to(f1 * c, ty, IS_BF16) + round_to(-f2 * s, ty, IS_BF16), ty, IS_BF16).to(ty)
    o2 = round_to(round_to(f2 * c, ty, IS_BF16) + round_to(f1 * s, ty, IS_BF16), ty, IS_BF16).to(ty)
    tl.store(base + d[None, :], o1, mask=ok)
    tl.store(base + HALF + d[None, :], o2, mask=ok)


def rotary_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on ``q`` ``[T, heads, D]`` and ``k`` ``[T, kv_heads, D]`` in place (one
    launch instead of ~14 kernels); ``cos``/``sin`` are the fp32 ``[positions, D]`` tables."""
    tensors: tuple[torch.Tensor, ...] = (q, k)
    if (
        q.dtype == k.dtype and q.stride()[1:] == (q.shape[2], 1) and k.stride()[1:] == (q.shape[2], 1)
        # A one-token view's row stride is arbitrary (torch picks it), so it need not match.
        and (q.shape[0] <= 1 or k.stride(0) == q.stride(0))
        and k.data_ptr() == q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size()
        # Two tensors that merely sit next to each other (the allocator's doing) are not one view.
        and k.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    ):
        # k's heads follow q's in each row (both views of the qkv projection): one launch for both.
        tensors = (q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride()),)
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError("rotary needs the head dimension contiguous")
        tokens, heads, dim = t.shape
        if dim % 2:  # an odd lane would be left out of both halves, unrotated
            raise ValueError(f"rotary rotates the two halves of each head: head_dim must be even, got {dim}")
        if tokens:
            _rotary_kernel[(tokens,)](
                t, positions, cos, sin, t.stride(0), t.stride(1), cos.stride(0), heads,
                HALF=dim // 2, BLOCK_D=triton.next_power_of_2(dim // 2), BLOCK_H=triton.next_power_of_2(heads),
                IS_BF16=t.dtype == torch.bfloat16,
                num_warps=4,
                enable_fp_fusion=False,  # see NO_FP_FUSION
            )
    return q, k


@triton.jit
def _silu_mul_kernel(gate_up, out, stride_in, stride_out, n_cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    dependent_launch_entry(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(gate_up + row * stride_in + cols, mask=ok, other=0.0)
    u = tl.load(gate_up + row * stride_in + n_cols + cols, mask=ok, other=0.0)
    ty = g.dtype
    g32 = g.to(tl.float32)
    # Eager: silu in fp32 rounded to the dtype, then the product rounded again.
    s = (g32 / (1.0 + tl.exp(-g32))).to(ty).to(tl.float32)
    tl.store(out + row * stride_out + cols, (s * u.to(tl.float32)).to(ty), mask=ok)


def silu_mul_triton(gate_up: torch.Tensor, intermediate: int, *, pdl: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` of shape ``[T, 2 * intermediate]``: one
    kernel and one pass instead of two kernels and an intermediate tensor (``pdl``: see
    ``dependent_launch``)."""
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * intermediate or gate_up.stride(1) != 1:
        raise ValueError(f"silu_mul needs a [T, 2 * {intermediate}] row-major tensor, got {tuple(gate_up.shape)}")
    tokens = gate_up.shape[0]
    out = torch.empty((tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(intermediate))
        _silu_mul_kernel[(tokens, triton.cdiv(intermediate, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), intermediate, BLOCK=block, num_warps=4,
            **dependent_launch(pdl),
        )
    return out
