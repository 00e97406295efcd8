"""The frontend's side of the engine core: one ``CoreProxy`` per model, standing where the model's
scheduler actor stands for the ingress (``submit``, ``abort``, ``fail_all``, ``statistics``), and
one ``CoreClient`` per core that carries their messages over the link.

Admission control happens here, at once and without a round trip: a proxy counts the requests it
has handed to the core and not yet seen end. The core answers each step with one ``CoreStep`` per
model, which the client applies to the requests' ``RequestStream``s (they merge, so a slow
consumer never holds the reader up). If the core goes away (it crashed, or was killed), every
request in flight ends with finish reason ``error`` and code ``engine_core_exited``, and the
model refuses new requests with that reason: nothing hangs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from mini_vllm.actors.core import (
    CANCELLED,
    DELTA,
    FAILED,
    PROMPT_TOKENS,
    REJECTED,
    SCHEDULED,
    CoreAbort,
    CoreFailAll,
    CoreFailed,
    CoreModel,
    CoreProgress,
    CoreReady,
    CoreRequest,
    CoreStep,
    CoreStop,
)
from mini_vllm.actors.errors import Overloaded, ServiceError, ShuttingDown
from mini_vllm.actors.executor import ExecutorStats
from mini_vllm.actors.link import Link
from mini_vllm.actors.request_stream import RequestStream
from mini_vllm.actors.scheduler import SchedulerStats
from mini_vllm.actors.service_config import LoadProgress
from mini_vllm.engine import errors as engine_errors
from mini_vllm.engine.detokenizer import IncrementalDetokenizer
from mini_vllm.engine.errors import MiniVllmError, ModelLoadError
from mini_vllm.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class CoreExited(ServiceError):
    code = "engine_core_exited"


class CoreProxy:
    """One model of a core, as the ingress sees it."""

    def __init__(self, client: CoreClient, info: CoreModel, max_pending: int) -> None:
        self.model = info.name
        self.info = info
        self.max_pending = max_pending
        self._client = client
        self._streams: dict[str, RequestStream] = {}
        self._closed: str | None = None
        self._gone: str | None = None  # why the core is unavailable, once it is
        self._stats: SchedulerStats | None = None
        self._executor: ExecutorStats | None = None
        self._changed = trio.Event()
        self.tokenizer: Any = None  # set by the service: text is made here, from the core's ids

    # ---- the ingress's calls: never block ------------------------------------------------------
    def submit(
        self, stream: RequestStream, prompt_token_ids: list[int], params: SamplingParams, priority: int,
        prompt: str | None,
    ) -> None:
        if self._gone is not None:
            raise CoreExited(self._gone)
        if self._closed is not None:
            raise ShuttingDown(self._closed)
        if len(self._streams) >= self.max_pending:
            raise Overloaded(
                f"model {self.model!r} has {len(self._streams)} requests queued or running (the limit); retry later"
            )
        if self.tokenizer is not None:
            stream.detokenize(
                [IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop) for _ in range(params.n)],
                self._stopped,
            )
        self._streams[stream.request_id] = stream
        self._client.send_soon(CoreRequest(self.model, stream.request_id, prompt_token_ids, params, priority, prompt))

    def _stopped(self, stream: RequestStream) -> None:
        """Stop strings ended the request here: the core aborts it (its blocks free at once)."""
        if self._streams.pop(stream.request_id, None) is stream and self._gone is None:
            self._client.send_soon(CoreAbort(self.model, stream.request_id))
        self._signal()

    def abort(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream and self._gone is None:
            self._client.send_soon(CoreAbort(self.model, stream.request_id))

    def fail_all(self, code: str, message: str) -> None:
        if self._closed is None:
            self._closed = message
            self._client.send_soon(CoreFailAll(code, message))

    def close(self, message: str) -> None:
        """The core has stopped: end whatever it did not end itself."""
        self._closed = self._closed or message
        self._end_all("shutting_down", message)

    def statistics(self) -> SchedulerStats:
        if self._stats is None:
            raise RuntimeError("no statistics before the core's first step")
        # The frontend's count and bound: the core's own bound is larger (room for aborts in flight).
        return attrs.evolve(
            self._stats, pending=len(self._streams), max_pending=self.max_pending, available=self._gone is None
        )

    def executor_statistics(self) -> ExecutorStats | None:
        return self._executor

    async def wait_changed(self) -> None:
        await self._changed.wait()

    @property
    def available(self) -> bool:
        return self._gone is None

    @property
    def has_statistics(self) -> bool:
        return self._stats is not None

    # ---- the client's calls --------------------------------------------------------------------
    def apply(self, step: CoreStep) -> None:
        streams = self._streams
        now = time.monotonic()  # one reading for the whole message: its requests' tokens landed together
        for event in step.events:
            kind, request_id = event[0], event[1]
            stream = streams.get(request_id)
            if stream is None:
                continue  # ended here already (the core's last word on an aborted request)
            if kind == DELTA:
                stream.push_parts(event[2], event[3], event[4], now)
                if event[3]:
                    del streams[request_id]
            elif kind == PROMPT_TOKENS:
                stream.set_prompt_tokens(event[2])
            elif kind == SCHEDULED:  # the core's time, as an age against the message's: ours again
                stream.mark_scheduled(now - max(step.sent - event[2], 0.0))
            elif kind == CANCELLED:
                stream.finish_cancelled(now)
                del streams[request_id]
            elif kind == FAILED:
                stream.fail(event[2], event[3], now)
                del streams[request_id]
            elif kind == REJECTED:
                stream.reject(event[2])
                del streams[request_id]
        self._stats, self._executor = step.scheduler, step.executor
        self._signal()

    def core_gone(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
            self._end_all(CoreExited.code, reason)

    def _end_all(self, code: str, message: str) -> None:
        for stream in list(self._streams.values()):
            stream.fail(code, message)
        self._streams.clear()
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class CoreClient:
    """Our end of one core's link: the handshake, a sender, and the reader that lands ``CoreStep``s
    (a core serves one model today; the messages name it, so one could serve several)."""

    def __init__(self, link: Link, max_pending: int, describe_exit: Callable[[], Awaitable[str]]) -> None:
        self._link = link
        self._max_pending = max_pending
        self._describe_exit = describe_exit  # why the core is gone, in words (exit status)
        # Unbounded, so that the ingress's calls never block: what waits here is bounded anyway, by
        # admission (one request and at most one abort per admitted request, one fail-all, a stop).
        self._outgoing_send, self._outgoing = trio.open_memory_channel[Any](math.inf)
        self.proxies: dict[str, CoreProxy] = {}
        self.running = False  # run() has started: the core's messages are being read
        self.finished = trio.Event()  # the core's link has ended (it stopped, or died)

    async def handshake(self, on_progress: Callable[[LoadProgress], None] | None) -> CoreModel:
        """Relay loading progress until the core is ready; raise what it failed with."""
        while True:
            try:
                message = await self._link.receive()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                raise ModelLoadError(f"the engine core exited while loading the model ({await self._describe_exit()})") from None
            if isinstance(message, CoreProgress):
                if on_progress is not None:
                    on_progress(message.event)
            elif isinstance(message, CoreFailed):
                kind = getattr(engine_errors, message.kind, None)
                if isinstance(kind, type) and issubclass(kind, MiniVllmError):
                    raise kind(message.message)
                raise ModelLoadError(message.message)
            elif isinstance(message, CoreReady):
                self.proxies = {message.model.name: CoreProxy(self, message.model, self._max_pending)}
                return message.model
            else:
                raise ModelLoadError(f"the engine core sent {type(message).__name__} before it was ready")

    def send_soon(self, message: Any) -> None:
        self._outgoing_send.send_nowait(message)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop)
            self.running = True
            task_status.started()
            await self._receive_loop()
            nursery.cancel_scope.cancel()

    def stop(self, message: str) -> None:
        """Ask the core to stop; what it ends on the way out still arrives through ``run``."""
        self.send_soon(CoreStop(message))

    async def _send_loop(self) -> None:
        async for message in self._outgoing:
            try:
                await self._link.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the reader sees the end too and reports it

    async def _receive_loop(self) -> None:
        proxies: Mapping[str, CoreProxy] = self.proxies
        while True:
            try:
                message = await self._link.receive()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                break
            if isinstance(message, CoreStep):
                proxy = proxies.get(message.model)
                if proxy is not None:
                    proxy.apply(message)
            else:
                log.error("engine core sent an unexpected %s; ignored", type(message).__name__)
        reason = f"the engine core exited ({await self._describe_exit()})"
        for proxy in proxies.values():
            proxy.core_gone(reason)
        self.finished.set()
