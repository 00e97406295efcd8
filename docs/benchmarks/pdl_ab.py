"""Programmatic dependent launch off and on (``--programmatic-dependent-launch``), on the GPU with
dummy weights: ``python3 docs/benchmarks/pdl_ab.py MODEL OUT.json`` (with this folder on
PYTHONPATH where ``python -P`` is in force, as docs/benchmarks/device_env.sh sets it).

With it, our Triton kernels in a step (the norms, the qkv prologue, the split decode and its merge,
SiLU-multiply, the skinny projections) may start while the kernel before them ends, which takes
the gap between two kernels out of the graph (engine/triton_norm.py, ``dependent_launch``).
Measured, off and on twice, interleaved:
1. each decode graph replayed alone at batch 1, 4, 16, 64 and 256, every row a 1,100-token context
   of its own blocks (µs of the GPU alone, launches queued behind a wait);
2. the offline loop's decode step for one 1,024-token request (wall, median, ms).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

import torch
from one_stream_breakdown import decode_step_ms  # this folder's: run as a script, it is on sys.path

from mini_vllm.engine import EngineArgs
from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.llm_engine import LLMEngine

SIZES = (1, 4, 16, 64, 256)
CONTEXT = 1100


def graph_replays(engine: LLMEngine) -> dict[str, float]:
    runner = engine.runner
    blocks = CONTEXT // runner.block_size + 1
    out = {}
    with torch.inference_mode():
        for bs in SIZES:
            graph, _ = runner.graphs[bs]
            runner._g_lens[:bs] = CONTEXT
            # Distinct blocks a row, as distinct sequences have: the same blocks for every row would
            # be read from the L2 cache at large batches.
            runner._g_tables[:bs, :blocks] = torch.arange(bs * blocks, device=runner._g_tables.device).view(bs, blocks)
            runner._g_slots[:bs] = -1  # reads, writes nothing
            out[str(bs)] = gpu_time_us(graph.replay, 20, runner.compute_stream)
        runner._g_slots.fill_(-1)
        runner._g_lens.zero_()
    return out


def main() -> None:
    model_name, path = sys.argv[1], sys.argv[2]
    report: dict[str, Any] = {"model": model_name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "context": CONTEXT, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for pdl in (False, True, False, True):
        engine = LLMEngine.from_engine_args(EngineArgs(
            model=model_name, load_format="dummy", max_model_len=2048, max_num_seqs=max(SIZES),
            num_kv_blocks=max(SIZES) * (CONTEXT // 16 + 1) + 64, programmatic_dependent_launch=pdl,
        ))
        run: dict[str, Any] = {"programmatic_dependent_launch": engine.runner.dependent_launch}
        decode_step_ms(engine, 16)  # warm-up
        run["engine_step_ms"], run["engine_wait_ms"] = decode_step_ms(engine, 256)
        run["graph_us"] = graph_replays(engine)
        print(f"dependent launch {pdl}: one-stream step {run['engine_step_ms']:.3f} ms; graph replay (µs) "
              + "  ".join(f"bs{b} {t:.0f}" for b, t in run["graph_us"].items()), flush=True)
        report.setdefault("runs", []).append(run)
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
