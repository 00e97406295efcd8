"""``mini-vllm bench serve --backend openai``: the HTTP/1.1 + SSE load generator (``bench/openai_load.py``)
against a small in-test HTTP server (trio + h11) that answers ``/v1/completions`` in OpenAI's shape
(keep-alive, error statuses, in-band errors, a server that closes mid-stream or while idle, a
manual clock for the timings), the command's flags, and both backends side by side against a live
demo-model server."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing
from conftest_serving import build_engine, wait_blocks_released
from test_bench_serve import Spy  # the same summarize spy as the WebSocket tests

from mini_vllm import cli
from mini_vllm.bench import openai_load
from mini_vllm.bench import serve as bench_serve
from mini_vllm.bench.openai_load import (
    Completion,
    HttpEndpoint,
    HttpStatusError,
    ServerUnreachable,
    SseParser,
    completion_body,
    http_endpoint,
    open_pool,
)
from mini_vllm.bench.serve import ServeBenchConfig, ServeRequest, Tracker, run_one_rate, summarize
from mini_vllm.engine.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


# ---- a small OpenAI-shaped HTTP server ------------------------------------------------------------------------


def sse(value: Any) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def chunk(ids: Sequence[int] | None, text: str = "x", finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = list(ids)
    return sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "demo", "choices": [choice]})


def usage(prompt: int, completion: int) -> bytes:
    return sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "demo", "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}})


def stream_of(*lengths: int, prompt: int = 3, finish: str = "length") -> list[bytes]:
    """One chunk per entry with that many token ids, a finishing chunk, the usage chunk, [DONE]."""
    ids = iter(range(1000))
    body = [chunk([next(ids) for _ in range(n)], text="t" * n) for n in lengths]
    return [*body, chunk([], text="", finish=finish), usage(prompt, sum(lengths)), DONE]


@attrs.frozen
class Reply:
    status: int = 200
    chunks: Sequence[bytes] = ()  # each written as one chunk of a chunked body
    body: bytes | None = None  # a whole body (Content-Length) instead
    content_type: str = "text/event-stream"
    close_after_chunks: int | None = None  # cut the connection after this many chunks, mid-body
    close_connection: bool = False  # close after the response without saying so (an idle timeout)
    connection_close_header: bool = False  # say "Connection: close"
    gate: Callable[[int], Awaitable[None]] | None = None  # awaited before chunk i is written


@attrs.frozen
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[Seen], Awaitable[Reply]]


class FakeOpenAI:
    """HTTP/1.1 with keep-alive on 127.0.0.1, port 0; each request is answered by ``handler``."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.seen: list[Seen] = []
        self.connections = 0
        self.closed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = 0
        self._changed = trio.Event()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until ``condition()`` holds (checked whenever a request arrives or a connection closes)."""
        while not condition():
            await self._changed.wait()

    @property
    def endpoint(self) -> HttpEndpoint:
        return HttpEndpoint("https" if self.ssl_context else "http", "127.0.0.1", self.port)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        stream: trio.abc.Stream = tcp
        try:
            if self.ssl_context is not None:
                stream = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
                await stream.do_handshake()
            conn = h11.Connection(h11.SERVER)
            while True:
                request = await self._request(conn, stream, number)
                if request is None:
                    return
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    reply = await self.handler(request)
                    whole = await self._answer(conn, stream, reply)
                finally:
                    self.in_flight -= 1
                if not whole or reply.close_connection or conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError, ssl.SSLError):
            return
        finally:
            self.closed += 1
            self._poke()
            await trio.aclose_forcefully(stream)

    async def _request(self, conn: h11.Connection, stream: trio.abc.Stream, number: int) -> Seen | None:
        head: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                headers = {k.decode(): v.decode() for k, v in head.headers}
                seen = Seen(head.method.decode(), head.target.decode(), headers, body, number)
                self.seen.append(seen)
                self._poke()
                return seen
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _answer(self, conn: h11.Connection, stream: trio.abc.Stream, reply: Reply) -> bool:
        headers = [("content-type", reply.content_type)]
        if reply.body is not None:
            headers.append(("content-length", str(len(reply.body))))
        if reply.connection_close_header:
            headers.append(("connection", "close"))
        await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        parts = [reply.body] if reply.body is not None else list(reply.chunks)
        for i, part in enumerate(parts):
            if reply.close_after_chunks is not None and i == reply.close_after_chunks:
                return False
            if reply.gate is not None:
                await reply.gate(i)
            await stream.send_all(conn.send(h11.Data(data=part)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return True


def replies(*answers: Reply) -> Handler:
    """A handler that answers the requests in order (the last answer again after the list)."""
    queue = list(answers)

    async def handler(seen: Seen) -> Reply:
        if seen.target != openai_load.COMPLETIONS_PATH:
            return Reply(404, body=b'{"error": {"message": "no such route", "type": "not_found_error", '
                                   b'"param": null, "code": "not_found"}}', content_type="application/json")
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


@contextlib.asynccontextmanager
async def fake_server(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(handler, ssl_context)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


BODY = ServeRequest(None, (5, 6, 7), 4).openai_body("demo", ignore_eos=True)


def tracker(output_len: int = 4) -> Tracker:
    return Tracker(0, 3, output_len)


async def stream(pool: openai_load.ConnectionPool, t: Tracker, body: bytes = BODY) -> Tracker:
    with trio.fail_after(10):
        await pool.stream_completion(body, t)
    assert t.finished.is_set()  # on_end came, whatever happened
    return t


# ---- URLs, bodies, SSE ----------------------------------------------------------------------------------------


def test_http_endpoint_is_the_ws_urls_host_and_port() -> None:
    assert http_endpoint("ws://127.0.0.1:8000").url == "http://127.0.0.1:8000"
    assert http_endpoint("ws://localhost:9/some/path?q=1") == HttpEndpoint("http", "localhost", 9)
    assert http_endpoint("wss://example.com") == HttpEndpoint("https", "example.com", 443)
    assert http_endpoint("ws://example.com") == HttpEndpoint("http", "example.com", 80)
    assert http_endpoint("http://h:1") == HttpEndpoint("http", "h", 1)
    v6 = http_endpoint("ws://[::1]:8000")
    assert v6.host == "::1" and v6.authority == "[::1]:8000" and v6.url == "http://[::1]:8000"
    for bad in ("ftp://h:1", "ws://:80", "ws://h:99999", "127.0.0.1:8000", ""):
        with pytest.raises(ConfigError, match="not a server URL"):
            http_endpoint(bad)


def test_status_errors_read_as_the_benchmark_counts_them() -> None:
    assert str(HttpStatusError(429, "slow down", "too_many_requests")) == "HTTP 429 too_many_requests: slow down"
    assert str(HttpStatusError(500, "boom")) == "HTTP 500: boom"
    e = HttpStatusError(404, "unknown model 'x'", "unknown_model")
    assert (e.status, e.code, e.message) == (404, "unknown_model", "unknown model 'x'")


def test_completion_body_carries_what_the_websocket_frame_does() -> None:
    ids = json.loads(ServeRequest(None, (3, 4), 7).openai_body("demo", ignore_eos=True))
    assert ids == {
        "model": "demo",
        "prompt": [3, 4],
        "max_tokens": 7,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    frame = json.loads(ServeRequest(None, (3, 4), 7).frame("r", "demo", ignore_eos=True))
    for key in ("model", "max_tokens", "temperature", "ignore_eos"):
        assert ids[key] == frame[key]
    assert ids["prompt"] == frame["prompt_token_ids"]
    text = json.loads(ServeRequest("Hello", None, 2).openai_body(None, ignore_eos=False))
    assert text["prompt"] == "Hello" and "model" not in text and "ignore_eos" not in text
    raw = completion_body(model="m", prompt="p", prompt_token_ids=None, max_tokens=1, temperature=0.5, ignore_eos=False)
    assert json.loads(raw)["temperature"] == 0.5 and b" " not in raw.replace(b'"p"', b"")  # compact


STREAM = (
    b": a comment line\n"
    b'data: {"a": 1}\n\n'
    b"event: ignored\nid: 7\nretry: 10\ndata: two\ndata:  lines\n\n"
    b"data\n\n"  # a field without a colon: data is "" and no event fires
    b"\n\n"  # blank lines with no data: nothing
    b"data:[DONE]\n\n"
    b"data: unterminated"  # never ended by a blank line: dropped
)
EVENTS = ['{"a": 1}', "two\n lines", "[DONE]"]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_sse_parser_events_whatever_the_line_ends(newline: bytes) -> None:
    data = STREAM.replace(b"\n", newline)
    assert SseParser().feed(data) == EVENTS
    assert SseParser().feed(b"\xef\xbb\xbf" + data) == EVENTS  # a byte-order mark first is skipped
    # Cut anywhere, byte by byte included: the same events.
    for cut in range(len(data) + 1):
        parser = SseParser()
        assert parser.feed(data[:cut]) + parser.feed(data[cut:]) == EVENTS, cut
    parser = SseParser()
    assert [e for b in (b"\xef\xbb\xbf" + data) for e in parser.feed(bytes([b]))] == EVENTS


def test_sse_parser_utf8_and_bytearrays() -> None:
    text = "données ✓ 日本"
    raw = bytearray(b"data: " + text.encode() + b"\n\n")
    parser = SseParser()
    out = [e for i in range(len(raw)) for e in parser.feed(raw[i : i + 1])]
    assert out == [text]
    assert SseParser().feed(b"data: \xff\n\n") == ["\ufffd"]  # invalid UTF-8 is replaced, not raised


# ---- one connection, reused -------------------------------------------------------------------------------------


async def test_streams_over_one_keep_alive_connection() -> None:
    async with fake_server(replies(Reply(chunks=stream_of(1, 2, 1, prompt=3)))) as server:
        async with open_pool(server.endpoint, 1, api_key="sk-test") as pool:
            done = [await stream(pool, tracker()) for _ in range(3)]
            stats = pool.statistics()
    for t in done:
        assert t.ok and t.tokens == 4 and len(t.token_times) == 3 and t.finish_reason == "length"
        assert t.prompt_tokens == 3 and t.error is None
        assert t.sent <= t.token_times[0] <= t.token_times[-1] <= t.done
    assert server.connections == 1 and len(server.seen) == 3  # one TCP connection carried all three
    assert {s.connection for s in server.seen} == {1}
    assert (stats.connections, stats.connects, stats.stale_retries, stats.waited) == (1, 1, 0, 0)
    seen = server.seen[0]
    assert (seen.method, seen.target) == ("POST", "/v1/completions")
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.headers["content-type"] == "application/json" and seen.headers["accept"] == "text/event-stream"
    assert seen.headers["host"] == f"127.0.0.1:{server.port}"
    assert seen.json()["prompt"] == [5, 6, 7] and seen.json()["return_token_ids"] is True
    assert "authorization" not in str(pool.statistics())


async def test_a_request_waits_for_a_free_connection() -> None:
    release = trio.Event()

    async def gate(i: int) -> None:
        if i == 0:
            await release.wait()

    async with fake_server(replies(Reply(chunks=stream_of(1, 1), gate=gate))) as server:
        async with open_pool(server.endpoint, 2) as pool:
            trackers = [tracker() for _ in range(5)]
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for t in trackers:
                        nursery.start_soon(pool.stream_completion, BODY, t)
                    await server.wait_for(lambda: len(server.seen) >= 2)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(server.seen) == 2  # the other three wait in the pool, not on the wire
                    release.set()
            stats = pool.statistics()
    assert all(t.ok and t.tokens == 2 for t in trackers)
    assert server.connections == 2 and server.max_in_flight == 2 and len(server.seen) == 5
    assert stats.connects == 2 and stats.waited == 3 and len(stats.wait_s) == 5
    assert all(w >= 0 for w in stats.wait_s) and max(stats.wait_s) > 0


# ---- what goes wrong ----------------------------------------------------------------------------------------------


OVERLOADED = json.dumps({"error": {"message": "the model's queue is full; retry later", "type": "server_error",
                                   "param": None, "code": "overloaded"}}).encode()


async def test_an_error_status_names_status_code_and_message_and_keeps_the_connection() -> None:
    answers = replies(
        Reply(503, body=OVERLOADED, content_type="application/json"),
        Reply(502, body=b"bad gateway\n", content_type="text/plain"),
        Reply(chunks=stream_of(2)),
    )
    async with fake_server(answers) as server:
        async with open_pool(server.endpoint, 1) as pool:
            first, second, third = [await stream(pool, tracker()) for _ in range(3)]
    assert first.error == "HTTP 503 overloaded: the model's queue is full; retry later" and not first.ok
    assert second.error == "HTTP 502: bad gateway"
    assert third.ok and third.tokens == 2
    assert server.connections == 1  # an error answered whole leaves the connection usable
    s = summarize([first, second, third], {})
    assert s["errors"] == {"HTTP 503 overloaded": 1, "HTTP 502": 1} and s["completed"] == 1
    assert s["error_examples"]["HTTP 503 overloaded"] == first.error


async def test_an_in_band_error_event_fails_the_request() -> None:
    error = sse({"error": {"message": "the step failed", "type": "server_error", "param": None,
                           "code": "model_error"}})
    answers = replies(Reply(chunks=[chunk([1]), error, DONE]), Reply(chunks=stream_of(1)))
    async with fake_server(answers) as server:
        async with open_pool(server.endpoint, 1) as pool:
            failed = await stream(pool, tracker())
            after = await stream(pool, tracker())
    assert failed.error == "model_error: the step failed" and not failed.ok
    assert len(failed.token_times) == 1  # what came before the error was seen
    assert after.ok and server.connections == 1
    assert summarize([failed], {})["errors"] == {"model_error": 1}


@pytest.mark.parametrize(
    "reply,message",
    [
        (Reply(chunks=stream_of(1, 1)[:-1]), "incomplete stream: the response ended without data: [DONE]"),
        (Reply(chunks=[b"data: {oops\n\n", DONE]), "bad stream: an event's data is not JSON"),
        (Reply(chunks=[b"data: [1, 2]\n\n", DONE]), "bad stream: an event's data is not a JSON object"),
        (Reply(body=b'{"choices": []}', content_type="application/json"),
         "not a stream: HTTP 200 with Content-Type 'application/json', not text/event-stream"),
    ],
)
async def test_a_malformed_stream_is_an_error(reply: Reply, message: str) -> None:
    async with fake_server(replies(reply)) as server:
        async with open_pool(server.endpoint, 1) as pool:
            t = await stream(pool, tracker())
    assert t.error is not None and t.error.startswith(message) and not t.ok


async def test_a_server_that_closes_mid_stream() -> None:
    answers = replies(Reply(chunks=stream_of(1, 1, 1), close_after_chunks=2), Reply(chunks=stream_of(3)))
    async with fake_server(answers) as server:
        async with open_pool(server.endpoint, 1) as pool:
            cut = await stream(pool, tracker())
            after = await stream(pool, tracker())
            stats = pool.statistics()
    assert cut.error is not None and cut.error.startswith("connection closed: in the middle of the answer")
    assert len(cut.token_times) == 2 and not cut.ok
    assert summarize([cut], {})["errors"] == {"connection closed": 1}
    # The broken connection is dropped and the next request gets a new one; no request is resent
    # once the server has answered part of it.
    assert after.ok and after.tokens == 3
    assert (server.connections, stats.connects, stats.stale_retries, len(server.seen)) == (2, 2, 0, 2)


async def test_an_idle_connection_the_server_closed_is_replaced_and_the_request_resent() -> None:
    answers = replies(Reply(chunks=stream_of(1), close_connection=True), Reply(chunks=stream_of(2)))
    async with fake_server(answers) as server:
        async with open_pool(server.endpoint, 1) as pool:
            first = await stream(pool, tracker())
            with trio.fail_after(10):  # the server closes it while it sits idle in the pool
                await server.wait_for(lambda: server.closed >= 1)
            second = await stream(pool, tracker())
            stats = pool.statistics()
    assert first.ok and second.ok and second.tokens == 2
    assert (stats.connects, stats.stale_retries, server.connections, len(server.seen)) == (2, 1, 2, 2)


async def test_connection_close_header_opens_a_new_connection_without_a_retry() -> None:
    answers = replies(Reply(chunks=stream_of(1), connection_close_header=True), Reply(chunks=stream_of(1)))
    async with fake_server(answers) as server:
        async with open_pool(server.endpoint, 1) as pool:
            assert (await stream(pool, tracker())).ok and (await stream(pool, tracker())).ok
            stats = pool.statistics()
    assert (stats.connects, stats.stale_retries, server.connections) == (2, 0, 2)


async def test_a_cancelled_request_never_leaves_its_connection_in_the_pool() -> None:
    never = trio.Event()

    async def gate(i: int) -> None:
        if i == 1:
            await never.wait()

    answers = replies(Reply(chunks=stream_of(1, 1), gate=gate), Reply(chunks=stream_of(1)))
    async with fake_server(answers) as server:
        async with open_pool(server.endpoint, 1) as pool:
            t = tracker()
            observer = Signalling(t)
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pool.stream_completion, BODY, observer)
                    await observer.seen(1)  # one chunk in: the response is half read
                    nursery.cancel_scope.cancel()
            assert not t.finished.is_set()
            after = await stream(pool, tracker())
            stats = pool.statistics()
    assert after.ok and stats.connects == 2 and server.connections == 2


async def test_without_token_ids_the_usage_chunk_counts_the_tokens() -> None:
    chunks = [chunk(None, "ab"), chunk(None, ""), chunk(None, "c"), chunk(None, "", finish="stop"), usage(4, 5), DONE]
    no_usage = [chunk(None, "ab"), chunk(None, "c"), chunk(None, "", finish="stop"), DONE]
    async with fake_server(replies(Reply(chunks=chunks), Reply(chunks=no_usage))) as server:
        async with open_pool(server.endpoint, 1) as pool:
            counted = await stream(pool, tracker())
            guessed = await stream(pool, tracker())
    # Two chunks carried text (the empty one is no token chunk): the times; the usage: the count.
    assert counted.ok and counted.tokens == 5 and len(counted.token_times) == 2 and counted.prompt_tokens == 4
    assert counted.finish_reason == "stop"
    assert guessed.ok and guessed.tokens == 2 and guessed.prompt_tokens is None  # one per chunk at least


async def test_an_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as s:  # bound, never listening: nothing answers there
        s.bind(("127.0.0.1", 0))
        endpoint = HttpEndpoint("http", "127.0.0.1", s.getsockname()[1])
        with trio.fail_after(10), pytest.raises(ServerUnreachable) as info:
            async with open_pool(endpoint, 3):
                pass
    assert str(info.value).startswith(f"cannot connect to {endpoint.url}: ")
    assert "is a server running there" in str(info.value)
    with pytest.raises(ConfigError, match="at least 1 connection"):
        openai_load.ConnectionPool(endpoint, 0)


async def test_a_pool_whose_server_went_away_fails_each_request_in_words() -> None:
    server = FakeOpenAI(replies(Reply(chunks=stream_of(1))))
    server_scope = trio.CancelScope()

    async def run_server(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with server_scope:
            await server.run(task_status=task_status)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server)
            async with open_pool(server.endpoint, 1) as pool:
                assert (await stream(pool, tracker())).ok
                server_scope.cancel()  # the server stops: its listener and connections close
                await server.wait_for(lambda: server.closed >= 1)
                gone = await stream(pool, tracker())
                stats = pool.statistics()
    # The idle connection was dead: resent once on a new one, which cannot be made.
    assert gone.error is not None and not gone.ok
    assert gone.error.startswith(f"connection closed: cannot connect to http://127.0.0.1:{server.port}: ")
    assert stats.stale_retries == 1 and summarize([gone], {})["errors"] == {"connection closed": 1}


# ---- manual clock: the timings -----------------------------------------------------------------------------------


class Signalling:
    """A Tracker's observer that also lets the server wait until the client has seen each chunk."""

    def __init__(self, inner: Tracker) -> None:
        self.inner = inner
        self.outputs = 0
        self._changed = trio.Event()

    def on_sent(self, now: float) -> None:
        self.inner.on_sent(now)

    def on_output(self, now: float, token_count: int) -> None:
        self.inner.on_output(now, token_count)
        self.outputs += 1
        self._changed.set()
        self._changed = trio.Event()

    def on_end(self, now: float, completion: Completion) -> None:
        self.inner.on_end(now, completion)

    async def seen(self, outputs: int) -> None:
        while self.outputs < outputs:
            await self._changed.wait()


