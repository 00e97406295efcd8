"""Per-request output streams: the scheduler pushes, one consumer reads, nobody ever waits on a reader.

A stream is a mailbox of capacity one that *merges*: each step's delta is folded into the pending
one (tokens appended, text concatenated), so a slow consumer receives fewer, larger deltas and the
scheduler's push is always O(new tokens) and never blocks. Memory stays bounded by the request's
own ``n * max_tokens``. A stream ends exactly once: finished by the engine, cancelled, failed after
it started (finish reason ``error``), or rejected before it started (the consumer gets the error).

A stream given a ``RequestTiming`` (the ingress gives every admitted request one) feeds it: the
core's "first scheduled", each push's new tokens, and the end, once; a rejected request leaves no
trace there (``actors/request_metrics.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

import attrs
import trio

from mini_vllm.engine.detokenizer import IncrementalDetokenizer
from mini_vllm.engine.outputs import TokenLogprob

if TYPE_CHECKING:
    from mini_vllm.actors.request_metrics import RequestTiming

FinishReason = Literal["stop", "length", "cancelled", "error"]
# One sample's news as it crosses the core's boundary: (index, token_ids, text, logprobs, finish_reason)
SampleParts = tuple[int, tuple[int, ...], str, tuple[TokenLogprob, ...] | None, str | None]


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int  # all samples together


@attrs.frozen
class ErrorInfo:
    """Why a request that had started ended with ``finish_reason == "error"``."""

    code: str
    message: str


@attrs.frozen
class SampleOutput:
    """One sample's news since the consumer's previous delta (possibly several steps merged)."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None
    completion_tokens: int  # this sample's tokens so far, these included


@attrs.frozen
class GenerationDelta:
    """What ``Service.generate`` yields; the last one has ``finished`` set and every sample's reason."""

    request_id: str
    model: str
    samples: tuple[SampleOutput, ...]
    finished: bool
    usage: Usage
    error: ErrorInfo | None = None


@attrs.define
class _Pending:
    token_ids: list[int] = attrs.field(factory=list)
    text: list[str] = attrs.field(factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None


_ENGINE_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
_RANK: dict[FinishReason, int] = {"stop": 0, "length": 1, "cancelled": 2, "error": 3}


def worse_reason(a: FinishReason | None, b: FinishReason) -> FinishReason:
    """What a request whose samples ended with ``a`` and ``b`` reports (error > cancelled > length > stop)."""
    if a is None:
        return b
    return a if _RANK[a] >= _RANK[b] else b


def _detokenize(
    detokenizer: IncrementalDetokenizer, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprob, ...] | None,
    finish_reason: str | None,
) -> tuple[tuple[int, ...], str, tuple[TokenLogprob, ...] | None, str | None]:
    """One sample's ids to text, token by token as the engine would: a stop string completed by a
    token ends the sample there (that token kept, the text cut before the stop string)."""
    for k, token in enumerate(token_ids):
        detokenizer.add_tokens([token])
        if detokenizer.stopped_by is not None:
            kept = k + 1
            text = detokenizer.take(final=True)
            return token_ids[:kept], text, logprobs[:kept] if logprobs is not None else None, "stop"
    if finish_reason is not None:
        detokenizer.finish()
    return token_ids, detokenizer.take(final=finish_reason is not None), logprobs, finish_reason


