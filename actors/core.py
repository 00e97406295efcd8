"""The engine core: the models of one device and their continuous-batching loops, behind a link.

It works in token ids only (no sockets to clients, no JSON); inside it the actors are today's:
a ``SchedulerActor`` and an ``ExecutorThread`` for its model, talking over trio channels (one core
per model). Its frontend (``core_client``) sends requests, aborts and a stop; the core answers,
per step, with one ``CoreStep``: every request's news of that step as tuples, and the statistics.
A request's first news also says when it was first scheduled, as a time of the core's clock that the
frontend reads against the message's own ``sent`` time (an age: the two processes' clocks never mix).

``run_core`` serves one link. In the server it runs in a process of its own, started by
``spawn_core`` (``python -m mini_vllm.actors.core_process``), so the event loop that writes frames to
clients never competes with the one that schedules and launches GPU work for the interpreter lock.
In-process (``ServiceConfig(core_process=False)``) the same code runs behind a memory link.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
import trio

from mini_vllm.actors.errors import ServiceError
from mini_vllm.actors.executor import ExecutorStats, ExecutorThread
from mini_vllm.actors.link import Link, SocketLink
from mini_vllm.actors.scheduler import SchedulerActor, SchedulerStats
from mini_vllm.actors.service_config import LoadProgress, ServiceConfig
from mini_vllm.engine.config import EngineArgs
from mini_vllm.engine.errors import ConfigError, MiniVllmError
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.loader import served_name
from mini_vllm.engine.outputs import RequestDelta
from mini_vllm.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


# ---- messages: frontend -> core ------------------------------------------------------------------
@attrs.frozen
class CoreStart:
    """What a core is to load and how to run it (the first message to a core process)."""

    model: EngineArgs | LLMEngine  # an engine only for a core in the same process
    config: ServiceConfig
    index: int  # this model's place among the service's models, for progress displays
    total: int
    rule: str  # how its KV share was set (``plan_kv_budget``)


@attrs.frozen
class CoreRequest:
    model: str
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    prompt: str | None


@attrs.frozen
class CoreAbort:
    model: str
    request_id: str


@attrs.frozen
class CoreFailAll:
    code: str
    message: str


@attrs.frozen
class CoreStop:
    message: str


# ---- messages: core -> frontend ------------------------------------------------------------------
@attrs.frozen
class CoreModel:
    name: str
    max_model_len: int
    vocab_size: int
    tokenizer_dir: str | None  # the frontend loads the same tokenizer from here; None: no tokenizer
    kv_rule: str  # how its KV cache was sized


@attrs.frozen
class CoreProgress:
    event: LoadProgress


@attrs.frozen
class CoreReady:
    model: CoreModel


@attrs.frozen
class CoreFailed:
    """Loading failed: the error's class name and message (the frontend raises it again)."""

    kind: str
    message: str


@attrs.frozen
class CoreStep:
    """One model's news since the previous ``CoreStep``: ``events`` (see ``CoreStream``) and stats."""

    model: str
    events: list[tuple[Any, ...]]
    scheduler: SchedulerStats
    executor: ExecutorStats
    sent: float = 0.0  # the core's time.monotonic() when the message was made (SCHEDULED events' times are on it)


# Event kinds in ``CoreStep.events``; each event is a tuple starting with its kind and request id.
# SCHEDULED (request id, the core's time.monotonic() when it was first scheduled) comes once, just
# before the request's first DELTA.
DELTA, PROMPT_TOKENS, CANCELLED, FAILED, REJECTED, SCHEDULED = range(6)


class CoreStream:
    """What the scheduler actor pushes a request's output into, inside the core: the same calls as
    the frontend's ``RequestStream``, each recorded as a tuple in the model's outbox."""

    def __init__(self, request_id: str, outbox: Outbox) -> None:
        self.request_id = request_id
        self.cancel_requested = False
        self.done = False
        self._outbox = outbox
        self._first = True  # no output yet: the first one says when the request was first scheduled

    def push(self, delta: RequestDelta) -> None:
        if self.done:
            return
        if self._first:
            self._first = False
            if delta.scheduled_at is not None:
                self._outbox.add((SCHEDULED, self.request_id, delta.scheduled_at))
        samples = [(s.index, s.token_ids, s.text, s.logprobs, s.finish_reason) for s in delta.samples]
        self._outbox.add((DELTA, self.request_id, delta.num_prompt_tokens, delta.finished, samples))
        if delta.finished:
            self._end()

    def set_prompt_tokens(self, count: int) -> None:
        self._outbox.add((PROMPT_TOKENS, self.request_id, count))

    def finish_cancelled(self) -> None:
        if not self.done:
            self._outbox.add((CANCELLED, self.request_id))
            self._end()

    def fail(self, code: str, message: str) -> None:
        if not self.done:
            self._outbox.add((FAILED, self.request_id, code, message))
            self._end()

    def reject(self, exc: BaseException) -> None:
        if not self.done:
            self._outbox.add((REJECTED, self.request_id, _portable(exc)))
            self._end()

    def _end(self) -> None:
        self.done = True
        self._outbox.streams.pop(self.request_id, None)


