"""The front door: HTTP/1.1 and WebSocket on the server's one port, over real sockets on 127.0.0.1.

HTTP is spoken with h11's client side or with raw bytes (malformed requests); WebSockets with
trio-websocket. Routes under test are small ones written here; the server's own ``/health``,
``/version`` and ``/`` are checked too. Timeouts are the server's own, set small.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tomllib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
from conftest_serving import build_engine, greedy, raw_client, wait_blocks_released
from trio_websocket import ConnectionRejected, open_websocket_url

import mini_vllm
from mini_vllm.actors import ServiceConfig, open_service
from mini_vllm.actors.task_group import open_task_group
from mini_vllm.engine import EngineArgs, LLMEngine
from mini_vllm.engine.errors import ConfigError
from mini_vllm.transport import ops
from mini_vllm.transport.http import HttpError, HttpRequest, HttpResponder, Routes, send_json
from mini_vllm.transport.server import Server, ServerLimits

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent


# ---- a raw HTTP client ------------------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; repeated ones joined with ", "
    body: bytes
    chunks: int = 0  # Data events the body came in

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    """One TCP connection speaking HTTP/1.1 through h11's client side (keep-alive between requests)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def head(self) -> h11.Response:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event

    async def answer(self) -> Answer:
        response = await self.head()
        body, chunks = b"", 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            body += bytes(event.data)
            chunks += 1
        return Answer(response.status_code, _headers(response.headers), body, chunks)

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str | bytes, str | bytes]] = (), body: bytes | None = None
    ) -> Answer:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers: list[tuple[str | bytes, str | bytes]] = [("Host", "127.0.0.1"), *headers]
        if body is not None:
            all_headers.append(("Content-Length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.answer()


def _headers(raw: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode().lower()
        out[key] = f"{out[key]}, {value.decode()}" if key in out else value.decode()
    return out


@contextlib.asynccontextmanager
async def http(server: Server) -> AsyncIterator[HttpClient]:
    assert server.port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        yield HttpClient(stream)


async def raw_exchange(server: Server, data: bytes, *, pieces: int = 1) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` (in ``pieces`` writes) and read until the server closes: (status, headers, body)."""
    assert server.port is not None
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            await stream.send_all(data[i : i + step])
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


# ---- servers --------------------------------------------------------------------------------------


@attrs.frozen
class FakeModel:
    name: str
    available: bool = True


class FakeService:
    """What the front door and the server's own routes ask of a service, nothing more."""

    def __init__(self, models: Sequence[FakeModel] = (FakeModel("demo"),)) -> None:
        self._models = list(models)
        self.shut_down_with: str | None = None

    def models(self) -> list[FakeModel]:
        return self._models

    def shutdown(self, message: str = "") -> None:
        self.shut_down_with = message


@contextlib.asynccontextmanager
async def serving(
    service: Any, limits: ServerLimits | None = None, routes: Routes | None = None, api_keys: Sequence[str] = ()
) -> AsyncIterator[Server]:
    async with open_task_group() as nursery:
        server = Server(service, limits, routes=routes, api_keys=api_keys)
        await nursery.start(server.run, "127.0.0.1", 0)
        yield server
        nursery.cancel_scope.cancel()


async def echo(request: HttpRequest, responder: HttpResponder) -> None:
    await send_json(responder, 200, {
        "method": request.method, "path": request.path, "query": request.query, "client": request.client,
        "body": request.body.decode("latin-1"), "content_type": request.header("Content-Type"),
    })


ECHO: Routes = {("POST", "/echo"): echo, ("GET", "/echo"): echo}


# ---- one port, two protocols ----------------------------------------------------------------------


async def test_http_and_websocket_on_the_same_port(engine: LLMEngine) -> None:
    with trio.fail_after(30):
        async with open_service([engine]) as service, serving(service) as server:
            assert server.http_url == f"http://127.0.0.1:{server.port}" and server.url == f"ws://127.0.0.1:{server.port}"
            async with http(server) as client:
                health = await client.request("GET", "/health")
                assert (health.status, health.json()) == (200, {"status": "ok"})
                assert health.headers["content-type"] == "application/json"
                version = await client.request("GET", "/version")
                assert version.json() == {"version": mini_vllm.__version__}
            async with raw_client(server.url) as ws:
                frames = await ws.request({"type": "generate", "id": "a", "prompt": "Hello", **greedy(4)})
                assert frames[-1]["type"] == "done"
            stats = server.statistics()
            assert stats.http_requests == 3 and stats.connections_total == 1 and stats.http_errors_4xx == 0


async def test_keep_alive_serves_requests_one_after_another_and_pipelined() -> None:
    with trio.fail_after(10):
        async with serving(FakeService(), routes=ECHO) as server:
            async with http(server) as client:
                first = await client.request("POST", "/echo?x=1", [("Content-Type", "text/plain")], b"one")
                second = await client.request("GET", "/echo", body=b"")
                assert first.json()["body"] == "one" and first.json()["query"] == "x=1"
                assert first.json()["content_type"] == "text/plain" and first.json()["client"] == "127.0.0.1"
                assert second.json()["method"] == "GET"
                assert server.statistics().tcp_connections_open == 1  # both on one connection
            assert server.port is not None
            async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                two = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nA"
                       b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nB")
                await stream.send_all(two)  # both at once: answered in order
                received = await read_until_closed(stream)
            assert received.count(b"HTTP/1.1 200 OK") == 2
            assert received.index(b'"body":"A"') < received.index(b'"body":"B"')


async def test_percent_decoded_path_chunked_body_and_100_continue() -> None:
    with trio.fail_after(10):
        async with serving(FakeService(), routes={("POST", "/a b"): echo}) as server, http(server) as client:
            await client.send(h11.Request(method="POST", target="/a%20b", headers=[
                ("Host", "x"), ("Transfer-Encoding", "chunked"), ("Expect", "100-continue")]))
            informational = await client.next_event()
            assert isinstance(informational, h11.InformationalResponse) and informational.status_code == 100
            await client.send(h11.Data(data=b"hel"), h11.Data(data=b"lo"), h11.EndOfMessage())
            answer = await client.answer()
            assert answer.json()["path"] == "/a b" and answer.json()["body"] == "hello"


# ---- refusals -------------------------------------------------------------------------------------


def check_error(answer: Answer | tuple[int, dict[str, str], bytes], status: int, code: str) -> dict[str, Any]:
    got_status, body = (answer.status, answer.body) if isinstance(answer, Answer) else (answer[0], answer[2])
    assert got_status == status, (got_status, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


async def test_unknown_path_404_wrong_method_405_options_and_head() -> None:
    with trio.fail_after(10):
        async with serving(FakeService(), routes=ECHO) as server, http(server) as client:
            error = check_error(await client.request("GET", "/nope"), 404, "not_found")
            assert error["type"] == "not_found_error" and "/nope" in error["message"]
            wrong = await client.request("DELETE", "/health")
            assert "GET" in check_error(wrong, 405, "method_not_allowed")["message"]
            assert wrong.headers["allow"] == "GET, HEAD, OPTIONS"
            options = await client.request("OPTIONS", "/echo")
            assert options.status == 204 and options.headers["allow"] == "GET, HEAD, OPTIONS, POST"
            head = await client.request("HEAD", "/health")
            assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "15"
            assert (await client.request("GET", "/health")).status == 200  # still the same connection
            assert server.statistics().http_errors_4xx == 2


async def test_malformed_http_is_a_400_with_an_error_body_then_closed() -> None:
    with trio.fail_after(10):
        async with serving(FakeService()) as server:
            answer = await raw_exchange(server, b"GARBAGE\r\n\r\n")
            error = check_error(answer, 400, "bad_request")
            assert "malformed HTTP request" in error["message"] and answer[1]["connection"] == "close"
            check_error(await raw_exchange(server, b"GET nopath HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "bad_request")
            bad_chunk = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
            check_error(await raw_exchange(server, bad_chunk), 400, "bad_request")
            assert server.statistics().http_errors_4xx == 3


async def test_an_oversized_head_is_431_whether_it_comes_at_once_or_in_pieces() -> None:
    limits = ServerLimits(max_header_bytes=1024)
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n"
    with trio.fail_after(10):
        async with serving(FakeService(), limits) as server:
            check_error(await raw_exchange(server, big), 431, "request_too_large")
            endless = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000  # never ends: h11's bound
            assert "1024 bytes" in check_error(await raw_exchange(server, endless, pieces=8), 431, "request_too_large")["message"]
            ok = await raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert ok[0] == 200


async def test_an_oversized_body_is_413_from_its_length_before_reading_and_while_reading_chunks() -> None:
    limits = ServerLimits(max_body_bytes=100)
    with trio.fail_after(10):
        async with serving(FakeService(), limits, routes=ECHO) as server:
            # Announced too large: answered at once, the body never sent.
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
            error = check_error(await raw_exchange(server, head), 413, "request_too_large")
            assert "100 bytes" in error["message"]
            async with http(server) as client:
                await client.send(h11.Request(method="POST", target="/echo",
                                              headers=[("Host", "x"), ("Transfer-Encoding", "chunked")]))
                for _ in range(5):
                    await client.send(h11.Data(data=b"x" * 30))
                check_error(await client.answer(), 413, "request_too_large")
            async with http(server) as client:  # at the limit: served
                assert (await client.request("POST", "/echo", body=b"y" * 100)).json()["body"] == "y" * 100


async def test_a_request_too_slow_to_arrive_gets_408_and_an_idle_keep_alive_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = ServerLimits(handshake_timeout=3.0, idle_timeout=30.0)
    with trio.fail_after(100):
        async with serving(FakeService(), limits) as server:
            check_error(await raw_exchange(server, b"GET /health HTTP/1.1\r\nHost"), 408, "request_timeout")
            async with http(server) as client:
                # A connection opened ahead and silent past handshake_timeout is idle, not slow:
                # its first request, when it comes, is served (pools open connections early).
                await trio.sleep(10.0)
                assert (await client.request("GET", "/health")).status == 200
                began = trio.current_time()
                assert await client.stream.receive_some(100) == b""  # closed after idle_timeout, no answer
                assert trio.current_time() - began == pytest.approx(30.0, abs=0.5)


async def test_max_connections_refuses_http_and_websocket_with_503() -> None:
    limits = ServerLimits(max_connections=1, retry_after=2.0)
    with trio.fail_after(10):
        async with serving(FakeService(), limits) as server, http(server) as held:
            assert (await held.request("GET", "/health")).status == 200  # holds the only place
            status, headers, body = await raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 503 and headers["retry-after"] == "2" and b"limit of 1 connections" in body
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(server.url):
                    pass
            assert info.value.status_code == 503
            assert server.statistics().connections_refused == 2
            assert (await held.request("GET", "/version")).status == 200  # the held one is still served


async def test_origins_on_http_cors_headers_and_preflights() -> None:
    limits = ServerLimits(allowed_origins=("https://app.example",))
    with trio.fail_after(10):
        async with serving(FakeService(), limits, routes=ECHO) as server, http(server) as client:
            own = f"http://127.0.0.1:{server.port}"
            plain = await client.request("GET", "/health")  # a program: no Origin, no CORS headers
            assert plain.status == 200 and "access-control-allow-origin" not in plain.headers
            for origin in (own, "https://app.example"):
                answer = await client.request("GET", "/health", [("Origin", origin)])
                assert answer.status == 200
                assert answer.headers["access-control-allow-origin"] == origin and answer.headers["vary"] == "Origin"
            refused = await client.request("GET", "/health", [("Origin", "https://evil.example")])
            assert "--allowed-origins" in check_error(refused, 403, "origin_not_allowed")["message"]
            preflight = await client.request("OPTIONS", "/echo", [
                ("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization, content-type")])
            assert preflight.status == 204
            assert preflight.headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS, POST"
            assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            evil = await client.request("OPTIONS", "/echo", [
                ("Origin", "https://evil.example"), ("Access-Control-Request-Method", "POST")])
            check_error(evil, 403, "origin_not_allowed")
            assert server.statistics().origins_refused == 2


async def test_websocket_handshakes_keep_their_origin_rule_and_are_checked_before_handing_over() -> None:
    with trio.fail_after(10):
        async with serving(FakeService()) as server:
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(server.url, extra_headers=[(b"Origin", b"https://evil.example")]):
                    pass
            assert info.value.status_code == 403
            handshake = (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
            status, headers, _ = await raw_exchange(server, handshake)
            assert status == 426 and headers["sec-websocket-version"] == "13"
            no_key = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
            check_error(await raw_exchange(server, no_key), 400, "bad_request")


# ---- routes: errors, streams, disconnects ---------------------------------------------------------


@attrs.define
class Probe:
    """What a test route saw."""

    first_chunk_read: trio.Event = attrs.field(factory=trio.Event)
    cancelled: trio.Event = attrs.field(factory=trio.Event)
    finished: bool = False


def streaming_routes(probe: Probe) -> Routes:
    async def stream(request: HttpRequest, responder: HttpResponder) -> None:
        await responder.start_stream(200, "text/event-stream", (("Cache-Control", "no-cache"),))
        await responder.write(b"data: 1\n\n")
        await probe.first_chunk_read.wait()  # the client saw it: the write was not held back
        await responder.write(b"data: 2\n\n")
        await responder.write(b"")  # nothing: must not end the chunked body
        await responder.write(b"data: [DONE]\n\n")
        await responder.end_stream()
        probe.finished = True

    async def forever(request: HttpRequest, responder: HttpResponder) -> None:
        await responder.start_stream(200, "text/event-stream")
        await responder.write(b"data: 1\n\n")
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            probe.cancelled.set()
            raise

    async def refuses(request: HttpRequest, responder: HttpResponder) -> None:
        raise HttpError(429, "slow down", "rate_limit_error", "overloaded", headers=(("Retry-After", "3"),))

    async def crashes(request: HttpRequest, responder: HttpResponder) -> None:
        raise RuntimeError("a bug in the route")

    async def crashes_mid_stream(request: HttpRequest, responder: HttpResponder) -> None:
        await responder.start_stream(200, "text/plain")
        await responder.write(b"partial")
        raise RuntimeError("a bug after the answer began")

    async def silent(request: HttpRequest, responder: HttpResponder) -> None:
        pass

    async def bad_header(request: HttpRequest, responder: HttpResponder) -> None:
        await responder.send(200, b"x", "text/plain", (("X-Bad", "a\r\nInjected: 1"),))

    return {
        ("GET", "/stream"): stream, ("GET", "/forever"): forever, ("GET", "/refuses"): refuses,
        ("GET", "/crashes"): crashes, ("GET", "/crashes-mid-stream"): crashes_mid_stream,
        ("GET", "/silent"): silent, ("GET", "/bad-header"): bad_header,
    }


async def test_a_streamed_answer_is_chunked_and_each_write_reaches_the_client_at_once() -> None:
    probe = Probe()
    with trio.fail_after(10):
        async with serving(FakeService(), routes=streaming_routes(probe)) as server, http(server) as client:
            await client.send(h11.Request(method="GET", target="/stream", headers=[("Host", "x")]), h11.EndOfMessage())
            response = await client.head()
            assert response.status_code == 200
            headers = _headers(response.headers)
            assert headers["transfer-encoding"] == "chunked" and headers["content-type"] == "text/event-stream"
            assert headers["cache-control"] == "no-cache"
            first = await client.next_event()
            assert bytes(first.data) == b"data: 1\n\n"
            probe.first_chunk_read.set()
            rest = b""
            while not isinstance(event := await client.next_event(), h11.EndOfMessage):
                rest += bytes(event.data)
            assert rest == b"data: 2\n\ndata: [DONE]\n\n"
            client.conn.start_next_cycle()
            assert (await client.request("GET", "/health")).status == 200  # keep-alive after a stream
            assert probe.finished


async def test_route_errors_answer_in_openai_shape_and_never_take_the_server_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = Probe()
    with trio.fail_after(10):
        async with serving(FakeService(), routes=streaming_routes(probe)) as server:
            async with http(server) as client:
                refused = await client.request("GET", "/refuses")
                assert check_error(refused, 429, "overloaded")["type"] == "rate_limit_error"
                assert refused.headers["retry-after"] == "3"
                crashed = await client.request("GET", "/crashes")
                assert "a bug in the route" in check_error(crashed, 500, "internal")["message"]
                check_error(await client.request("GET", "/silent"), 500, "internal")
                check_error(await client.request("GET", "/bad-header"), 500, "internal")
                assert (await client.request("GET", "/health")).status == 200  # the same connection goes on
            async with http(server) as client:
                await client.send(h11.Request(method="GET", target="/crashes-mid-stream", headers=[("Host", "x")]),
                                  h11.EndOfMessage())
                assert (await client.head()).status_code == 200
                assert bytes((await client.next_event()).data) == b"partial"
                with pytest.raises(h11.RemoteProtocolError):  # the chunked body never ends: cut, not completed
                    await client.next_event()
            assert server.statistics().http_errors_5xx == 3
    assert "a bug in the route" in caplog.text and "a bug after the answer began" in caplog.text


async def test_a_client_that_disconnects_mid_stream_cancels_its_route() -> None:
    probe = Probe()
    with trio.fail_after(10):
        async with serving(FakeService(), routes=streaming_routes(probe)) as server:
            async with http(server) as client:
                await client.send(h11.Request(method="GET", target="/forever", headers=[("Host", "x")]),
                                  h11.EndOfMessage())
                assert (await client.head()).status_code == 200
                assert bytes((await client.next_event()).data) == b"data: 1\n\n"
            await probe.cancelled.wait()  # closing the socket cancelled the route's task
            while server.statistics().tcp_connections_open:  # noqa: ASYNC110 -- the counter settles a step later
                await trio.sleep(0.005)
            assert server.statistics().http_disconnects == 1


def generation_route(service: Any) -> Routes:
    async def generate(request: HttpRequest, responder: HttpResponder) -> None:
        await responder.start_stream(200, "text/event-stream")
        async for delta in service.generate("Hello", **greedy(900)):
            for sample in delta.samples:
                await responder.write(json.dumps({"ids": list(sample.token_ids)}).encode() + b"\n")
        await responder.end_stream()

    return {("POST", "/generate"): generate}


async def test_a_closed_http_connection_aborts_its_generation_and_frees_its_blocks(engine: LLMEngine) -> None:
    with trio.fail_after(30):
        async with open_service([engine]) as service, serving(service, routes=generation_route(service)) as server:
            async with http(server) as client:
                await client.send(h11.Request(method="POST", target="/generate",
                                              headers=[("Host", "x"), ("Content-Length", "0")]), h11.EndOfMessage())
                assert (await client.head()).status_code == 200
                assert b"ids" in bytes((await client.next_event()).data)
                assert service.statistics().blocks.used_blocks > 0
            await wait_blocks_released(service)
            assert service.statistics().ingress.cancelled == 1


async def test_a_client_that_reads_a_stream_too_slowly_is_dropped_and_its_route_cancelled() -> None:
    ended = trio.Event()
    ended_with: list[type[BaseException]] = []

    async def flood(request: HttpRequest, responder: HttpResponder) -> None:
        await responder.start_stream(200, "application/octet-stream")
        try:
            while True:
                await responder.write(b"x" * (1 << 20))
        except BaseException as exc:
            ended_with.append(type(exc))
            try:
                await trio.lowlevel.checkpoint()  # the route's scope is cancelled too: no more waiting on it
            except trio.Cancelled:
                ended.set()
            raise

    limits = ServerLimits(slow_client_timeout=0.2)
    with trio.fail_after(20):
        async with serving(FakeService(), limits, routes={("GET", "/flood"): flood}) as server, http(server) as client:
            await client.send(h11.Request(method="GET", target="/flood", headers=[("Host", "x")]), h11.EndOfMessage())
            await ended.wait()  # we never read: the socket's buffers fill, a write waits, the server gives up
            assert ended_with == [trio.BrokenResourceError]  # what the slow write raised
            assert server.statistics().http_slow_clients_dropped == 1


# ---- /health, /version, the page, shutdown --------------------------------------------------------


async def test_health_is_503_naming_a_model_whose_engine_core_was_killed(demo_model_dir: Path) -> None:
    # One core process (several models: test_health_problem_names_every_model_down_and_a_shutdown).
    args = [EngineArgs(model=str(demo_model_dir), model_name="a", num_kv_blocks=64, device="cpu")]
    with trio.fail_after(60):
        async with open_service(args, ServiceConfig(core_process=True)) as service, serving(service) as server:
            async with http(server) as client:
                assert (await client.request("GET", "/health")).json() == {"status": "ok"}
                os.kill(service.core_pids()["a"], signal.SIGKILL)
                while all(m.available for m in service.models()):  # noqa: ASYNC110 -- the link's end, seen by the service
                    await trio.sleep(0.01)
                answer = await client.request("GET", "/health")
                assert answer.status == 503 and answer.json()["status"] == "unavailable"
                assert answer.json()["reason"] == "model 'a' cannot serve: its engine core has exited"
                assert (await client.request("GET", "/version")).status == 200


def test_health_problem_names_every_model_down_and_a_shutdown() -> None:
    service: Any = FakeService([FakeModel("a", available=False), FakeModel("b"), FakeModel("c", available=False)])
    problem = ops.health_problem(service, None)
    assert problem is not None and "'a'" in problem and "'c'" in problem and "'b'" not in problem
    assert ops.health_problem(FakeService(), None) is None  # type: ignore[arg-type]
    assert "shutting down" in (ops.health_problem(FakeService(), "going away") or "")  # type: ignore[arg-type]


async def test_shutdown_closes_idle_keep_alive_connections_and_health_says_why() -> None:
    service = FakeService()
    release = trio.Event()
    seen: list[int] = []

    async def slow(request: HttpRequest, responder: HttpResponder) -> None:
        await release.wait()
        await ops.health_route(service, lambda: server.stopping)(request, responder)  # type: ignore[arg-type]

    with trio.fail_after(10):
        async with serving(service, routes={("GET", "/slow"): slow}) as server:
            async with http(server) as idle, http(server) as busy, trio.open_nursery() as nursery:
                assert (await idle.request("GET", "/health")).status == 200

                async def ask() -> None:
                    answer = await busy.request("GET", "/slow")
                    seen.append(answer.status)
                    assert answer.headers["connection"] == "close" and "shutting down" in answer.json()["reason"]

                nursery.start_soon(ask)
                while server.statistics().http_requests < 2:  # noqa: ASYNC110 -- wait for /slow to be in
                    await trio.sleep(0.005)
                nursery.start_soon(server.shutdown, "maintenance", 5.0)
                assert await idle.stream.receive_some(100) == b""  # closed at once: it had nothing in flight
                release.set()
            assert seen == [503] and service.shut_down_with == "maintenance"


async def test_the_page_is_served_at_the_root_with_its_files() -> None:
    with trio.fail_after(10):
        async with serving(FakeService()) as server, http(server) as client:
            page = await client.request("GET", "/")
            assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
            assert page.body == (REPO / "examples" / "browser" / "index.html").read_bytes()
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            script = await client.request("GET", "/app.js")
            assert script.headers["content-type"].startswith("text/javascript") and b"mini-vllm.bearer." in script.body
            assert (await client.request("GET", "/style.css")).status == 200


def test_the_page_is_package_data_from_its_one_copy() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert ops.PAGE_PACKAGE in project["packages"]
    assert project["package-dir"][ops.PAGE_PACKAGE] == "examples/browser"
    patterns = project["package-data"][ops.PAGE_PACKAGE]
    served = {f.path for f in ops.page_files()}
    assert served == {"/", "/app.js", "/style.css"}
    assert {Path(p).suffix for p in patterns} >= {".html", ".js", ".css"}


def test_mounting_a_taken_route_is_a_config_error() -> None:
    async def nothing(request: HttpRequest, responder: HttpResponder) -> None:
        pass

    server = Server(FakeService())  # type: ignore[arg-type]
    server.mount({("POST", "/v1/extra"): nothing})
    for taken in (("GET", "/health"), ("POST", "/v1/completions"), ("GET", "/metrics"), ("POST", "/v1/extra")):
        with pytest.raises(ConfigError, match=" ".join(taken)):
            server.mount({taken: nothing})
    with pytest.raises(ConfigError, match="upper case"):
        server.mount({("get", "/x"): nothing})
    assert server.admission is not None  # the fair share HTTP routes ask, the WebSocket's own
    assert Server(FakeService(), ServerLimits(client_key="off")).admission is None  # type: ignore[arg-type]


def test_server_limits_for_http_are_checked() -> None:
    with pytest.raises(ConfigError, match="max_body_bytes"):
        ServerLimits(max_body_bytes=0)
    with pytest.raises(ConfigError, match="max_header_bytes"):
        ServerLimits(max_header_bytes=1.5)  # type: ignore[arg-type]


async def test_websocket_connections_count_against_max_connections_with_http(demo_model_dir: Path) -> None:
    limits = ServerLimits(max_connections=2)
    with trio.fail_after(30):
        async with open_service([build_engine(demo_model_dir)]) as service, serving(service, limits) as server:
            async with raw_client(server.url), http(server) as held:
                assert (await held.request("GET", "/health")).status == 200
                status, _, _ = await raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert status == 503
                assert server.statistics().tcp_connections_open == 2
