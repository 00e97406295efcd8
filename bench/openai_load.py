"""The OpenAI-compatible side of ``mini-vllm bench serve --backend openai``: streamed
``POST /v1/completions`` over HTTP/1.1 keep-alive connections, on trio and h11 directly.

A load generator that holds a thousand streams must stay cheap per chunk, so there is no HTTP
client library in between: h11 frames the requests and undoes the chunked transfer encoding,
``SseParser`` cuts the body into Server-Sent Events, and each event costs one ``json.loads`` and a
few dictionary reads. ``trio.current_time()`` is read once per socket read, and every event of that
read gets the same timestamp (as the WebSocket path stamps a frame when it arrives).

- ``ConnectionPool`` holds ``size`` connections, opened before the first request so that no TTFT
  pays for a TCP handshake. HTTP/1.1 carries one request at a time per connection: a request waits
  for a free one (fairly, in arrival order; the waits are counted). A connection the server closed
  while it sat idle (its idle timeout; opened ahead or kept alive) is found out when a request on
  it gets no byte back; that request is sent once more on a fresh connection, as HTTP clients do
  for a stale keep-alive.
- ``stream_completion`` sends one request and reports to a ``CompletionObserver``: when the bytes
  went out, each chunk that carries output (with how many ``token_ids`` it has, vLLM's
  ``return_token_ids``), and how it ended (``Completion``): the finish reason, the output tokens
  (the ids counted, or the final usage chunk's ``completion_tokens`` for a server that sends no
  ids), the prompt tokens, or the error: a status other than 200 with the OpenAI error message, an
  in-band ``{"error": ...}`` event, a stream without ``data: [DONE]``, a connection that closed.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, Protocol

import attrs
import h11
import trio

from mini_vllm.engine.errors import ConfigError, MiniVllmError

Scheme = Literal["http", "https"]
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
CONNECT_TIMEOUT_S = 10.0
RECEIVE_BYTES = 64 << 10
MAX_ERROR_BODY_BYTES = 1 << 20  # an error answer longer than this is cut (and its connection closed)
MAX_JSON_BODY_BYTES = 16 << 20
CONCURRENT_CONNECTS = 64  # opening a thousand connections at once would overflow a listen backlog
USER_AGENT = b"mini-vllm-bench"
Header = tuple[bytes, bytes]
_STREAM_HEADERS: tuple[Header, ...] = ((b"content-type", b"application/json"), (b"accept", b"text/event-stream"))
_JSON_HEADERS: tuple[Header, ...] = ((b"accept", b"application/json"),)
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_Broken = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.RemoteProtocolError)


# ---- where to connect ---------------------------------------------------------------------------------------------


@attrs.frozen
class HttpEndpoint:
    scheme: Scheme
    host: str
    port: int

    @property
    def authority(self) -> str:
        """``host:port`` as the Host header and URLs write it (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"


def http_endpoint(url: str) -> HttpEndpoint:
    """The HTTP side of the server at ``url``: the one port serves WebSocket and HTTP, so a
    ``ws://HOST:PORT`` URL means ``http://HOST:PORT`` (``wss://`` means ``https://``); an
    ``http(s)://`` URL is taken as it is. The path is ignored."""
    schemes: dict[str, Scheme] = {"ws": "http", "http": "http", "wss": "https", "https": "https"}
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number in range
        raise ConfigError(f"not a server URL: {url!r} (give ws://HOST:PORT or http://HOST:PORT)") from None
    scheme = schemes.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ConfigError(f"not a server URL: {url!r} (give ws://HOST:PORT or http://HOST:PORT)")
    return HttpEndpoint(scheme, parts.hostname, port or (443 if scheme == "https" else 80))


# ---- errors --------------------------------------------------------------------------------------------------------


class ServerUnreachable(MiniVllmError):
    """No TCP (or TLS) connection to the server could be made."""


class HttpStatusError(MiniVllmError):
    """The server answered with a status other than 200; the message is the OpenAI error's."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        self.status = status
        self.message = message
        self.code = code
        # "HTTP 429 too_many_requests: ..." : the benchmark counts errors by what precedes the colon.
        super().__init__(f"HTTP {status} {code}: {message}" if code else f"HTTP {status}: {message}")


def status_error(status: int, reason: bytes, body: bytes, truncated: bool) -> HttpStatusError:
    """OpenAI's ``{"error": {"message", "type", "code"}}`` (or vLLM's older flat shape); any other
    body is shown as text."""
    message, code = "", None
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(value, dict) and value.get("object") == "error":
        error = value
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        raw_code = error.get("code") or error.get("type")
        code = None if raw_code is None else str(raw_code)
    elif isinstance(error, str):
        message = error
    if not message:
        text = body.decode("utf-8", "replace").strip()
        message = (text[:300] + ("..." if truncated or len(text) > 300 else "")) or reason.decode("latin-1")
        message = message or "(no message)"
    return HttpStatusError(status, message, code)


# ---- Server-Sent Events ---------------------------------------------------------------------------------------


class SseParser:
    """Server-Sent Events from a byte stream cut anywhere: ``feed`` returns the ``data`` of every
    event completed so far (several ``data:`` lines of one event joined by newlines). Lines end with
    CRLF, LF or CR; a blank line ends an event; ``:`` lines are comments; other fields (``event``,
    ``id``, ``retry``) mean nothing to OpenAI's stream and are skipped. An event the stream never
    finished with a blank line is dropped, as the specification says."""

    def __init__(self) -> None:
        self._pending = b""  # the start of a line not yet ended
        self._data: list[str] = []  # the data lines of the event being read
        self._started = False

    def feed(self, chunk: bytes | bytearray) -> list[str]:
        buf = self._pending + chunk
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._pending = buf  # wait: a byte-order mark may be coming
                return []
            self._started = True
            if buf.startswith(_BOM):
                buf = buf[len(_BOM) :]
        hold = b""
        if buf.endswith(b"\r"):  # may be the first half of a CRLF: decide with the next chunk
            buf, hold = buf[:-1], b"\r"
        lines = _LINE_END.split(buf) if b"\r" in buf else buf.split(b"\n")
        self._pending = lines.pop() + hold
        events: list[str] = []
        for line in lines:
            if not line:
                if self._data:
                    data = "\n".join(self._data)
                    self._data = []
                    if data:
                        events.append(data)
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                self._data.append((value[1:] if value.startswith(b" ") else value).decode("utf-8", "replace"))
        return events


# ---- one streamed completion ------------------------------------------------------------------------------------


@attrs.frozen
class Completion:
    """How one streamed completion ended."""

    finish_reason: str | None
    output_tokens: int
    prompt_tokens: int | None
    error: str | None = None  # "CODE: message", or None when the stream was whole


class CompletionObserver(Protocol):
    """What ``stream_completion`` reports, as it happens (times are ``trio.current_time()``)."""

    def on_sent(self, now: float) -> None:
        """The request is being written to its connection (again, if a stale one made it resend)."""

    def on_output(self, now: float, token_count: int) -> None:
        """A chunk that carries output arrived, with this many token ids (0: the server sends none)."""

    def on_end(self, now: float, completion: Completion) -> None:
        """The request ended, whole or not; called exactly once."""


class _StreamReader:
    """The OpenAI completion chunks of one response, as the SSE parser hands out their data."""

    def __init__(self, observer: CompletionObserver) -> None:
        self.observer = observer
        self.ids = 0
        self.chunks_without_ids = 0  # chunks with text but no token_ids: a server without return_token_ids
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.error: str | None = None
        self.done_at = math.nan

    def on_data(self, now: float, data: str) -> None:
        if data == "[DONE]":
            self.done_at = now
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self._bad(f"an event's data is not JSON: {data[:120]!r}")
            return
        if not isinstance(chunk, dict):
            self._bad(f"an event's data is not a JSON object: {data[:120]!r}")
            return
        if "error" in chunk or chunk.get("object") == "error":
            self._in_band_error(chunk)
            return
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                self._bad(f"a choice is not an object: {choice!r:.120}")
                return
            ids = choice.get("token_ids")
            if ids:
                self.ids += len(ids)
                self.observer.on_output(now, len(ids))
            elif ids is None and choice.get("text"):
                self.chunks_without_ids += 1
                self.observer.on_output(now, 0)
            reason = choice.get("finish_reason")
            if reason is not None:
                self.finish_reason = str(reason)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = _count(usage.get("prompt_tokens"), self.prompt_tokens)
            self.completion_tokens = _count(usage.get("completion_tokens"), self.completion_tokens)

    def _in_band_error(self, chunk: dict[str, Any]) -> None:
        error = chunk if chunk.get("object") == "error" else chunk.get("error")
        if isinstance(error, dict):
            code = error.get("code") or error.get("type") or "error"
            self.error = self.error or f"{code}: {error.get('message') or ''}"
        else:
            self.error = self.error or f"error: {error}"

    def _bad(self, what: str) -> None:
        self.error = self.error or f"bad stream: {what}"

    def result(self) -> Completion:
        if self.chunks_without_ids:  # no ids to count: the usage chunk's count, or one per chunk at least
            tokens = self.completion_tokens if self.completion_tokens is not None else self.ids + self.chunks_without_ids
        else:
            tokens = self.ids
        error = self.error
        if error is None and math.isnan(self.done_at):
            error = "incomplete stream: the response ended without data: [DONE]"
        return Completion(self.finish_reason, tokens, self.prompt_tokens, error)


def _count(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# ---- one HTTP/1.1 connection --------------------------------------------------------------------------------------


class _NoAnswer(Exception):
    """The connection broke before the server sent a byte of its answer."""


class HttpConnection:
    """One keep-alive connection: a request, its whole response, then the next request."""

    def __init__(self, stream: trio.abc.Stream, endpoint: HttpEndpoint, headers: Sequence[Header]) -> None:
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT)
        self._headers = [(b"host", _host_header(endpoint.authority)), (b"user-agent", USER_AGENT), *headers]
        self.requests = 0  # requests answered whole on this connection
        self.received_at = math.nan  # when the last bytes came in
        self._answered = False  # whether any byte of the current response came
        self._closed = False

    @classmethod
    async def open(
        cls, endpoint: HttpEndpoint, headers: Sequence[Header] = (), ssl_context: ssl.SSLContext | None = None
    ) -> HttpConnection:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                stream: trio.abc.Stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except trio.TooSlowError:
            raise ServerUnreachable(f"cannot connect to {endpoint.url}: no answer within {CONNECT_TIMEOUT_S:g} s") from None
        except OSError as exc:
            raise ServerUnreachable(
                f"cannot connect to {endpoint.url}: {exc.strerror or exc}: is a server running there (mini-vllm serve)?"
            ) from None
        if endpoint.scheme == "https":
            tls = trio.SSLStream(stream, ssl_context or ssl.create_default_context(),
                                 server_hostname=endpoint.host, https_compatible=True)
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    await tls.do_handshake()  # now: a refused certificate is this error, not a failed request
            except (trio.TooSlowError, trio.BrokenResourceError) as exc:
                await trio.aclose_forcefully(tls)
                why = f"no answer within {CONNECT_TIMEOUT_S:g} s" if isinstance(exc, trio.TooSlowError) else (
                    exc.__cause__ or exc)
                raise ServerUnreachable(f"cannot connect to {endpoint.url}: the TLS handshake failed: {why}") from None
            except BaseException:
                await trio.aclose_forcefully(tls)
                raise
            stream = tls
        return cls(stream, endpoint, headers)

    @property
    def reusable(self) -> bool:
        """Open and between requests: False after a broken, cut or cancelled exchange, or a
        response that asked to close (h11 then is in no IDLE state)."""
        return not self._closed and self._h11.our_state is h11.IDLE and self._h11.their_state is h11.IDLE

    async def aclose(self) -> None:
        self._closed = True
        await trio.aclose_forcefully(self._stream)

    async def send_request(self, method: str, path: str, body: bytes, headers: Sequence[Header] = ()) -> None:
        """Raises ``_NoAnswer`` when the connection is already broken."""
        self._answered = False
        data = self._h11.send(h11.Request(
            method=method, target=path, headers=[*self._headers, *headers, (b"content-length", b"%d" % len(body))]
        ))
        data += self._h11.send(h11.Data(data=body)) + self._h11.send(h11.EndOfMessage())
        try:
            await self._stream.send_all(data)
        except _Broken as exc:
            raise _NoAnswer(_reason(exc)) from None

    async def next_event(self) -> h11.Event:
        """The server's next event; ``_NoAnswer`` if the connection breaks before its first byte."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if not self._answered:
                    raise _NoAnswer(_reason(exc)) from None
                raise
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except _Broken as exc:
                if not self._answered:
                    raise _NoAnswer(_reason(exc)) from None
                raise
            self.received_at = trio.current_time()
            self._answered = self._answered or bool(data)
            self._h11.receive_data(data)

    async def read_body(self, limit: int) -> tuple[bytes, bool]:
        """The rest of the response body, at most ``limit`` bytes; (body, whether it was cut)."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                parts.append(bytes(event.data))
                size += len(event.data)
                if size > limit:  # the rest is never read: h11 stays mid-body, the connection is not reused
                    return b"".join(parts)[:limit], True
            elif isinstance(event, h11.EndOfMessage):
                self.end_cycle()
                return b"".join(parts), False
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the server closed the connection in the middle of a response")

    def end_cycle(self) -> None:
        """After a whole response: ready for the next request (unless it said Connection: close)."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self.requests += 1


