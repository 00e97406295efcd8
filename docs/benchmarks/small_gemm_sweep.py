"""Decode's projections at 32-256 rows: cuBLAS (torch's default BLAS), cuBLASLt and a plain Triton
GEMM over a few tiles, on qwen3-0.6b's and llama3-8b's shapes (random bf16 weights):
``python3 docs/benchmarks/small_gemm_sweep.py OUT.json``. The question is whether the 5-7 µs each
of qwen3-0.6b's 112 matmuls a step take at any batch (docs/gpu-execution.md) is the shapes' cost or
the kernels'. Times are the GPU's alone (launches queued behind a wait), µs per call; the floor
column is max(bytes / copy rate, FLOPs / matmul rate) at the peaks this script measures.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mini_vllm.bench.env import measure_gpu_peaks
from mini_vllm.engine.cuda_runner import gpu_time_us


@triton.jit
def _gemm_kernel(x, w, y, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[M, N] = x[M, K] @ w[N, K]^T, one BLOCK_M x BLOCK_N tile of y per program, fp32 accumulation.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(x + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None], other=0.0)
        b = tl.load(w + cols.to(tl.int64)[:, None] * stride_wn + k[None, :], mask=col_ok[:, None], other=0.0)
        acc += tl.dot(a, tl.trans(b))
    tl.store(y + rows[:, None] * stride_ym + cols[None, :], acc.to(y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def triton_gemm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: tuple[int, int, int, int, int]) -> None:
    bm, bn, bk, warps, stages = cfg
    m, (n, k) = x.shape[0], w.shape
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _gemm_kernel[grid](x, w, y, m, n, x.stride(0), w.stride(0), y.stride(0), K=k, BLOCK_M=bm, BLOCK_N=bn,
                       BLOCK_K=bk, num_warps=warps, num_stages=stages)


SHAPES = {  # name: (N, K); every K here is a multiple of every BLOCK_K below
    "qwen3-0.6b qkv": (4096, 1024), "qwen3-0.6b o": (1024, 2048), "qwen3-0.6b gate_up": (6144, 1024),
    "qwen3-0.6b down": (1024, 3072), "llama3-8b qkv": (6144, 4096), "llama3-8b o": (4096, 4096),
    "llama3-8b gate_up": (28672, 4096), "llama3-8b down": (4096, 14336),
}
ROWS = (32, 64, 128, 256)
# BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
CONFIGS = [(32, 64, 128, 4, 4), (32, 128, 64, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4),
           (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (64, 32, 128, 4, 4), (32, 32, 256, 4, 3), (128, 32, 128, 4, 3)]


def blas_us(library: str, x: torch.Tensor, w: torch.Tensor) -> float:
    torch.backends.cuda.preferred_blas_library(library)
    try:
        return gpu_time_us(partial(F.linear, x, w))
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")


def main() -> None:
    dev = torch.device("cuda")
    copy_bw, flops = measure_gpu_peaks(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "copy_TBps": copy_bw / 1e12, "matmul_TFLOPs": flops / 1e12,
                              "configs": ["/".join(map(str, c)) for c in CONFIGS], "shapes": {}}
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
            y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            floor_us = 1e6 * max((m * k + n * k + m * n) * 2 / copy_bw, 2 * m * n * k / flops)
            entry: dict[str, Any] = {"floor_us": floor_us, "cublas_us": blas_us("cublas", x, w),
                                     "cublaslt_us": blas_us("cublaslt", x, w), "triton_us": {}}
            for cfg in CONFIGS:
                triton_gemm(x, w, y, cfg)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-2:
                    raise SystemExit(f"{name} m={m} {cfg}: relative error {err}")
                entry["triton_us"]["/".join(map(str, cfg))] = gpu_time_us(partial(triton_gemm, x, w, y, cfg))
            best = min(entry["triton_us"], key=entry["triton_us"].get)
            print(f"{name:20s} m={m:3d}  floor {floor_us:6.1f}  cuBLAS {entry['cublas_us']:6.1f}  "
                  f"cuBLASLt {entry['cublaslt_us']:6.1f}  Triton {entry['triton_us'][best]:6.1f} ({best})", flush=True)
            result["shapes"][f"{name} m={m}"] = entry
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
