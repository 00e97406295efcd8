"""The projections of a decode step with few rows, each with its neighbours fused in, in Triton.

At one to a few sequences a decode step is a chain of weight reads: per llama3-8b layer four
matrix-vector products (cuBLAS), and around them eight small kernels, each a launch and a gap in
the graph: the two RMSNorms (with the residual add), the SiLU-multiply and cuBLAS's split-K
reduction after o_proj and after down_proj (the profile of a batch-1 step had 12 kernels a layer,
391 a step; docs/gpu-execution.md). Here one kernel per projection does the reading and takes its
neighbours along:

- ``norm`` (input and post-attention RMSNorm, with the residual add before it): the kernel adds
  the residual, writes the sum (the next residual) and scales by the norm weight as it loads x,
  accumulates the sum of squares on the way, and divides by the root mean square at the end.
  The RMS is a per-row scalar, so it can come out of the product: ``(x / rms * w) @ W.T ==
  ((x * w) @ W.T) / rms``. The rounding differs from the separate kernels' (which round
  ``x / rms`` to the dtype, then times ``w`` again), by about one rounding of the dtype.
- ``silu_intermediate`` (gate_up): each program reads matching gate and up columns and writes
  ``silu(gate) * up``, rounded as ``silu_mul_triton`` rounds it.
- No split-K: every program walks the whole of K for its own columns, so nothing is left to reduce.

Each program owns ``BLOCK_N`` output columns for all rows (at most ``MAX_ROWS``, padded to a
16-row tile for ``tl.dot``) and reads each weight byte once. Accumulation is fp32; fp32 products
are IEEE (not TF32), so fp32 stays an exactness path. The kernel also runs under
``TRITON_INTERPRET=1`` on CPU tensors, and tests/test_triton_skinny_aot.py compiles it for sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mini_vllm.engine.triton_attention import INTERPRETED, _mma
from mini_vllm.engine.triton_norm import round_to

# One tl.dot tile of rows. Up to 16 rows the plain kernel read the weights as fast as cuBLAS
# (skinny-linear-sweep-20261201.json); at 32 rows and more a plain Triton GEMM lost to it
# (small-gemm-sweep-20261201.json).
MAX_ROWS = 16
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


# Kernel arguments are left unannotated: Triton reads annotations as specialization hints.
@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x,
    residual,
    res_out,
    norm_w,
    w,
    bias,
    y,
    M,
    stride_x,
    stride_r,
    stride_ro,
    stride_w,
    stride_y,
    eps,
    N: tl.constexpr,  # output columns (for SiLU: the intermediate size; the weight has 2 N rows)
    K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    IS_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    w_rows = w + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ty = y.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        xm = row_ok[:, None] & k_ok[None, :]
        a = tl.load(x + rows[:, None] * stride_x + k[None, :], mask=xm, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual + rows[:, None] * stride_r + k[None, :], mask=xm, other=0.0)
            a = (a.to(tl.float32) + r.to(tl.float32)).to(ty)  # rounded like a + b
            if pid == 0:  # one program writes the sum (a branch: newer interpreters refuse a scalar in the mask)
                tl.store(res_out + rows[:, None] * stride_ro + k[None, :], a, mask=xm)
        if HAS_NORM:
            a32 = a.to(tl.float32)
            sum_sq += tl.sum(a32 * a32, axis=1)
            nw = tl.load(norm_w + k, mask=k_ok, other=0.0)
            a = (a32 * nw.to(tl.float32)[None, :]).to(ty)
        wm = col_ok[:, None] & k_ok[None, :]
        b = tl.load(w_rows + k[None, :], mask=wm, other=0.0)
        acc += _mma(a, tl.trans(b), DOT_PRECISION, UPCAST_DOT)
        if SILU:
            bu = tl.load(w_rows + N * stride_w + k[None, :], mask=wm, other=0.0)
            acc_up += _mma(a, tl.trans(bu), DOT_PRECISION, UPCAST_DOT)
    if HAS_NORM:
        inv_rms = 1.0 / tl.sqrt(sum_sq / K + eps)
        acc = acc * inv_rms[:, None]
        acc_up = acc_up * inv_rms[:, None]
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SILU:
        # As silu_mul_triton on the rounded projections: silu in fp32 rounded, the product rounded.
        g = round_to(acc, ty, IS_BF16)
        s = round_to(g / (1.0 + tl.exp(-g)), ty, IS_BF16)
        acc = s * round_to(acc_up, ty, IS_BF16)
    tl.store(y + rows[:, None] * stride_y + cols[None, :], acc.to(ty), mask=row_ok[:, None] & col_ok[None, :])


def skinny_tiles(n: int, k: int, *, silu: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, stages) for ``n`` output columns over ``k`` inputs: narrow column tiles
    for narrow outputs (enough programs to cover the GPU), long K tiles for long rows (from the H200
    sweep of the plain kernel, docs/benchmarks/skinny-linear-sweep-20261201.json, where gate_up's
    best was 32 x 128 on both models). SiLU's programs stage two weight tiles: K tiles of 128, which
    compile for sm_90 without spills under triton 3.6 and 3.9 (256 spilled under 3.9, and two tiles
    of 512 would need 298 KB of shared memory; tests/test_triton_skinny_aot.py)."""
    block_n = 16 if n <= 2048 else 32
    if silu:
        return block_n, 128, 3
    block_k = 512 if n <= 4096 and k >= 4096 else (128 if k <= 1024 else 256)
    return block_n, block_k, 4 if block_k == 512 else 3


