"""The bundled async client (trio): many concurrent requests over one WebSocket connection.

    async with connect("ws://127.0.0.1:8000") as client:
        async for delta in client.generate("Hello", max_tokens=16, temperature=0):
            print(delta.text, end="")

A server started with an API key needs it: ``connect(url, api_key="...")``, or the environment
variable ``MINI_VLLM_API_KEY``; it goes in the handshake's ``Authorization: Bearer`` header.

A background task reads frames and routes them by request id to bounded per-request queues; when
one is full the reader waits, which is backpressure all the way to the server (the server then
merges tokens into fewer frames). Errors arrive as typed exceptions. Leaving an ``async for``
early, or cancelling the task that iterates, sends ``cancel`` for that request.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import socket
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from mini_vllm.actors.task_group import open_task_group
from mini_vllm.engine.outputs import TokenLogprob
from mini_vllm.transport import auth, protocol
from mini_vllm.transport.protocol import (
    DoneEvent,
    ErrorEvent,
    ModelInfo,
    ModelsEvent,
    ServerEvent,
    StatsEvent,
    TokenEvent,
    Usage,
)

log = logging.getLogger(__name__)
_REQUEST_QUEUE = 256  # frames buffered per request before the reader waits for its consumer


class ClientError(Exception):
    """Base of the client's errors."""


class ConnectionLost(ClientError):
    """The connection closed (or could not be opened) before the answer was complete."""


class AuthenticationFailed(ConnectionLost):
    """The server wants an API key and the handshake carried none, or one it does not accept (HTTP 401)."""


class InvalidURL(ClientError, ValueError):
    """Not a ws:// or wss:// URL with a host (a ValueError too, as trio-websocket raises for these)."""


class ServerError(ClientError):
    """The server answered with an error; ``code`` is one of ``protocol.ERROR_CODES``."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class RequestRejected(ServerError):
    """The server refused the request before generating anything."""


class InvalidRequestError(RequestRejected):
    """A field is missing, unknown or out of range, or the model cannot take the prompt."""


class UnknownModelError(RequestRejected):
    pass


class OverloadedError(RequestRejected):
    """The model's queue or the connection's request limit is full: retry later."""


class ShuttingDownError(RequestRejected):
    pass


class GenerationFailed(ServerError):
    """The request had started and ended with finish reason ``error`` (the server says why)."""


_REJECTIONS: dict[str, type[RequestRejected]] = {
    "unknown_model": UnknownModelError,
    "overloaded": OverloadedError,
    "too_many_requests": OverloadedError,
    "shutting_down": ShuttingDownError,
}


def _rejection(event: ErrorEvent) -> RequestRejected:
    return _REJECTIONS.get(event.code, InvalidRequestError)(event.code, event.message, event.id)


@attrs.frozen
class ClientDelta:
    """New text of one sample; the sample's last delta carries ``finish_reason`` and ``usage``."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