@pytest.mark.timeout(30)
async def test_ttft_itl_tpot_e2e_from_the_chunks(mock_clock: trio.testing.MockClock) -> None:
    """Time moves only when the server says: 50 ms to the first token, then 20 and 30 ms, then 10 ms
    to the end. The manual clock has rate 0, so this test leans on the module's timeout alone."""
    t = Tracker(0, 3, 4)
    observer = Signalling(t)
    steps = {0: (0, 0.050), 1: (1, 0.020), 2: (2, 0.030), 3: (3, 0.010)}  # chunk -> (outputs seen first, jump)

    async def gate(i: int) -> None:
        if i in steps:
            outputs, jump = steps[i]
            await observer.seen(outputs)
            mock_clock.jump(jump)

    start = trio.current_time()
    chunks = [chunk([1]), chunk([2]), chunk([3, 4]), chunk([], "", finish="length"), usage(3, 4) + DONE]
    async with fake_server(replies(Reply(chunks=chunks, gate=gate))) as server:
        async with open_pool(server.endpoint, 1) as pool:
            await pool.stream_completion(BODY, observer)
    assert t.ok and t.tokens == 4 and t.sent == start
    assert t.ttft_ms == pytest.approx(50)
    assert t.itls_ms() == pytest.approx([20, 30])
    assert t.e2e_ms == pytest.approx(110)
    assert t.tpot_ms == pytest.approx((110 - 50) / 3)
    s = summarize([t], {"ttft": 60})
    assert s["ttft_ms"]["median"] == pytest.approx(50) and s["itl_ms"]["max"] == pytest.approx(30)
    assert s["goodput"] == pytest.approx(1 / 0.110, rel=1e-3)


