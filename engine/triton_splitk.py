"""A projection with a long K and a narrow output, split along K, for decode steps of 17-256 rows.

qwen3-0.6b's o_proj (2,048 -> 1,024) and down_proj (3,072 -> 1,024) at 256 rows took cuBLAS 6.6
and 7.8 µs on the H200 against 1.4 and 2.2 µs for their bytes and FLOPs
(docs/benchmarks/small-gemm-sweep-20261201.json): a 1,024-wide output gives about 128 tiles, one
per SM, and each walks the whole of K alone. Here ``SPLITS`` programs share each output tile,
one slice of K each, so there are ``SPLITS`` times as many of them, each with a short loop.

The slices meet without a second kernel and without floating-point atomics (whose order would
vary from run to run): each program writes its fp32 partial tile to a workspace and bumps the
tile's counter; the program that finds itself last sums the partials in slice order 0, 1, ...
(the same order whoever comes last, so the output is the same every run), stores the output and
zeroes the counter for the next launch, which a CUDA graph's replay needs.

``SplitKLinear`` owns the workspaces (one per output width and device, sized for ``max_rows``,
made on the first call: the runner's eager warm-up makes them before any graph is captured).
Accumulation is fp32; fp32 products are IEEE (not TF32), so fp32 stays an exactness path. The
kernel also runs under ``TRITON_INTERPRET=1`` on CPU tensors (one program after another, so the
last program is the last one run); tests/test_triton_splitk_aot.py compiles it for sm_90.
"""

from __future__ import annotations

import attrs
import torch
import triton
import triton.language as tl

from mini_vllm.engine.triton_attention import INTERPRETED, _mma
from mini_vllm.engine.triton_norm import dependent_launch, dependent_launch_entry

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)
MAX_ROWS = 256  # the decode batches that matter at load; larger steps are prefill chunks, compute-bound


@attrs.frozen
class SplitTiles:
    block_m: int
    block_n: int
    block_k: int
    splits: int
    num_warps: int = 4
    num_stages: int = 3


# Kernel arguments are left unannotated: Triton reads annotations as specialization hints. M, N
# and K stay runtime values so that one compiled kernel serves every projection of a tile shape.
@triton.jit(do_not_specialize=["M", "N", "K", "blocks_per_split"])
def _splitk_kernel(
    x,
    w,
    y,
    partial,
    counters,
    M,
    N,
    K,
    blocks_per_split,
    stride_x,
    stride_w,
    stride_y,
    SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dependent_launch_entry(USE_PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_rows = x + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w + cols.to(tl.int64)[:, None] * stride_w
    # Whole K blocks per slice, so every block starts at a multiple of BLOCK_K: the compiler can
    # then load 16 bytes at a time (a slice start it cannot prove aligned made every load scalar,
    # 3-8x slower than cuBLAS on the H200). With EVEN_K no K mask either.
    first_block = split * blocks_per_split
    n_blocks = tl.minimum(blocks_per_split, tl.cdiv(K, BLOCK_K) - first_block)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(n_blocks):
        k = (first_block + i) * BLOCK_K + ks
        if EVEN_K:
            a = tl.load(x_rows + k[None, :], mask=row_ok[:, None], other=0.0)
            b = tl.load(w_rows + k[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k_ok = k < K
            a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _mma(a, tl.trans(b), DOT_PRECISION, UPCAST_DOT)
    ok = row_ok[:, None] & col_ok[None, :]
    out = y + rows[:, None] * stride_y + cols[None, :]
    if SPLITS == 1:
        tl.store(out, acc.to(y.dtype.element_ty), mask=ok)
    else:
        tile = rows[:, None] * N + cols[None, :]  # this tile's place in a [M, N] partial
        tl.store(partial + split * M * N + tile, acc, mask=ok)
        # acq_rel at the GPU's scope: our partial is visible before the count says so, and the
        # last program sees every other program's partial after its own increment.
        arrived = tl.atomic_add(counters + pid_m * tl.num_programs(1) + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLITS):  # slice order, not arrival order: the same sum every run
                total += tl.load(partial + s * M * N + tile, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(y.dtype.element_ty), mask=ok)
            tl.atomic_xchg(counters + pid_m * tl.num_programs(1) + pid_n, 0, sem="relaxed", scope="gpu")


def split_tiles(m: int, n: int, k: int) -> SplitTiles:
    """The tiles and split for ``m`` rows of an ``[n, k]`` projection (from the H200 sweep,
    docs/benchmarks/splitk-sweep-*.json: 32 x 64 tiles, 64 long in K, were the best at every
    shape; the same for fp32, whose tiles also fit shared memory)."""
    block_m, block_k = 32, 64
    tiles_mn = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
    # About two programs per SM of the H200's 132 (the sweep's best at qwen3-0.6b's o and down),
    # each slice of K at least 256 long.
    splits = 1
    while splits < 8 and tiles_mn * (2 * splits) <= 2 * 132 and k // (2 * splits) >= 256:
        splits *= 2
    return SplitTiles(block_m, 64, block_k, splits)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"splitk_linear: x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"splitk_linear: x and weight of one dtype of {SUPPORTED_DTYPES}, got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("splitk_linear: x and weight need contiguous rows")


class SplitKLinear:
    """``x @ weight.T`` for at most ``max_rows`` rows, split along K; the workspaces it needs
    (fp32 partials and the tiles' counters) are its own and reused launch after launch."""

    def __init__(self, max_rows: int, *, pdl_rows: int = 0) -> None:
        if max_rows < 1:
            raise ValueError(f"SplitKLinear: max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        self.pdl_rows = pdl_rows  # steps of at most this many rows launch with programmatic dependent launch
        self._workspaces: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def workspace(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The partials ``[8, max_rows, n]`` fp32 and counters (zero between launches) for outputs ``n`` wide."""
        key = (n, device)
        if key not in self._workspaces:
            if torch.cuda.is_available() and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"SplitKLinear: no workspace for outputs {n} wide yet; run a step eagerly first")
            partial = torch.empty((8 * self.max_rows * n,), dtype=torch.float32, device=device)
            counters = torch.zeros((triton.cdiv(self.max_rows, 32) * triton.cdiv(n, 64),), dtype=torch.int32, device=device)
            self._workspaces[key] = (partial, counters)
        return self._workspaces[key]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, tiles: SplitTiles | None = None) -> torch.Tensor:
        _check(x, weight)
        m, k = x.shape
        n = weight.shape[0]
        if m > self.max_rows:
            raise ValueError(f"splitk_linear: at most {self.max_rows} rows, got {m}")
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if m == 0:
            return y
        t = tiles or split_tiles(m, n, k)
        if t.splits > 8 or t.block_m < 32 or t.block_n < 64:
            raise ValueError(f"splitk_linear: at most 8 splits of tiles at least 32 x 64, got {t}")
        partial, counters = self.workspace(n, x.device)
        blocks_per_split = triton.cdiv(triton.cdiv(k, t.block_k), t.splits)
        grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), t.splits)
        _splitk_kernel[grid](
            x, weight, y, partial, counters, m, n, k, blocks_per_split, x.stride(0), weight.stride(0), y.stride(0),
            SPLITS=t.splits, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST_DOT=INTERPRETED,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, EVEN_K=k % t.block_k == 0,
            num_warps=t.num_warps, num_stages=t.num_stages,
            **dependent_launch(m <= self.pdl_rows),
        )
        return y
