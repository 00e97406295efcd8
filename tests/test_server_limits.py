"""The server's bounds: connections (503), browser origins (403), idle connections, fair
admission per client with ``retry_after``, throttled accept errors and the open-file limit.

Real sockets on 127.0.0.1 (port 0) where the handshake matters; a gated engine holds requests
in flight without time passing; fake sockets and trio's autojump clock where time does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from conftest_serving import GatedEngine, RawClient, greedy, raw_client, released, running_server
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, open_websocket_url, wrap_client_stream

from mini_vllm.actors import ServiceConfig
from mini_vllm.actors.request_stream import GenerationDelta, SampleOutput, Usage
from mini_vllm.engine import LLMEngine
from mini_vllm.engine.errors import ConfigError
from mini_vllm.transport import commands
from mini_vllm.transport.front_door import GuardedListener, ThrottledLog
from mini_vllm.transport.server import Connection, ServerLimits, _Counters, own_origins

pytestmark = pytest.mark.timeout(60)


def gen(rid: str, **fields: Any) -> dict[str, Any]:
    return {"type": "generate", "id": rid, "prompt": "Hello", **greedy(900), **fields}


@contextlib.asynccontextmanager
async def client_from(port: int, local_address: str) -> AsyncIterator[RawClient]:
    """A WebSocket from ``local_address`` (127.0.0.2 is loopback too on Linux): another client IP."""
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/")
        try:
            yield RawClient(ws)
        finally:
            await ws.aclose()


async def connect_with(url: str, origin: str | None) -> int:
    """Open a WebSocket (with that Origin header) and return 101, or the HTTP status it was refused with."""
    headers = [(b"Origin", origin.encode())] if origin is not None else []
    try:
        async with open_websocket_url(url, extra_headers=headers):
            return 101
    except ConnectionRejected as exc:
        return exc.status_code


async def until(condition: Any) -> None:
    """Wait for the server to reach a state (each test's timeout bounds it)."""
    while not condition():  # noqa: ASYNC110 -- no event to wait on: the server's counters, read from outside
        await trio.sleep(0.005)


# ---- connections ----------------------------------------------------------------------------------


async def test_connections_beyond_the_limit_get_503_and_the_good_client_is_still_served(engine: LLMEngine) -> None:
    limits = ServerLimits(max_connections=2, retry_after=3.0)
    with trio.fail_after(30):
        async with running_server([engine], limits) as (_, server), raw_client(server.url) as good:
            async with raw_client(server.url):
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(server.url):
                        pass
                assert info.value.status_code == 503
                assert b"limit of 2 connections" in (info.value.body or b"")
                assert (b"retry-after", b"3") in [(k.lower(), v) for k, v in info.value.headers]
                frames = await good.request(gen("ok", **greedy(3)))
                assert frames[-1]["type"] == "done"
            await until(lambda: server.statistics().connections_open == 1)
            async with raw_client(server.url) as again:  # the place came back
                frames = await again.request(gen("again", **greedy(3)))
                assert frames[-1]["type"] == "done"
            assert server.statistics().connections_refused == 1


# ---- origins --------------------------------------------------------------------------------------


async def test_foreign_origins_get_403_own_origin_and_programs_connect(engine: LLMEngine) -> None:
    with trio.fail_after(30):
        async with running_server([engine]) as (_, server):
            url, port = server.url, server.port
            assert await connect_with(url, None) == 101  # a program
            assert await connect_with(url, f"http://127.0.0.1:{port}") == 101
            assert await connect_with(url, f"http://localhost:{port}") == 101
            assert await connect_with(url, f"http://[::1]:{port}") == 101
            assert await connect_with(url, "https://evil.example") == 403
            assert await connect_with(url, f"http://evil.example:{port}") == 403  # DNS rebinding
            assert await connect_with(url, f"http://127.0.0.1:{port + 1}") == 403  # another local page
            assert await connect_with(url, "null") == 403  # file:// pages, sandboxed frames: only when allowed
            assert server.statistics().origins_refused == 4
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(url, extra_headers=[(b"Origin", b"https://evil.example")]):
                    pass
            assert b"--allowed-origins" in (info.value.body or b"")


async def test_null_and_listed_origins_only_when_allowed(engine: LLMEngine) -> None:
    limits = ServerLimits(allowed_origins=("null", "https://App.example/"))
    with trio.fail_after(30):
        async with running_server([engine], limits) as (_, server), raw_client(server.url):
            url = server.url
            assert await connect_with(url, "null") == 101
            assert await connect_with(url, "https://app.example") == 101
            assert await connect_with(url, "https://app.example:443") == 101
            assert await connect_with(url, "http://app.example") == 403
            assert await connect_with(url, "https://evil.example") == 403
    assert ServerLimits(allowed_origins=("*",)).allowed_origins == ("*",)


def test_own_origins_and_bad_origins() -> None:
    assert own_origins("127.0.0.1", 8000) == {("http", h, 8000) for h in ("127.0.0.1", "localhost", "::1")}
    assert own_origins("0.0.0.0", 80) == {("http", h, 80) for h in ("127.0.0.1", "localhost", "::1")}
    assert own_origins("192.168.1.5", 8000) == {("http", "192.168.1.5", 8000)}
    for bad in ("evil.example", "http://x.example/path", "http://x.example:99999"):
        with pytest.raises(ConfigError, match="not an origin"):
            ServerLimits(allowed_origins=(bad,))
    with pytest.raises(ConfigError, match="client_key"):
        ServerLimits(client_key="user")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="client_share"):
        ServerLimits(client_share=1.5)
    with pytest.raises(ConfigError, match="max_connections"):
        ServerLimits(max_connections=0)


