"""The prefill attention kernel's tile shapes at OFFLINE-256's step shape, on a GPU.

Run from the repository root (on the H200: after ``source docs/benchmarks/device_env.sh``):

    python3 docs/benchmarks/prefill_tiles_sweep.py OUT.json

For each case (query heads, kv heads, new and cached tokens per sequence) it times every
(BLOCK_M, BLOCK_N, warps, stages) with ``triton.testing.do_bench`` (median, L2 flushed) and
prints the default next to the fastest; ``err`` is the largest difference from the default
tiles' output. It chose ``tile_sizes`` in ``engine/triton_attention.py`` (2026-12-01).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch
import triton
import triton.testing

from mini_vllm.engine import triton_attention as ta
from mini_vllm.engine.attention import AttentionMetadata

HEAD_DIM = 128
BLOCK_SIZE = 16
SCALE = 0.088


def make_case(heads: int, kv_heads: int, new: list[int], cached: list[int], device: torch.device,
              cache_blocks: int | None = None) -> dict[str, Any]:
    """A case's query, cache and metadata; its blocks at random places in a cache of
    ``cache_blocks`` (default: just the blocks it needs)."""
    seq_lens = [a + b for a, b in zip(new, cached, strict=True)]
    per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    blocks = sum(per_seq)
    pool = cache_blocks or blocks
    order = torch.randperm(pool, device=device)[:blocks].to(torch.int32)
    tables = torch.zeros(len(per_seq), max(per_seq), dtype=torch.int32, device=device)
    at = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[at : at + n]
        at += n
    k = torch.randn((pool, BLOCK_SIZE, kv_heads, HEAD_DIM), dtype=torch.bfloat16, device=device)
    qsl = np.cumsum([0, *new]).astype(np.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(new), dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables,
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
        query_start_loc_list=qsl.tolist(),
        seq_lens_list=seq_lens,
    )
    # Causal FLOPs of q.k and p.v: each new token sees the cached keys and the new ones up to itself.
    flops = sum(4 * n * (c + (n + 1) / 2) * HEAD_DIM * heads for n, c in zip(new, cached, strict=True))
    return {"q": torch.randn(sum(new), heads, HEAD_DIM, dtype=torch.bfloat16, device=device), "k": k,
            "v": torch.randn_like(k), "meta": meta, "qsl": qsl, "flops": flops, "group": heads // kv_heads,
            "kv_heads": kv_heads}


def time_variant(c: dict[str, Any], block_m: int, block_n: int, warps: int, stages: int,
                 out: torch.Tensor) -> float:
    q, k, v, meta = c["q"], c["k"], c["v"], c["meta"]
    # Built once, as the runner does per step: the timed call is the kernel alone.
    sched = ta.build_prefill_schedule(c["qsl"], block_m // c["group"], q.device)

    def launch() -> None:
        ta.prefill_attention_triton(q, k, v, meta, SCALE, out, schedule=sched, block_n=block_n, num_warps=warps,
                                    num_stages=stages)

    launch()
    return float(triton.testing.do_bench(launch, warmup=5, rep=30, return_mode="median"))


def sweep(name: str, c: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    reference = ta.prefill_attention_triton(c["q"], c["k"], c["v"], c["meta"], SCALE)
    out = torch.empty_like(c["q"])
    for block_m in (64, 128):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3, 4):
                    row: dict[str, Any] = {"case": name, "bm": block_m, "bn": block_n, "w": warps, "st": stages}
                    try:
                        ms = time_variant(c, block_m, block_n, warps, stages, out)
                    except Exception as exc:  # a variant that does not compile (shared memory) is reported
                        rows.append({**row, "error": str(exc)[:120]})
                        continue
                    err = (out.float() - reference.float()).abs().max().item()
                    rows.append({**row, "ms": round(ms, 4), "tflops": round(c["flops"] / ms / 1e9, 1), "err": err})
    done = sorted((r for r in rows if r["case"] == name and "ms" in r), key=lambda r: r["ms"])
    print(name, "fastest:", done[:4], flush=True)


def main() -> None:
    device = torch.device("cuda")
    rows: list[dict[str, Any]] = []
    sweep("qwen3-14x585", make_case(16, 8, [585] * 14, [0] * 14, device), rows)
    sweep("llama-14x585", make_case(32, 8, [585] * 14, [0] * 14, device), rows)
    sweep("qwen3-chunk4x2048@1024", make_case(16, 8, [2048] * 4, [1024] * 4, device), rows)
    with open(sys.argv[1], "w") as f:
        json.dump({"prefill": rows}, f, indent=0)


if __name__ == "__main__":
    main()