@attrs.frozen
class Completion:
    """A whole answer (sample 0), as ``Client.complete`` returns it."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage


class ClientGeneration:
    """One request's deltas. The frame is sent on the first ``__anext__``."""

    def __init__(self, client: Client, request_id: str, frame: str, n: int) -> None:
        self.request_id = request_id
        self._client = client
        self._frame = frame
        self._open = n  # samples not yet done
        self._events: trio.MemoryReceiveChannel[ServerEvent] | None = None
        self._ended = False
        self._thread = threading.get_ident()

    def __aiter__(self) -> ClientGeneration:
        return self

    async def __anext__(self) -> ClientDelta:
        if self._ended:
            raise StopAsyncIteration
        try:
            if self._events is None:
                self._events = self._client._register(self.request_id)
                await self._client._send(self._frame)
            try:
                event = await self._events.receive()
            except trio.EndOfChannel:
                raise ConnectionLost(f"connection closed while request {self.request_id!r} was running") from None
        except BaseException:
            self._end(send_cancel=True)
            raise
        if isinstance(event, ErrorEvent):
            self._end(send_cancel=False)
            raise _rejection(event)
        if isinstance(event, TokenEvent):
            return ClientDelta(self.request_id, event.index, event.text, event.token_ids, event.logprobs)
        if not isinstance(event, DoneEvent):
            raise ClientError(f"unexpected frame for request {self.request_id!r}: {event!r}")
        self._open -= 1
        if self._open <= 0:
            self._end(send_cancel=False)
        if event.finish_reason == "error":
            self._end(send_cancel=True)
            raise GenerationFailed(event.error_code or "error", event.error_message or "generation failed", event.id)
        return ClientDelta(self.request_id, event.index, "", (), None, event.finish_reason, event.usage)

    async def __aenter__(self) -> ClientGeneration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._end(send_cancel=True)
        await trio.lowlevel.checkpoint()

    def cancel(self) -> None:
        """Ask the server to stop; iteration then ends with finish reason ``cancelled``."""
        if not self._ended and self._events is not None:
            self._client._send_soon(protocol.cancel_request(self.request_id))

    def _end(self, send_cancel: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if self._events is not None:
            self._client._unregister(self.request_id)
            if send_cancel:
                self._client._send_soon(protocol.cancel_request(self.request_id))

    def __del__(self) -> None:
        # Dropped mid-iteration (``break``): tell the server, from the trio thread only.
        if not self._ended and self._events is not None and threading.get_ident() == self._thread:
            with contextlib.suppress(Exception):
                self._end(send_cancel=True)


class Client:
    """A connection to a mini-vllm server. Make one with ``connect(url)``."""

    def __init__(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        self._ws = ws
        self._nursery = nursery
        self._ids = itertools.count(1)
        self._routes: dict[str, trio.MemorySendChannel[ServerEvent]] = {}
        self._closed: str | None = None

    # ---- requests ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        model: str | None = None,
        request_id: str | None = None,
        priority: int = 0,
        **sampling: Any,
    ) -> ClientGeneration:
        """Stream a completion; sampling fields (``max_tokens``, ``temperature``, ...) as keywords."""
        rid = request_id or self._new_id()
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        frame = protocol.generate_request(
            rid, prompt=text, prompt_token_ids=ids, model=model, priority=priority, sampling=sampling
        )
        return ClientGeneration(self, rid, frame, int(sampling.get("n", 1)))

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str | None = None,
        request_id: str | None = None,
        priority: int = 0,
        **sampling: Any,
    ) -> ClientGeneration:
        """Like ``generate``, the prompt made from ``messages`` by the model's chat template."""
        rid = request_id or self._new_id()
        frame = protocol.chat_request(rid, messages, model=model, priority=priority, sampling=sampling)
        return ClientGeneration(self, rid, frame, int(sampling.get("n", 1)))

    async def complete(self, prompt: str | Sequence[int], **kwargs: Any) -> Completion:
        """The whole answer of sample 0 (``n`` must be 1)."""
        text: list[str] = []
        ids: list[int] = []
        async for d in self.generate(prompt, **kwargs):
            text.append(d.text)
            ids.extend(d.token_ids)
            if d.finish_reason is not None and d.usage is not None:
                return Completion("".join(text), tuple(ids), d.finish_reason, d.usage)
        raise ConnectionLost("the request ended without a done frame")

    async def cancel(self, request_id: str) -> None:
        await self._send(protocol.cancel_request(request_id))

    async def models(self) -> list[ModelInfo]:
        event = await self._ask(protocol.models_request, "the model list")
        if not isinstance(event, ModelsEvent):
            raise ClientError(f"unexpected answer to 'models': {event!r}")
        return list(event.models)

    async def stats(self, reset_loop_lag: bool = False) -> dict[str, Any]:
        """The server's counters: ``server`` (connections, frames) and ``service`` (queues, KV
        blocks, steps, event-loop lag). ``reset_loop_lag`` starts a new lag window afterwards."""
        event = await self._ask(lambda rid: protocol.stats_request(rid, reset_loop_lag), "the statistics")
        if not isinstance(event, StatsEvent):
            raise ClientError(f"unexpected answer to 'stats': {event!r}")
        return event.stats

    async def _ask(self, frame: Callable[[str], str], what: str) -> ServerEvent:
        rid = self._new_id()
        events = self._register(rid)
        try:
            await self._send(frame(rid))
            try:
                event = await events.receive()
            except trio.EndOfChannel:
                raise ConnectionLost(f"connection closed before {what} arrived") from None
        finally:
            self._unregister(rid)
        if isinstance(event, ErrorEvent):
            raise _rejection(event)
        return event

    # ---- plumbing ---------------------------------------------------------------------------------
    def _new_id(self) -> str:
        return str(next(self._ids))

    def _register(self, request_id: str) -> trio.MemoryReceiveChannel[ServerEvent]:
        if self._closed is not None:
            raise ConnectionLost(self._closed)
        if request_id in self._routes:
            raise ClientError(f"request id {request_id!r} is already in use on this connection")
        send, receive = trio.open_memory_channel[ServerEvent](_REQUEST_QUEUE)
        self._routes[request_id] = send
        return receive

    def _unregister(self, request_id: str) -> None:
        send = self._routes.pop(request_id, None)
        if send is not None:
            send.close()

    async def _send(self, frame: str) -> None:
        try:
            await self._ws.send_message(frame)
        except ConnectionClosed as exc:
            raise ConnectionLost(f"connection closed: {exc.reason}") from None

    def _send_soon(self, frame: str) -> None:
        """Send without waiting (from finalizers and cancelled tasks)."""
        if self._closed is None:
            self._nursery.start_soon(self._send_quietly, frame)

    async def _send_quietly(self, frame: str) -> None:
        with contextlib.suppress(ConnectionLost):
            await self._send(frame)

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    message = await self._ws.get_message()
                except ConnectionClosed as exc:
                    self._closed = f"connection closed: {exc.reason}"
                    return
                event = protocol.parse_server_frame(message)
                route = self._routes.get(event.id) if event.id is not None else None
                if route is None:
                    if isinstance(event, ErrorEvent):
                        log.warning("server error not tied to a request: [%s] %s", event.code, event.message)
                    continue  # e.g. frames of a request we stopped listening to
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    await route.send(event)
        finally:
            self._closed = self._closed or "connection closed"
            for send in self._routes.values():
                send.close()
            self._routes.clear()

    @property
    def close_reason(self) -> str | None:
        return self._closed