# ---- idle connections -----------------------------------------------------------------------------


async def test_an_idle_connection_is_closed_with_1001_and_a_reason(engine: LLMEngine) -> None:
    limits = ServerLimits(idle_timeout=0.2)
    with trio.fail_after(30):
        async with running_server([engine], limits) as (_, server), raw_client(server.url) as client:
            with pytest.raises(ConnectionClosed) as info:
                await client.receive()
            assert info.value.reason.code == 1001
            assert "idle for 0.2 s" in (info.value.reason.reason or "")
            assert server.statistics().idle_closed == 1


class FakeSocket:
    """Hands out ``frames_in`` then waits for more forever; takes every frame sent."""

    def __init__(self, frames_in: list[str]) -> None:
        self._in_send, self._in_recv = trio.open_memory_channel[str](100)
        for f in frames_in:
            self._in_send.send_nowait(f)
        self.sent: list[dict[str, Any]] = []
        self.closed_with: tuple[int, str | None] | None = None
        self.closed_at: float | None = None

    async def get_message(self) -> str:
        try:
            return await self._in_recv.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(CloseReason(1000, None)) from None

    async def send_message(self, message: str) -> None:
        self.sent.append(json.loads(message))
        await trio.lowlevel.checkpoint()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self.closed_with is None:
            self.closed_with, self.closed_at = (code, reason), trio.current_time()
        await trio.lowlevel.checkpoint()


class SlowGeneration:
    """One token a second for ``seconds`` seconds, then done."""

    def __init__(self, seconds: int) -> None:
        self._left = seconds

    def __aiter__(self) -> SlowGeneration:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self._left == 0:
            raise StopAsyncIteration
        await trio.sleep(1.0)
        self._left -= 1
        reason = "length" if self._left == 0 else None
        sample = SampleOutput(0, (1,), "x", None, reason, 1)
        return GenerationDelta("r", "fake", (sample,), self._left == 0, Usage(1, 1))

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeService:
    def generate(self, prompt: Any, **kwargs: Any) -> SlowGeneration:
        return SlowGeneration(50)

    def models(self) -> list[Any]:
        return []


