"""Ingress: the front door. Routes by model name, tokenizes, admits, and fans outputs out.

Everything a request needs before it reaches a scheduler happens here, on the caller's task:
pick the model (by name; optional when one model is served), turn the prompt or chat messages
into token ids, refuse a duplicate id, then hand a ``RequestStream`` to the model's scheduler,
whose admission control answers at once (``Overloaded`` beyond its bounded queue). The scheduler
pushes outputs into that stream, which is the fan-out: one mailbox per request, no shared queue
that a slow reader could clog. The "scheduler" here is the model's ``CoreProxy``: the engine core
(in this process or its own) answers through it with token ids; each request's stream makes the
text (incremental detokenization and stop strings) here, in the frontend.

Short prompts are tokenized right here on the event loop (well under a millisecond); long ones go
to a worker thread, so a megabyte prompt cannot stall other clients.

Before any of that work, a request is checked against the server's per-request limits
(``ServiceConfig``: max n, logprobs, stop strings, ...) and the model (top_k and token ids inside
the vocabulary, the prompt inside max_model_len): what passes cannot fail the engine core's step,
which would fail every request batched with it (docs/protocol.md, "Request limits").

Every admitted request's stream carries a ``RequestTiming`` from the ingress's ``RequestMetrics``,
with the request's arrival taken before any of that work (as vLLM's arrival time): the per-request
figures behind ``/metrics`` are the same whichever protocol the request came by.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from mini_vllm.actors.core_client import CoreProxy
from mini_vllm.actors.errors import DuplicateRequest, ModelRequired, ShuttingDown, UnknownModel
from mini_vllm.actors.request_metrics import RequestMetrics
from mini_vllm.actors.request_stream import RequestStream
from mini_vllm.actors.service_config import ServiceConfig
from mini_vllm.engine.errors import InvalidRequest, MiniVllmError
from mini_vllm.engine.prompts import PromptEncoder
from mini_vllm.engine.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, show_value

INLINE_TOKENIZE_CHARS = 16384


@attrs.frozen
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    has_chat_template: bool
    available: bool  # False once its engine core has exited: requests to it are refused


@attrs.frozen
class IngressStats:
    in_flight: int
    submitted: int  # accepted by a scheduler
    rejected: int  # refused before reaching a model (unknown model, overloaded, bad prompt, ...)
    cancelled: int
    rejections_by_code: tuple[tuple[str, int], ...]


class Ingress:
    def __init__(
        self,
        engines: Mapping[str, PromptEncoder],
        schedulers: Mapping[str, CoreProxy],
        config: ServiceConfig | None = None,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self._engines = dict(engines)
        self.metrics = metrics or RequestMetrics({name: e.max_model_len for name, e in self._engines.items()})
        self._schedulers = dict(schedulers)
        self.config = config or ServiceConfig()  # only its request limits are read here
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._submitted = 0
        self._cancelled = 0
        self._rejections: dict[str, int] = {}
        self._closed: str | None = None

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=name,
                max_model_len=e.max_model_len,
                vocab_size=e.vocab_size,
                has_chat_template=e.has_chat_template,
                available=self._schedulers[name].available,
            )
            for name, e in self._engines.items()
        ]

    def encoder(self, name: str) -> PromptEncoder:
        return self._engines[name]

    def route(self, model: str | None) -> str:
        if model is None:
            if len(self._engines) == 1:
                return next(iter(self._engines))
            raise ModelRequired(f"several models are served ({', '.join(self._engines)}): name one in 'model'")
        if model not in self._engines:
            raise UnknownModel(f"unknown model {model!r}; served: {', '.join(self._engines)}")
        return model

    async def submit(
        self,
        request_id: str,
        model: str | None,
        params: SamplingParams,
        priority: int,
        *,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> RequestStream:
        """Validate, tokenize and admit one request; raises a MiniVllmError if it cannot be taken."""
        arrival = time.monotonic()
        try:
            if self._closed is not None:
                raise ShuttingDown(self._closed)
            if request_id in self._streams:
                raise DuplicateRequest(f"request id {request_id!r} is already in flight")
            name = self.route(model)
            engine = self._engines[name]
            # The cheap checks first: n = 10**6 is refused before any tokenizing or allocating.
            _check_priority(priority)
            check_request_limits(params, self.config)
            engine.check_params(params)
            if messages is not None:
                chat: list[Any] = [dict(m) if isinstance(m, Mapping) else m for m in messages]
                if _text_size(chat) <= INLINE_TOKENIZE_CHARS:
                    ids = engine.apply_chat_template(chat)
                else:  # a megabyte of chat through a template is as slow as a megabyte prompt
                    ids = await trio.to_thread.run_sync(engine.apply_chat_template, chat)
            elif prompt is not None:
                if not isinstance(prompt, str) or len(prompt) <= INLINE_TOKENIZE_CHARS:
                    ids = engine.tokenize(prompt)  # (a prompt that is no string is refused there)
                else:
                    ids = await trio.to_thread.run_sync(engine.tokenize, prompt)
            else:
                ids = list(prompt_token_ids or ())
            engine.check_prompt(ids)
            check_request_tokens(params, len(ids), engine.max_model_len, self.config)
            # Re-check after a possible await: another task may have taken the id meanwhile.
            if request_id in self._streams:
                raise DuplicateRequest(f"request id {request_id!r} is already in flight")
            scheduler = self._schedulers[name]
            timing = self.metrics.start(name, arrival, len(ids), params)
            stream = RequestStream(request_id, name, params.n, scheduler.abort, timing)
            scheduler.submit(stream, ids, params, priority, prompt)
        except MiniVllmError as exc:
            code = getattr(exc, "code", "invalid_request")
            self._rejections[code] = self._rejections.get(code, 0) + 1
            raise
        self._streams[request_id] = stream
        self._submitted += 1
        return stream

    def forget(self, stream: RequestStream) -> None:
        """The consumer is done with ``stream`` (read to the end, or left): cancel it if it still runs."""
        if not stream.done:
            stream.cancel()
            self._cancelled += 1
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    def abort(self, request_id: str) -> bool:
        """Cancel a request in flight; False if no such request is running."""
        stream = self._streams.get(request_id)
        if stream is None or stream.done or stream.cancel_requested:
            return False
        stream.cancel()
        self._cancelled += 1
        return True

    def shutdown(self, message: str) -> None:
        """Refuse new requests and end every running one with an error that says why."""
        if self._closed is None:
            self._closed = message
            for scheduler in self._schedulers.values():
                scheduler.fail_all("shutting_down", message)

    def statistics(self) -> IngressStats:
        return IngressStats(
            in_flight=len(self._streams),
            submitted=self._submitted,
            rejected=sum(self._rejections.values()),
            cancelled=self._cancelled,
            rejections_by_code=tuple(sorted(self._rejections.items())),
        )


def check_request_limits(params: SamplingParams, config: ServiceConfig) -> None:
    """The server's per-request limits on the sampling fields (``InvalidRequest`` naming the field)."""
    if params.n > config.max_n:
        raise InvalidRequest(f"n must be in [1, {config.max_n}] (this server's limit), got {params.n}")
    if params.logprobs is not None and params.logprobs > config.max_logprobs:
        raise InvalidRequest(
            f"logprobs must be in [0, {config.max_logprobs}] (this server's limit), got {params.logprobs}"
        )
    if len(params.stop) > config.max_stop_strings:
        raise InvalidRequest(
            f"stop must have at most {config.max_stop_strings} strings (this server's limit), got {len(params.stop)}"
        )
    for i, s in enumerate(params.stop):
        if len(s) > config.max_stop_string_chars:
            raise InvalidRequest(
                f"stop[{i}] must be at most {config.max_stop_string_chars} characters long (this server's limit), "
                f"got {len(s)}"
            )
    if len(params.stop_token_ids) > config.max_stop_token_ids:
        raise InvalidRequest(
            f"stop_token_ids must have at most {config.max_stop_token_ids} ids (this server's limit), "
            f"got {len(params.stop_token_ids)}"
        )


