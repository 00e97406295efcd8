"""The few-row projections (engine/triton_skinny.py) against the separate kernels, on the GPU
with dummy weights: ``python3 docs/benchmarks/skinny_ab.py MODEL OUT.json`` (with this folder on
PYTHONPATH where ``python -P`` is in force, as docs/benchmarks/device_env.sh sets it).

Three measurements, each with the skinny path off and on:
1. o, gate_up and down of one layer at 1, 4 and 16 rows: cuBLAS (with the fused SiLU-multiply
   after gate_up) against one skinny call, and a few of its tiles;
2. the decode graph replayed alone at batch 1, 2, 4, 8 and 16 at a 1,100-token context;
3. the offline loop's decode step for one 1,024-token request (wall, median).
Device times are the GPU's alone (launches queued behind a wait), µs.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from one_stream_breakdown import ab_runs, graph_replays  # this folder's: run as a script, it is on sys.path

from mini_vllm.engine import EngineArgs
from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.triton_norm import silu_mul_triton
from mini_vllm.engine.triton_skinny import skinny_linear_triton, skinny_tiles

# (BLOCK_N, BLOCK_K, stages); SiLU's two tiles of 512 would not fit an SM's shared memory
TILES = [(16, 128, 3), (16, 256, 3), (32, 128, 3), (32, 256, 3), (32, 256, 4), (32, 512, 4), (64, 256, 3)]


def linear_silu(x: torch.Tensor, w: torch.Tensor, inter: int) -> torch.Tensor:
    return silu_mul_triton(F.linear(x, w), inter)


def projections(engine: LLMEngine, rows: tuple[int, ...]) -> dict[str, Any]:
    model = engine.runner.model
    layer = model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    dev, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    stream = engine.runner.compute_stream
    hidden, inter = model.config.hidden_size, mlp.intermediate
    out: dict[str, Any] = {}
    for m in rows:
        x = torch.randn(m, hidden, device=dev, dtype=dtype)
        o_in = torch.randn(m, attn.q_size, device=dev, dtype=dtype)
        act = torch.randn(m, inter, device=dev, dtype=dtype)
        wo, wgu, wd = attn.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight
        separate = {
            "o": partial(F.linear, o_in, wo),
            "gate_up+silu": partial(linear_silu, x, wgu, inter),
            "down": partial(F.linear, act, wd),
        }
        skinny = {
            "o": (partial(skinny_linear_triton, o_in, wo), wo.shape[0], attn.q_size),
            "gate_up+silu": (partial(skinny_linear_triton, x, wgu, silu_intermediate=inter), inter, hidden),
            "down": (partial(skinny_linear_triton, act, wd), wd.shape[0], inter),
        }
        for name, call in separate.items():
            fn, n, k = skinny[name]
            silu = name.endswith("silu")
            entry = {"separate_us": gpu_time_us(call, 50, stream), "skinny_us": gpu_time_us(fn, 50, stream),
                     "default_tiles": list(skinny_tiles(n, k, silu=silu)), "tiles_us": {}}
            for t in TILES if not silu else [t for t in TILES if t[1] < 512]:
                entry["tiles_us"]["/".join(map(str, t))] = gpu_time_us(partial(fn, tiles=t), 20, stream)
            best = min(entry["tiles_us"], key=entry["tiles_us"].get)
            print(f"m={m:2d} {name:14s} separate {entry['separate_us']:7.1f}  skinny {entry['skinny_us']:7.1f}"
                  f"  (best tiles {best}: {entry['tiles_us'][best]:.1f})", flush=True)
            out[f"{name} m={m}"] = entry
    return out


def main() -> None:
    model_name, path = sys.argv[1], sys.argv[2]
    report: dict[str, Any] = {"model": model_name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args = partial(EngineArgs, model=model_name, load_format="dummy", max_model_len=2048, max_num_seqs=16)

    def measure(engine: LLMEngine, skinny: bool) -> dict[str, Any]:
        if skinny and "projections" not in report:
            report["projections"] = projections(engine, (1, 4, 16))
        return {"graph_us": graph_replays(engine, (1, 2, 4, 8, 16), 1100, distinct_blocks=False, reps=30)}

    report["runs"] = ab_runs("skinny", lambda on: args(skinny_kernels=on), measure)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