def check_url(url: str) -> str:
    """``url`` if it is ``ws://HOST[:PORT][/PATH]`` or ``wss://...``; else InvalidURL saying what is wrong."""
    example = "e.g. ws://127.0.0.1:8000"
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is out of range or not a number
    except ValueError as exc:
        raise InvalidURL(f"bad URL {url!r}: {exc} ({example})") from None
    if parts.scheme not in ("ws", "wss"):
        if parts.scheme in ("http", "https") and parts.netloc:  # the likeliest slip: suggest the same address
            example = f"e.g. {'ws' if parts.scheme == 'http' else 'wss'}://{parts.netloc}"
        raise InvalidURL(f"{url!r} is not a WebSocket URL: it must start with ws:// or wss:// ({example})")
    if not parts.hostname:
        raise InvalidURL(f"{url!r} names no host ({example})")
    return url


@contextlib.asynccontextmanager
async def connect(
    url: str, *, max_frame_bytes: int = 64 << 20, connect_timeout: float = 60.0, api_key: str | None = None
) -> AsyncIterator[Client]:
    """Open a connection. Raises InvalidURL for a URL that is not ws:// or wss://, and
    ConnectionLost saying why when the server cannot be reached (refused, timed out, not a
    WebSocket server, unknown host), AuthenticationFailed (a ConnectionLost) when it refuses the key.

    ``api_key``: sent as ``Authorization: Bearer KEY``; None (the default) reads the environment
    variable ``MINI_VLLM_API_KEY``, and ``""`` sends no key whatever the environment says."""
    check_url(url)
    key = auth.client_key(api_key)
    headers = [auth.bearer_header(key)] if key is not None else []
    opened = False
    # trio-websocket's connect_timeout alone leaves its reader task waiting on a server that accepts
    # TCP and never answers the handshake (the open then never returns): this scope bounds the opening.
    with trio.CancelScope(deadline=trio.current_time() + connect_timeout) as opening:
        try:
            async with open_websocket_url(
                url, max_message_size=max_frame_bytes, connect_timeout=connect_timeout, disconnect_timeout=2,
                extra_headers=headers,
            ) as ws:
                opened = True
                opening.deadline = math.inf
                async with open_task_group() as nursery:
                    client = Client(ws, nursery)
                    nursery.start_soon(client._reader)
                    yield client
        except (HandshakeError, OSError) as exc:
            if opened:
                raise
            failure = _connect_failure(exc, connect_timeout, sent_key=key is not None)
            if isinstance(exc, ConnectionRejected) and exc.status_code == 401:
                raise AuthenticationFailed(f"cannot connect to {url}: {failure}") from None
            raise ConnectionLost(f"cannot connect to {url}: {failure}") from None
    if opening.cancelled_caught and not opened:
        raise ConnectionLost(f"cannot connect to {url}: {_connect_failure(ConnectionTimeout(), connect_timeout)}")


