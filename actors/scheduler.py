"""The scheduler actor: one per model, the continuous-batching loop around the engine.

It is the only task that calls the engine (the engine is not thread-safe and not re-entrant),
except for the device work (``execute``, or its halves ``launch`` and ``collect``), which it hands
to the model's executor thread. Its inbox is a bounded channel of submissions and aborts;
admission control keeps the number of live requests at most ``max_pending``, and the inbox is
sized so that sending into it never blocks the sender (see below). Outputs go straight into each
request's ``RequestStream``, which merges instead of waiting: the loop never waits on a client.

Why the inbox never fills: it holds the Submits of admitted requests not yet added (at most
``max_pending``) and at most one Abort per cancelled request, whether still live (at most
``max_pending``) or finished since the last drain with its Abort still queued (at most
``max_pending`` more); hence a capacity of three per admitted request.

Aborts that arrive while a step runs in the executor thread are applied right after the step:
the stream was already marked cancelled, so the step's output for that request is dropped.
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from mini_vllm.actors.errors import Overloaded, ServiceError, ShuttingDown
from mini_vllm.actors.executor import ExecutorThread
from mini_vllm.actors.request_stream import RequestStream
from mini_vllm.actors.resources import resident_bytes
from mini_vllm.engine.block_manager import BlockStats
from mini_vllm.engine.errors import MiniVllmError
from mini_vllm.engine.fault_isolation import FaultIsolation, Verdict
from mini_vllm.engine.llm_engine import EngineStats, LLMEngine
from mini_vllm.engine.outputs import RequestDelta
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.step_loop import StepLoop, StepResult

log = logging.getLogger(__name__)
_SPARE_INBOX = 16  # room for the fail-all message, beyond three per admitted request
RSS_INTERVAL = 1.0  # seconds between two reads of the process's resident memory


@attrs.frozen
class Submit:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    prompt: str | None


@attrs.frozen
class Abort:
    stream: RequestStream


@attrs.frozen
class FailAll:
    code: str
    message: str


_Message = Submit | Abort | FailAll


@attrs.frozen
class SchedulerStats:
    model: str
    pending: int  # admitted and not yet finished (the admission-control count)
    max_pending: int
    inbox: int  # messages waiting to be applied
    steps: int
    step_errors: int
    last_step_seconds: float
    busy_seconds: float  # schedule + process on the event loop (the device work is the executor's)
    pipelined: bool  # step N+1 is queued on the device before step N's tokens are processed
    engine: EngineStats
    blocks: BlockStats
    available: bool = True  # False once the model's engine core has exited (the frontend's view)
    rss_bytes: int = 0  # resident memory of the process this scheduler runs in (the engine core's)


class SchedulerActor:
    def __init__(self, engine: LLMEngine, executor: ExecutorThread, max_pending: int, detokenize: bool = True) -> None:
        self.engine = engine
        self.detokenize = detokenize  # False: the frontend turns the ids into text (the engine core)
        self.model = engine.name
        self.executor = executor
        self.max_pending = max_pending
        # The engine's step loop, driven here with the device jobs on the executor thread; one step
        # ahead where the engine schedules asynchronously (GPUs).
        self.loop = StepLoop(engine.async_scheduling)
        self._send, self._inbox = trio.open_memory_channel[_Message](3 * max_pending + _SPARE_INBOX)
        self._streams: dict[str, RequestStream] = {}
        self._pending = 0
        self._closed_reason: str | None = None
        self._steps = 0
        self._step_errors = 0
        self._last_step = 0.0
        self._busy = 0.0
        self._changed = trio.Event()
        self._isolation = FaultIsolation()  # after a failed step: whose request broke it
        # Statistics are taken after every step and message; the process's memory is read from
        # /proc at most once a second (RSS_INTERVAL), not on that hot path.
        self._rss = 0
        self._rss_read = -RSS_INTERVAL
        self._stats = self._snapshot()

    # ---- called from other tasks (ingress); never block, never touch the engine ------------------
    def submit(
        self,
        stream: RequestStream,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int,
        prompt: str | None,
    ) -> None:
        """Admit a request or raise Overloaded / ShuttingDown at once."""
        if self._closed_reason is not None:
            raise ShuttingDown(self._closed_reason)
        if self._pending >= self.max_pending:
            raise Overloaded(
                f"model {self.model!r} has {self._pending} requests queued or running (the limit); retry later"
            )
        self._pending += 1
        self._send.send_nowait(Submit(stream, prompt_token_ids, params, priority, prompt))

    def abort(self, stream: RequestStream) -> None:
        self._send.send_nowait(Abort(stream))

    def fail_all(self, code: str, message: str) -> None:
        """End every request with an error and refuse new ones (shutdown)."""
        if self._closed_reason is None:
            self._closed_reason = message
            self._send.send_nowait(FailAll(code, message))

    def close(self, message: str) -> None:
        """After the loop has stopped: end every request still here, queued ones included."""
        self._closed_reason = self._closed_reason or message
        while True:
            try:
                msg = self._inbox.receive_nowait()
            except trio.WouldBlock:
                break
            if isinstance(msg, Submit):
                msg.stream.reject(ShuttingDown(message))
                self._pending -= 1
        self._fail_everything("shutting_down", message)
        self._publish()

    def statistics(self) -> SchedulerStats:
        return self._stats

    async def wait_changed(self) -> None:
        """Wait for the next statistics update (after a step or an inbox message)."""
        await self._changed.wait()

    # ---- the loop --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self.loop.has_work(self.engine):
                self._handle(await self._inbox.receive())
            self._drain()
            try:
                progressed = await self._step()
            except Exception as exc:  # a failing step must not take the server down
                self.loop.reset()
                self._step_failed(exc)
                continue
            self._drain()  # aborts that arrived during the step take effect now
            self._publish()
            if not progressed:  # nothing can run until something changes: wait for a message
                self._handle(await self._inbox.receive())

    async def _step(self) -> bool:
        """One turn of the step loop, its device jobs on the executor thread; whether work was done."""
        t0 = time.perf_counter()
        steps = self.loop.step(self.engine)
        busy = time.perf_counter()
        try:
            job = next(steps)
            while True:
                self._busy += time.perf_counter() - busy
                result = await self.executor.run(job)
                busy = time.perf_counter()
                job = steps.send(result)
        except StopIteration as done:
            self._busy += time.perf_counter() - busy
            outcome: StepResult = done.value
        self._deliver(outcome.deltas)
        if outcome.progressed:
            self._steps += 1
            self._last_step = time.perf_counter() - t0
        return outcome.progressed

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        """Push each request's delta of the landed step(s) into its stream."""
        t0 = time.perf_counter()
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            stream.push(delta)
            if delta.finished:
                self._forget(stream)
        if self._isolation.needs_news:  # a failed step's cause is being sought
            tokens = {d.request_id: sum(len(s.token_ids) for s in d.samples) for d in deltas}
            self._apply(self._isolation.landed(tokens, [d.request_id for d in deltas if d.finished]))
        self._busy += time.perf_counter() - t0

    def _drain(self) -> None:
        while True:
            try:
                message = self._inbox.receive_nowait()
            except trio.WouldBlock:
                return
            self._handle(message)

    def _handle(self, message: _Message) -> None:
        if isinstance(message, Submit):
            self._add(message)
        elif isinstance(message, Abort):
            self._abort(message.stream)
        else:
            self._fail_everything(message.code, message.message)
        self._publish()

    def _add(self, msg: Submit) -> None:
        stream = msg.stream
        if stream.cancel_requested:  # cancelled before it reached us
            stream.finish_cancelled()
            self._pending -= 1
            return
        if self._closed_reason is not None:
            stream.reject(ShuttingDown(self._closed_reason))
            self._pending -= 1
            return
        try:
            self.engine.add_request(
                stream.request_id, msg.prompt_token_ids, msg.params, msg.priority, prompt=msg.prompt,
                detokenize=self.detokenize,
            )
        except MiniVllmError as exc:  # InvalidRequest: too long, ids out of vocabulary, ...
            stream.reject(exc)
            self._pending -= 1
            return
        except Exception as exc:  # a bug in the engine: refuse this request, keep the loop alive
            log.exception("model %r: add_request failed", self.model)
            stream.reject(ServiceError(f"internal error: {type(exc).__name__}: {exc}"))
            self._pending -= 1
            return
        stream.set_prompt_tokens(len(msg.prompt_token_ids))
        self._streams[stream.request_id] = stream
        if self._isolation.arrived(stream.request_id):  # held until the search for a bad request ends
            self.engine.hold(stream.request_id)

    def _abort(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is not stream:
            return  # finished already, or its Submit is still ahead in the inbox (handled there)
        try:
            self.engine.abort_request(stream.request_id)  # frees its blocks now
        except Exception:  # a bug in the engine must not stop the loop; the request ends regardless
            log.exception("model %r: abort_request failed", self.model)
        stream.finish_cancelled()
        self._forget(stream)

    def _forget(self, stream: RequestStream) -> None:
        del self._streams[stream.request_id]
        self._pending -= 1
        self._isolation.forget(stream.request_id)

    def _fail_everything(self, code: str, message: str) -> None:
        for stream in list(self._streams.values()):
            try:
                self.engine.abort_request(stream.request_id)
            except Exception:
                log.exception("model %r: abort_request failed", self.model)
            stream.fail(code, message)
            self._forget(stream)

    def _step_failed(self, exc: Exception) -> None:
        """One request's bad input must not end the others: roll the running requests back to their
        landed tokens and search for the one(s) that break the step (``engine.fault_isolation``)."""
        self._step_errors += 1
        if self.engine.closed:  # the step closed the engine (a tensor-parallel rank died): nothing to retry
            message = f"model {self.model!r} failed and is closed: {exc}"
            log.error("model %r: a step failed and closed the engine; failing every request", self.model, exc_info=exc)
            self._closed_reason = self._closed_reason or message  # new requests are refused with it
            self._fail_everything("model_error", message)
            self._publish()
            return
        try:
            verdict = self._isolation.failed(self.engine.roll_back())
        except Exception:  # the engine's books are broken too: nothing left to save
            log.exception("model %r: rolling back a failed step failed", self.model)
            verdict = Verdict(systemic=True)
        log.error("model %r: a step failed (%s)", self.model,
                  "failing every request" if verdict.systemic else
                  f"failing {list(verdict.blame)}" if verdict.blame else
                  f"holding {len(verdict.hold)} requests out while the others retry", exc_info=exc)
        self._apply(verdict, exc)
        self._publish()

    def _apply(self, verdict: Verdict, exc: Exception | None = None) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "a step failed"
        if verdict.systemic:
            self._fail_everything(
                "model_error", f"model {self.model!r} failed, and its steps fail whatever they hold: {reason}"
            )
            return
        for request_id in verdict.blame:
            stream = self._streams.get(request_id)
            try:
                self.engine.abort_request(request_id)
            except Exception:
                log.exception("model %r: abort_request failed", self.model)
            if stream is not None:
                stream.fail("model_error", f"this request makes the model's step fail ({reason}); the others go on")
                self._forget(stream)
        for request_id in verdict.hold:
            self.engine.hold(request_id)
        for request_id in verdict.release:
            self.engine.release(request_id)

    def _snapshot(self) -> SchedulerStats:
        now = time.monotonic()
        if now - self._rss_read >= RSS_INTERVAL:
            self._rss, self._rss_read = resident_bytes(), now
        return SchedulerStats(
            model=self.model,
            pending=self._pending,
            max_pending=self.max_pending,
            inbox=self._inbox.statistics().current_buffer_used,
            steps=self._steps,
            step_errors=self._step_errors,
            last_step_seconds=self._last_step,
            busy_seconds=self._busy,
            pipelined=self.loop.pipelined,
            engine=self.engine.statistics(),
            blocks=self.engine.block_manager.statistics(),
            rss_bytes=self._rss,
        )

    def _publish(self) -> None:
        self._stats = self._snapshot()
        self._changed.set()
        self._changed = trio.Event()