def _host_header(authority: str) -> bytes:
    try:
        return authority.encode("ascii")
    except UnicodeEncodeError:  # an internationalized host name: its ASCII (punycode) form
        return authority.encode("idna")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _response(conn: HttpConnection) -> h11.Response:
    while True:
        event = await conn.next_event()
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.ConnectionClosed):
            raise _NoAnswer("the server closed the connection")
        # h11.InformationalResponse (100 Continue and the like): the real answer follows


def _header(response: h11.Response, name: bytes) -> str:
    for key, value in response.headers:
        if key == name:
            return value.decode("latin-1")
    return ""


# ---- the pool ----------------------------------------------------------------------------------------------------


@attrs.define
class _Slot:
    """A borrowed place in the pool: its connection (None: none open yet), which the borrower may replace."""

    conn: HttpConnection | None


@attrs.frozen
class PoolStats:
    connections: int  # the pool's size
    connects: int  # connections opened, the initial ones included
    stale_retries: int  # requests sent again because their idle connection had been closed
    waited: int  # requests that found every connection busy
    wait_s: tuple[float, ...]  # each request's wait for a connection, in seconds


class ConnectionPool:
    """``size`` keep-alive connections to one server; ``stream_completion`` borrows one per request."""

    def __init__(
        self, endpoint: HttpEndpoint, size: int, *, api_key: str | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        if size < 1:
            raise ConfigError(f"a connection pool needs at least 1 connection, got {size}")
        self.endpoint = endpoint
        self.size = size
        # UTF-8, as the server reads it (transport/auth.py): a key may hold any printable character.
        self._headers: tuple[Header, ...] = ((b"authorization", b"Bearer " + api_key.encode()),) if api_key else ()
        self._ssl_context = ssl_context
        self._idle: list[HttpConnection | None] = [None] * size  # None: a slot whose connection is closed
        self._free = trio.Semaphore(size)  # fair: waiters get a connection in arrival order
        self._connects = 0
        self._stale_retries = 0
        self._waited = 0
        self._wait_s: list[float] = []

    async def _connect(self) -> HttpConnection:
        conn = await HttpConnection.open(self.endpoint, self._headers, self._ssl_context)
        self._connects += 1
        return conn

    async def open_all(self) -> None:
        """Open every connection now (so that no measured request pays for a handshake)."""
        errors: list[ServerUnreachable] = []
        limiter = trio.CapacityLimiter(CONCURRENT_CONNECTS)

        async def one(slot: int) -> None:
            async with limiter:
                try:
                    self._idle[slot] = await self._connect()
                except ServerUnreachable as exc:
                    errors.append(exc)

        async with trio.open_nursery() as nursery:
            for slot, conn in enumerate(self._idle):
                if conn is None:
                    nursery.start_soon(one, slot)
        if errors:
            raise errors[0]

    async def aclose(self) -> None:
        idle, self._idle = self._idle, [None] * self.size
        for conn in idle:
            if conn is not None:
                await conn.aclose()

    @contextlib.asynccontextmanager
    async def _borrow(self) -> AsyncIterator[_Slot]:
        """A slot for one request; its connection goes back to the pool if it is still reusable."""
        if self._free.value == 0:
            self._waited += 1
        asked = trio.current_time()
        await self._free.acquire()
        self._wait_s.append(trio.current_time() - asked)
        slot = _Slot(self._idle.pop())
        try:
            yield slot
        finally:
            # Back first (an await below may raise Cancelled), then close what cannot be reused.
            conn = slot.conn
            reusable = conn is not None and conn.reusable
            self._idle.append(conn if reusable else None)
            self._free.release()
            if conn is not None and not reusable:
                await conn.aclose()

    async def _exchange(
        self, slot: _Slot, method: str, path: str, body: bytes, headers: Sequence[Header],
        observer: CompletionObserver | None,
    ) -> tuple[HttpConnection, h11.Response]:
        """Send the request on the slot's connection and read the response head. An idle
        connection that turns out to be closed (no byte back) is replaced and the request sent
        once more; ``_NoAnswer`` otherwise, ``ServerUnreachable`` if no new connection can be made."""
        may_retry = True
        while True:
            fresh = False
            if slot.conn is None or not slot.conn.reusable:
                if slot.conn is not None:
                    await slot.conn.aclose()
                    slot.conn = None
                slot.conn = await self._connect()
                fresh = True
            conn = slot.conn
            # A connection opened ahead (the pool opens them all at start) has waited idle like a
            # kept-alive one, and the server may have closed it just as this request went out.
            reused = not fresh
            if observer is not None:  # as the WebSocket path: the clock starts as the request goes out
                observer.on_sent(trio.current_time())
            try:
                await conn.send_request(method, path, body, headers)
                return conn, await _response(conn)
            except _NoAnswer:
                if not (reused and may_retry):
                    raise
                may_retry = False
                self._stale_retries += 1

    async def stream_completion(self, body: bytes, observer: CompletionObserver) -> None:
        """POST ``body`` (a completions request with ``stream: true``) and report its stream to
        ``observer``. What the server or the network did is never raised but ends up in the
        ``Completion``'s ``error``; ``observer.on_end`` is called once (unless this task is cancelled)."""
        async with self._borrow() as slot:
            try:
                conn, response = await self._exchange(slot, "POST", COMPLETIONS_PATH, body, _STREAM_HEADERS, observer)
                when, completion = await _read_stream(conn, response, observer)
            except (ServerUnreachable, _NoAnswer) as exc:
                when, completion = trio.current_time(), Completion(None, 0, None, f"connection closed: {exc}")
            except _Broken as exc:
                when = trio.current_time()
                completion = Completion(None, 0, None, f"connection closed: in the middle of the answer ({_reason(exc)})")
            observer.on_end(when, completion)

    async def get_json(self, path: str) -> Any:
        """``GET path``: the JSON body of a 200; ``HttpStatusError`` for any other status,
        ``ServerUnreachable`` when no connection can be made or it breaks."""
        async with self._borrow() as slot:
            try:
                conn, response = await self._exchange(slot, "GET", path, b"", _JSON_HEADERS, None)
                limit = MAX_JSON_BODY_BYTES if response.status_code == 200 else MAX_ERROR_BODY_BYTES
                body, truncated = await conn.read_body(limit)
            except (_NoAnswer, *_Broken) as exc:
                raise ServerUnreachable(
                    f"{self.endpoint.url} broke off the connection without answering GET {path}: {_reason(exc)}"
                ) from None
        if response.status_code != 200:
            raise status_error(response.status_code, response.reason, body, truncated)
        if truncated:
            raise MiniVllmError(f"{self.endpoint.url} answered GET {path} with more than {MAX_JSON_BODY_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise MiniVllmError(
                f"{self.endpoint.url} answered GET {path} with a body that is not JSON: {body[:120]!r}"
            ) from None

    def statistics(self) -> PoolStats:
        return PoolStats(self.size, self._connects, self._stale_retries, self._waited, tuple(self._wait_s))


async def _read_stream(
    conn: HttpConnection, response: h11.Response, observer: CompletionObserver
) -> tuple[float, Completion]:
    """The rest of one response to a streamed completion request: when it ended (the ``[DONE]``
    event, or the last bytes) and how."""
    if response.status_code != 200:
        body, truncated = await conn.read_body(MAX_ERROR_BODY_BYTES)
        error = status_error(response.status_code, response.reason, body, truncated)
        return conn.received_at, Completion(None, 0, None, str(error))
    content_type = _header(response, b"content-type")
    if not content_type.lower().startswith("text/event-stream"):
        await conn.read_body(MAX_ERROR_BODY_BYTES)
        return conn.received_at, Completion(
            None, 0, None, f"not a stream: HTTP 200 with Content-Type {content_type or 'none'!r}, not text/event-stream"
        )
    parser = SseParser()
    reader = _StreamReader(observer)
    while True:
        event = await conn.next_event()
        if isinstance(event, h11.Data):
            now = conn.received_at
            for data in parser.feed(event.data):
                reader.on_data(now, data)
        elif isinstance(event, h11.EndOfMessage):
            conn.end_cycle()
            return (conn.received_at if math.isnan(reader.done_at) else reader.done_at), reader.result()
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the server closed the connection in the middle of a response")


@contextlib.asynccontextmanager
async def open_pool(
    endpoint: HttpEndpoint, size: int, *, api_key: str | None = None, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[ConnectionPool]:
    """A pool with every connection open (``ServerUnreachable`` if one cannot be), closed on exit."""
    pool = ConnectionPool(endpoint, size, api_key=api_key, ssl_context=ssl_context)
    try:
        await pool.open_all()
        yield pool
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()


def completion_body(
    *, model: str | None, prompt: str | None, prompt_token_ids: Sequence[int] | None, max_tokens: int,
    temperature: float, ignore_eos: bool,
) -> bytes:
    """A streamed ``/v1/completions`` request with usage at the end and vLLM's per-chunk ``token_ids``."""
    body: dict[str, Any] = {
        "prompt": list(prompt_token_ids) if prompt_token_ids is not None else prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if model is not None:
        body["model"] = model
    if ignore_eos:
        body["ignore_eos"] = True
    return json.dumps(body, separators=(",", ":")).encode()


__all__ = [
    "COMPLETIONS_PATH",
    "MODELS_PATH",
    "Completion",
    "CompletionObserver",
    "ConnectionPool",
    "HttpConnection",
    "HttpEndpoint",
    "HttpStatusError",
    "PoolStats",
    "ServerUnreachable",
    "SseParser",
    "completion_body",
    "http_endpoint",
    "open_pool",
    "status_error",
]