def check_request_tokens(params: SamplingParams, prompt_len: int, max_model_len: int, config: ServiceConfig) -> None:
    """n × max_tokens within the server's limit. max_tokens counts only up to the room the prompt
    leaves in max_model_len: beyond it no token is made, and clients often send a large max_tokens
    to mean "until the end"."""
    per_sample = min(params.max_tokens, max(max_model_len - prompt_len, 0))
    if params.n * per_sample > config.max_request_tokens:
        raise InvalidRequest(
            f"n × max_tokens must be at most {config.max_request_tokens} (this server's limit), got "
            f"n={params.n} × max_tokens={per_sample} = {params.n * per_sample}"
            + (f" (max_tokens={params.max_tokens} counted as the {per_sample} tokens the prompt leaves in "
               f"max_model_len={max_model_len})" if per_sample < params.max_tokens else "")
        )


def _check_priority(priority: object) -> None:
    # The core's scheduler orders by it: a value it cannot compare would fail its step.
    if not isinstance(priority, int) or isinstance(priority, bool) or not INT64_MIN <= priority <= INT64_MAX:
        raise InvalidRequest(f"priority must be an integer in [-2**63, 2**63-1], got {show_value(priority)}")


def _text_size(messages: Sequence[object]) -> int:
    """Characters of the messages' strings (what the template and the tokenizer will read)."""
    return sum(len(v) for m in messages if isinstance(m, Mapping) for v in m.values() if isinstance(v, str))