async def test_idle_timeout_waits_for_the_request_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    frame = json.dumps({"type": "generate", "id": "r", "prompt": "hi"})
    ws = FakeSocket([frame])
    counters = _Counters()
    conn = Connection(ws, FakeService(), ServerLimits(idle_timeout=5.0), counters)  # type: ignore[arg-type]
    await conn.serve()
    # 50 s of streaming with no frame from the client: not idle; closed 5 s after the request ended.
    assert [f["type"] for f in ws.sent].count("token") == 50 and ws.sent[-1]["type"] == "done"
    assert ws.closed_with is not None and ws.closed_with[0] == 1001 and "idle" in (ws.closed_with[1] or "")
    assert ws.closed_at == pytest.approx(55.0, abs=0.1)
    assert counters.idle_closed == 1


async def test_a_silent_connection_is_closed_on_time(autojump_clock: trio.testing.MockClock) -> None:
    ws = FakeSocket([json.dumps({"type": "models"})])
    conn = Connection(ws, FakeService(), ServerLimits(idle_timeout=7.0), _Counters())  # type: ignore[arg-type]
    await conn.serve()
    assert ws.closed_with is not None and ws.closed_with[0] == 1001
    assert ws.closed_at == pytest.approx(7.0, abs=0.01)


# ---- fair admission -------------------------------------------------------------------------------

FAIR = {"client_share": 0.25, "min_client_share": 1, "retry_after": 0.5}  # a share of 2 of 8 places


async def first_error(client: RawClient) -> dict[str, Any]:
    frames = await client.until(lambda f: f["type"] == "error")
    return frames[-1]


async def refusals(client: RawClient, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send ``frames``, then a ``stats`` probe; the errors answered before the probe's reply (a fair
    share refusal is answered at once, in order) and that reply's server counters last."""
    for frame in frames:
        await client.send(frame)
    await client.send({"type": "stats", "id": "probe"})
    answered = await client.until(lambda f: f["type"] == "stats")
    return [f for f in answered if f["type"] == "error"] + [answered[-1]["server"]]


def check_queue_bound(service: Any, model: str, want: int) -> None:
    got = service.statistics().scheduler(model).max_pending
    assert got == want, (
        f"SchedulerStats.max_pending is {got}, the model's admission bound is {want}: the fair share reads "
        "the bound from the statistics, so CoreProxy.statistics() must report its own max_pending"
    )


async def test_one_client_cannot_lock_out_another_per_connection(engine: LLMEngine) -> None:
    gated = GatedEngine(engine)  # holds every request in flight: nothing finishes while we count
    limits = ServerLimits(client_key="connection", **FAIR)  # type: ignore[arg-type]
    config = ServiceConfig(max_pending_per_model=8)
    with trio.fail_after(30):
        async with running_server([gated], limits, config) as (service, server), raw_client(server.url) as hog:  # type: ignore[list-item]
            check_queue_bound(service, "demo", 8)
            with released(gated):
                # Alone, a client borrows idle room beyond its share of 2, but leaves a share free.
                *errors, _ = await refusals(hog, [gen(f"a{i}") for i in range(7)])
                assert [(e["id"], e["code"]) for e in errors] == [("a6", "overloaded")]
                assert errors[0]["retry_after"] == 0.5 and "fair share" in errors[0]["message"]
                async with raw_client(server.url) as other:
                    *errors, counters = await refusals(other, [gen(f"b{i}") for i in range(3)])
                    assert [(e["id"], e["code"]) for e in errors] == [("b2", "overloaded")]  # b0, b1: the free share
                    assert errors[0]["retry_after"] == 0.5
                    assert counters["fair_share_refused"] == 2 and counters["requests_in_flight"] == 8


