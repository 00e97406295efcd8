"""The projections after attention and in the MLP of a decode step with few rows, in Triton.

At one to a few sequences a decode step is a chain of weight reads. In the batch-1 profile a
llama3-8b layer had twelve kernels (391 a step; docs/gpu-execution.md): besides the four
matrix-vector products (cuBLAS), cuBLAS's split-K reduction after o_proj and after down_proj and
the SiLU-multiply between gate_up and down are launches of their own, each with a gap in the graph.
Here one kernel per projection reads the weights and leaves those out:

- No split-K: every program walks the whole of K for its own columns, so nothing is left to reduce.
- ``silu_intermediate`` (gate_up): each program reads matching gate and up columns and writes
  ``silu(gate) * up``, rounded as ``silu_mul_triton`` rounds it.

The norms in front of qkv and gate_up stay their own kernel (``rms_norm_triton``, 2 µs). Taken
into these kernels, as they once were, they cost three to five times the separate kernels on the
H200 (docs/benchmarks/skinny-variants-llama3-8b-20261201.json): every program redid the norm's
arithmetic over the whole of K on its 16-row A tile.

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
from mini_vllm.engine.triton_norm import dependent_launch, dependent_launch_entry, round_to

# One tl.dot tile of rows. Up to 16 rows the plain kernel read the weights as fast as cuBLAS
# (skinny-linear-sweep-20261201.json); at 32 rows and more a plain Triton GEMM lost to it
# (small-gemm-sweep-20261201.json).
MAX_ROWS = 16
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


# Kernel arguments are left unannotated: Triton reads annotations as specialization hints.
@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x,
    w,
    y,
    M,
    stride_x,
    stride_w,
    stride_y,
    N: tl.constexpr,  # output columns (for SiLU: the intermediate size; the weight has 2 N rows)
    K: tl.constexpr,
    SILU: tl.constexpr,
    IS_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dependent_launch_entry(USE_PDL)
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    w_rows = w + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ty = y.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        a = tl.load(x + rows[:, None] * stride_x + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wm = col_ok[:, None] & k_ok[None, :]
        b = tl.load(w_rows + k[None, :], mask=wm, other=0.0)
        acc += _mma(a, tl.trans(b), DOT_PRECISION, UPCAST_DOT)
        if SILU:
            bu = tl.load(w_rows + N * stride_w + k[None, :], mask=wm, other=0.0)
            acc_up += _mma(a, tl.trans(bu), DOT_PRECISION, UPCAST_DOT)
    if SILU:
        # As silu_mul_triton on the rounded projections: silu in fp32 rounded, the product rounded.
        g = round_to(acc, ty, IS_BF16)
        s = round_to(g / (1.0 + tl.exp(-g)), ty, IS_BF16)
        acc = s * round_to(acc_up, ty, IS_BF16)
    tl.store(y + rows[:, None] * stride_y + cols[None, :], acc.to(ty), mask=row_ok[:, None] & col_ok[None, :])


def skinny_tiles(n: int, k: int, *, silu: bool = False, element_size: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, stages) for ``n`` output columns over ``k`` inputs of ``element_size``
    bytes: narrow column tiles for narrow outputs (enough programs to cover the GPU), long K tiles
    for long rows (from the H200 sweeps of this kernel, docs/benchmarks/skinny-linear-sweep-20261201.json
    and skinny-ab-llama3-8b-20261201-d2105f8.json: 32 x 512 for llama3-8b's o and down). SiLU's
    programs stage two weight tiles: K tiles of 128, which compile for sm_90 without spills under
    triton 3.6 and 3.9 (256 spilled under 3.9). fp32 takes K tiles half as long (64 with SiLU, which
    spilled at 128, and at most 256 without: stages of 32 x 512 need 288 KB of shared memory, more
    than an SM has; tests/test_triton_skinny_aot.py)."""
    block_n = 16 if n <= 2048 else 32
    if silu:
        return block_n, 256 // element_size, 3
    block_k = 512 if n <= 4096 and k >= 4096 else (128 if k <= 1024 else 256)
    block_k = min(block_k, 1024 // element_size)
    return block_n, block_k, 4 if block_k == 512 else 3


def skinny_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    silu_intermediate: int | None = None,
    tiles: tuple[int, int, int] | None = None,
    num_warps: int = 4,
    pdl: bool = False,
) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` of at most ``MAX_ROWS`` rows ``[M, K]`` and ``weight`` ``[N, K]``;
    with ``silu_intermediate`` (``weight`` = [gate; up], ``2 * silu_intermediate`` rows) it is
    ``silu(gate) * up``, ``[M, silu_intermediate]``. ``tiles`` overrides ``skinny_tiles`` and
    ``num_warps`` the 4 warps a program (sweeps); ``pdl``: see ``triton_norm.dependent_launch``."""
    m, k = x.shape if x.dim() == 2 else (-1, -1)
    if m < 0 or weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"skinny_linear: x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear: at most {MAX_ROWS} rows, got {m}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"skinny_linear: x and weight of one dtype of {SUPPORTED_DTYPES}, got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny_linear: x and weight need contiguous rows")
    n = weight.shape[0]
    if silu_intermediate is not None:
        if n != 2 * silu_intermediate:
            raise ValueError(f"skinny_linear: SiLU needs a [2 * {silu_intermediate}, K] weight, got {n} rows")
        n = silu_intermediate
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    silu = silu_intermediate is not None
    block_n, block_k, stages = tiles or skinny_tiles(n, k, silu=silu, element_size=x.element_size())
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, m, x.stride(0), weight.stride(0), y.stride(0),
        N=n, K=k, SILU=silu, IS_BF16=x.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST_DOT=INTERPRETED,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=stages,
        **dependent_launch(pdl),
    )
    return y
