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

The port is the front door's (``transport/front_door.py``): it parses HTTP/1.1, answers the HTTP
routes (the server's own ``/``, ``/health``, ``/version`` from ``transport/ops.py``, and those
mounted beside them: the OpenAI API, ``/metrics``) and hands WebSocket upgrades here.

Bounded resources (``ServerLimits``, docs/protocol.md "Limits of the server"): the front door
refuses a browser Origin that is not allowed (403), a request without a valid API key when keys
are set (401), and connections beyond ``max_connections`` (503); each client (remote address, or
connection) gets a fair share of each model's queue (``_ClientShares``, shared by WebSocket and
HTTP routes); accept errors such as EMFILE are logged once per interval with a count.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import urllib.parse
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from mini_vllm.actors.errors import Overloaded
from mini_vllm.actors.request_stream import GenerationDelta
from mini_vllm.actors.resources import resident_bytes
from mini_vllm.actors.service import Generation, Service
from mini_vllm.engine.errors import ConfigError, MiniVllmError
from mini_vllm.transport import ops, protocol
from mini_vllm.transport.auth import ApiKeys, select_subprotocol
from mini_vllm.transport.front_door import DoorCounters, DoorLimits, FrontDoor, Peer, ThrottledLog
from mini_vllm.transport.http import Admission, Routes
from mini_vllm.transport.metrics import metrics_routes
from mini_vllm.transport.openai_api import openai_routes
from mini_vllm.transport.protocol import ChatFrame, ClientFrame, GenerateFrame, ModelsFrame, ProtocolError, StatsFrame

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
ClientKey = Literal["ip", "connection", "off"]
CLIENT_KEYS: tuple[ClientKey, ...] = ("ip", "connection", "off")
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # one machine's loopback, however a page names it


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
    # TCP connections (HTTP and WebSocket) beyond this are answered 503 and closed: each one holds
    # a file descriptor, and without a bound idle sockets can take every descriptor the process has.
    max_connections: int = 1000
    # Seconds without a request in flight or a frame before a WebSocket is closed (1001); seconds
    # a keep-alive HTTP connection waits for its next request.
    idle_timeout: float = 300.0
    handshake_timeout: float = 10.0  # seconds from a request's first byte to its whole head and body
    max_header_bytes: int = 32 << 10  # an HTTP request head beyond this: 431
    max_body_bytes: int = 16 << 20  # an HTTP request body beyond this: 413
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
    # The front door's (HTTP and WebSocket on the one port); connections_* above count WebSockets.
    tcp_connections_open: int = 0  # TCP connections holding a max_connections place
    auth_refused: int = 0  # 401: no valid API key (HTTP requests and WebSocket handshakes)
    http_requests: int = 0  # request heads read, WebSocket handshakes included
    http_errors_4xx: int = 0  # answers with a 4xx status (refused handshakes included)
    http_errors_5xx: int = 0
    http_disconnects: int = 0  # HTTP routes cancelled because their client closed the connection
    http_slow_clients_dropped: int = 0  # an HTTP answer's write waited over slow_client_timeout


@attrs.define
class _Counters:
    connections_open: int = 0
    connections_total: int = 0
    requests_in_flight: int = 0
    frames_received: int = 0
    frames_sent: int = 0
    errors_sent: int = 0
    slow_clients_dropped: int = 0
    idle_closed: int = 0
    fair_share_refused: int = 0
    door: DoorCounters = attrs.field(factory=DoorCounters)  # the front door's: every TCP connection


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