async def test_per_ip_clients_share_one_share_and_another_ip_gets_in(engine: LLMEngine) -> None:
    gated = GatedEngine(engine)
    limits = ServerLimits(client_key="ip", **FAIR)  # type: ignore[arg-type]
    config = ServiceConfig(max_pending_per_model=8)
    with trio.fail_after(30):
        async with running_server([gated], limits, config) as (service, server):  # type: ignore[list-item]
            check_queue_bound(service, "demo", 8)
            assert server.port is not None
            with released(gated):
                async with raw_client(server.url) as first, raw_client(server.url) as second:
                    *errors, _ = await refusals(first, [gen(f"a{i}") for i in range(6)])
                    assert errors == []
                    # Another connection of the same client (address): over its share.
                    *errors, _ = await refusals(second, [gen("same-ip")])
                    assert [(e["id"], e["code"]) for e in errors] == [("same-ip", "overloaded")]
                    async with client_from(server.port, "127.0.0.2") as other_ip:
                        *errors, counters = await refusals(other_ip, [gen("b0"), gen("b1")])
                        assert errors == []
                        assert counters["fair_share_refused"] == 1 and counters["requests_in_flight"] == 8


async def test_without_a_share_one_client_fills_the_queue_and_overloaded_has_retry_after(engine: LLMEngine) -> None:
    gated = GatedEngine(engine)
    limits = ServerLimits(client_key="off", retry_after=2.0)
    config = ServiceConfig(max_pending_per_model=2)
    with trio.fail_after(30):
        async with running_server([gated], limits, config) as (_, server), raw_client(server.url) as client:  # type: ignore[list-item]
            with released(gated):
                for i in range(3):
                    await client.send(gen(f"a{i}"))
                refused = await first_error(client)  # refused by the model's queue itself
                assert refused == {
                    "type": "error", "id": "a2", "code": "overloaded", "message": refused["message"], "retry_after": 2.0,
                }
                async with raw_client(server.url) as other:  # the lock-out a share prevents
                    assert (await first_error_of(other, gen("b0")))["code"] == "overloaded"


async def first_error_of(client: RawClient, frame: dict[str, Any]) -> dict[str, Any]:
    await client.send(frame)
    return await first_error(client)


# ---- accept errors and the open-file limit --------------------------------------------------------


class FailingListener(trio.abc.Listener[trio.SocketStream]):
    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return "a stream"  # type: ignore[return-value]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_repeated_accept_errors_are_logged_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    throttled = ThrottledLog(interval=10.0)
    errors: list[OSError] = []

    def failed(exc: OSError) -> None:
        errors.append(exc)
        throttled.note("accept:EMFILE", "cannot accept: EMFILE", logging.ERROR)

    listener = GuardedListener(FailingListener(250), failed, lambda: throttled.ended("accept:EMFILE", "accepting again"))
    with caplog.at_level(logging.WARNING, logger="mini_vllm.transport.front_door"):
        assert await listener.accept() == "a stream"  # 250 failures, 0.1 s apart: 25 s
    assert len(errors) == 250
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # t=0, t=10, t=20, and the recovery
    assert lines[0] == "cannot accept: EMFILE"
    assert re.fullmatch(r"cannot accept: EMFILE \(10\d times in the last 10 s\)", lines[1]), lines[1]
    assert lines[-1].startswith("accepting again (")


def test_serve_raises_the_open_file_limit_and_fits_max_connections(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import resource

    state = {"limits": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: state["limits"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: state.update(limits=limits))
    assert commands.raise_open_file_limit() == 4096
    assert state["limits"] == (4096, 4096)
    assert "raised the open-file limit from 1024 to 4096" in capsys.readouterr().err
    assert commands.raise_open_file_limit() == 4096  # already there: nothing to say
    assert capsys.readouterr().err == ""
    fitted = commands._fit_open_file_limit(ServerLimits(max_connections=5000), 1024)
    assert fitted.max_connections == 1024 - commands._RESERVED_FDS
    assert "lowered" in capsys.readouterr().err
    assert commands._fit_open_file_limit(ServerLimits(), None).max_connections == ServerLimits().max_connections
