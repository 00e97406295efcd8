"""The WebSocket server (trio-websocket): one ``Connection`` per client, many requests per connection.

Per connection, five kinds of task share one nursery tree:

- the reader parses each frame (``mini_vllm.transport.protocol``) and answers bad ones with an ``error``
  frame; it never raises out, so no client can bring the server down;
- one task per request iterates the service's ``Generation`` and turns deltas into frames;
- the writer is the only task that writes to the socket, from a bounded queue of frames;
- the watchdog drops a client whose socket has not taken a frame for ``slow_client_timeout``;
- the idle watch closes a connection with no request in flight and no frame for ``idle_timeout``.

Backpressure: when a client reads slowly the frame queue fills, request tasks wait on it, and
meanwhile each request's stream merges new tokens into one pending delta. The scheduler never
waits. A closed connection cancels its request tasks, which aborts their requests.

Bounded resources (``ServerLimits``, docs/protocol.md "Limits of the server"): the handshake is
refused with 403 for a browser Origin that is not allowed and with 503 beyond ``max_connections``;
each client (remote address, or connection) gets a fair share of each model's queue
(``_ClientShares``); accept errors such as EMFILE are logged once per interval with a count.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import json
import logging
import math
import os
import urllib.parse
from collections.abc import Callable
from typing import Any, Literal

import attrs
import trio
from trio_websocket import ConnectionClosed, Endpoint, WebSocketConnection, WebSocketRequest, WebSocketServer

from mini_vllm.actors.errors import Overloaded
from mini_vllm.actors.request_stream import GenerationDelta
from mini_vllm.actors.resources import resident_bytes
from mini_vllm.actors.service import Generation, Service
from mini_vllm.engine.errors import ConfigError, MiniVllmError
from mini_vllm.transport import protocol
from mini_vllm.transport.protocol import ChatFrame, ClientFrame, GenerateFrame, ModelsFrame, ProtocolError, StatsFrame

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
ClientKey = Literal["ip", "connection", "off"]
CLIENT_KEYS: tuple[ClientKey, ...] = ("ip", "connection", "off")
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # one machine's loopback, however a page names it
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})  # as trio's
_ACCEPT_RETRY = 0.1  # seconds between accept attempts while out of descriptors (trio's own pause)


def origin_key(origin: str) -> tuple[str, str, int | None] | None:
    """``scheme://host[:port]`` as (scheme, host, port with the scheme's default), or None if it is not one."""
    try:
        parts = urllib.parse.urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    return scheme, parts.hostname.lower(), port if port is not None else default