def _connect_failure(exc: BaseException, timeout: float, sent_key: bool = False) -> str:
    """Why a connection attempt failed, in words: trio-websocket's HandshakeError says nothing
    itself; the socket error is in its cause, inside trio's group of attempts (one per address)."""
    if isinstance(exc, ConnectionRejected):
        return _rejection_reason(exc, sent_key)
    if isinstance(exc, ConnectionTimeout):
        return (
            f"timed out after {timeout:g} s without a WebSocket handshake "
            "(is the host reachable, and is it a mini-vllm server?)"
        )
    errors = _os_errors(exc)
    for e in errors:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused: nothing listens there (start one with `mini-vllm serve`, or check the port)"
    for e in errors:
        if isinstance(e, socket.gaierror):
            return f"unknown host ({e.strerror})"
        if isinstance(e, TimeoutError):
            return "timed out"
    if errors:
        deepest = errors[-1]
        return deepest.strerror or str(deepest) or type(deepest).__name__
    return str(exc) or type(exc).__name__


def _rejection_reason(exc: ConnectionRejected, sent_key: bool) -> str:
    """The server's HTTP answer to the handshake, in words (with its own message when it sent one)."""
    said = _error_message(exc.body)
    if exc.status_code == 401:
        if sent_key:
            return f"the server refused the API key (HTTP 401): {said or 'check the key'}"
        return (f"the server needs an API key (HTTP 401): pass api_key= (--api-key KEY) or set {auth.API_KEY_ENV}")
    if exc.status_code in (403, 503) and said:
        return f"refused with HTTP {exc.status_code}: {said}"
    return f"not a WebSocket server: it answered the handshake with HTTP {exc.status_code} (check the host and port)"


def _error_message(body: bytes | None) -> str | None:
    """The message of an OpenAI-shaped error body (the server's refusals), or None."""
    try:
        value = json.loads(body or b"")
        message = value["error"]["message"]
    except (ValueError, TypeError, KeyError):
        return None
    return message if isinstance(message, str) else None


def _os_errors(exc: BaseException | None) -> list[OSError]:
    """The OSErrors in ``exc``, its causes and its groups' members, outermost first."""
    found: list[OSError] = []
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            found.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.append(e.__cause__ or e.__context__)
    return found
