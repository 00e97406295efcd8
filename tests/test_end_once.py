"""Every request ends exactly once, whatever races: a cancel against the request's last step, in
the stream itself and through the service with the engine core in-process and in a process."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from conftest_serving import SMALL_KV_BLOCKS, wait_blocks_released

from mini_vllm.actors import ServiceConfig, open_service
from mini_vllm.actors.request_stream import RequestStream
from mini_vllm.engine import EngineArgs, SamplingParams

pytestmark = pytest.mark.timeout(180)


async def test_a_cancel_that_raced_the_last_step_still_ends_the_stream() -> None:
    cancels: list[RequestStream] = []
    stream = RequestStream("r", "demo", 2, cancels.append)
    stream.push_parts(3, False, [(0, (5, 6), "", None, None), (1, (7,), "", None, None)])
    stream.cancel()  # the abort is on its way; the core finishes the request before it arrives
    stream.push_parts(3, True, [(0, (8,), "", None, "length"), (1, (9, 10), "", None, "length")])
    with trio.fail_after(5):
        first = await stream.receive()
        assert first is not None and first.finished and stream.done
        assert [s.finish_reason for s in first.samples] == ["cancelled", "cancelled"]
        assert [s.token_ids for s in first.samples] == [(5, 6), (7,)]  # nothing after the cancel
        assert await stream.receive() is None
    assert cancels == [stream]


@pytest.mark.parametrize("core_process", [False, True], ids=["core-in-process", "core-process"])
async def test_cancel_against_the_last_token_many_times(demo_model_dir: Path, core_process: bool) -> None:
    """Each request is cancelled as soon as it has all but its last token, so its abort crosses
    the step that computes that token: every one must end (cancelled, or length if the end won)."""
    rounds, per_round, max_tokens = 4, 64, 8
    args = EngineArgs(model=str(demo_model_dir), num_kv_blocks=SMALL_KV_BLOCKS, device="cpu")
    config = ServiceConfig(core_process=core_process, loop_lag_interval=None, max_pending_per_model=per_round)
    ends: dict[str, int] = {}
    reasons: dict[str, int] = {}

    async def one(i: int) -> None:
        generation = service.generate(f"request {i}", params=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        seen = 0
        async for delta in generation:
            seen += sum(len(s.token_ids) for s in delta.samples)
            if seen >= max_tokens - 1:
                generation.cancel()
            if delta.finished:
                ends[generation.request_id] = ends.get(generation.request_id, 0) + 1
                reason = delta.samples[0].finish_reason if delta.samples else None
                reasons[str(reason)] = reasons.get(str(reason), 0) + 1

    async with open_service([args], config) as service:
        with trio.fail_after(150):
            for r in range(rounds):
                async with trio.open_nursery() as nursery:
                    for i in range(per_round):
                        nursery.start_soon(one, r * per_round + i)
            await wait_blocks_released(service)
        assert service.statistics().schedulers[0].pending == 0  # every admission slot came back
    assert len(ends) == rounds * per_round and set(ends.values()) == {1}
    assert set(reasons) <= {"cancelled", "length"}, reasons


async def test_a_shutdown_behind_a_wedged_step_ends_within_its_deadline(demo_model_dir: Path) -> None:
    """A step that never returns (the in-process core's executor thread is stuck in it) must not
    hold the shutdown: after stop_timeout the step is abandoned and every request still ends."""
    from conftest_serving import GatedEngine, build_engine, wait_thread_event

    gated = GatedEngine(build_engine(demo_model_dir))
    config = ServiceConfig(stop_timeout=0.5, loop_lag_interval=None)
    ended: list[object] = []
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                async with open_service([gated], config) as service:  # type: ignore[list-item]

                    async def one() -> None:
                        async for delta in service.generate("wedged", params=SamplingParams(max_tokens=4)):
                            if delta.finished:
                                ended.append(delta.error)

                    nursery.start_soon(one)
                    await wait_thread_event(gated.entered)  # the step is stuck in the thread
                    started = trio.current_time()
                # Leaving the block stops the service: within its deadlines, not when the step returns.
                assert trio.current_time() - started < 5
    finally:
        gated.release.set()  # let the abandoned thread finish
    assert len(ended) == 1 and ended[0] is not None