def _portable(exc: BaseException) -> BaseException:
    """An error the frontend can unpickle and raise: ours as they are, others as a ServiceError."""
    if isinstance(exc, MiniVllmError) and len(getattr(exc, "args", ())) <= 1:
        return exc
    return ServiceError(f"{type(exc).__name__}: {exc}")


class Outbox:
    """One model's events since the last send, and the live streams of that model."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.streams: dict[str, CoreStream] = {}
        self.ready = trio.Event()
        self.ready.set()  # the first message goes out at once: the frontend waits for statistics

    def add(self, event: tuple[Any, ...]) -> None:
        self.events.append(event)
        self.ready.set()

    def touch(self) -> None:
        self.ready.set()  # the statistics changed: worth a message even without events

    def take(self) -> list[tuple[Any, ...]]:
        events, self.events = self.events, []
        self.ready = trio.Event()
        return events


# ---- loading ----------------------------------------------------------------------------------
def check_model_names(models: Sequence[EngineArgs | LLMEngine]) -> None:
    """Raise ConfigError if two of ``models`` would be served under one name."""
    seen: dict[str, str] = {}
    for i, m in enumerate(models):
        if isinstance(m, EngineArgs):
            name, source = served_name(m), m.model or "demo"
        else:
            name, source = m.name, f"the engine at position {i + 1}"
        if name in seen:
            raise ConfigError(
                f"two models share the name {name!r} ({seen[name]} and {source}): give each its own name, "
                "e.g. --model NAME=PATH (EngineArgs.model_name from Python)"
            )
        seen[name] = source


async def load_engine(
    model: EngineArgs | LLMEngine, link: Link, index: int, total: int, rule: str
) -> tuple[LLMEngine, str]:
    """Build the engine in a worker thread (loading is slow, blocking work), reporting progress
    over ``link``; an engine the caller built is taken as it is."""
    if not isinstance(model, EngineArgs):
        return model, f"num_kv_blocks={model.block_manager.num_blocks} (engine built by the caller)"
    label = model.model_name or model.model or "demo"
    started = time.perf_counter()
    await link.send(CoreProgress(LoadProgress(index, total, label, "loading", 0.0, rule)))
    # The frontend tokenizes and makes the text: no tokenizer (nor transformers' import) here.
    args = attrs.evolve(model, skip_tokenizer_init=True)
    engine = await trio.to_thread.run_sync(LLMEngine.from_engine_args, args, abandon_on_cancel=True)
    seconds = time.perf_counter() - started
    await link.send(CoreProgress(LoadProgress(index, total, label, "loaded", seconds, rule)))
    return engine, f"{rule} -> {engine.block_manager.num_blocks} blocks"


def _set_cpu_threads(engine: LLMEngine, config: ServiceConfig) -> None:
    if engine.runner.device.type == "cpu":
        threads = config.cpu_threads or max(1, (os.cpu_count() or 1) - 1)
        if threads != torch.get_num_threads():
            log.info("torch intra-op threads: %d -> %d (a core for the event loop)", torch.get_num_threads(), threads)
            torch.set_num_threads(threads)


# ---- the core's loop --------------------------------------------------------------------------

# The young generation's collection threshold in the engine core process (CPython's is 700). A
# step of 256 sequences makes thousands of short-lived records, which reference counting frees
# anyway, and at 700 the collector ran several times a step, in the middle of it: 395 collections
# in 435 measured steps of `mini-vllm bench host --freeze-gc`, none at 20,000, and a full-batch
# decode step's host time 0.83-0.86 -> 0.78 ms on the 2-core VM (docs/gpu-execution.md).
CORE_GC_THRESHOLD = (20_000, 10, 10)


def settle_gc() -> None:
    """For a process that holds little but the engine now: move everything alive into the
    permanent generation, so that a full collection no longer walks the ~165k objects torch's import
    leaves (100-150 ms each, a stall of many GPU steps), and collect the young generation only
    after ``CORE_GC_THRESHOLD[0]`` net allocations. Process-wide: only the engine core process
    (and ``bench host --freeze-gc``, which measures it) calls it, never a program that embeds us."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*CORE_GC_THRESHOLD)


