"""The qkv prologue (engine/triton_qkv.py) by tokens per program and warps, on both models' head
shapes over 1 to 8,190 tokens, each configuration checked bit for bit against the kernels it
replaces (``rms_norm_triton`` on q and k, ``rotary_triton``, ``store_kv_triton``), and timed
beside an older version of the kernel's file if one is given:

    python3 docs/benchmarks/prologue_tiles_sweep.py OUT.json [OLD_TRITON_QKV.py]

(on the H200: after ``source docs/benchmarks/device_env.sh``). Times are the GPU's alone
(``gpu_time_us``), µs a call; ``GBps`` is the bytes a call must move (the qkv rows read, q written
back, K and V written to the cache, cos/sin read) over its time. ``default`` names the tiles
``prologue_tiles`` picks. The script fails if any configuration's output differs.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.triton_attention import store_kv_triton
from mini_vllm.engine.triton_norm import rms_norm_triton, rotary_triton
from mini_vllm.engine.triton_qkv import prologue_tiles, qkv_prologue_triton

# The older A/B beside this file: its shapes (heads, kv heads, head_dim, q/k norm) and its loader
# (the device's environment keeps a script's folder off sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from prologue_order_ab import BLOCK_SIZE, SHAPES, load_old_prologue

TOKENS = (1, 16, 64, 128, 256, 512, 2048, 8190)
TILES = [(1, 2), (2, 2), (4, 2), (4, 4), (8, 2), (8, 4), (16, 4), (16, 8), (32, 4), (32, 8)]


def zero_caches(shape: tuple[int, ...], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.zeros(shape, device=dev, dtype=torch.bfloat16)
    return k, torch.zeros_like(k)


def main() -> None:
    out_path = sys.argv[1]
    old = load_old_prologue(sys.argv[2]) if len(sys.argv) > 2 else None
    dev = torch.device("cuda")
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "old_file": sys.argv[2] if old else None, "tiles": [list(t) for t in TILES], "shapes": {}}
    for name, (heads, kv_heads, head_dim, norm) in SHAPES.items():
        width = (heads + 2 * kv_heads) * head_dim
        blocks = max(TOKENS) // BLOCK_SIZE + 1
        cache_shape = (blocks, BLOCK_SIZE, kv_heads, head_dim)
        angles = torch.outer(torch.arange(4096, device=dev).float(), torch.rand(head_dim // 2, device=dev))
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        q_norm = torch.rand(head_dim, device=dev).to(torch.bfloat16) + 0.5
        k_norm = torch.rand(head_dim, device=dev).to(torch.bfloat16) + 0.5
        weights = {"q_norm": q_norm, "k_norm": k_norm, "eps": 1e-6} if norm else {}
        for t in TOKENS:
            qkv0 = torch.randn(t, width, device=dev, dtype=torch.bfloat16) * 4
            positions = torch.randint(0, 4096, (t,), device=dev)
            slots = torch.randperm(blocks * BLOCK_SIZE, device=dev)[:t]

            # The kernels the prologue replaces, as the model calls them.
            q, k, v = qkv0.clone().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q, k, v = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)
            if norm:
                q, k = rms_norm_triton(q, q_norm, 1e-6)[0], rms_norm_triton(k, k_norm, 1e-6)[0]
            q, k = rotary_triton(positions, q, k, cos, sin)
            want_k, want_v = zero_caches(cache_shape, dev)
            store_kv_triton(k, v, want_k, want_v, slots)
            moved = 2 * t * (width + heads * head_dim + 2 * kv_heads * head_dim) + 2 * 4 * t * head_dim // 2
            entry: dict[str, Any] = {"default": list(prologue_tiles(t)), "tiles": {}}
            for tiles in TILES:
                qkv = qkv0.clone()
                k_cache, v_cache = zero_caches(cache_shape, dev)
                got = qkv_prologue_triton(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads=heads,
                                          tiles=tiles, **weights)
                if not (torch.equal(got, q) and torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)):
                    raise SystemExit(f"{name} T={t} tiles {tiles}: the prologue differs from the separate kernels")
                call = partial(qkv_prologue_triton, qkv0.clone(), positions, cos, sin, k_cache, v_cache, slots,
                               num_heads=heads, tiles=tiles, **weights)
                us = gpu_time_us(call, 20)
                entry["tiles"][f"{tiles[0]}x{tiles[1]}"] = {"us": round(us, 2), "GBps": round(moved / us / 1e3)}
            if old is not None:
                k_cache, v_cache = zero_caches(cache_shape, dev)
                call = partial(old, qkv0.clone(), positions, cos, sin, k_cache, v_cache, slots, num_heads=heads,
                               **weights)
                entry["old_us"] = round(gpu_time_us(call, 20), 2)
            best = min(entry["tiles"], key=lambda c: entry["tiles"][c]["us"])
            default = entry["tiles"]["{}x{}".format(*entry["default"])]["us"]
            print(f"{name:11s} T={t:5d}  old {entry.get('old_us', '-')} us  default {entry['default']} {default} us  "
                  f"best {best} {entry['tiles'][best]['us']} us ({entry['tiles'][best]['GBps']} GB/s)", flush=True)
            result["shapes"][f"{name} T={t}"] = entry
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