class RequestStream:
    """The mailbox between one request's scheduler and its consumer (see the module docstring)."""

    def __init__(
        self, request_id: str, model: str, n: int, on_cancel: Callable[[RequestStream], None],
        timing: RequestTiming | None = None,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.n = n
        self._on_cancel = on_cancel
        self._pending: dict[int, _Pending] = {}
        self._counts = [0] * n
        self._finished = [False] * n
        self._num_prompt_tokens = 0
        self._ready = trio.Event()
        self._rejection: BaseException | None = None
        self._error: ErrorInfo | None = None
        self._done = False  # no more input will come (finished, cancelled, failed or rejected)
        self._delivered_last = False
        self.cancel_requested = False
        self._text: list[IncrementalDetokenizer] | None = None
        self._on_stop: Callable[[RequestStream], None] | None = None
        self._timing = timing
        self._outcome: FinishReason | None = None  # the worst of the ended samples' reasons

    def detokenize(self, detokenizers: list[IncrementalDetokenizer], on_stop: Callable[[RequestStream], None]) -> None:
        """Make the text here, one detokenizer per sample, from the token ids pushed (the engine
        core sends ids only). A stop string ends its sample at once; when every sample has ended
        so before the core says so, ``on_stop`` tells the core to abort the request."""
        self._text = detokenizers
        self._on_stop = on_stop

    # ---- producer side (the scheduler's task) -----------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done

    def push_parts(
        self, num_prompt_tokens: int, finished: bool, samples: Iterable[SampleParts], now: float | None = None
    ) -> None:
        """Merge one step's news, each sample as ``(index, token_ids, text, logprobs, finish_reason)``:
        the form a delta crosses the engine core's boundary in (tuples pickle ten times faster than
        records). Once cancelled, an aborted request shows no more output; but if this is the
        request's end (the core finished it before the abort arrived), it ends here, cancelled:
        the core will not speak of it again, so each request still ends exactly once. ``now``: when
        the news landed (``time.monotonic()``; the reader of one core message passes one value)."""
        if self._done:
            return
        if self.cancel_requested:
            if finished:
                self.finish_cancelled(now)
            return
        self._num_prompt_tokens = num_prompt_tokens
        added = 0
        for index, token_ids, text, logprobs, finish_reason in samples:
            if not 0 <= index < self.n or self._finished[index]:
                continue
            if self._text is not None:
                token_ids, text, logprobs, finish_reason = _detokenize(
                    self._text[index], token_ids, logprobs, finish_reason
                )
            p = self._pending.setdefault(index, _Pending())
            p.token_ids.extend(token_ids)
            if text:
                p.text.append(text)
            if logprobs is not None:
                p.logprobs = [*(p.logprobs or ()), *logprobs]
            self._counts[index] += len(token_ids)
            added += len(token_ids)
            if finish_reason is not None:
                p.finish_reason = reason = _ENGINE_REASONS[finish_reason]
                self._outcome = worse_reason(self._outcome, reason)
                self._finished[index] = True
        if added and self._timing is not None:
            if now is None:
                now = time.monotonic()
            self._timing.tokens(now, added)
        if finished:
            self._end_unfinished("cancelled", now)  # the engine finished the request: no sample stays open
        elif all(self._finished):  # stop strings ended every sample here: the core is still at it
            self._done = True
            self._record_end(now)
            if self._on_stop is not None:
                self._on_stop(self)
        self._ready.set()

    def set_prompt_tokens(self, count: int) -> None:
        self._num_prompt_tokens = count

    def mark_scheduled(self, at: float) -> None:
        """The engine core first put the request in a batch at ``at`` (the frontend's clock)."""
        if self._timing is not None and not self._done:
            self._timing.mark_scheduled(at)

    def finish_cancelled(self, now: float | None = None) -> None:
        """The request was aborted: every open sample ends with ``cancelled``."""
        if self._done:
            return
        self._end_unfinished("cancelled", now)
        self._ready.set()

    def fail(self, code: str, message: str, now: float | None = None) -> None:
        """The request had started and cannot go on (model failure, shutdown)."""
        if self._done:
            return
        self._error = ErrorInfo(code, message)
        self._end_unfinished("error", now)
        self._ready.set()

    def reject(self, exc: BaseException) -> None:
        """The request never started: the consumer's next read raises ``exc``."""
        if self._done:
            return
        self._rejection = exc
        self._done = True
        self._ready.set()

    def _end_unfinished(self, reason: FinishReason, now: float | None) -> None:
        for i in range(self.n):
            if not self._finished[i]:
                self._pending.setdefault(i, _Pending()).finish_reason = reason
                self._finished[i] = True
                self._outcome = worse_reason(self._outcome, reason)
        self._done = True
        self._record_end(now)

    def _record_end(self, now: float | None) -> None:
        if self._timing is not None:
            self._timing.ended(
                time.monotonic() if now is None else now, self._outcome or "cancelled", sum(self._counts),
                max(self._counts),
            )

    # ---- consumer side ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask for an abort (idempotent, never blocks). The scheduler frees the blocks at once."""
        if self._done or self.cancel_requested:
            return
        self.cancel_requested = True
        self._on_cancel(self)

    async def receive(self) -> GenerationDelta | None:
        """The merged news since the last call; None after the last delta has been handed out."""
        while not self._pending and not self._done:
            await self._ready.wait()
            self._ready = trio.Event()
        if self._rejection is not None:
            raise self._rejection
        if self._delivered_last:
            return None
        pending, self._pending = self._pending, {}
        self._delivered_last = self._done
        samples = tuple(
            SampleOutput(
                index=i,
                token_ids=tuple(p.token_ids),
                text="".join(p.text),
                logprobs=tuple(p.logprobs) if p.logprobs is not None else None,
                finish_reason=p.finish_reason,
                completion_tokens=self._counts[i],
            )
            for i, p in sorted(pending.items())
        )
        return GenerationDelta(
            request_id=self.request_id,
            model=self.model,
            samples=samples,
            finished=self._done,
            usage=Usage(self._num_prompt_tokens, sum(self._counts)),
            error=self._error if self._done else None,
        )
