"""The prefill attention kernel's tiles in sequence order against longest first.

Run from the repository root on a GPU machine (on the H200: after
``source docs/benchmarks/device_env.sh``):

    python3 docs/benchmarks/prefill_variants_probe.py OUT.json

For each case (query heads, kv heads, new and cached tokens per sequence) and each cache layout
(``compact``: the case's blocks only, shuffled; ``engine``: the same blocks drawn at random from a
cache of 70,000 blocks, as the engine's 128 GB cache holds them) it times
``prefill_attention_triton`` with ``triton.testing.do_bench`` (median, L2 flushed) for: tiles in
sequence order (``base``, the engine before 2026-12-03), longest first (the engine since), and
longest first with 64 keys a step. ``bits_equal`` says whether a variant's output equals
``base``'s bit for bit (it must for the order alone).

The run of 2026-12-03 (docs/benchmarks/prefill-variants-20261203-a09119a.json) also timed a walk
that left the causal mask out of the key steps every row sees (``git show
a09119a:docs/benchmarks/prefill_variants_probe.py``): not bit-equal on the H200, 9 % faster on
qwen3-0.6b's heads and 50 % slower on llama3-8b's, so it was not kept.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
import triton
import triton.testing

from mini_vllm.engine import triton_attention as ta

# This folder's sweep builds the cases (the device's environment keeps a script's folder off sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill_tiles_sweep import HEAD_DIM, SCALE, make_case

ENGINE_BLOCKS = 70_000


def offline_step(rng: random.Random) -> tuple[list[int], list[int]]:
    """A prefill-carrying step of OFFLINE-256's shape: 8,192 tokens, prompts of 100-1,024 tokens,
    the first a chunk after 512 cached, and 64 decodes of 200-1,500 tokens of context."""
    new, cached = [], []
    for _ in range(64):
        new.append(1)
        cached.append(rng.randint(200, 1500))
    left = 8192 - 64
    first = True
    while left > 0:
        n = min(rng.randint(100, 1024), left)
        new.append(n)
        cached.append(512 if first else 0)
        first = False
        left -= n
    return new, cached


def main() -> None:
    out_path = sys.argv[1]
    device = torch.device("cuda")
    torch.manual_seed(0)
    rng = random.Random(0)
    offline_new, offline_cached = offline_step(rng)
    cases = {
        "qwen3-14x585": (16, 8, [585] * 14, [0] * 14),
        "llama3-14x585": (32, 8, [585] * 14, [0] * 14),
        "qwen3-chunk4x2048@1024": (16, 8, [2048] * 4, [1024] * 4),
        "qwen3-offline-step": (16, 8, offline_new, offline_cached),
        "llama3-offline-step": (32, 8, offline_new, offline_cached),
    }
    variants = {
        "base": {"ordered": False, "block_n": 32},
        "longest_first": {"ordered": True, "block_n": 32},
        "longest_first_n64": {"ordered": True, "block_n": 64},
    }
    rows: list[dict[str, Any]] = []
    for name, (heads, kv_heads, new, cached) in cases.items():
        for layout in ("compact", "engine"):
            c = make_case(heads, kv_heads, new, cached, device, None if layout == "compact" else ENGINE_BLOCKS)
            tokens = ta.prefill_tokens_per_tile(heads, kv_heads, ta.tile_sizes(HEAD_DIM, torch.bfloat16)[0])
            base_out = None
            for vname, v in variants.items():
                lens = c["meta"].seq_lens_list if v["ordered"] else None
                schedule = ta.build_prefill_schedule(c["qsl"], tokens, device, lens)
                out = torch.empty_like(c["q"])

                def run(c: dict[str, Any] = c, v: dict[str, Any] = v, schedule: ta.PrefillSchedule = schedule,
                        out: torch.Tensor = out) -> None:
                    ta.prefill_attention_triton(c["q"], c["k"], c["v"], c["meta"], SCALE, out, schedule=schedule,
                                                block_n=v["block_n"])

                run()
                torch.cuda.synchronize()
                if base_out is None:
                    base_out = out.clone()
                ms = triton.testing.do_bench(run, warmup=25, rep=200)
                row = {"case": name, "layout": layout, "variant": vname, "us": round(ms * 1000, 2),
                       "tflops": round(c["flops"] / (ms * 1e-3) / 1e12, 1),
                       "bits_equal": bool(torch.equal(out.view(torch.int16), base_out.view(torch.int16))),
                       "max_diff": float((out.float() - base_out.float()).abs().max())}
                rows.append(row)
                print(f"{name:26s} {layout:8s} {vname:14s} {row['us']:9.2f} us {row['tflops']:6.1f} TFLOP/s "
                      f"bits_equal={row['bits_equal']} max_diff={row['max_diff']:.2e}", flush=True)
            del c
            torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                   "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