class Server:
    """Serves a ``Service`` on one port until cancelled: WebSockets, the HTTP routes, the browser
    page; ``shutdown`` stops it gracefully.

    ``routes`` are HTTP routes beside the server's own (``/``, ``/health``, ``/version``, the OpenAI
    API's ``/v1/...``, ``/tokenize``, ``/detokenize``, ``/metrics``); more can be ``mount``ed before
    ``run`` (routes that need ``admission`` or ``statistics`` of this server).
    ``api_keys``: when given, every route but the public ones and every WebSocket need one.
    """

    def __init__(
        self,
        service: Service,
        limits: ServerLimits | None = None,
        *,
        routes: Routes | None = None,
        api_keys: Sequence[str] = (),
    ) -> None:
        self.service = service
        self.limits = limits or ServerLimits()
        self._counters = _Counters()
        self._connections: set[Connection] = set()
        self._shares = _ClientShares(self.limits, service) if self.limits.client_key != "off" else None
        self._log = ThrottledLog(self.limits.log_interval)
        self._own_origins: frozenset[tuple[str, str, int | None]] = frozenset()  # set once listening
        self._allowed_origins = frozenset(origin_key(a) for a in self.limits.allowed_origins) - {None}
        self._listen_scope = trio.CancelScope()
        self._stopping: str | None = None
        page = ops.page_files()
        self.has_page = bool(page)  # the browser page is installed: served at /
        self._routes: Routes = ops.ops_routes(service, lambda: self._stopping, page)
        self.keys = ApiKeys.of(api_keys)  # digests only; ``keys.enabled``: whether a key is required
        self._door = FrontDoor(
            _door_limits(self.limits),
            self._routes,
            public_paths=ops.public_paths(page),
            keys=self.keys,
            origin_allowed=self.origin_allowed,
            on_websocket=self._handle,
            throttled_log=self._log,
            counters=self._counters.door,
        )
        # The OpenAI-compatible API and Prometheus' /metrics are the server's own, on every port.
        self.mount(openai_routes(service, admission=self._shares, retry_after=self.limits.retry_after,
                                 max_body_bytes=self.limits.max_body_bytes))
        self.mount(metrics_routes(service))
        if routes:
            self.mount(routes)
        self.port: int | None = None
        self.host: str | None = None

    def mount(self, routes: Routes) -> None:
        """Add HTTP routes (before ``run``); a (method, path) that is taken already is a ConfigError."""
        taken = sorted(f"{method} {path}" for method, path in routes if (method, path) in self._routes)
        if taken:
            raise ConfigError(f"routes already served: {', '.join(taken)}")
        for (method, path), route in routes.items():
            if method != method.upper() or not path.startswith("/"):
                raise ConfigError(f"a route is (METHOD, /path) with the method upper case, got {(method, path)!r}")
            self._routes[method, path] = route

    @property
    def admission(self) -> Admission | None:
        """The per-client fair share of each model's queue (None: ``client_key="off"``), the same
        one the WebSocket requests take: HTTP routes ask it before starting a request."""
        return self._shares

    @property
    def stopping(self) -> str | None:
        """Why the server is shutting down, or None while it serves."""
        return self._stopping

    @property
    def url(self) -> str:
        return f"ws://{netloc(self.host, self.port)}"

    @property
    def http_url(self) -> str:
        return f"http://{netloc(self.host, self.port)}"

    async def run(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (port 0: any free port; see ``self.port``) until cancelled."""
        async with trio.open_nursery() as handlers:
            self.port = await handlers.start(self._listen, host, port, handlers)
            self.host = host
            self._own_origins = own_origins(host, self.port)
            task_status.started(self)
            await trio.sleep_forever()

    async def _listen(self, host: str, port: int, handlers: trio.Nursery, *, task_status: trio.TaskStatus[int]) -> None:
        with self._listen_scope:
            listeners = await trio.open_tcp_listeners(port, host=host)
            # Bound already (connections wait in the backlog), so the port is known before serving.
            task_status.started(listeners[0].socket.getsockname()[1])
            await self._door.serve(listeners, handlers)

    async def shutdown(self, message: str = "the server is shutting down", grace: float = 5.0) -> None:
        """Stop accepting, end in-flight requests with ``message``, close every connection (1001)."""
        self._stopping = message
        self._listen_scope.cancel()
        self.service.shutdown(message)
        for conn in list(self._connections):
            conn.close(CLOSE_GOING_AWAY, message)
        self._door.close_idle()
        with trio.move_on_after(grace):
            while self._door.open_connections:
                await self._door.wait_changed()

    def origin_allowed(self, origin: str) -> bool:
        """Whether a request whose Origin header is ``origin`` may be served (no header: always)."""
        allowed = self.limits.allowed_origins
        if "*" in allowed:
            return True
        origin = origin.strip().lower()
        if origin == "null":
            return "null" in allowed
        key = origin_key(origin)
        return key is not None and (key in self._own_origins or key in self._allowed_origins)

    async def _handle(self, request: WebSocketRequest, peer: Peer) -> None:
        """A WebSocket handshake the front door let in (Origin, key, capacity checked)."""
        # Everything is caught here: an exception escaping would end the front door's connection task.
        try:
            ws = await request.accept(subprotocol=select_subprotocol(request.proposed_subprotocols))
        except Exception:  # the client vanished during the handshake
            return
        if self._listen_scope.cancel_called:  # accepted just as we stopped listening
            with trio.move_on_after(self.limits.close_timeout):
                await ws.aclose(CLOSE_GOING_AWAY, "the server is shutting down")
            return
        await self._serve_connection(peer, ws)

    async def _serve_connection(self, peer: Peer, ws: WebSocketConnection) -> None:
        client = peer.client(self.limits.client_key)
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
            with trio.move_on_after(self.limits.close_timeout, shield=True):
                await ws.aclose(*conn.close_reason)  # idempotent; cuts TCP if the close frame is stuck

    def statistics(self) -> ServerStats:
        return _stats(self._counters)


def _door_limits(limits: ServerLimits) -> DoorLimits:
    return DoorLimits(
        max_connections=limits.max_connections,
        handshake_timeout=limits.handshake_timeout,
        idle_timeout=limits.idle_timeout,
        slow_client_timeout=limits.slow_client_timeout,
        close_timeout=limits.close_timeout,
        max_header_bytes=limits.max_header_bytes,
        max_body_bytes=limits.max_body_bytes,
        max_message_bytes=limits.hard_max_frame_bytes,
        retry_after=limits.retry_after,
        client_key=limits.client_key,
    )


def netloc(host: str | None, port: int | None) -> str:
    """``host:port`` for a URL (an IPv6 address in brackets)."""
    name = host or ""
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


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
    # A frozen snapshot of the live counters (the same fields), and the process's memory.
    counters = attrs.asdict(c, recurse=False)
    door = attrs.asdict(counters.pop("door"))
    return ServerStats(**counters, **door, rss_bytes=resident_bytes())


async def serve(
    service: Service,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    limits: ServerLimits | None = None,
    *,
    routes: Routes | None = None,
    api_keys: Sequence[str] = (),
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``server = await nursery.start(serve, service, host, 0)``; runs until cancelled."""
    server = Server(service, limits, routes=routes, api_keys=api_keys)
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
    "netloc",
    "origin_key",
    "own_origins",
    "serve",
]