def _origins(value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    return tuple(str(item).strip().rstrip("/").lower() for item in items)


@attrs.frozen
class ServerLimits:
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES  # larger frames get an error frame
    hard_max_frame_bytes: int = 16 << 20  # trio-websocket closes the connection (1009) beyond this
    max_requests_per_connection: int = 64
    outbound_frames: int = 64  # the per-connection frame queue
    slow_client_timeout: float = 30.0  # seconds one frame may wait for the socket
    slow_client_grace: float = 5.0  # then this long to deliver the close frame before cutting TCP
    close_timeout: float = 2.0
    # Connections beyond this are refused at the handshake (HTTP 503): each one holds a file
    # descriptor, and without a bound idle sockets can take every descriptor the process has.
    max_connections: int = 1000
    idle_timeout: float = 300.0  # seconds without a request in flight or a frame before we close (1001)
    handshake_timeout: float = 10.0  # seconds a TCP connection may take to send its handshake
    # Browser origins allowed beside the server's own ("http://HOST:PORT"): "null" (file:// pages,
    # sandboxed frames) and "*" (any) only when given. Clients that send no Origin are programs: allowed.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=_origins)
    # Fair admission: "ip" counts requests per remote address, "connection" per connection (behind
    # a proxy every client has the proxy's address), "off" turns the share off. See _ClientShares.
    client_key: ClientKey = "ip"
    client_share: float = 0.25  # a client's share of each model's pending limit ...
    min_client_share: int = 4  # ... but at least this many requests (small limits)
    retry_after: float = 1.0  # seconds, sent with every `overloaded` error
    log_interval: float = 10.0  # seconds between two log lines about the same repeating trouble

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if isinstance(field.default, bool) or not isinstance(field.default, int | float):
                continue  # not a number: checked below
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{field.name} must be a positive number, got {value!r}")
            if isinstance(field.default, int) and not isinstance(value, int):
                raise ConfigError(f"{field.name} must be an integer, got {value!r}")
        if self.hard_max_frame_bytes < self.max_frame_bytes:
            raise ConfigError("hard_max_frame_bytes must be >= max_frame_bytes")
        if self.client_key not in CLIENT_KEYS:
            raise ConfigError(f"client_key must be one of {', '.join(CLIENT_KEYS)}, got {self.client_key!r}")
        if not self.client_share <= 1:
            raise ConfigError(f"client_share is a fraction of the pending limit in (0, 1], got {self.client_share!r}")
        for origin in self.allowed_origins:
            if origin not in ("*", "null") and origin_key(origin) is None:
                raise ConfigError(
                    f"allowed origin {origin!r} is not an origin: give scheme://host[:port] "
                    "(e.g. http://localhost:3000), null (file:// pages) or * (any page)"
                )


@attrs.frozen
class ServerStats:
    connections_open: int
    connections_total: int
    requests_in_flight: int
    frames_received: int
    frames_sent: int
    errors_sent: int
    slow_clients_dropped: int
    connections_refused: int  # 503: beyond max_connections
    origins_refused: int  # 403: a browser Origin that is not allowed
    idle_closed: int
    fair_share_refused: int  # `overloaded` because the client holds its share of a busy model
    accept_errors: int  # accept(2) failed (EMFILE, ...)
    rss_bytes: int = 0  # the frontend process's resident memory (each engine core's: its scheduler's)


@attrs.define
class _Counters:
    connections_open: int = 0
    connections_total: int = 0
    requests_in_flight: int = 0
    frames_received: int = 0
    frames_sent: int = 0
    errors_sent: int = 0
    slow_clients_dropped: int = 0
    connections_refused: int = 0
    origins_refused: int = 0
    idle_closed: int = 0
    fair_share_refused: int = 0
    accept_errors: int = 0


@attrs.define
class _ThrottledLog:
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


class _ClientShares:
    """Fair admission: the requests each client holds per model, and who may add one.

    A client's share of a model is ``max(min_client_share, ceil(client_share * max_pending))``.
    Below its share a client is always admitted (the service still refuses when the queue is
    full). At or above it, the client may borrow idle room only while more than one share of the
    queue stays free. So a lone client can use most of the queue (3/4 with the defaults: an idle
    server is not held back), yet a client that arrives always finds a share free and is
    admitted at once, and while others hold requests, places that free up go to clients below
    their share first: a greedy client shrinks back to its share instead of starving the rest.
    A hard cap of one share would also protect, at the price of idling most of the batch for a
    single user (max_num_seqs equals the pending limit by default).
    """

    def __init__(self, limits: ServerLimits, service: Service) -> None:
        self._limits = limits
        self._service = service
        self._held: dict[tuple[str, str], int] = {}  # (client, model) -> requests in flight
        self._model_held: dict[str, int] = {}  # model -> requests in flight through this server
        self._max_pending: dict[str, int] = {}  # fixed per model: looked up once

    def share(self, max_pending: int) -> int:
        return min(max_pending, max(self._limits.min_client_share, math.ceil(self._limits.client_share * max_pending)))

    def held(self, client: str, model: str) -> int:
        return self._held.get((client, model), 0)

    def refusal(self, client: str, model: str) -> str | None:
        """Why ``client`` may not add a request to ``model`` now, or None if it may."""
        held = self.held(client, model)
        max_pending = self._max_pending.get(model)
        if max_pending is None:
            max_pending = self._max_pending[model] = self._service.statistics().scheduler(model).max_pending
        share = self.share(max_pending)
        if held < share:
            return None
        # Only here, where the queue's fill matters, are the statistics read. The server's own
        # count covers requests admitted here and not yet submitted to the scheduler.
        pending = max(self._service.statistics().scheduler(model).pending, self._model_held.get(model, 0))
        if max_pending - pending > share:
            return None
        return (
            f"this client already has {held} requests for model {model!r}, its fair share while the queue is busy "
            f"({pending} of {max_pending} places taken, {share} kept for other clients); retry later"
        )

    def take(self, client: str, model: str) -> None:
        self._held[client, model] = self.held(client, model) + 1
        self._model_held[model] = self._model_held.get(model, 0) + 1

    def give_back(self, client: str, model: str) -> None:
        left = self.held(client, model) - 1
        if left > 0:
            self._held[client, model] = left
        else:
            self._held.pop((client, model), None)  # no entry per client that ever came: bounded memory
        self._model_held[model] -= 1


def _error_code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in protocol.ERROR_CODES:
        return code
    if isinstance(exc, ConfigError):
        return "invalid_field"
    return "invalid_request"


class Connection:
    def __init__(
        self,
        ws: WebSocketConnection,
        service: Service,
        limits: ServerLimits,
        counters: _Counters,
        *,
        client: str = "",
        shares: _ClientShares | None = None,  # None: no fair share (client_key "off")
    ) -> None:
        self._ws = ws
        self._service = service
        self._limits = limits
        self._counters = counters
        self._client = client
        self._shares = shares
        self._last_active = trio.current_time()  # the last frame received, or the last request's end
        self._out_send, self._out_recv = trio.open_memory_channel[str](limits.outbound_frames)
        self._requests: dict[str, Generation] = {}
        self._send_started: float | None = None
        self._closing: tuple[int, str] | None = None  # set when we end the connection (code, reason)
        self._reader_scope = trio.CancelScope()
        self._requests_scope: trio.CancelScope | None = None
        self._connection_scope: trio.CancelScope | None = None

    async def serve(self) -> None:
        async with trio.open_nursery() as connection:
            self._connection_scope = connection.cancel_scope
            connection.start_soon(self._writer)
            connection.start_soon(self._watchdog)
            connection.start_soon(self._idle_watch)
            # The frame queue closes once the reader and every request are done: the writer drains it, then closes.
            async with self._out_send:
                async with trio.open_nursery() as requests:
                    self._requests_scope = requests.cancel_scope
                    with self._reader_scope:
                        await self._reader(requests)
                    if self._closing is None:  # the client went away: abort its requests
                        requests.cancel_scope.cancel()

    @property
    def close_reason(self) -> tuple[int, str]:
        return self._closing or (1000, "bye")

    def close(self, code: int, reason: str) -> None:
        """Stop reading; the requests still running finish (shutdown ends them quickly), then close."""
        if self._closing is None:
            self._closing = (code, reason)
            self._reader_scope.cancel()

    # ---- reading ----------------------------------------------------------------------------------
    async def _reader(self, requests: trio.Nursery) -> None:
        while True:
            try:
                message = await self._ws.get_message()
            except ConnectionClosed:
                return
            self._counters.frames_received += 1
            self._last_active = trio.current_time()
            frame: ClientFrame | None = None
            try:
                frame = protocol.parse_client_frame(message, self._limits.max_frame_bytes)
                await self._dispatch(frame, requests)
            except ProtocolError as exc:
                await self._send_error(exc.request_id, exc.code, exc.message)
            except MiniVllmError as exc:  # refused while starting the request
                await self._send_error(getattr(frame, "id", None), _error_code(exc), str(exc))
            except Exception as exc:  # a bug must cost one error frame, never the server
                log.exception("unexpected error handling a frame")
                await self._send_error(None, "internal", f"internal error: {type(exc).__name__}: {exc}")

    async def _dispatch(self, frame: ClientFrame, requests: trio.Nursery) -> None:
        if isinstance(frame, ModelsFrame):
            models = [protocol.ModelInfo(**attrs.asdict(m)) for m in self._service.models()]
            await self._send(protocol.models_frame(frame.id, models))
            return
        if isinstance(frame, StatsFrame):
            stats = {"server": attrs.asdict(_stats(self._counters)), "service": attrs.asdict(self._service.statistics())}
            if frame.reset_loop_lag and self._service.loop_lag is not None:
                self._service.loop_lag.reset()  # after the snapshot: the answer still shows the old window
            await self._send(protocol.stats_frame(frame.id, stats))
            return
        if isinstance(frame, protocol.CancelFrame):
            generation = self._requests.get(frame.id)
            if generation is None:
                raise ProtocolError("unknown_id", f"no request {frame.id!r} is in flight on this connection", frame.id)
            generation.cancel()  # its done frame(s) say "cancelled"
            return
        if frame.id in self._requests:
            raise ProtocolError(
                "duplicate_id", f"request {frame.id!r} is still in flight on this connection; ids must differ", frame.id
            )
        if len(self._requests) >= self._limits.max_requests_per_connection:
            raise ProtocolError(
                "too_many_requests",
                f"this connection already has {len(self._requests)} requests in flight "
                f"(the limit is {self._limits.max_requests_per_connection}); wait for one to finish",
                frame.id,
            )
        model: str | None = None
        if self._shares is not None:
            try:
                model = self._service.resolve_model(frame.model)
            except MiniVllmError:  # unknown_model / missing_field: the service refuses it, and counts it
                model = None
            refusal = self._shares.refusal(self._client, model) if model is not None else None
            if refusal is not None:
                self._counters.fair_share_refused += 1
                raise Overloaded(refusal)
        generation = self._start(frame)
        if self._shares is not None and model is not None:
            self._shares.take(self._client, model)  # no await since the check: nobody slipped in between
        self._requests[frame.id] = generation
        self._counters.requests_in_flight += 1
        requests.start_soon(self._run_request, frame.id, generation, model)

    def _start(self, frame: GenerateFrame | ChatFrame) -> Generation:
        common: dict[str, Any] = {"model": frame.model, "params": frame.params, "priority": frame.priority}
        if isinstance(frame, ChatFrame):
            messages = [{"role": m.role, "content": m.content} for m in frame.messages]
            return self._service.chat(messages, **common)
        prompt = frame.prompt if frame.prompt is not None else list(frame.prompt_token_ids or ())
        return self._service.generate(prompt, **common)

    # ---- one request --------------------------------------------------------------------------------
    async def _run_request(self, client_id: str, generation: Generation, model: str | None) -> None:
        try:
            async for delta in generation:
                await self._send_delta(client_id, delta)
        except MiniVllmError as exc:  # rejected before it started: one error frame ends it
            await self._send_error(client_id, _error_code(exc), str(exc))
        except Exception as exc:
            log.exception("request %r failed", client_id)
            await self._send_error(client_id, "internal", f"internal error: {type(exc).__name__}: {exc}")
        finally:
            generation.close()  # cancelled while waiting on the frame queue: abort it here and now
            del self._requests[client_id]
            self._counters.requests_in_flight -= 1
            if self._shares is not None and model is not None:
                self._shares.give_back(self._client, model)
            if not self._requests:
                self._last_active = trio.current_time()  # idle from now on

    async def _send_delta(self, client_id: str, delta: GenerationDelta) -> None:
        for s in delta.samples:
            if s.token_ids or s.text:
                await self._send(protocol.token_frame(client_id, s.index, s.text, s.token_ids, s.logprobs))
            if s.finish_reason is not None:
                error = (delta.error.code, delta.error.message) if s.finish_reason == "error" and delta.error else None
                await self._send(
                    protocol.done_frame(
                        client_id, s.index, s.finish_reason, delta.usage.prompt_tokens, s.completion_tokens, error
                    )
                )

    # ---- writing ------------------------------------------------------------------------------------
    async def _send(self, frame: str) -> None:
        await self._out_send.send(frame)

    async def _send_error(self, request_id: str | None, code: str, message: str) -> None:
        self._counters.errors_sent += 1
        if code == "overloaded":  # whether the model's queue or the client's share is full: say when to retry
            await self._send(_error_frame_with_retry(request_id, code, message, self._limits.retry_after))
        else:
            await self._send(protocol.error_frame(request_id, code, message))

    async def _writer(self) -> None:
        try:
            async for frame in self._out_recv:
                if self._closing is not None and self._closing[0] == CLOSE_POLICY_VIOLATION:
                    break  # dropped as too slow: no more frames, just the close frame
                self._send_started = trio.current_time()
                await self._ws.send_message(frame)
                self._send_started = None
                self._counters.frames_sent += 1
            with trio.move_on_after(self._limits.close_timeout):
                await self._ws.aclose(*self.close_reason)
        except ConnectionClosed:
            pass
        finally:
            if self._connection_scope is not None:
                self._connection_scope.cancel()

    async def _watchdog(self) -> None:
        limit = self._limits.slow_client_timeout
        while True:
            await trio.sleep(limit / 4)
            started = self._send_started
            if started is not None and trio.current_time() - started > limit:
                break
        self._counters.slow_clients_dropped += 1
        reason = f"client too slow: a frame waited over {limit:g} s for the socket; its requests were cancelled"
        log.warning("dropping a connection: %s", reason)
        self._closing = (CLOSE_POLICY_VIOLATION, reason)
        self._reader_scope.cancel()
        if self._requests_scope is not None:
            self._requests_scope.cancel()  # aborts its requests: their blocks go back to the pool
        # The writer sends the close frame once its stuck frame is through; if it never is, cut TCP.
        await trio.sleep(self._limits.slow_client_grace)
        if self._connection_scope is not None:
            self._connection_scope.cancel()

    async def _idle_watch(self) -> None:
        """Close a connection that has had no request in flight and sent no frame for ``idle_timeout``:
        an idle socket still holds a file descriptor and one of the ``max_connections`` places."""
        timeout = self._limits.idle_timeout
        while True:
            if self._requests:  # busy: look again later (the last request's end restarts the clock)
                await trio.sleep(timeout)
                continue
            deadline = self._last_active + timeout
            if trio.current_time() >= deadline:
                break
            await trio.sleep_until(deadline)
        if self._closing is None:
            self._counters.idle_closed += 1
            self.close(CLOSE_GOING_AWAY, f"idle for {timeout:g} s with no request in flight; reconnect to go on")


def _error_frame_with_retry(request_id: str | None, code: str, message: str, retry_after: float) -> str:
    """``protocol.error_frame`` plus ``retry_after`` (seconds); the other fields are the same."""
    frame = {"type": "error", "id": request_id, "code": code, "message": message, "retry_after": retry_after}
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


class _GuardedListener(trio.abc.Listener[trio.SocketStream]):
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


class Server:
    """Serves a ``Service`` over WebSockets until cancelled; ``shutdown`` stops it gracefully."""

    def __init__(self, service: Service, limits: ServerLimits | None = None) -> None:
        self.service = service
        self.limits = limits or ServerLimits()
        self._counters = _Counters()
        self._connections: set[Connection] = set()
        self._slots = 0  # connections accepted or being accepted: what max_connections bounds
        self._connection_ids = itertools.count(1)
        self._shares = _ClientShares(self.limits, service) if self.limits.client_key != "off" else None
        self._log = _ThrottledLog(self.limits.log_interval)
        self._own_origins: frozenset[tuple[str, str, int | None]] = frozenset()  # set once listening
        self._allowed_origins = frozenset(origin_key(a) for a in self.limits.allowed_origins) - {None}
        self._listen_scope = trio.CancelScope()
        self._handlers: trio.Nursery | None = None
        self._all_closed = trio.Event()
        self.port: int | None = None
        self.host: str | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def run(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (port 0: any free port; see ``self.port``) until cancelled."""
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            self.port = await handlers.start(self._listen, host, port)
            self.host = host
            self._own_origins = own_origins(host, self.port)
            task_status.started(self)
            await trio.sleep_forever()

    async def _listen(self, host: str, port: int, *, task_status: trio.TaskStatus[int]) -> None:
        with self._listen_scope:
            listeners = await trio.open_tcp_listeners(port, host=host)
            ws_server = WebSocketServer(
                self._handle,
                # Typed for trio's listeners; it only ever serves them (and asks ours nothing else).
                [_GuardedListener(x, self._accept_failed, self._accept_recovered) for x in listeners],  # type: ignore[misc]
                handler_nursery=self._handlers,
                max_message_size=self.limits.hard_max_frame_bytes,
                connect_timeout=self.limits.handshake_timeout,
                disconnect_timeout=self.limits.close_timeout,
            )
            # Bound already (connections wait in the backlog), so the port is known before serving.
            task_status.started(listeners[0].socket.getsockname()[1])
            await ws_server.run()

    def _accept_failed(self, exc: OSError) -> None:
        self._counters.accept_errors += 1
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._log.note(
            f"accept:{name}",
            f"cannot accept connections: {name} ({os.strerror(exc.errno or 0)}); retrying every {_ACCEPT_RETRY:g} s "
            f"(raise the open-file limit, ulimit -n, or lower --max-connections, now {self.limits.max_connections})",
            logging.ERROR,
        )

    def _accept_recovered(self) -> None:
        for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS"):
            self._log.ended(f"accept:{name}", f"accepting connections again after {name}")

    async def shutdown(self, message: str = "the server is shutting down", grace: float = 5.0) -> None:
        """Stop accepting, end in-flight requests with ``message``, close every connection (1001)."""
        self._listen_scope.cancel()
        self.service.shutdown(message)
        for conn in list(self._connections):
            conn.close(CLOSE_GOING_AWAY, message)
        with trio.move_on_after(grace):
            while self._connections:
                await self._all_closed.wait()

    def _refusal(self, request: WebSocketRequest) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """(HTTP status, body, headers) to refuse the handshake with, or None to accept it."""
        origins = [value for name, value in request.headers if name.lower() == b"origin"]
        if origins and not (len(origins) == 1 and self.origin_allowed(origins[0].decode("latin-1"))):
            self._counters.origins_refused += 1
            shown = ascii(b", ".join(origins).decode("latin-1")[:200])
            self._log.note("origin", f"refused a handshake from origin {shown} (not in --allowed-origins)")
            return 403, (
                f"origin {shown} may not use this server: a web page needs the server started with "
                f"--allowed-origins ORIGIN (file:// pages: --allowed-origins null)\n"
            ), []
        if self._slots >= self.limits.max_connections:
            self._counters.connections_refused += 1
            self._log.note("max_connections", f"refused a connection: {self._slots} are open (--max-connections)")
            retry = str(max(1, math.ceil(self.limits.retry_after))).encode()
            return 503, (
                f"the server has its limit of {self.limits.max_connections} connections open; retry later\n"
            ), [(b"Retry-After", retry)]
        return None

    def origin_allowed(self, origin: str) -> bool:
        """Whether a handshake whose Origin header is ``origin`` may connect (no header: always)."""
        allowed = self.limits.allowed_origins
        if "*" in allowed:
            return True
        origin = origin.strip().lower()
        if origin == "null":
            return "null" in allowed
        key = origin_key(origin)
        return key is not None and (key in self._own_origins or key in self._allowed_origins)

    def _client_key(self, request: WebSocketRequest, number: int) -> str:
        remote = request.remote
        address = remote.address if isinstance(remote, Endpoint) else str(remote)
        if self.limits.client_key == "connection":
            return f"connection {number} ({address})"
        return str(address)

    async def _handle(self, request: WebSocketRequest) -> None:
        # Everything is caught here: an exception escaping a handler would stop trio-websocket's server.
        refusal = self._refusal(request)
        if refusal is not None:
            status, body, headers = refusal
            headers = [*headers, (b"Content-Type", b"text/plain; charset=utf-8")]
            try:
                await request.reject(status, body=body.encode(), extra_headers=headers)
            except Exception:  # the client vanished meanwhile
                pass
            return
        self._slots += 1  # taken before the await: handshakes in progress count too
        try:
            try:
                ws = await request.accept()
            except Exception:  # the client vanished during the handshake
                return
            if self._listen_scope.cancel_called:  # accepted just as we stopped listening
                await ws.aclose(CLOSE_GOING_AWAY, "the server is shutting down")
                return
            await self._serve_connection(request, ws)
        finally:
            self._slots -= 1

    async def _serve_connection(self, request: WebSocketRequest, ws: WebSocketConnection) -> None:
        client = self._client_key(request, next(self._connection_ids))
        conn = Connection(ws, self.service, self.limits, self._counters, client=client, shares=self._shares)
        self._connections.add(conn)
        self._counters.connections_open += 1
        self._counters.connections_total += 1
        try:
            await conn.serve()
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._connections.discard(conn)
            self._counters.connections_open -= 1
            if not self._connections:
                self._all_closed.set()
                self._all_closed = trio.Event()
            with trio.move_on_after(self.limits.close_timeout, shield=True):
                await ws.aclose(*conn.close_reason)  # idempotent; cuts TCP if the close frame is stuck

    def statistics(self) -> ServerStats:
        return _stats(self._counters)


def own_origins(host: str, port: int) -> frozenset[tuple[str, str, int | None]]:
    """The origins of pages served from ``host:port`` itself; for a loopback or wildcard address,
    every loopback spelling (127.0.0.1, localhost, [::1]) with that port."""
    name = host.strip("[]").lower()
    names = {name} if name else set()
    try:
        ip = ipaddress.ip_address(name)
        local = ip.is_loopback or ip.is_unspecified
    except ValueError:
        local = name in ("", "localhost")
    if local:
        names.update(_LOOPBACK_NAMES)
    if name in ("", "0.0.0.0", "::"):
        names.discard(name)  # nobody browses to the wildcard address
    return frozenset(("http", n, port) for n in names)


def _stats(c: _Counters) -> ServerStats:
    # A frozen snapshot of the live counters (same fields), and the process's memory.
    return ServerStats(**attrs.asdict(c), rss_bytes=resident_bytes())


async def serve(
    service: Service,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    limits: ServerLimits | None = None,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``server = await nursery.start(serve, service, host, 0)``; runs until cancelled."""
    server = Server(service, limits)
    await server.run(host, port, task_status=task_status)


__all__ = [
    "CLIENT_KEYS",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ClientKey",
    "Connection",
    "Server",
    "ServerLimits",
    "ServerStats",
    "origin_key",
    "own_origins",
    "serve",
]
