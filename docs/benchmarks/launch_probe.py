"""Where the host's time goes inside ``CudaModelRunner.launch`` at a full decode batch, on the GPU:
``python3 docs/benchmarks/launch_probe.py MODEL OUT.json [BATCH]``.

`mini-vllm bench host --runner device` on the H200 (2026-12-02) put 0.90 ms of a qwen3-0.6b
full-batch decode step's host time in the launch, while ``replay_probe.py`` found a replay alone
costs the host 6-40 µs. This runs the engine to a steady decode of BATCH sequences (560-token
prompts) and, for 60 steps, times the launch as a whole and the parts it calls: the block-table
sync, the wait for the pinned buffers (``Event.synchronize`` inside the launch), the graph
replay, the greedy argmax; the rest is the numpy fills and the small torch calls between them.
Then a torch profiler trace of 10 more steps lists the CPU-side operations inside the launch.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from mini_vllm.engine import EngineArgs
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams


def main() -> None:
    model, out_path = sys.argv[1], sys.argv[2]
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    engine = LLMEngine.from_engine_args(EngineArgs(model=model, load_format="dummy", max_model_len=2048))
    runner: Any = engine.runner
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(560)]
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    for _ in range(40):  # every prompt prefilled (8,192 tokens a step), the batch decoding
        engine.step()

    spent: dict[str, list[float]] = defaultdict(list)
    inside = [False]
    current: dict[str, float] = defaultdict(float)

    def timed(name: str, fn: Callable[..., Any], only_inside: bool = True) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if only_inside and not inside[0]:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                current[name] += time.perf_counter() - t
        return wrapper

    launch = runner.launch

    def timed_launch(inputs: Any) -> Any:
        current.clear()
        inside[0] = True
        t = time.perf_counter()
        try:
            return launch(inputs)
        finally:
            total = time.perf_counter() - t
            inside[0] = False
            if inputs.is_decode_only and len(inputs.query_lens) == batch:
                spent["launch"].append(total)
                for k in ("table sync", "event synchronize", "graph replay", "greedy argmax"):
                    spent[k].append(current[k])
                spent["rest"].append(total - sum(current.values()))

    runner.launch = timed_launch
    runner._table_rows.sync = timed("table sync", runner._table_rows.sync)
    runner.greedy_argmax = timed("greedy argmax", runner.greedy_argmax)
    replay, sync = torch.cuda.CUDAGraph.replay, torch.cuda.Event.synchronize
    torch.cuda.CUDAGraph.replay = timed("graph replay", replay)  # type: ignore[method-assign]
    torch.cuda.Event.synchronize = timed("event synchronize", sync)  # type: ignore[method-assign]
    for _ in range(60):
        engine.step()
    report: dict[str, Any] = {
        "model": model, "batch": batch, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "steps": len(spent["launch"]),
        "us_p50": {k: round(statistics.median(v) * 1e6, 1) for k, v in spent.items()},
        "us_mean": {k: round(statistics.fmean(v) * 1e6, 1) for k, v in spent.items()},
        "us_max": {k: round(max(v) * 1e6, 1) for k, v in spent.items()},
    }
    torch.cuda.CUDAGraph.replay, torch.cuda.Event.synchronize = replay, sync  # type: ignore[method-assign]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:30]
    report["profiler_top_self_cpu"] = [
        {"name": e.key, "calls_per_step": e.count / 10, "self_us_per_step": round(e.self_cpu_time_total / 10, 1)}
        for e in rows
    ]
    for k in report["us_p50"]:
        print(f"{k:18s} p50 {report['us_p50'][k]:8.1f} us  mean {report['us_mean'][k]:8.1f}  max {report['us_max'][k]:8.1f}")
    for r in report["profiler_top_self_cpu"]:
        print(f"  {r['self_us_per_step']:8.1f} us/step {r['calls_per_step']:6.1f} calls  {r['name'][:80]}")
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