def skinny_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    silu_intermediate: int | None = None,
    tiles: tuple[int, int, int] | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, x + residual)`` for ``x`` of at most ``MAX_ROWS`` rows ``[M, K]`` and ``weight``
    ``[N, K]``; the second is None without ``residual``. In order: ``x + residual`` (rounded),
    RMSNorm by ``norm_weight`` with ``eps``, the product with ``weight.T``, ``bias``; with
    ``silu_intermediate`` (``weight`` = [gate; up], ``2 * silu_intermediate`` rows) ``y`` is
    ``silu(gate) * up``, ``[M, silu_intermediate]``. ``tiles`` overrides ``skinny_tiles`` and ``num_warps`` the 4 warps a program (sweeps)."""
    m, k = x.shape if x.dim() == 2 else (-1, -1)
    if m < 0 or weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"skinny_linear: x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear: at most {MAX_ROWS} rows, got {m}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"skinny_linear: x and weight of one dtype of {SUPPORTED_DTYPES}, got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny_linear: x and weight need contiguous rows")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"skinny_linear: residual must be {tuple(x.shape)} with contiguous rows")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"skinny_linear: norm_weight must be [{k}]")
    if residual is not None and norm_weight is None:
        raise ValueError("skinny_linear: a residual is only added in front of a norm")
    n = weight.shape[0]
    if silu_intermediate is not None:
        if n != 2 * silu_intermediate or bias is not None:
            raise ValueError(f"skinny_linear: SiLU needs a [2 * {silu_intermediate}, K] weight and no bias")
        n = silu_intermediate
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"skinny_linear: bias must be [{n}]")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    if m == 0:
        return y, total
    flags = {"HAS_RESIDUAL": residual is not None, "HAS_NORM": norm_weight is not None, "HAS_BIAS": bias is not None,
             "SILU": silu_intermediate is not None, "IS_BF16": x.dtype == torch.bfloat16}
    block_n, block_k, stages = tiles if tiles is not None else skinny_tiles(n, k, silu=silu_intermediate is not None)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, total if total is not None else y,
        norm_weight if norm_weight is not None else x, weight, bias if bias is not None else x, y,
        m, x.stride(0), residual.stride(0) if residual is not None else 0, total.stride(0) if total is not None else 0,
        weight.stride(0), y.stride(0), eps,
        N=n, K=k, **flags, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST_DOT=INTERPRETED,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=stages,
    )
    return y, total
