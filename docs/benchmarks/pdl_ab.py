"""Programmatic dependent launch off and on (``--programmatic-dependent-launch``), on the GPU with
dummy weights: ``python3 docs/benchmarks/pdl_ab.py MODEL OUT.json`` (with this folder on
PYTHONPATH where ``python -P`` is in force, as docs/benchmarks/device_env.sh sets it).

With it, our Triton kernels in a step (the norms, the qkv prologue, the split decode and its merge,
SiLU-multiply, the skinny projections) may start while the kernel before them ends, which takes
the gap between two kernels out of the graph (engine/triton_norm.py, ``dependent_launch``).
"On" is what the engine does: dependent launch at steps of up to
``cuda_runner.DEPENDENT_LAUNCH_MAX_ROWS`` tokens (64; at 77aa36a it covered every step, and
``pdl-ab-*-20261202-77aa36a.json`` are those runs). Measured, off and on twice, interleaved:
1. each decode graph replayed alone at batch 1, 4, 16, 32, 64, 128 and 256, every row a 1,100-token context
   of its own blocks (µs of the GPU alone, launches queued behind a wait);
2. the offline loop's decode step for one 1,024-token request (wall, median, ms).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from one_stream_breakdown import ab_runs, graph_replays  # this folder's: run as a script, it is on sys.path

from mini_vllm.engine import EngineArgs
from mini_vllm.engine.llm_engine import LLMEngine

SIZES = (1, 4, 16, 32, 64, 128, 256)
CONTEXT = 1100


def main() -> None:
    model_name, path = sys.argv[1], sys.argv[2]
    report: dict[str, Any] = {"model": model_name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "context": CONTEXT, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def args(pdl: bool) -> EngineArgs:
        return EngineArgs(model=model_name, load_format="dummy", max_model_len=2048, max_num_seqs=max(SIZES),
                          num_kv_blocks=max(SIZES) * (CONTEXT // 16 + 1) + 64, programmatic_dependent_launch=pdl)

    def measure(engine: LLMEngine, pdl: bool) -> dict[str, Any]:
        if engine.runner.dependent_launch is not pdl:
            raise RuntimeError(f"asked for dependent launch {pdl}, the runner has {engine.runner.dependent_launch}")
        return {"dependent_launch_max_rows": engine.runner.dependent_launch_max_rows,
                "graph_us": graph_replays(engine, SIZES, CONTEXT, distinct_blocks=True, reps=20)}

    report["runs"] = ab_runs("programmatic_dependent_launch", args, measure)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
