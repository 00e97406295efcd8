"""The server's one port: HTTP/1.1 (parsed with h11) and WebSocket upgrades on one TCP listener.

Every TCP connection comes in here. The front door reads a request head (bounded in size and in
time), then either

- hands a WebSocket upgrade to trio-websocket: the head is rebuilt from h11's parsed event and
  replayed, with the bytes h11 read beyond it, to ``wrap_server_stream``; the server's WebSocket
  handler then runs on that connection until it ends; or
- answers plain HTTP from the routes table (``transport/http.py``): 404, 405 with ``Allow``, 413,
  400, 431, 401, 403 and 503 come from here, all in OpenAI's error shape; a route gets the whole
  body and an ``HttpResponder`` that writes a whole body or a chunked stream, each chunk to the
  socket at once.

Checks, in order, for both kinds: the browser ``Origin`` (403 unless allowed; CORS headers for the
allowed ones, and answers to preflights), ``max_connections`` (503 with ``Retry-After``: a
connection beyond it is answered and closed), the API key (401, except on public paths). A closed
connection cancels its route's task, so a ``Generation`` the route iterates is aborted and its
KV blocks go back at once; a client that reads a stream too slowly is dropped like a slow
WebSocket reader. Keep-alive connections wait ``idle_timeout`` for the next request;
``handshake_timeout`` bounds how long one request's head and body may take to arrive.
"""

from __future__ import annotations

import email.utils
import errno
import http
import itertools
import logging
import math
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal

import attrs
import h11
import trio
import trio_websocket
from trio_websocket import WebSocketRequest

from mini_vllm.transport.auth import ApiKeys
from mini_vllm.transport.http import Headers, HttpError, HttpRequest, HttpResponder, Route, Routes, send_error

log = logging.getLogger(__name__)

_RECEIVE_BYTES = 65536
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})  # as trio's
_ACCEPT_RETRY = 0.1  # seconds between accept attempts while out of descriptors (trio's own pause)
# Connections beyond max_connections that are being answered 503 at once; beyond this many more,
# a connection is closed without an answer (a flood must not take every descriptor that way).
_MAX_REFUSING = 64
_LINGER_BYTES = 1 << 20  # what a lingering close reads (and drops) at most
_PREFLIGHT_MAX_AGE = "600"  # seconds a browser may cache a preflight's answer
_SHOWN_CHARS = 200  # of client-chosen text (a path, an origin) quoted back in messages and logs
# Set by the front door itself: a route giving them would break the response's framing.
_DOOR_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "date"})
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

WebSocketHandler = Callable[[WebSocketRequest, "Peer"], Awaitable[None]]
ClientKeyMode = Literal["ip", "connection", "off"]


@attrs.frozen
class DoorLimits:
    """What the front door bounds (the server fills it from its ``ServerLimits``)."""

    max_connections: int  # TCP connections served at once (HTTP and WebSocket)
    handshake_timeout: float  # seconds from a request's first byte (or the accept) to its whole body
    idle_timeout: float  # seconds a keep-alive connection waits for its next request
    slow_client_timeout: float  # seconds one write of a response may wait for the socket
    close_timeout: float  # seconds a closing connection may take (and a lingering close reads)
    max_header_bytes: int  # a request head beyond this: 431
    max_body_bytes: int  # a request body beyond this: 413
    max_message_bytes: int  # WebSocket messages (trio-websocket closes with 1009 beyond)
    retry_after: float  # seconds, sent with 503
    client_key: ClientKeyMode  # what HttpRequest.client is: the address, the connection, nothing


@attrs.frozen
class Peer:
    """One TCP connection's other end."""

    address: str  # the remote IP address ("" if unknown)
    port: int
    connection_id: int  # unique per server

    def client(self, mode: ClientKeyMode) -> str:
        """The fair-share key of this client: its address, this connection, or "" (no share)."""
        if mode == "off":
            return ""
        if mode == "connection":
            return f"connection {self.connection_id} ({self.address})"
        return self.address


