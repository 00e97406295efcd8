"""A reader too slow for too long is dropped with a clear close reason; nothing else waits for it.

Deterministic: a fake socket that stops taking frames, a fake service that produces output
forever, and trio's autojump clock (no threads, no real sleeps).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import CloseReason, ConnectionClosed

from mini_vllm.actors.request_stream import GenerationDelta, SampleOutput, Usage
from mini_vllm.transport.server import Connection, ServerLimits, _Counters

pytestmark = pytest.mark.timeout(30)


class FakeSocket:
    """Takes ``accept`` frames, then blocks in ``send_message`` until ``unblock_at`` (or forever)."""

    def __init__(self, frames_in: list[str], accept: int, unblock_at: float | None) -> None:
        self._in_send, self._in_recv = trio.open_memory_channel[str](100)
        for f in frames_in:
            self._in_send.send_nowait(f)
        self.accept = accept
        self.unblock_at = unblock_at
        self.sent: list[str] = []
        self.closed_with: tuple[int, str | None] | None = None

    async def get_message(self) -> str:
        try:
            return await self._in_recv.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(CloseReason(1000, None)) from None

    async def send_message(self, message: str) -> None:
        if len(self.sent) >= self.accept:
            if self.unblock_at is None:
                await trio.sleep_forever()
            await trio.sleep_until(self.unblock_at)
        self.sent.append(message)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_with = (code, reason)
        await trio.lowlevel.checkpoint()


class EndlessGeneration:
    def __init__(self, log: list[tuple[str, float]]) -> None:
        self._log = log
        self._n = 0

    def __aiter__(self) -> EndlessGeneration:
        return self

    async def __anext__(self) -> GenerationDelta:
        try:
            await trio.sleep(0.01)
        except trio.Cancelled:
            self._log.append(("cancelled", trio.current_time()))
            raise
        self._n += 1
        sample = SampleOutput(0, (1,), "x", None, None, self._n)
        return GenerationDelta("r", "fake", (sample,), False, Usage(1, self._n))

    def cancel(self) -> None:
        self._log.append(("cancel()", trio.current_time()))

    def close(self) -> None:
        self._log.append(("closed", trio.current_time()))


class FakeService:
    def __init__(self) -> None:
        self.log: list[tuple[str, float]] = []

    def generate(self, prompt: Any, **kwargs: Any) -> EndlessGeneration:
        return EndlessGeneration(self.log)

    def models(self) -> list[Any]:
        return []


GENERATE = json.dumps({"type": "generate", "id": "r", "prompt": "hi"})


async def test_a_slow_but_alive_reader_gets_the_close_reason_after_its_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ws = FakeSocket([GENERATE], accept=5, unblock_at=20.0)
    counters = _Counters()
    service = FakeService()
    limits = ServerLimits(slow_client_timeout=10.0, slow_client_grace=60.0)
    conn = Connection(ws, service, limits, counters)  # type: ignore[arg-type]
    await conn.serve()
    assert counters.slow_clients_dropped == 1
    # Its request was aborted when the client was found too slow, not when the socket woke at t=20.
    (event, when), *_ = service.log
    assert event == "closed" and 10.0 < when < 15.0
    assert len(ws.sent) == 6  # the stuck frame went through, then nothing but the close frame
    assert ws.closed_with is not None and ws.closed_with[0] == 1008
    assert "client too slow" in (ws.closed_with[1] or "")
    assert 10.0 < trio.current_time() <= 21.0


async def test_a_reader_that_never_reads_again_is_cut_after_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ws = FakeSocket([GENERATE], accept=3, unblock_at=None)
    counters = _Counters()
    service = FakeService()
    limits = ServerLimits(slow_client_timeout=10.0, slow_client_grace=5.0)
    conn = Connection(ws, service, limits, counters)  # type: ignore[arg-type]
    await conn.serve()
    assert counters.slow_clients_dropped == 1
    assert [e for e, _ in service.log] == ["closed"]
    assert conn.close_reason[0] == 1008  # the server's handler closes with this (and cuts TCP)
    assert 15.0 <= trio.current_time() <= 20.0


async def test_a_reader_that_keeps_up_is_never_dropped(autojump_clock: trio.testing.MockClock) -> None:
    ws = FakeSocket([GENERATE], accept=10**9, unblock_at=None)
    counters = _Counters()
    limits = ServerLimits(slow_client_timeout=1.0)
    conn = Connection(ws, FakeService(), limits, counters)  # type: ignore[arg-type]
    with trio.move_on_after(30):
        await conn.serve()
    assert counters.slow_clients_dropped == 0
    assert len(ws.sent) > 1000