async def run_core(link: Link, start: CoreStart, *, own_process: bool = False) -> None:
    """Load ``start.model``, then serve the link until ``CoreStop`` or until the frontend is gone.

    ``own_process``: this process is the core's alone (``core_process.main``), so the collector may
    be settled for it. ``config.core_process`` run in the frontend's process (tests do) runs the
    jobs inline as a core process would but leaves the process's collector as it found it.

    One core per model: a model that crashes its process takes no other model with it. An engine
    loaded here from ``EngineArgs`` is closed on the way out (its device memory freed); an engine
    the caller built stays theirs.
    """
    config = start.config
    try:
        engine, rule = await load_engine(start.model, link, start.index, start.total, start.rule)
    except MiniVllmError as exc:
        await link.send(CoreFailed(type(exc).__name__, str(exc)))
        await link.aclose()
        return
    if own_process:
        settle_gc()
    try:
        _set_cpu_threads(engine, config)
        # In a process of its own the core's event loop serves only the link, so the device jobs run
        # on it (inline): a second thread would contend with the launches for the interpreter lock
        # (on the H200, ONLINE-1000 over WebSocket: 10,177 tok/s with the thread, 15,313 inline,
        # docs/serving.md). In-process, the thread keeps the frontend's loop free for its clients.
        executor = ExecutorThread(engine.name, inline=config.core_process, stop_timeout=config.stop_timeout)
        # The frontend admits (its count is the limit) and detokenizes. It ends a request at a stop
        # string before the core hears of it, so the core's own bound leaves room for requests
        # whose abort is still on its way.
        scheduler = SchedulerActor(
            engine, executor, 2 * config.max_pending_per_model, detokenize=False
        )
        outbox = Outbox()
        executor.start()
        # The frontend loads the tokenizer from the model's directory. An engine loaded here skipped
        # it (skip_tokenizer_init; a model has one iff it has a directory); an engine the caller
        # built has one or not.
        loaded_here = isinstance(start.model, EngineArgs)
        tokenizer_dir = engine.source_directory if loaded_here or engine.tokenizer is not None else None
        await link.send(CoreReady(CoreModel(
            engine.name, engine.max_model_len, engine.model_config.vocab_size,
            str(tokenizer_dir) if tokenizer_dir is not None else None, rule,
        )))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(scheduler.run)
                nursery.start_soon(_watch, scheduler, outbox)
                nursery.start_soon(_flush, link, scheduler, executor, outbox)
                message = await _serve_requests(link, scheduler, outbox)
                scheduler.fail_all("shutting_down", message)
                nursery.cancel_scope.cancel()
        finally:
            scheduler.close("the engine core has stopped")
            with trio.CancelScope(shield=True):
                await executor.aclose()
                # What the close just ended still goes out, if the frontend is there to read it.
                with trio.move_on_after(1):
                    await _send_step(link, scheduler, executor, outbox)
    except trio.BrokenResourceError:
        log.info("engine core: the frontend is gone; stopping")
    finally:
        if isinstance(start.model, EngineArgs):
            engine.close()
        with trio.CancelScope(shield=True):
            await link.aclose()  # the frontend's reader sees the end: the core has stopped


async def _serve_requests(link: Link, scheduler: SchedulerActor, outbox: Outbox) -> str:
    """Apply the frontend's messages until it says stop (or goes away); returns why we stop."""
    while True:
        try:
            message = await link.receive()
        except (trio.EndOfChannel, trio.BrokenResourceError):
            return "the frontend has gone"
        if isinstance(message, CoreRequest):
            stream = CoreStream(message.request_id, outbox)
            outbox.streams[message.request_id] = stream
            try:
                scheduler.submit(
                    stream, message.prompt_token_ids, message.params, message.priority, message.prompt  # type: ignore[arg-type]
                )
            except MiniVllmError as exc:  # Overloaded / ShuttingDown: the frontend's count raced ours
                stream.reject(exc)
        elif isinstance(message, CoreAbort):
            stream = outbox.streams.get(message.request_id)
            if stream is not None and not stream.cancel_requested:
                stream.cancel_requested = True
                scheduler.abort(stream)  # type: ignore[arg-type]
        elif isinstance(message, CoreFailAll):
            scheduler.fail_all(message.code, message.message)
        elif isinstance(message, CoreStop):
            return message.message
        else:
            log.error("engine core: unknown message %r ignored", type(message).__name__)


async def _watch(scheduler: SchedulerActor, outbox: Outbox) -> None:
    while True:
        await scheduler.wait_changed()
        outbox.touch()


async def _flush(link: Link, scheduler: SchedulerActor, executor: ExecutorThread, outbox: Outbox) -> None:
    """Send a model's news whenever there is some. While a send waits on a slow frontend, the next
    steps' events gather in the outbox and leave together: the core itself never waits per token."""
    while True:
        # Not ``wait()`` on a set event: it yields even then, and in a core that runs its device
        # jobs inline a yield here may let the next step take the thread before these tokens leave.
        if not outbox.ready.is_set():
            await outbox.ready.wait()
        await _send_step(link, scheduler, executor, outbox)


async def _send_step(link: Link, scheduler: SchedulerActor, executor: ExecutorThread, outbox: Outbox) -> None:
    step = CoreStep(scheduler.model, outbox.take(), scheduler.statistics(), executor.statistics(), time.monotonic())
    await link.send(step)


# ---- the core as a process --------------------------------------------------------------------
async def spawn_core(start: CoreStart) -> tuple[SocketLink, trio.Process]:
    """Start ``python -m mini_vllm.actors.core_process`` on one end of a socket pair; returns our end.

    The child gets a session of its own, so a Ctrl-C at the terminal reaches only the frontend,
    which stops the core in order; and it dies with us (it watches its parent, and the socket's end
    of file), so no core outlives its server, even one killed with SIGKILL.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "mini_vllm.actors.core_process", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            start_new_session=True,
        )
    finally:
        theirs.close()
    link = SocketLink(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    await link.send(start)
    return link, process
