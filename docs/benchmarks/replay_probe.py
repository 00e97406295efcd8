"""The host's time inside ``CUDAGraph.replay()``, on the GPU with dummy weights:
``python3 docs/benchmarks/replay_probe.py MODEL OUT.json``.

`mini-vllm bench host --runner device --profile` on the H200 (2026-12-02) put 0.41 ms of a
qwen3-0.6b full-batch decode step's host time inside the one replay call a step. That is either
the host side of launching a graph of some 300 kernels, or a wait: the step loop launches step
N+1's graph while step N, very often the same graph, still runs. This times one replay (median of
30, the host's wall clock around the call) of the decode graphs at batch 1 and the largest batch:
with the GPU idle; behind a 5 ms sleep kernel (busy, but not with a graph); behind the same graph
still running; behind another graph still running. If "behind the same graph" stands out, two
executable copies of each graph, alternated, would take the wait out of the host's step.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from mini_vllm.engine import EngineArgs
from mini_vllm.engine.llm_engine import LLMEngine

SLEEP_CYCLES = 10_000_000  # about 5 ms at the H200's clock


def main() -> None:
    model_name, path = sys.argv[1], sys.argv[2]
    engine = LLMEngine.from_engine_args(EngineArgs(model=model_name, load_format="dummy", max_model_len=2048))
    runner = engine.runner
    stream = runner.compute_stream
    sizes = sorted(runner.graphs)
    top, other = sizes[-1], sizes[-2]
    report: dict[str, Any] = {"model": model_name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "replay_us": {}}

    def host_us(before: Callable[[], None], graph: torch.cuda.CUDAGraph, reps: int = 30) -> float:
        times = []
        with torch.cuda.stream(stream):
            for _ in range(reps):
                torch.cuda.synchronize()
                before()
                start = time.perf_counter()
                graph.replay()
                times.append((time.perf_counter() - start) * 1e6)
            torch.cuda.synchronize()
        return statistics.median(times)

    for bs in (1, top):
        graph, behind = runner.graphs[bs][0], runner.graphs[other if bs == top else top][0]
        cases: dict[str, Callable[[], None]] = {
            "GPU idle": lambda: None,
            "behind a sleep kernel": lambda: torch.cuda._sleep(SLEEP_CYCLES),
            "behind the same graph": graph.replay,
            "behind another graph": behind.replay,
        }
        row = {name: host_us(before, graph) for name, before in cases.items()}
        report["replay_us"][f"batch {bs}"] = row
        print(f"batch {bs:4d}: " + "  ".join(f"{name} {us:7.1f} µs" for name, us in row.items()), flush=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
