"""Would a Triton kernel for a few rows (decode at small batches) read the projections' weights
faster than cuBLAS? A tile sweep of such a kernel (kept here as it was measured: alone it did not
win; engine/triton_skinny.py grew from it, with the norm and SiLU fused in, and
docs/benchmarks/skinny_ab.py sweeps that one's tiles)
against F.linear at 1, 4 and 16 rows, on llama3-8b's and qwen3-0.6b's projection shapes (random
bf16 weights): ``python3 docs/benchmarks/skinny_linear_sweep.py OUT.json``. Times are the GPU's
alone (launches queued behind a wait), µs per call."""

from __future__ import annotations

import itertools
import json
import sys
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mini_vllm.engine.cuda_runner import gpu_time_us


@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(x, w, y, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Each program owns BLOCK_N output columns and walks the whole of K: every weight byte read once.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    col_ok, row_ok = cols < N, rows < M
    w_rows = w + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        a = tl.load(x + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b))
    tl.store(y + rows[:, None] * stride_ym + cols[None, :], acc.to(y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def skinny_linear_triton(x, w, *, block_n, block_k, num_warps, num_stages):
    m, (n, k) = x.shape[0], w.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, m, n, x.stride(0), w.stride(0), y.stride(0), K=k, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y


SHAPES = {  # name: (N, K)
    "llama3-8b qkv": (6144, 4096), "llama3-8b o": (4096, 4096), "llama3-8b gate_up": (28672, 4096),
    "llama3-8b down": (4096, 14336), "llama3-8b lm_head": (128256, 4096),
    "qwen3-0.6b qkv": (4096, 1024), "qwen3-0.6b o": (1024, 2048), "qwen3-0.6b gate_up": (6144, 1024),
    "qwen3-0.6b down": (1024, 3072), "qwen3-0.6b lm_head": (151936, 1024),
}
ROWS = (1, 4, 16)
# block_n, block_k, warps, stages
CONFIGS = [*itertools.product((16, 32), (128, 256, 512), (4,), (3, 5)), (16, 256, 8, 4), (32, 512, 8, 4)]


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    totals = dict.fromkeys(CONFIGS, 0.0)
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            entry = {"cublas_us": gpu_time_us(partial(F.linear, x, w)), "configs": {}}
            for cfg in CONFIGS:
                bn, bk, warps, stages = cfg
                call = partial(skinny_linear_triton, x, w, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
                out = call()
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-2:
                    raise SystemExit(f"{name} m={m} {cfg}: relative error {err}")
                t = gpu_time_us(call)
                entry["configs"]["/".join(map(str, cfg))] = t
                totals[cfg] += t
            best = min(entry["configs"], key=entry["configs"].get)
            gb = n * k * 2 / 1e9
            print(f"{name:20s} m={m:2d} cuBLAS {entry['cublas_us']:7.1f} us ({gb / entry['cublas_us'] * 1e3:.2f} TB/s)"
                  f"  best {best} {entry['configs'][best]:7.1f} us ({gb / entry['configs'][best] * 1e3:.2f} TB/s)", flush=True)
            result["shapes"][f"{name} m={m}"] = entry
    ranked = sorted(totals, key=totals.get)[:8]
    result["best_overall"] = ["/".join(map(str, c)) for c in ranked]
    for c in ranked:
        print("overall", c, round(totals[c], 1))
    for name in SHAPES:
        for cfg in ranked[:1]:
            key = "/".join(map(str, cfg))
            print(name, "with", key, [round(result["shapes"][f"{name} m={m}"]["configs"][key], 1) for m in ROWS],
                  "cuBLAS", [round(result["shapes"][f"{name} m={m}"]["cublas_us"], 1) for m in ROWS])
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
