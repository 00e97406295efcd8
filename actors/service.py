"""The embedding API: ``open_service`` starts every actor in a nursery and yields a ``Service``.

    async with open_service([EngineArgs(model=None)]) as service:
        async for delta in service.generate("Hello", max_tokens=16, temperature=0):
            print(delta.samples[0].text, end="")

Leaving the ``async for`` early (``break``, an exception) or cancelling the iterating task aborts
the request, and its KV blocks return to the pool before that model's next step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
import trio

from mini_vllm.actors.block_manager import BlockManagerActor, BlockManagerStats, plan_kv_budget
from mini_vllm.actors.executor import ExecutorStats, ExecutorThread
from mini_vllm.actors.ingress import Ingress, IngressStats, ModelInfo
from mini_vllm.actors.loop_lag import LoopLagMonitor, LoopLagStats
from mini_vllm.actors.request_stream import GenerationDelta, RequestStream
from mini_vllm.actors.scheduler import SchedulerActor, SchedulerStats
from mini_vllm.actors.task_group import open_task_group
from mini_vllm.engine.config import PRESETS, EngineArgs
from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@attrs.frozen
class ServiceConfig:
    max_pending_per_model: int = attrs.field(default=256)  # admitted and unfinished requests per model
    loop_lag_interval: float | None = 0.01  # None: do not run the lag monitor
    pipelined: bool | None = None  # queue step N+1 before processing step N; None: on GPUs only
    # torch's intra-op threads when a model runs on the CPU. None: one fewer than the cores, so the
    # event loop keeps a core (on 2 cores, 2 torch threads tripled the demo's TPOT under load:
    # 22 ms against 6.5 ms with 1, docs/serving.md). Process-wide, as torch's setting is.
    cpu_threads: int | None = attrs.field(default=None)

    @cpu_threads.validator
    def _check_threads(self, _: Any, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"cpu_threads must be an integer >= 1 or None (auto), got {value!r}")

    @max_pending_per_model.validator
    def _check_pending(self, _: Any, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"max_pending_per_model must be an integer >= 1, got {value!r}")


@attrs.frozen
class LoadProgress:
    """One model-loading event, for progress displays."""

    index: int  # 0-based position in the list of models
    total: int
    model: str  # what was asked for (path, preset, or "demo")
    phase: Literal["loading", "loaded"]
    seconds: float  # time spent so far on this model
    kv_rule: str


@attrs.frozen
class ServiceStats:
    ingress: IngressStats
    schedulers: tuple[SchedulerStats, ...]
    executors: tuple[ExecutorStats, ...]
    blocks: BlockManagerStats
    loop_lag: LoopLagStats | None

    def scheduler(self, model: str) -> SchedulerStats:
        for s in self.schedulers:
            if s.model == model:
                return s
        raise KeyError(model)


class Generation:
    """One request's outputs as an async iterator of ``GenerationDelta``s (also an async context manager).

    Nothing is submitted until the first ``__anext__``; rejections (unknown model, overloaded,
    prompt too long, ...) are raised from there as ``MiniVllmError`` subclasses.
    """

    def __init__(
        self, ingress: Ingress, request_id: str, model: str | None, params: SamplingParams, priority: int, **prompt: Any
    ) -> None:
        self.request_id = request_id
        self._ingress = ingress
        self._model = model
        self._params = params
        self._priority = priority
        self._prompt = prompt
        self._stream: RequestStream | None = None
        self._ended = False
        self._cancel_on_submit = False
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self._ended:
            raise StopAsyncIteration
        try:
            if self._stream is None:
                self._stream = await self._ingress.submit(
                    self.request_id, self._model, self._params, self._priority, **self._prompt
                )
                if self._cancel_on_submit:
                    self._ingress.abort(self.request_id)
            delta = await self._stream.receive()
        except BaseException:  # rejected, or the iterating task was cancelled: abort and pass it on
            self._end()
            raise
        if delta is None:
            self._end()
            raise StopAsyncIteration
        if delta.finished:
            self._end()
        return delta

    def cancel(self) -> None:
        """Abort the request (idempotent, never blocks); iteration then ends with ``cancelled``."""
        if self._ended:
            return
        if self._stream is None:
            self._cancel_on_submit = True
        else:
            self._ingress.abort(self.request_id)

    def close(self) -> None:
        """Stop listening; a request still running is aborted (its blocks are freed at once)."""
        self._end()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._end()
        await trio.lowlevel.checkpoint()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._stream is not None:
                self._ingress.forget(self._stream)

    def __del__(self) -> None:
        # Dropped mid-iteration (``break`` out of ``async for``): abort. Usually runs on the trio
        # thread at once (reference counting); a cyclic GC on another thread hands it over.
        if self._ended or self._stream is None:
            return
        with contextlib.suppress(Exception):  # a finalizer must not raise (e.g. at interpreter exit)
            if threading.get_ident() == self._thread:
                self._end()
            else:
                self._token.run_sync_soon(self._end)


class Service:
    """The handle ``open_service`` yields. All methods are called from the service's trio run."""

    def __init__(
        self,
        ingress: Ingress,
        schedulers: Mapping[str, SchedulerActor],
        executors: Sequence[ExecutorThread],
        blocks: BlockManagerActor,
        lag: LoopLagMonitor | None,
    ) -> None:
        self._ingress = ingress
        self._schedulers = dict(schedulers)
        self._executors = list(executors)
        self._blocks = blocks
        self._lag = lag

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        model: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        **sampling: Any,
    ) -> Generation:
        """Stream a completion of ``prompt`` (text, or token ids). Sampling fields as keywords or ``params``."""
        params = _params(params, sampling)
        rid = request_id if request_id is not None else self._ingress.new_request_id()
        if isinstance(prompt, str):
            return Generation(self._ingress, rid, model, params, priority, prompt=prompt)
        return Generation(self._ingress, rid, model, params, priority, prompt_token_ids=list(prompt))

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        **sampling: Any,
    ) -> Generation:
        """Like ``generate``, with the prompt built from ``messages`` by the model's chat template."""
        params = _params(params, sampling)
        rid = request_id if request_id is not None else self._ingress.new_request_id()
        return Generation(self._ingress, rid, model, params, priority, messages=[dict(m) for m in messages])

    def abort(self, request_id: str) -> bool:
        """Cancel a request in flight: its iterator ends with finish reason ``cancelled``."""
        return self._ingress.abort(request_id)

    def models(self) -> list[ModelInfo]:
        return self._ingress.models()

    def resolve_model(self, model: str | None) -> str:
        """The served model a request naming ``model`` goes to (raises UnknownModel / ModelRequired)."""
        return self._ingress.route(model)

    def shutdown(self, message: str = "the server is shutting down") -> None:
        """Refuse new requests; end every running one with finish reason ``error`` and ``message``."""
        self._ingress.shutdown(message)

    def statistics(self) -> ServiceStats:
        return ServiceStats(
            ingress=self._ingress.statistics(),
            schedulers=tuple(s.statistics() for s in self._schedulers.values()),
            executors=tuple(e.statistics() for e in self._executors),
            blocks=self._blocks.statistics(),
            loop_lag=self._lag.statistics() if self._lag is not None else None,
        )

    @property
    def loop_lag(self) -> LoopLagMonitor | None:
        return self._lag

    async def wait_idle(self) -> None:
        """Wait until no model has a request queued or running (every block released)."""
        for scheduler in self._schedulers.values():
            while scheduler.statistics().pending or scheduler.statistics().engine.num_requests:
                await scheduler.wait_changed()