@attrs.define
class DoorCounters:
    tcp_connections_open: int = 0  # connections holding one of the max_connections places
    connections_refused: int = 0  # 503: beyond max_connections (HTTP and WebSocket)
    origins_refused: int = 0  # 403: a browser Origin that is not allowed (HTTP and WebSocket)
    auth_refused: int = 0  # 401: no valid API key (HTTP and WebSocket)
    accept_errors: int = 0  # accept(2) failed (EMFILE, ...)
    http_requests: int = 0  # request heads read, WebSocket handshakes included
    http_errors_4xx: int = 0  # responses with a 4xx status, refusals of handshakes included
    http_errors_5xx: int = 0
    http_disconnects: int = 0  # routes cancelled because their client closed the connection
    http_slow_clients_dropped: int = 0  # a response write waited over slow_client_timeout


@attrs.define
class ThrottledLog:
    """One log line per ``interval`` for each kind of repeating trouble, with how often it happened:
    a descriptor shortage makes accept fail ten times a second, and a line (with a traceback) each
    time buried everything else in the log."""

    interval: float
    _last: dict[str, float] = attrs.field(factory=dict)  # kind -> when it was last logged
    _unlogged: dict[str, int] = attrs.field(factory=dict)  # kind -> occurrences since then

    def note(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        now = trio.current_time()
        count = self._unlogged.get(kind, 0) + 1
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._unlogged[kind] = count
            return
        self._last[kind], self._unlogged[kind] = now, 0
        since = f" ({count} times in the last {now - last:.0f} s)" if last is not None and count > 1 else ""
        log.log(level, "%s%s", message, since)

    def ended(self, kind: str, message: str) -> None:
        """The trouble stopped: say how many occurrences went unlogged, if any."""
        count = self._unlogged.pop(kind, 0)
        if self._last.pop(kind, None) is not None and count:
            log.warning("%s (%d more times since the last report)", message, count)


class GuardedListener(trio.abc.Listener[trio.SocketStream]):
    """A TCP listener whose ``accept`` rides out a shortage of descriptors (EMFILE and the like)
    itself: it waits and retries as trio does, but reports through the server's throttled log
    instead of one line with a traceback per attempt, ten a second."""

    def __init__(self, inner: trio.abc.Listener[trio.SocketStream], on_error: Callable[[OSError], None],
                 on_recovered: Callable[[], None]) -> None:
        self.inner = inner
        self._on_error = on_error
        self._on_recovered = on_recovered

    async def accept(self) -> trio.SocketStream:
        failed = False
        while True:
            try:
                stream = await self.inner.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                failed = True
                self._on_error(exc)
                await trio.sleep(_ACCEPT_RETRY)
                continue
            if failed:
                self._on_recovered()
            return stream

    async def aclose(self) -> None:
        await self.inner.aclose()


class FrontDoor:
    """Accepts every TCP connection of the server and serves HTTP/1.1 and WebSocket upgrades on it."""

    def __init__(
        self,
        limits: DoorLimits,
        routes: Routes,
        *,
        public_paths: frozenset[str],
        keys: ApiKeys,
        origin_allowed: Callable[[str], bool],
        on_websocket: WebSocketHandler,
        throttled_log: ThrottledLog,
        counters: DoorCounters | None = None,
    ) -> None:
        self.limits = limits
        self.routes = routes  # read live: the server may mount more before it runs
        self.public_paths = public_paths
        self.keys = keys
        self.origin_allowed = origin_allowed
        self.on_websocket = on_websocket
        self.log = throttled_log
        self.counters = counters if counters is not None else DoorCounters()
        self.closing = False  # shutting down: answers say Connection: close, idle ones are closed
        self._connections: set[_HttpConnection] = set()
        self._refusing = 0  # connections beyond max_connections being answered 503
        self._ids = itertools.count(1)
        self._changed = trio.Event()

    # ---- listening ------------------------------------------------------------------------------
    async def serve(self, listeners: Sequence[trio.SocketListener], handler_nursery: trio.Nursery) -> None:
        """Accept on ``listeners`` until cancelled; each connection is served in ``handler_nursery``."""
        guarded = [GuardedListener(x, self._accept_failed, self._accept_recovered) for x in listeners]
        await trio.serve_listeners(self.handle, guarded, handler_nursery=handler_nursery)

    def _accept_failed(self, exc: OSError) -> None:
        self.counters.accept_errors += 1
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.log.note(
            f"accept:{name}",
            f"cannot accept connections: {name} ({os.strerror(exc.errno or 0)}); retrying every {_ACCEPT_RETRY:g} s "
            f"(raise the open-file limit, ulimit -n, or lower --max-connections, now {self.limits.max_connections})",
            logging.ERROR,
        )

    def _accept_recovered(self) -> None:
        for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS"):
            self.log.ended(f"accept:{name}", f"accepting connections again after {name}")

    # ---- connections ----------------------------------------------------------------------------
    @property
    def open_connections(self) -> int:
        """Every connection being served, refused ones still being answered included."""
        return len(self._connections)

    async def wait_changed(self) -> None:
        """Until a connection ends."""
        await self._changed.wait()

    def close_idle(self) -> None:
        """Shutting down: close keep-alive connections waiting for a request; the others close
        after their current response."""
        self.closing = True
        for conn in list(self._connections):
            conn.close_if_idle()

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one TCP connection to its end. Never raises: an escaping exception would end the
        accept loop, and every other client with it."""
        admitted = self.counters.tcp_connections_open < self.limits.max_connections
        if not admitted and self._refusing >= _MAX_REFUSING:
            self.counters.connections_refused += 1
            await trio.aclose_forcefully(stream)
            return
        if admitted:
            self.counters.tcp_connections_open += 1
        else:
            self._refusing += 1
        conn = _HttpConnection(self, stream, _peer(stream, next(self._ids)), admitted)
        self._connections.add(conn)
        try:
            await conn.serve()
        except Exception:
            log.exception("an HTTP connection's handler failed")
        finally:
            self._connections.discard(conn)
            if admitted:
                self.counters.tcp_connections_open -= 1
            else:
                self._refusing -= 1
            await trio.aclose_forcefully(stream)
            self._changed.set()
            self._changed = trio.Event()

    # ---- what a request may reach ----------------------------------------------------------------
    def methods(self, path: str) -> list[str]:
        """The methods ``path`` answers (HEAD with GET, OPTIONS with any), or [] for an unknown path."""
        if path == "*":
            found = {method for method, _ in self.routes}
        else:
            found = {method for method, p in self.routes if p == path}
        if not found:
            return []
        if "GET" in found:
            found.add("HEAD")
        found.add("OPTIONS")
        return sorted(found)

    def origin_refusal(self, headers: Sequence[tuple[bytes, bytes]]) -> tuple[list[tuple[str, str]], HttpError | None]:
        """(CORS headers for the answer, or a 403): no Origin is a program, always let in."""
        origins = _headers(headers, b"origin")
        if not origins:
            return [], None
        origin = origins[0].decode("latin-1").strip()
        if len(origins) == 1 and self.origin_allowed(origin):
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")], None
        self.counters.origins_refused += 1
        shown = ascii(b", ".join(origins).decode("latin-1")[:_SHOWN_CHARS])
        self.log.note("origin", f"refused a request from origin {shown} (not in --allowed-origins)")
        return [], HttpError(
            403,
            f"origin {shown} may not use this server: a web page needs the server started with "
            "--allowed-origins ORIGIN (file:// pages: --allowed-origins null)",
            "permission_error",
            "origin_not_allowed",
        )

    def key_refusal(
        self, headers: Sequence[tuple[bytes, bytes]], subprotocols: Sequence[str] | None, peer: Peer
    ) -> HttpError | None:
        """401 unless the request carries a valid API key (``subprotocols``: a WebSocket handshake's)."""
        if subprotocols is None:
            refusal = self.keys.http_refusal(headers)
        else:
            refusal = self.keys.websocket_refusal(headers, subprotocols)
        if refusal is not None:
            self.counters.auth_refused += 1
            self.log.note("auth", f"refused a request from {peer.address or 'a client'} without a valid API key")
        return refusal

    def busy(self) -> HttpError:
        self.counters.connections_refused += 1
        self.log.note(
            "max_connections",
            f"refused a connection: {self.counters.tcp_connections_open} are open (--max-connections)",
        )
        return HttpError(
            503,
            f"the server has its limit of {self.limits.max_connections} connections open; retry later",
            "server_error",
            "overloaded",
            headers=(("Retry-After", str(max(1, math.ceil(self.limits.retry_after)))),),
        )

    def count_status(self, status: int) -> None:
        if 400 <= status < 500:
            self.counters.http_errors_4xx += 1
        elif status >= 500:
            self.counters.http_errors_5xx += 1


def _peer(stream: trio.SocketStream, connection_id: int) -> Peer:
    try:
        address, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):  # reset before we looked, or not an IP socket
        return Peer("", 0, connection_id)
    return Peer(str(address), int(port), connection_id)


class _ReplayStream(trio.abc.Stream):
    """The socket, with the bytes the front door already read (the handshake's head, rebuilt, and
    what h11 read beyond it) served first: what trio-websocket reads is what the client sent."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = memoryview(prefix)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = bytes(self._prefix[:size]), self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _HttpConnection:
    """One TCP connection: requests one after another (keep-alive), or one WebSocket upgrade."""

    def __init__(self, door: FrontDoor, stream: trio.SocketStream, peer: Peer, admitted: bool) -> None:
        self.door = door
        self.stream = stream
        self.peer = peer
        self.admitted = admitted  # holds a place within max_connections (else: answered 503)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=door.limits.max_header_bytes)
        self.broken = False  # a write failed or timed out: nothing more can be sent
        self.close_after = False  # the current answer ends the connection
        self.route_scope: trio.CancelScope | None = None
        self._pending_input = False  # bytes of the next request arrived while the last one ran
        self._idle_scope: trio.CancelScope | None = None  # set while waiting for a next request
        self._deadline = math.inf  # when the current request's head and body must be in
        self._cors: list[tuple[str, str]] = []  # the current request's CORS headers (allowed Origin)

    def close_if_idle(self) -> None:
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def serve(self) -> None:
        while True:
            event = await self._read_head()
            if event is None:
                return
            self.door.counters.http_requests += 1
            if _wants_websocket(event):
                await self._upgrade(event)
                return
            if not await self._answer(event) or self.broken:
                return
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return  # Connection: close (theirs or ours), or HTTP/1.0
            self.h11.start_next_cycle()

    # ---- reading --------------------------------------------------------------------------------
    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive_some(_RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""  # reset: as good as closed

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        """h11's next event, reading the socket as it needs (raises h11.RemoteProtocolError)."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self._receive())

    async def _read_head(self) -> h11.Request | None:
        """The next request's head, or None when the connection is to end (closed by the client,
        silent too long, malformed, or too slow to send a request it began: these two answered)."""
        limits = self.door.limits
        # A connection that has sent nothing yet, new or kept alive, is idle: it has idle_timeout to
        # begin a request, then handshake_timeout from the first byte to send it all. (Measured from
        # the accept, a pool that opens its connections ahead, as load generators and proxies do,
        # lost a request each time one of them was closed just as its first request went out.)
        began = self._pending_input
        wait = limits.handshake_timeout if began else limits.idle_timeout
        self._pending_input = False
        self._cors = []
        event: h11.Event | type[h11.PAUSED] | None = None
        malformed: h11.RemoteProtocolError | None = None
        with trio.CancelScope(deadline=trio.current_time() + wait) as scope:
            if not began:
                self._idle_scope = scope  # a shutdown closes the connection while it waits
                if self.door.closing:
                    scope.cancel()
            try:
                while True:
                    event = self.h11.next_event()
                    if event is not h11.NEED_DATA:
                        break
                    data = await self._receive()
                    if data and not began:
                        began, self._idle_scope = True, None
                        scope.deadline = min(scope.deadline, trio.current_time() + limits.handshake_timeout)
                    self.h11.receive_data(data)
            except h11.RemoteProtocolError as exc:
                malformed = exc
            finally:
                self._idle_scope = None
        self._deadline = scope.deadline  # the body has until then too
        if malformed is not None:
            await self._refuse_malformed(malformed)
            return None
        if scope.cancelled_caught:
            if began:  # a request was on its way: say why it is cut off
                await self._refuse(_timeout_error(limits.handshake_timeout), close=True)
            return None  # silent all along (a speculative connection, an idle keep-alive): just close
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed: the client is done
        if _head_size(event) > limits.max_header_bytes:
            await self._refuse(_head_too_large(limits.max_header_bytes), close=True)
            return None
        return event

    async def _read_body(self, keep: bool) -> bytes | None:
        """The request's body (``keep=False``: read and dropped, b""), or None if it did not come
        (too large, too slow, malformed, or the client left: answered where it can be)."""
        limits = self.door.limits
        if self.h11.they_are_waiting_for_100_continue:
            try:
                await self.emit([h11.InformationalResponse(status_code=100, headers=[])])
            except trio.BrokenResourceError:
                return None  # gone before sending its body
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_at(self._deadline) as scope:
            try:
                while True:
                    event = await self._next_event()
                    if isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > limits.max_body_bytes:
                            await self._refuse(_body_too_large(limits.max_body_bytes), close=True)
                            return None
                        if keep:
                            chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        return b"".join(chunks)
                    else:
                        return None  # the client closed its connection
            except h11.RemoteProtocolError as exc:
                await self._refuse_malformed(exc)
                return None
        if scope.cancelled_caught:
            await self._refuse(_timeout_error(limits.handshake_timeout), close=True)
        return None

    # ---- answering ------------------------------------------------------------------------------
    async def _answer(self, event: h11.Request) -> bool:
        """Answer one plain HTTP request; whether the connection may carry another."""
        door = self.door
        method = event.method.decode("ascii", "replace").upper()
        headers = list(event.headers)  # names lower case (h11), values bytes
        cors, refusal = door.origin_refusal(headers)
        self._cors = cors
        responder = _Responder(self, head_only=method == "HEAD", extra=cors)
        if refusal is None and not self.admitted:
            refusal = door.busy()
        if refusal is not None:
            return await self._refuse(refusal, responder, close=not self.admitted)
        target = _split_target(event.target)
        if target is None:
            error = HttpError(400, "the request target must be a path starting with '/' (or '*')", code="bad_request")
            return await self._refuse(error, responder, close=True)
        path, query = target
        if method == "OPTIONS" and cors and _header(headers, b"access-control-request-method") is not None:
            return await self._preflight(responder, path, headers)
        if path not in door.public_paths and (refusal := door.key_refusal(headers, None, self.peer)) is not None:
            return await self._refuse(refusal, responder)
        route = self._route(method, path)
        if isinstance(route, HttpError):
            return await self._refuse(route, responder)
        length = _header(headers, b"content-length")
        if length is not None and int(length) > door.limits.max_body_bytes:
            return await self._refuse(_body_too_large(door.limits.max_body_bytes), responder, close=True)
        body = await self._read_body(keep=True)
        if body is None:
            return False
        request = HttpRequest(
            method=method,
            path=path,
            query=query,
            headers=tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in headers),
            body=body,
            client=self.peer.client(door.limits.client_key),
        )
        return await self._run_route(route, request, responder)

    def _route(self, method: str, path: str) -> Route | HttpError:
        routes = self.door.routes
        route = routes.get((method, path))
        if route is None and method == "HEAD":
            route = routes.get(("GET", path))  # the same answer without its body
        if route is not None:
            return route
        allowed = self.door.methods(path)
        if not allowed:
            return _not_found(method, path)
        if method == "OPTIONS":
            return _options_route(allowed)
        return HttpError(
            405,
            f"method {method} is not allowed on {_shown(path)}; it allows {', '.join(allowed)}",
            code="method_not_allowed",
            headers=(("Allow", ", ".join(allowed)),),
        )

    async def _preflight(self, responder: _Responder, path: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """A browser's CORS preflight from an allowed origin (it never carries the API key)."""
        allowed = self.door.methods(path)
        if not allowed:
            return await self._refuse(_not_found("OPTIONS", path), responder)
        answer = [("Access-Control-Allow-Methods", ", ".join(allowed)), ("Access-Control-Max-Age", _PREFLIGHT_MAX_AGE)]
        asked = _header(headers, b"access-control-request-headers")
        if asked is not None:  # any header a page asks for (authorization, content-type, ...), as vLLM's "*"
            answer.append(("Access-Control-Allow-Headers", asked.decode("latin-1")))
        if await self._read_body(keep=False) is None:
            return False
        await self._quietly(responder.send(204, b"", "", answer))
        return True

    async def _refuse(self, error: HttpError, responder: _Responder | None = None, close: bool = False) -> bool:
        """Answer ``error`` instead of running a route; whether the connection may go on. Unless
        ``close``, a body that fits is read and dropped first (closing with unread input can
        reset the connection before the client has read the answer); else the answer says
        ``Connection: close`` and the close lingers."""
        if responder is None:
            responder = _Responder(self, head_only=False, extra=self._cors)
        if not close and self.h11.their_state is h11.SEND_BODY:
            if self.h11.they_are_waiting_for_100_continue:
                close = True  # the body has not been sent: do not ask for it
            elif await self._read_body(keep=False) is None:
                return False  # reading it answered already (413, 408, 400), or the client left
        self.close_after = self.close_after or close
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._quietly(send_error(responder, error))
        if self.close_after:
            await self._linger()
            return False
        return True

    async def _refuse_malformed(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        if status == 431:
            error = _head_too_large(self.door.limits.max_header_bytes)
        else:
            error = HttpError(status, f"malformed HTTP request: {str(exc)[:_SHOWN_CHARS]}", code="bad_request")
        await self._refuse(error, close=True)

    async def _linger(self) -> None:
        """Close gracefully: stop sending, then read (and drop) what the client still sends for a
        moment, so that the close does not reset the connection before it has read the answer."""
        with trio.move_on_after(self.door.limits.close_timeout):
            try:
                await self.stream.send_eof()
                received = 0
                while received < _LINGER_BYTES:
                    data = await self.stream.receive_some(_RECEIVE_BYTES)
                    if not data:
                        break
                    received += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    # ---- running a route ------------------------------------------------------------------------
    async def _run_route(self, route: Route, request: HttpRequest, responder: _Responder) -> bool:
        """Run ``route`` while watching the socket: the client closing it cancels the route."""
        gone = False
        async with trio.open_nursery() as nursery:
            self.route_scope = nursery.cancel_scope

            async def watch() -> None:
                nonlocal gone
                buffered = 0
                while buffered < self.door.limits.max_header_bytes:
                    data = await self._receive()
                    if not data:
                        gone = True
                        nursery.cancel_scope.cancel()  # the route's task: its Generation is aborted
                        return
                    self.h11.receive_data(data)  # a pipelined request: h11 keeps it for the next cycle
                    self._pending_input = True
                    buffered += len(data)
                # That much of the next request is here: the client is alive; stop reading.

            nursery.start_soon(watch)
            await self._call(route, request, responder)
            nursery.cancel_scope.cancel()
        self.route_scope = None
        if gone:
            self.door.counters.http_disconnects += 1
            return False
        return not self.broken

    async def _call(self, route: Route, request: HttpRequest, responder: _Responder) -> None:
        try:
            await route(request, responder)
        except HttpError as exc:
            if not responder.started:
                await self._quietly(send_error(responder, exc))
                return
            log.error("route %s %s raised HttpError %d after its answer began: closing the connection",
                      request.method, _shown(request.path), exc.status)
            self.broken = True
            return
        except Exception as exc:
            if self.broken:  # the client left, or read too slowly: nothing to report to anyone
                return
            log.exception("route %s %s failed", request.method, _shown(request.path))
            if not responder.started:
                error = HttpError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal")
                await self._quietly(send_error(responder, error))
            else:
                self.broken = True  # a stream cut short: the client sees its chunked body end badly
            return
        if not responder.started:
            log.error("route %s %s returned without an answer", request.method, _shown(request.path))
            error = HttpError(500, "internal error: the route sent no answer", "server_error", "internal")
            await self._quietly(send_error(responder, error))
        elif responder.streaming:
            await self._quietly(responder.end_stream())

    async def _quietly(self, sending: Awaitable[None]) -> None:
        """Send an answer to a client that may be gone already (then there is no one to tell)."""
        try:
            await sending
        except trio.BrokenResourceError:
            pass

    # ---- writing --------------------------------------------------------------------------------
    async def emit(self, events: Iterable[h11.Event]) -> None:
        if self.broken:
            raise trio.BrokenResourceError("the client's connection is closed")
        try:
            data = b"".join(self.h11.send(event) or b"" for event in events)
        except h11.LocalProtocolError:
            self.broken = True  # our own framing went wrong: the connection cannot be trusted
            raise
        timeout = self.door.limits.slow_client_timeout
        with trio.move_on_after(timeout) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True
                raise trio.BrokenResourceError("the client closed its connection") from None
        if scope.cancelled_caught:
            self.broken = True
            self.door.counters.http_slow_clients_dropped += 1
            reason = f"client too slow: a write waited over {timeout:g} s for the socket"
            self.door.log.note("slow_http", f"dropping an HTTP connection: {reason}")
            if self.route_scope is not None:
                self.route_scope.cancel()  # its request is aborted, as a slow WebSocket reader's
            raise trio.BrokenResourceError(reason)

    # ---- WebSocket ------------------------------------------------------------------------------
    async def _upgrade(self, event: h11.Request) -> None:
        """Check the handshake, then hand the connection to trio-websocket and the server."""
        door = self.door
        headers = list(event.headers)
        _, refusal = door.origin_refusal(headers)
        refusal = refusal or _handshake_refusal(event, headers)
        if refusal is None:
            offered = [p.strip() for v in _headers(headers, b"sec-websocket-protocol")
                       for p in v.decode("latin-1").split(",") if p.strip()]
            refusal = door.key_refusal(headers, offered, self.peer)
        if refusal is None and not self.admitted:
            refusal = door.busy()
        if refusal is not None:
            await self._refuse(refusal, close=True)
            return
        trailing, _ = self.h11.trailing_data
        stream = _ReplayStream(self.stream, _rebuild_head(event) + bytes(trailing))
        async with trio.open_nursery() as nursery:
            request: WebSocketRequest | None = None
            with trio.move_on_at(self._deadline):  # the handshake's own time bound
                request = await trio_websocket.wrap_server_stream(
                    nursery, stream, max_message_size=door.limits.max_message_bytes
                )
            if request is not None:
                await door.on_websocket(request, self.peer)
            nursery.cancel_scope.cancel()  # trio-websocket's reader, if the handler left it running


class _Responder:
    """``HttpResponder`` over h11 for one request (see transport/http.py)."""

    def __init__(self, conn: _HttpConnection, head_only: bool, extra: list[tuple[str, str]]) -> None:
        self._conn = conn
        self._head_only = head_only  # HEAD: the headers of GET's answer, no body
        self._extra = extra  # CORS headers for an allowed Origin
        self._state: Literal["new", "streaming", "done"] = "new"

    @property
    def started(self) -> bool:
        return self._state != "new"

    @property
    def streaming(self) -> bool:
        return self._state == "streaming"

    async def send(self, status: int, body: bytes, content_type: str, headers: Headers = ()) -> None:
        response = self._begin(status, content_type, headers, len(body))
        self._state = "done"
        events: list[h11.Event] = [response]
        if body and not self._head_only and _may_have_body(status):
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self._conn.emit(events)

    async def start_stream(self, status: int, content_type: str, headers: Headers = ()) -> None:
        response = self._begin(status, content_type, headers, None)
        self._state = "streaming"
        await self._conn.emit([response])

    async def write(self, data: bytes) -> None:
        if self._state != "streaming":
            raise RuntimeError("write() needs start_stream() first, and not after end_stream()")
        if not data or self._head_only:
            await trio.lowlevel.checkpoint()
            return
        await self._conn.emit([h11.Data(data=bytes(data))])  # at once: SSE chunks are latency-critical

    async def end_stream(self) -> None:
        if self._state == "done":
            await trio.lowlevel.checkpoint()
            return
        if self._state != "streaming":
            raise RuntimeError("end_stream() needs start_stream() first")
        self._state = "done"
        await self._conn.emit([h11.EndOfMessage()])

    def _begin(self, status: int, content_type: str, headers: Headers, length: int | None) -> h11.Response:
        if self._state != "new":
            raise RuntimeError("this request's answer has begun already: one send() or one stream per request")
        if not 200 <= status <= 599:
            raise ValueError(f"an answer's status must be in 200..599, got {status}")
        checked = [_checked_header(name, value) for name, value in headers]
        conn = self._conn
        conn.door.count_status(status)
        out: list[tuple[str, str]] = [("Date", email.utils.formatdate(usegmt=True))]
        if content_type and _may_have_body(status):
            out.append(("Content-Type", content_type))
        if length is not None and _may_have_body(status):
            out.append(("Content-Length", str(length)))
        out.extend(checked)
        out.extend(self._extra)
        if conn.close_after or conn.door.closing:
            out.append(("Connection", "close"))
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=status, headers=out, reason=reason)


def _checked_header(name: str, value: str) -> tuple[str, str]:
    """A route's header, refused (ValueError, before anything is sent) if it would break the answer."""
    if not name or not set(name) <= _TOKEN_CHARS:
        raise ValueError(f"a header name must be an HTTP token, got {name!r}")
    if name.lower() in _DOOR_HEADERS:
        raise ValueError(f"header {name!r} is set by the front door, not by a route")
    if any(c in value for c in "\r\n\x00"):
        raise ValueError(f"header {name!r}: a value must not hold CR, LF or NUL")
    value.encode("latin-1")  # raises UnicodeEncodeError (a ValueError) for what a header cannot carry
    return name, value


def _may_have_body(status: int) -> bool:
    return status not in (204, 304)


def _options_route(allowed: Sequence[str]) -> Route:
    async def options(request: HttpRequest, responder: HttpResponder) -> None:
        await responder.send(204, b"", "", (("Allow", ", ".join(allowed)),))

    return options


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _headers(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def _tokens(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> set[str]:
    """The comma-separated tokens of every ``name`` header, lower case."""
    return {t.strip().lower() for v in _headers(headers, name) for t in v.decode("latin-1").split(",") if t.strip()}


def _wants_websocket(event: h11.Request) -> bool:
    return event.method == b"GET" and "websocket" in _tokens(list(event.headers), b"upgrade")


def _handshake_refusal(event: h11.Request, headers: Sequence[tuple[bytes, bytes]]) -> HttpError | None:
    """400 (or 426 for another WebSocket version) for a handshake trio-websocket could not take."""
    if event.http_version != b"1.1":
        return HttpError(400, "a WebSocket handshake needs HTTP/1.1", code="bad_request")
    if "upgrade" not in _tokens(headers, b"connection"):
        return HttpError(400, "a WebSocket handshake needs the header 'Connection: Upgrade'", code="bad_request")
    if _header(headers, b"sec-websocket-version") != b"13":
        return HttpError(426, "this server speaks WebSocket version 13 (RFC 6455)", code="bad_request",
                         headers=(("Sec-WebSocket-Version", "13"),))
    if not _header(headers, b"sec-websocket-key"):
        return HttpError(400, "a WebSocket handshake needs a Sec-WebSocket-Key header", code="bad_request")
    return None


def _rebuild_head(event: h11.Request) -> bytes:
    """The request head as the client sent it (names in their own case), for trio-websocket."""
    lines = [b"%s %s HTTP/%s" % (event.method, event.target, event.http_version)]
    lines.extend(name + b": " + value for name, value in event.headers.raw_items())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _head_size(event: h11.Request) -> int:
    # h11 bounds a head that arrives in pieces; one that arrives in one read is measured here.
    return len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers.raw_items())


def _split_target(target: bytes) -> tuple[str, str] | None:
    """(percent-decoded path, raw query) of a request target, or None if it is not one."""
    text = target.decode("latin-1")
    if text == "*":
        return "*", ""
    if text.startswith(("http://", "https://")):  # the absolute form (sent to proxies)
        try:
            parts = urllib.parse.urlsplit(text)
        except ValueError:  # e.g. "http://[::1": an unclosed IPv6 host (found by bench fuzz --protocol http)
            return None
        path, query = parts.path or "/", parts.query
    elif text.startswith("/"):
        path, _, query = text.partition("?")
    else:
        return None
    return urllib.parse.unquote(path, errors="replace"), query


def _shown(text: str) -> str:
    return ascii(text[:_SHOWN_CHARS])


def _not_found(method: str, path: str) -> HttpError:
    return HttpError(404, f"no route for {method} {_shown(path)} on this server", "not_found_error", "not_found")


def _body_too_large(limit: int) -> HttpError:
    return HttpError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)",
                     code="request_too_large")


def _head_too_large(limit: int) -> HttpError:
    return HttpError(431, f"the request head is over the server's limit of {limit} bytes (--max-header-bytes)",
                     code="request_too_large")


def _timeout_error(timeout: float) -> HttpError:
    return HttpError(408, f"the request did not arrive in full within {timeout:g} s", code="request_timeout")


__all__ = [
    "ClientKeyMode",
    "DoorCounters",
    "DoorLimits",
    "FrontDoor",
    "GuardedListener",
    "Peer",
    "ThrottledLog",
    "WebSocketHandler",
]
