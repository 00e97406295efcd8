"""Measure the event loop's lag while the model runs (the figure docs/serving.md reports).

    python examples/measure_loop_lag.py [--requests 32] [--max-tokens 64] [--model PATH] [--device cpu]

A monitor task asks to wake every 5 ms and records how late it runs, first idle, then while
``--requests`` concurrent requests stream ``--max-tokens`` tokens each. The executor thread runs
the model steps, so the loop should stay within a few milliseconds however long a step takes.
"""

from __future__ import annotations

import argparse
import platform

import torch
import trio

from mini_vllm.actors import ServiceConfig, measure_loop_lag_under_load, open_service
from mini_vllm.engine import EngineArgs


async def main(args: argparse.Namespace) -> None:
    engine_args = EngineArgs(model=args.model, device=args.device, num_kv_blocks=args.num_kv_blocks)
    async with open_service([engine_args], ServiceConfig(loop_lag_interval=0.005)) as service:
        # Warm-up: the first steps allocate and compile; not what we want to measure.
        async for _ in service.generate("warm up", max_tokens=8):
            pass
        r = await measure_loop_lag_under_load(service, requests=args.requests, max_tokens=args.max_tokens)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print(
        f"load: {r.requests} concurrent requests x {r.max_tokens} tokens = {r.generated_tokens} tokens "
        f"in {r.seconds:.2f} s, {r.steps} steps, {r.mean_step_ms:.1f} ms per step in the executor thread"
    )
    print("loop lag (ms)      samples   mean    p50    p99    max")
    for name, s in (("idle", r.idle), ("under load", r.loaded)):
        print(f"  {name:<14} {s.samples:>9} {s.mean_ms:>6.2f} {s.p50_ms:>6.2f} {s.p99_ms:>6.2f} {s.max_ms:>6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model directory or preset (default: the demo model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    trio.run(main, parser.parse_args())
