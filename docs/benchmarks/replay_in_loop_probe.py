"""The host's time inside ``CUDAGraph.replay()`` in the engine's own step loop, on the GPU:
``python3 docs/benchmarks/replay_in_loop_probe.py MODEL OUT.json``.

``replay_probe.py`` timed one replay of a decode graph at 10-25 µs, alone or behind the same graph
(2026-12-04), while ``bench host --runner device --profile`` put 0.43 ms a full-batch step inside
the one replay call of the step. This wraps ``CUDAGraph.replay`` and times every call as the
engine makes it (no profiler), for 256 requests of 560 prompt and 128 output tokens, and lists
the process's threads: a thread that takes the GIL while the replay has let it go would make the
call look long.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import threading
import time
from typing import Any

import torch

from mini_vllm.engine import EngineArgs
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams


def main() -> None:
    model_name, path = sys.argv[1], sys.argv[2]
    engine = LLMEngine.from_engine_args(EngineArgs(model=model_name, load_format="dummy", max_model_len=2048))
    times: list[tuple[int, float]] = []  # (graph id, µs)
    original = torch.cuda.CUDAGraph.replay

    def timed(graph: torch.cuda.CUDAGraph) -> None:
        start = time.perf_counter()
        original(graph)
        times.append((id(graph), (time.perf_counter() - start) * 1e6))

    torch.cuda.CUDAGraph.replay = timed  # type: ignore[method-assign]
    sizes = {id(g): bs for bs, (g, _) in engine.runner.graphs.items()}
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for i in range(256):
        engine.add_request(f"r{i}", [rng.randrange(vocab) for _ in range(560)], params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    by_size: dict[str, list[float]] = {}
    for graph, us in times:
        by_size.setdefault(f"decode {sizes[graph]}" if graph in sizes else "mixed", []).append(us)
    report: dict[str, Any] = {
        "model": model_name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": steps,
        "threads": [t.name for t in threading.enumerate()], "switch_interval_s": sys.getswitchinterval(),
        "replay_us": {k: {"calls": len(v), "p50": statistics.median(v), "p90": sorted(v)[int(0.9 * (len(v) - 1))],
                          "max": max(v)} for k, v in sorted(by_size.items())},
    }
    print(json.dumps(report, indent=1))
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
