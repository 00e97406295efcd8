"""The qkv prologue with its loads issued first (engine/triton_qkv.py) against an older version of
the kernel's file, timed in the same process and checked bit for bit.

Run from the repository root on a GPU machine (on the H200: after
``source docs/benchmarks/device_env.sh``):

    python3 docs/benchmarks/prologue_order_ab.py OUT.json OLD_TRITON_QKV.py

Both models' head shapes (qwen3-0.6b with its q/k norm, llama3-8b without), 1 to 8,190 tokens,
the default warps; GPU time alone (``gpu_time_us``), old and new interleaved twice. Each shape's
outputs (q rotated in place, the K and V cache) must be equal bit for bit, or the script fails.
Against a file older than dbf3951 (the q/k norm summed pairwise since) qwen3-0.6b's shapes differ
in a rounding now and then and fail; ``prologue_tiles_sweep.py`` checks against the separate kernels.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import partial
from typing import Any

import torch

from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.triton_qkv import qkv_prologue_triton

SHAPES = {"qwen3-0.6b": (16, 8, 128, True), "llama3-8b": (32, 8, 128, False)}  # heads, kv heads, head_dim, q/k norm
TOKENS = (1, 16, 64, 256, 2048, 8190)
BLOCK_SIZE = 16


def load_old_prologue(path: str) -> Any:
    """``qkv_prologue_triton`` of another version of engine/triton_qkv.py, loaded from ``path``."""
    spec = importlib.util.spec_from_file_location("old_triton_qkv", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    return old.qkv_prologue_triton


def main() -> None:
    out_path, old_path = sys.argv[1], sys.argv[2]
    versions = {"old": load_old_prologue(old_path), "new": qkv_prologue_triton}
    dev = torch.device("cuda")
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "old_file": old_path, "shapes": {}}
    for name, (heads, kv_heads, head_dim, norm) in SHAPES.items():
        width = (heads + 2 * kv_heads) * head_dim
        blocks = max(TOKENS) // BLOCK_SIZE + 1
        angles = torch.outer(torch.arange(4096, device=dev).float(), torch.rand(head_dim // 2, device=dev))
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        weights = {"q_norm": torch.rand(head_dim, device=dev).to(torch.bfloat16) + 0.5,
                   "k_norm": torch.rand(head_dim, device=dev).to(torch.bfloat16) + 0.5, "eps": 1e-6} if norm else {}
        for t in TOKENS:
            qkv0 = torch.randn(t, width, device=dev, dtype=torch.bfloat16)
            positions = torch.randint(0, 4096, (t,), device=dev)
            slots = torch.randperm(blocks * BLOCK_SIZE, device=dev)[:t]
            outs = {}
            for label, fn in versions.items():
                qkv = qkv0.clone()
                k_cache = torch.zeros(blocks, BLOCK_SIZE, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
                v_cache = torch.zeros_like(k_cache)
                fn(qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads=heads, **weights)
                outs[label] = (qkv, k_cache, v_cache)
            equal = all(torch.equal(a, b) for a, b in zip(outs["old"], outs["new"], strict=True))
            if not equal:
                raise SystemExit(f"{name} T={t}: the new kernel's output differs from the old one's")
            k_cache = torch.zeros(blocks, BLOCK_SIZE, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
            v_cache = torch.zeros_like(k_cache)
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(2):
                for label, fn in versions.items():
                    qkv = qkv0.clone()
                    call = partial(fn, qkv, positions, cos, sin, k_cache, v_cache, slots, num_heads=heads, **weights)
                    times[label].append(round(gpu_time_us(call, 20), 2))
            entry = {"old_us": times["old"], "new_us": times["new"], "bit_equal": equal}
            print(f"{name:11s} T={t:5d}  old {times['old']} us  new {times['new']} us", flush=True)
            result["shapes"][f"{name} T={t}"] = entry
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