def _params(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams:
    if params is not None and sampling:
        raise ConfigError(f"give sampling fields either as params= or as keywords, not both (got {sorted(sampling)})")
    return params if params is not None else SamplingParams.from_dict(sampling)


async def load_engines(
    models: Sequence[EngineArgs | LLMEngine],
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> tuple[list[LLMEngine], dict[str, str]]:
    """Build the engines one after another in a worker thread (loading is slow, blocking work).

    One at a time on purpose: on a GPU each model's KV share is measured after the previous
    models took theirs (see ``plan_kv_budget``).
    """
    check_model_names(models)  # before loading anything: a clash found after loading wastes minutes
    to_load = [m for m in models if isinstance(m, EngineArgs)]
    shares = iter(plan_kv_budget(to_load))
    engines: list[LLMEngine] = []
    rules: dict[str, str] = {}
    for i, m in enumerate(models):
        if not isinstance(m, EngineArgs):  # an engine the caller built
            engines.append(m)
            rules[m.name] = f"num_kv_blocks={m.block_manager.num_blocks} (engine built by the caller)"
            continue
        share = next(shares)
        label = m.model_name or m.model or "demo"
        started = time.perf_counter()
        if on_progress is not None:
            on_progress(LoadProgress(i, len(models), label, "loading", 0.0, share.rule))
        engine = await trio.to_thread.run_sync(LLMEngine.from_engine_args, share.args, abandon_on_cancel=True)
        if on_progress is not None:
            on_progress(LoadProgress(i, len(models), label, "loaded", time.perf_counter() - started, share.rule))
        engines.append(engine)
        rules[engine.name] = f"{share.rule} -> {engine.block_manager.num_blocks} blocks"
    names = [e.name for e in engines]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # a backstop, should served_name and the loader's naming ever disagree
        raise ConfigError(f"two models share the name {dupes[0]!r}: name them, e.g. --model NAME=PATH")
    return engines, rules


def served_name(args: EngineArgs) -> str:
    """The name clients will pick the model by, known without loading it: the loader's rule
    (``engine.loader.resolve_model``): model_name, else "demo", a preset's name, a directory's
    last component, or the hub id."""
    if args.model_name:
        return args.model_name
    if args.model is None:
        return "demo"
    if args.model in PRESETS:
        return args.model
    path = Path(args.model).expanduser()
    return path.name if path.is_dir() else args.model


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


@contextlib.asynccontextmanager
async def open_service(
    models: Sequence[EngineArgs | LLMEngine],
    config: ServiceConfig | None = None,
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> AsyncIterator[Service]:
    """Load the models (or take ready engines) and run every actor until the block exits.

    On exit the actors stop; a request still streaming ends with finish reason ``error``; the
    engines loaded from ``EngineArgs`` are closed (their device memory freed).
    """
    if not models:
        raise ConfigError("open_service needs at least one model")
    config = config or ServiceConfig()
    engines, rules = await load_engines(models, on_progress)
    if any(e.runner.device.type == "cpu" for e in engines):
        threads = config.cpu_threads or max(1, (os.cpu_count() or 1) - 1)
        if threads != torch.get_num_threads():
            log.info("torch intra-op threads: %d -> %d (a core for the event loop)", torch.get_num_threads(), threads)
            torch.set_num_threads(threads)
    executors = [ExecutorThread(e.name) for e in engines]
    schedulers = {
        e.name: SchedulerActor(e, x, config.max_pending_per_model, config.pipelined)
        for e, x in zip(engines, executors, strict=True)
    }
    ingress = Ingress({e.name: e for e in engines}, schedulers)
    lag = LoopLagMonitor(config.loop_lag_interval) if config.loop_lag_interval else None
    service = Service(ingress, schedulers, executors, BlockManagerActor(schedulers, rules), lag)
    for x in executors:
        x.start()
    try:
        async with open_task_group() as nursery:
            for s in schedulers.values():
                await nursery.start(s.run)
            if lag is not None:
                await nursery.start(lag.run)
            yield service
    finally:
        # The loops have stopped, so touching the engines from here is safe: end what still runs.
        for s in schedulers.values():
            s.close("the service has stopped")
        with trio.CancelScope(shield=True):
            for x in executors:
                await x.aclose()
        # The engines loaded here are the service's own: free their device memory now, not when
        # the caller drops the service object (engines the caller built stay theirs to close).
        for e, m in zip(engines, models, strict=True):
            if isinstance(m, EngineArgs):
                e.close()
