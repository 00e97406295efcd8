"""The cancel race of issue 14, 1,024 times: each request is cancelled once it has 7 of its 8
tokens, so its abort crosses the step that computes the last one; every request must still end
exactly once (cancelled, or length where the end won the race), and every KV block come back.

Run: python docs/benchmarks/cancel_race.py process|inprocess (the engine core in a process of its
own, or in this one).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import trio

from mini_vllm.actors import ServiceConfig, open_service
from mini_vllm.engine import EngineArgs, SamplingParams
from mini_vllm.engine.demo_model import ensure_demo_model

ROUNDS, PER_ROUND, MAX_TOKENS = 16, 64, 8


async def main(core_process: bool) -> int:
    path = ensure_demo_model(Path(tempfile.mkdtemp()))
    args = EngineArgs(model=str(path), num_kv_blocks=512, device="cpu")
    config = ServiceConfig(core_process=core_process, loop_lag_interval=None)
    ends: dict[str, int] = {}
    reasons: dict[str, int] = {}
    async with open_service([args], config) as service:

        async def one(i: int) -> None:
            generation = service.generate(f"request {i}", params=SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            seen = 0
            async for delta in generation:
                seen += sum(len(s.token_ids) for s in delta.samples)
                if seen >= MAX_TOKENS - 1:
                    generation.cancel()
                if delta.finished:
                    ends[generation.request_id] = ends.get(generation.request_id, 0) + 1
                    reason = str(delta.samples[0].finish_reason if delta.samples else None)
                    reasons[reason] = reasons.get(reason, 0) + 1

        with trio.move_on_after(600):  # a lost request shows as one without an end, not as a hang
            for r in range(ROUNDS):
                async with trio.open_nursery() as nursery:
                    for i in range(PER_ROUND):
                        nursery.start_soon(one, r * PER_ROUND + i)
        await service.wait_idle()
        used = sum(m.blocks.used_blocks for m in service.statistics().blocks.models)
    sent = ROUNDS * PER_ROUND
    lost = sent - len(ends)
    print(f"core_process={core_process}: {sent} requests, {len(ends)} ended, {lost} without an end, "
          f"ends per request {sorted(set(ends.values()))}, reasons {reasons}, KV blocks in use after {used}")
    return 1 if lost or used or set(ends.values()) != {1} else 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("process", "inprocess"):
        sys.exit("usage: python docs/benchmarks/cancel_race.py process|inprocess")
    sys.exit(trio.run(main, sys.argv[1] == "process"))
