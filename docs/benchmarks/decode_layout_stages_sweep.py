"""The decode kernel's K/V layout and pipeline stages, on a GPU.

Run from the repository root (on the H200: after ``source docs/benchmarks/device_env.sh``):

    python3 docs/benchmarks/decode_layout_stages_sweep.py OUT.json

The cache is the engine's ``[blocks, slot, kv head, dim]`` ("slot-major") or the same view of a
``[blocks, kv head, slot, dim]`` allocation ("head-major": each block's rows of one head
contiguous), which the kernel reads through its strides. For each batch x context x heads it times
one-partition decode over keys per tile, warps and ``num_stages`` (``triton.testing.do_bench``,
median, L2 flushed); ``err`` is the largest difference from ``decode_attention_triton``'s default.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import triton.testing

from mini_vllm.engine import triton_attention as ta

BLOCK_SIZE = 16
HEAD_DIM = 128
SCALE = 0.088


def sweep(batch: int, context: int, heads: int, kv_heads: int, head_major: bool, rows: list[dict[str, Any]]) -> None:
    dev = torch.device("cuda")
    per_seq = -(-context // BLOCK_SIZE)
    blocks = batch * per_seq
    if head_major:
        k = torch.randn((blocks, kv_heads, BLOCK_SIZE, HEAD_DIM), dtype=torch.bfloat16, device=dev).transpose(1, 2)
        v = torch.randn((blocks, kv_heads, BLOCK_SIZE, HEAD_DIM), dtype=torch.bfloat16, device=dev).transpose(1, 2)
    else:
        k = torch.randn((blocks, BLOCK_SIZE, kv_heads, HEAD_DIM), dtype=torch.bfloat16, device=dev)
        v = torch.randn((blocks, BLOCK_SIZE, kv_heads, HEAD_DIM), dtype=torch.bfloat16, device=dev)
    tables = torch.randperm(blocks, device=dev).to(torch.int32).view(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q = torch.randn(batch, heads, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(q)
    kv_bytes = 2 * batch * context * kv_heads * HEAD_DIM * 2
    reference = ta.decode_attention_triton(q, k, v, lens, tables, SCALE, 1, block_n=64, num_warps=4)
    for block_n in (32, 64, 128):
        for warps in (4, 8):
            for stages in (1, 2, 3, 4):
                def launch(bn: int = block_n, w: int = warps, st: int = stages) -> None:
                    ta.decode_attention_triton(q, k, v, lens, tables, SCALE, 1, out, block_n=bn, num_warps=w,
                                               num_stages=st)

                row: dict[str, Any] = {"bs": batch, "ctx": context, "H": heads, "KV": kv_heads, "hm": head_major,
                                       "bn": block_n, "w": warps, "st": stages}
                try:
                    launch()
                    torch.cuda.synchronize()
                    err = (out.float() - reference.float()).abs().max().item()
                    ms = float(triton.testing.do_bench(launch, warmup=10, rep=50, return_mode="median"))
                except Exception as exc:  # a variant that does not compile is reported
                    rows.append({**row, "error": str(exc)[:100]})
                    continue
                rows.append({**row, "ms": round(ms, 4), "tbs": round(kv_bytes / ms / 1e9, 3), "err": err})
    done = sorted((r for r in rows if "ms" in r and r["bs"] == batch and r["ctx"] == context and r["H"] == heads
                   and r["hm"] == head_major), key=lambda r: r["ms"])
    print(batch, context, heads, kv_heads, "head-major" if head_major else "slot-major", "fastest:", done[:3],
          flush=True)


def main() -> None:
    rows: list[dict[str, Any]] = []
    for batch, context, heads, kv_heads in ((256, 600, 16, 8), (256, 900, 32, 8), (64, 900, 16, 8), (16, 700, 16, 8)):
        for head_major in (False, True):
            sweep(batch, context, heads, kv_heads, head_major, rows)
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
