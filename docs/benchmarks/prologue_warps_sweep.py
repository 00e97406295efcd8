"""Does the qkv prologue (engine/triton_qkv.py) run faster with fewer warps per program? One
program per (token, head) is latency-bound at large steps (246 µs a layer for 8,190 qwen3-0.6b
tokens, about 0.6 TB/s), and an SM holds at most 64 warps and 32 programs: with the norm's 4 warps,
16 programs; with 1 or 2, 32. ``python3 docs/benchmarks/prologue_warps_sweep.py OUT.json`` times it
at both models' head shapes over 1 to 8,190 tokens with 1, 2 and 4 warps (GPU time alone, µs) and
reports bytes moved per µs. With the norm, the default (4) is the one bit-equal to
``rms_norm_triton``; another count would need rms_norm_triton's head-sized rows to change with it.
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch

from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.triton_qkv import qkv_prologue_triton

SHAPES = {"qwen3-0.6b": (16, 8, 128, True), "llama3-8b": (32, 8, 128, False)}  # heads, kv heads, head_dim, q/k norm
TOKENS = (1, 16, 256, 2048, 8190)
BLOCK_SIZE = 16


def main() -> None:
    dev = torch.device("cuda")
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, (heads, kv_heads, head_dim, norm) in SHAPES.items():
        width = (heads + 2 * kv_heads) * head_dim
        max_t = max(TOKENS)
        blocks = max_t // BLOCK_SIZE + 1
        k_cache = torch.zeros(blocks, BLOCK_SIZE, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        angles = torch.outer(torch.arange(4096, device=dev).float(), torch.rand(head_dim // 2, device=dev))
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        weights = {"q_norm": torch.ones(head_dim, device=dev, dtype=torch.bfloat16),
                   "k_norm": torch.ones(head_dim, device=dev, dtype=torch.bfloat16), "eps": 1e-6} if norm else {}
        for t in TOKENS:
            qkv = torch.randn(t, width, device=dev, dtype=torch.bfloat16)
            positions = torch.arange(t, device=dev) % 4096
            slots = torch.arange(t, device=dev)
            moved = t * (width + 2 * kv_heads * head_dim) * 2 + t * head_dim * 4 * 2  # rows, cache writes, tables
            entry = {}
            for warps in (1, 2, 4):
                call = partial(qkv_prologue_triton, qkv, positions, cos, sin, k_cache, v_cache, slots,
                               num_heads=heads, num_warps=warps, **weights)
                us = gpu_time_us(call, 20)
                entry[str(warps)] = {"us": us, "GBps": moved / us / 1e3}
            print(f"{name:11s} T={t:5d} " + "  ".join(f"{w} warps {e['us']:7.1f} us ({e['GBps']:6.0f} GB/s)"
                                                   for w, e in entry.items()), flush=True)
            result["shapes"][f"{name} T={t}"] = entry
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
