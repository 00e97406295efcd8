"""An engine core that runs its device jobs inline (its own process) sends each step's tokens
before the next step holds its thread: one stream gets one token per message, not three.

Measured on the H200 before this held: llama3-8b, one stream over WebSocket, 857 frames for 2,560
tokens and TTFT 43 ms instead of 30 (the flusher needed three turns of the loop, one per step)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import trio

from mini_vllm.actors import ServiceConfig
from mini_vllm.actors.core import DELTA, CoreReady, CoreRequest, CoreStart, CoreStep, CoreStop, run_core
from mini_vllm.actors.link import memory_link_pair
from mini_vllm.engine import EngineArgs
from mini_vllm.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)
TOKENS = 24


async def test_each_landed_token_leaves_before_the_next_inline_step(demo_model_dir: Path) -> None:
    # core_process=True makes run_core run its jobs inline, as in its own process; here it shares
    # this test's loop, which is what a core process's loop holds besides the link.
    config = ServiceConfig(core_process=True, loop_lag_interval=None)
    args = EngineArgs(model=str(demo_model_dir), num_kv_blocks=64, device="cpu")
    ours, theirs = memory_link_pair()
    per_message: list[int] = []  # our request's new tokens in each CoreStep that carried any
    collector = (gc.get_freeze_count(), gc.get_threshold())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_core, theirs, CoreStart(args, config, 1, 1, "test"))
            while not isinstance(ready := await ours.receive(), CoreReady):
                pass
            params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
            await ours.send(CoreRequest(ready.model.name, "r", [1, 2, 3, 4], params, 0, None))
            finished = False
            while not finished:
                message = await ours.receive()
                if not isinstance(message, CoreStep):
                    continue
                tokens = 0
                for event in message.events:
                    if event[0] == DELTA and event[1] == "r":
                        _, _, _, done, samples = event
                        tokens += sum(len(s[1]) for s in samples)
                        finished = finished or done
                if tokens:
                    per_message.append(tokens)
            await ours.send(CoreStop("done"))
    assert sum(per_message) == TOKENS
    assert per_message == [1] * TOKENS, f"tokens per message: {per_message}"
    # Only a process of the core's own settles its collector (core_process.main): sharing this
    # process, the core left the collector as it found it (a frozen heap broke a later test here).
    assert (gc.get_freeze_count(), gc.get_threshold()) == collector
