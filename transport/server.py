"""The WebSocket server (trio-websocket): one ``Connection`` per client, many requests per connection.

Per connection, four kinds of task share one nursery tree:

- the reader parses each frame (``mini_vllm.transport.protocol``) and answers bad ones with an ``error``
  frame; it never raises out, so no client can bring the server down;
- one task per request iterates the service's ``Generation`` and turns deltas into frames;
- the writer is the only task that writes to the socket, from a bounded queue of frames;
- the watchdog drops a client whose socket has not taken a frame for ``slow_client_timeout``.

Backpressure: when a client reads slowly the frame queue fills, request tasks wait on it, and
meanwhile each request's stream merges new tokens into one pending delta. The scheduler never
waits. A closed connection cancels its request tasks, which aborts their requests.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from mini_vllm.actors.request_stream import GenerationDelta
from mini_vllm.actors.service import Generation, Service
from mini_vllm.engine.errors import ConfigError, MiniVllmError
from mini_vllm.transport import protocol
from mini_vllm.transport.protocol import ChatFrame, ClientFrame, GenerateFrame, ModelsFrame, ProtocolError, StatsFrame

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008


@attrs.frozen
class ServerLimits:
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES  # larger frames get an error frame
    hard_max_frame_bytes: int = 16 << 20  # trio-websocket closes the connection (1009) beyond this
    max_requests_per_connection: int = 64
    outbound_frames: int = 64  # the per-connection frame queue
    slow_client_timeout: float = 30.0  # seconds one frame may wait for the socket
    slow_client_grace: float = 5.0  # then this long to deliver the close frame before cutting TCP
    close_timeout: float = 2.0

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{field.name} must be a positive number, got {value!r}")
        if self.hard_max_frame_bytes < self.max_frame_bytes:
            raise ConfigError("hard_max_frame_bytes must be >= max_frame_bytes")


@attrs.frozen
class ServerStats:
    connections_open: int
    connections_total: int
    requests_in_flight: int
    frames_received: int
    frames_sent: int
    errors_sent: int
    slow_clients_dropped: int


@attrs.define
class _Counters:
    connections_open: int = 0
    connections_total: int = 0
    requests_in_flight: int = 0
    frames_received: int = 0
    frames_sent: int = 0
    errors_sent: int = 0
    slow_clients_dropped: int = 0


def _error_code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in protocol.ERROR_CODES:
        return code
    if isinstance(exc, ConfigError):
        return "invalid_field"
    return "invalid_request"


class Connection:
    def __init__(self, ws: WebSocketConnection, service: Service, limits: ServerLimits, counters: _Counters) -> None:
        self._ws = ws
        self._service = service
        self._limits = limits
        self._counters = counters
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
        generation = self._start(frame)
        self._requests[frame.id] = generation
        self._counters.requests_in_flight += 1
        requests.start_soon(self._run_request, frame.id, generation)

    def _start(self, frame: GenerateFrame | ChatFrame) -> Generation:
        common: dict[str, Any] = {"model": frame.model, "params": frame.params, "priority": frame.priority}
        if isinstance(frame, ChatFrame):
            messages = [{"role": m.role, "content": m.content} for m in frame.messages]
            return self._service.chat(messages, **common)
        prompt = frame.prompt if frame.prompt is not None else list(frame.prompt_token_ids or ())
        return self._service.generate(prompt, **common)

    # ---- one request --------------------------------------------------------------------------------
    async def _run_request(self, client_id: str, generation: Generation) -> None:
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


class Server:
    """Serves a ``Service`` over WebSockets until cancelled; ``shutdown`` stops it gracefully."""

    def __init__(self, service: Service, limits: ServerLimits | None = None) -> None:
        self.service = service
        self.limits = limits or ServerLimits()
        self._counters = _Counters()
        self._connections: set[Connection] = set()
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
            ws_server = await handlers.start(self._listen, host, port)
            self.host, self.port = host, ws_server.port
            task_status.started(self)
            await trio.sleep_forever()

    async def _listen(self, host: str, port: int, *, task_status: trio.TaskStatus[Any]) -> None:
        with self._listen_scope:
            await serve_websocket(
                self._handle,
                host,
                port,
                None,
                handler_nursery=self._handlers,
                max_message_size=self.limits.hard_max_frame_bytes,
                disconnect_timeout=self.limits.close_timeout,
                task_status=task_status,
            )

    async def shutdown(self, message: str = "the server is shutting down", grace: float = 5.0) -> None:
        """Stop accepting, end in-flight requests with ``message``, close every connection (1001)."""
        self._listen_scope.cancel()
        self.service.shutdown(message)
        for conn in list(self._connections):
            conn.close(CLOSE_GOING_AWAY, message)
        with trio.move_on_after(grace):
            while self._connections:
                await self._all_closed.wait()

    async def _handle(self, request: WebSocketRequest) -> None:
        # Everything is caught here: an exception escaping a handler would stop trio-websocket's server.
        try:
            ws = await request.accept()
        except Exception:  # the client vanished during the handshake
            return
        if self._listen_scope.cancel_called:  # accepted just as we stopped listening
            await ws.aclose(CLOSE_GOING_AWAY, "the server is shutting down")
            return
        conn = Connection(ws, self.service, self.limits, self._counters)
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


def _stats(c: _Counters) -> ServerStats:
    return ServerStats(**attrs.asdict(c))  # a frozen snapshot of the live counters (same fields)


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


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Connection", "Server", "ServerLimits", "ServerStats", "serve"]