# ---- TLS (a wss:// URL means https://) ------------------------------------------------------------------------


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """(key, certificate) for 127.0.0.1, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return key, cert


async def test_https_with_a_self_signed_certificate(self_signed: tuple[Path, Path]) -> None:
    key, cert = self_signed
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    async with fake_server(replies(Reply(chunks=stream_of(2, 1))), server_context) as server:
        async with open_pool(server.endpoint, 1, ssl_context=client_context) as pool:
            first = await stream(pool, tracker())
            second = await stream(pool, tracker())
        with pytest.raises(ServerUnreachable, match="cannot connect to https://"):  # the system's CAs: refused
            async with open_pool(server.endpoint, 1):
                pass
    assert first.ok and second.ok and first.tokens == 3 and server.connections == 2


# ---- the replay and the command --------------------------------------------------------------------------------


async def test_run_one_rate_over_openai_against_the_fake_server() -> None:
    requests = [ServeRequest(None, (1, 2, 3), 3), ServeRequest("hi", None, 3), ServeRequest(None, (4,), 3)]
    async with fake_server(replies(Reply(chunks=stream_of(1, 2)))) as server:
        with trio.fail_after(20):
            run = await run_one_rate(
                server.ws_url, requests, model="demo", request_rate=math.inf, burstiness=1.0, max_concurrency=None,
                connections=2, targets={}, label="t", progress_interval=None, backend="openai",
            )
    assert run["backend"] == "openai" and run["completed"] == 3 and run["output_tokens"] == 9
    assert run["prompt_tokens"] == 9 and run["token_frames"] == 6
    assert run["server"] == {}  # this server answers no stats frame (it speaks no WebSocket)
    client = run["http_client"]
    assert (client["connections"], client["connects"], client["requests_waited"]) == (2, 2, 1)
    assert client["connection_wait_ms"]["max"] >= 0
    posts = [s for s in server.seen if s.target == openai_load.COMPLETIONS_PATH]
    assert sorted(json.dumps(s.json()["prompt"]) for s in posts) == ['"hi"', "[1, 2, 3]", "[4]"]
    assert len({s.connection for s in posts}) == 2
    # Before and after the run it asked for the server's statistics over a WebSocket of their own.
    upgrades = [s for s in server.seen if s.headers.get("upgrade", "").lower() == "websocket"]
    assert len(upgrades) == 2 and len(server.seen) == 5
    with pytest.raises(ConfigError, match="round_robin"):
        await bench_serve.replay(server.ws_url, requests, model=None, request_rate=math.inf, burstiness=1.0,
                                 max_concurrency=None, connections=1, backend="openai", round_robin=True)


async def test_the_openai_check_before_any_run() -> None:
    models = json.dumps({"object": "list", "data": [{"id": "demo", "object": "model"}]}).encode()

    async def handler(seen: Seen) -> Reply:
        if seen.headers.get("authorization") != "Bearer right-é":  # UTF-8, as the server reads it
            return Reply(401, body=b'{"error": {"message": "invalid API key", "type": "authentication_error", '
                                   b'"param": null, "code": "invalid_api_key"}}', content_type="application/json")
        if seen.target == "/v1/models":
            return Reply(body=models, content_type="application/json")
        return Reply(404, body=b"{}", content_type="application/json")

    async with fake_server(handler) as server:
        with trio.fail_after(10):
            await bench_serve._check_openai(server.ws_url, "demo", "right-é")
            with pytest.raises(ConfigError, match="does not list 'other' \\(it lists demo\\)"):
                await bench_serve._check_openai(server.ws_url, "other", "right-é")
            with pytest.raises(ConfigError) as info:
                await bench_serve._check_openai(server.ws_url, "demo", "wrong")
    assert "HTTP 401 invalid_api_key: invalid API key" in str(info.value)
    assert str(info.value).startswith(f"--backend openai: http://127.0.0.1:{server.port} answered GET /v1/models")

    async def not_openai(seen: Seen) -> Reply:
        return Reply(404, body=b"Not Found", content_type="text/plain")

    async with fake_server(not_openai) as server:
        with trio.fail_after(10), pytest.raises(ConfigError, match="HTTP 404: Not Found .does the server serve"):
            await bench_serve._check_openai(server.ws_url, "demo", None)


def test_backend_flag_parses_lists_and_repeats() -> None:
    def config(*flags: str) -> ServeBenchConfig:
        args = cli.build_parser().parse_args(["bench", "serve", *flags])
        return bench_serve.config_from(args)

    assert config().backends == ("websocket",)
    assert config("--backend", "openai").backends == ("openai",)
    assert config("--backend", "websocket,openai").backends == ("websocket", "openai")
    assert config("--backend", "openai", "--backend", "websocket").backends == ("openai", "websocket")
    assert config("--backend", "openai, websocket,openai").backends == ("openai", "websocket")
    assert config("--api-key", "k1").api_key == "k1"
    assert "k1" not in repr(config("--api-key", "k1"))
    with pytest.raises(ConfigError, match="--backend takes websocket or openai"):
        attrs.evolve(config(), backends=())


def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINI_VLLM_API_KEY", "from-env")
    args = cli.build_parser().parse_args(["bench", "serve"])
    assert bench_serve.config_from(args).api_key == "from-env"
    args = cli.build_parser().parse_args(["bench", "serve", "--api-key", "flag"])
    assert bench_serve.config_from(args).api_key == "flag"
    monkeypatch.setenv("MINI_VLLM_API_KEY", "")
    assert bench_serve.config_from(cli.build_parser().parse_args(["bench", "serve"])).api_key is None


@pytest.mark.parametrize("value", ["grpc", "", "websocket,", "openai,http"])
def test_a_bad_backend_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "serve", "--backend", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "is not a backend: give websocket or openai" in err and "Traceback" not in err


def test_the_api_key_never_reaches_the_record() -> None:
    argv = ["bench", "serve", "--api-key", "sk-1", "--url", "ws://h:1", "--api-key=sk-2"]
    assert bench_serve._redacted(argv) == [
        "bench", "serve", "--api-key", "REDACTED", "--url", "ws://h:1", "--api-key=REDACTED"
    ]


def test_table_puts_backends_side_by_side() -> None:
    import io

    def run(backend: str, rate: float | None, failed: int = 0) -> dict[str, Any]:
        d = {"mean": 1.0, "median": 1.0, "p90": 1.0, "p99": 2.0, "max": 2.0}
        return {
            "backend": backend, "request_rate": rate, "completed": 4 - failed, "num_requests": 4,
            "failed": failed, "errors": {"HTTP 503 overloaded": failed} if failed else {},
            "error_examples": {"HTTP 503 overloaded": "HTTP 503 overloaded: full"} if failed else {},
            "request_throughput": 1.0, "output_throughput": 10.0, "goodput": None, "server": {},
            "ttft_ms": d, "tpot_ms": d, "itl_ms": d, "e2el_ms": d,
        }

    record = {"label": "x", "workload": "w", "cpu": "c", "burstiness": 1.0,
              "runs": [run("websocket", None), run("openai", None, failed=1)]}
    out = io.StringIO()
    bench_serve.print_table(record, out)
    lines = out.getvalue().splitlines()
    assert lines[2].startswith("backend ") and lines[3].startswith("websocket ") and lines[4].startswith("openai ")
    assert "  openai @ inf: 1 failed with HTTP 503 overloaded: full" in lines
    single = {**record, "runs": [run("websocket", None)]}
    out = io.StringIO()
    bench_serve.print_table(single, out)
    assert out.getvalue().splitlines()[2].startswith("   rate ")  # one websocket backend: the table as before


# ---- both backends against a live demo-model server -------------------------------------------------------------

DATASET = [
    {"prompt": "Hello there", "max_tokens": 6},
    {"prompt_token_ids": [5, 6, 7, 8, 9], "max_tokens": 3},
    {"prompt": "The quick brown fox", "max_tokens": 5},
    {"prompt_token_ids": [40, 41], "max_tokens": 9},
]


def _write_dataset(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in DATASET))
    return path


async def test_both_backends_against_a_live_server(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Awaits the front door (Server(..., routes=...)) and the OpenAI routes of issue 13.
    from mini_vllm.actors import open_service
    from mini_vllm.actors.task_group import open_task_group
    from mini_vllm.transport.server import Server, ServerLimits

    spy = Spy(monkeypatch)
    config = ServeBenchConfig(
        url=None, model=None, dataset=_write_dataset(tmp_path / "d.jsonl"), num_prompts=None, dataset_max_tokens=4,
        request_rates=(math.inf,), burstiness=1.0, max_concurrency=None, connections=2, targets={}, sweep=False,
        label="both", warmup_requests=1, backends=("websocket", "openai"), api_key="sk-live",
    )
    with trio.fail_after(60):
        async with open_service([build_engine(demo_model_dir)]) as service, open_task_group() as nursery:
            limits = ServerLimits(client_key="off")
            server = Server(service, limits, api_keys=("sk-live",))
            await nursery.start(server.run, "127.0.0.1", 0)
            record = await bench_serve._bench(config, server.url)
            await wait_blocks_released(service)
            with pytest.raises(ConfigError) as refused:  # no key: refused in words, before any request
                await bench_serve._bench(attrs.evolve(config, api_key=None), server.url)
            nursery.cancel_scope.cancel()
    assert str(refused.value).startswith(f"the server at {server.url} refused the WebSocket handshake with HTTP 401")
    assert str(refused.value).endswith("give its key with --api-key (or MINI_VLLM_API_KEY)")
    assert record["backends"] == ["websocket", "openai"]
    assert set(record["warmup"]["by_backend"]) == {"websocket", "openai"} and record["warmup"]["completed"] == 2
    ws, http = record["runs"]
    assert (ws["backend"], http["backend"]) == ("websocket", "openai")
    want = [r["max_tokens"] for r in DATASET]
    for run in (ws, http):
        assert run["completed"] == run["num_requests"] == 4 and run["failed"] == 0, run["errors"]
        assert run["output_tokens"] == sum(want)
        assert run["server"]["engine"]["generation_tokens"] == sum(want)  # stats over a WebSocket for both
    assert ws["prompt_tokens"] == http["prompt_tokens"]  # the same prompts, text tokenized alike
    assert http["http_client"]["connections"] == 2 and "frames_sent" not in http["server"]
    _, _, ws_trackers, http_trackers = spy.runs  # two warm-ups, then the runs
    assert [t.tokens for t in ws_trackers] == [t.tokens for t in http_trackers] == want
    assert [t.prompt_tokens for t in ws_trackers] == [t.prompt_tokens for t in http_trackers]
    assert all(t.finish_reason == "length" for t in http_trackers)


def test_bench_serve_in_process_with_both_backends_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Awaits the front door and the OpenAI routes of issue 13 (the in-process server wires them).
    out = tmp_path / "both.json"
    argv = ["bench", "serve", "--dataset", str(_write_dataset(tmp_path / "d.jsonl")), "--backend", "websocket,openai",
            "--sweep", "--request-rate", "400", "--request-rate", "100", "--goodput", "tpot:600000",
            "--warmup-requests", "1", "--connections", "2", "--max-model-len", "512",
            "--api-key", "never-written", "--output", str(out)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    text = out.read_text()
    record = json.loads(text)
    assert "never-written" not in text and "--api-key REDACTED" in record["command"]
    assert record["backends"] == ["websocket", "openai"]
    # One record per backend and rate, sorted by rate, the backends side by side.
    assert [(r["backend"], r["request_rate"], r["completed"], r["output_tokens"]) for r in record["runs"]] == [
        ("websocket", 100.0, 4, 23), ("openai", 100.0, 4, 23), ("websocket", 400.0, 4, 23), ("openai", 400.0, 4, 23)
    ]
    sweeps = record["sweep"]["by_backend"]
    assert set(sweeps) == {"websocket", "openai"}
    assert all(s["highest_rate_within_p99_targets"] == 400.0 for s in sweeps.values())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend "))
    assert [line.split()[:2] for line in lines[header + 1 : header + 5]] == [
        ["websocket", "100"], ["openai", "100"], ["websocket", "400"], ["openai", "400"]
    ]
    assert "openai: max output throughput" in stdout and "websocket: max output throughput" in stdout


def test_notes_say_what_skews_a_comparison() -> None:
    wait = {"mean": 1.0, "median": 1.0, "p90": 1.0, "p99": 12.5, "max": 13.0}
    run = {"num_requests": 10, "prompt_tokens": 1000, "http_client": {"requests_waited": 6, "connections": 4,
                                                                      "connection_wait_ms": wait},
           "server": {"engine": {"prompt_tokens_computed": 400}}}
    pool, cache = bench_serve._notes(run)
    assert pool.startswith("6 of 10 requests waited for a free HTTP connection (p99 12.5 ms")
    assert "--connections 10" in pool and "--max-concurrency 4" in pool
    assert cache.startswith("the server computed 400 of 1,000 prompt tokens") and "--no-enable-prefix-caching" in cache
    quiet = {**run, "http_client": {**run["http_client"], "requests_waited": 0},
             "server": {"engine": {"prompt_tokens_computed": 1000}}}
    assert bench_serve._notes(quiet) == []
    assert bench_serve._notes({"num_requests": 1, "prompt_tokens": 5, "server": {}}) == []


async def test_a_connection_opened_ahead_and_closed_by_the_servers_idle_timeout_is_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The pool opens every connection before the first request; one that the real server closed
    # while it waited (its idle timeout) is found dead when a request goes out, and the request is
    # sent again on a new connection: nothing was asked on the old one, so nothing ran twice.
    from test_front_door import FakeService

    from mini_vllm.actors.task_group import open_task_group
    from mini_vllm.transport.server import Server, ServerLimits

    with trio.fail_after(100):
        async with open_task_group() as nursery:
            server = Server(FakeService(), ServerLimits(idle_timeout=2.0))  # type: ignore[arg-type]
            await nursery.start(server.run, "127.0.0.1", 0)
            async with open_pool(openai_load.http_endpoint(server.url), 1) as pool:
                await trio.sleep(5.0)  # past the idle timeout: the server has closed it
                assert (await pool.get_json("/version"))["version"]
                stats = pool.statistics()
            nursery.cancel_scope.cancel()
    assert (stats.connects, stats.stale_retries) == (2, 1)
