"""The embedding API: ``open_service`` starts every actor in a nursery and yields a ``Service``.

    async with open_service([EngineArgs(model=None)]) as service:
        async for delta in service.generate("Hello", max_tokens=16, temperature=0):
            print(delta.samples[0].text, end="")

Leaving the ``async for`` early (``break``, an exception) or cancelling the iterating task aborts
the request, and its KV blocks return to the pool before that model's next step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from mini_vllm.actors.block_manager import BlockManagerActor, BlockManagerStats, plan_kv_budget
from mini_vllm.actors.core import CoreModel, CoreStart, check_model_names, run_core, spawn_core
from mini_vllm.actors.core_client import CoreClient, CoreProxy
from mini_vllm.actors.executor import ExecutorStats
from mini_vllm.actors.ingress import Ingress, IngressStats, ModelInfo
from mini_vllm.actors.link import Link, memory_link_pair
from mini_vllm.actors.loop_lag import LoopLagMonitor, LoopLagStats
from mini_vllm.actors.request_metrics import RequestMetrics
from mini_vllm.actors.request_stream import GenerationDelta, RequestStream
from mini_vllm.actors.scheduler import SchedulerStats
from mini_vllm.actors.service_config import LoadProgress as LoadProgress
from mini_vllm.actors.service_config import ServiceConfig
from mini_vllm.actors.task_group import open_task_group
from mini_vllm.engine.config import EngineArgs
from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.llm_engine import LLMEngine, load_tokenizer
from mini_vllm.engine.prompts import PromptEncoder
from mini_vllm.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


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
        schedulers: Mapping[str, CoreProxy],
        blocks: BlockManagerActor,
        lag: LoopLagMonitor | None,
        core_pids: Mapping[str, int | None],
    ) -> None:
        self._ingress = ingress
        self._schedulers = dict(schedulers)
        self._blocks = blocks
        self._lag = lag
        self._core_pids = dict(core_pids)

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

    @property
    def config(self) -> ServiceConfig:
        """What the service was opened with; its request limits bound what a frontend may ask."""
        return self._ingress.config

    def prompt_encoder(self, model: str | None) -> PromptEncoder:
        """The tokenizer, chat template and prompt checks of the served model ``model`` names
        (raises UnknownModel / ModelRequired): for /tokenize, /detokenize and logprobs' token text."""
        return self._ingress.encoder(self._ingress.route(model))

    def resolve_model(self, model: str | None) -> str:
        """The served model a request naming ``model`` goes to (raises UnknownModel / ModelRequired)."""
        return self._ingress.route(model)

    def shutdown(self, message: str = "the server is shutting down") -> None:
        """Refuse new requests; end every running one with finish reason ``error`` and ``message``."""
        self._ingress.shutdown(message)

    def core_pids(self) -> dict[str, int | None]:
        """Each model's engine core process id (None: its core runs in this process)."""
        return dict(self._core_pids)

    def statistics(self) -> ServiceStats:
        return ServiceStats(
            ingress=self._ingress.statistics(),
            schedulers=tuple(s.statistics() for s in self._schedulers.values()),
            executors=tuple(x for s in self._schedulers.values() if (x := s.executor_statistics()) is not None),
            blocks=self._blocks.statistics(),
            loop_lag=self._lag.statistics() if self._lag is not None else None,
        )

    @property
    def loop_lag(self) -> LoopLagMonitor | None:
        return self._lag

    @property
    def request_metrics(self) -> RequestMetrics:
        """Every request's timings and counts since the service started, per model (all protocols)."""
        return self._ingress.metrics

    async def wait_idle(self) -> None:
        """Wait until no model has a request queued or running (every block released)."""
        for scheduler in self._schedulers.values():
            while scheduler.statistics().pending or scheduler.statistics().engine.num_requests:
                await scheduler.wait_changed()


def _params(params: SamplingParams | None, sampling: dict[str, Any]) -> SamplingParams:
    if params is not None and sampling:
        raise ConfigError(f"give sampling fields either as params= or as keywords, not both (got {sorted(sampling)})")
    return params if params is not None else SamplingParams.from_dict(sampling)


@contextlib.asynccontextmanager
async def open_service(
    models: Sequence[EngineArgs | LLMEngine],
    config: ServiceConfig | None = None,
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> AsyncIterator[Service]:
    """Start the engine core with ``models`` (or ready engines), the frontend's actors around it,
    and run them until the block exits.

    The core runs in a process of its own with ``config.core_process`` (then ``models`` must be
    ``EngineArgs``: an engine cannot move between processes), else in this one; the code path is
    the same. On exit a request still streaming ends with finish reason ``error``, the core stops,
    and the engines it loaded from ``EngineArgs`` are closed (their device memory freed).
    """
    if not models:
        raise ConfigError("open_service needs at least one model")
    config = config or ServiceConfig()
    check_model_names(models)  # before anything loads
    if config.core_process and not all(isinstance(m, EngineArgs) for m in models):
        raise ConfigError("with core_process=True give EngineArgs, not engines: an engine cannot move to another process")
    shares = iter(plan_kv_budget([m for m in models if isinstance(m, EngineArgs)]))
    cores: list[_Core] = []
    async with open_task_group() as nursery:
        try:
            proxies: dict[str, CoreProxy] = {}
            fronts: dict[str, PromptEncoder] = {}
            rules: dict[str, str] = {}
            if config.core_process:  # the frontend's tokenizers need transformers: import it while the cores load
                nursery.start_soon(functools.partial(trio.to_thread.run_sync, _import_tokenizers, abandon_on_cancel=True))
            # One after another: on a GPU each model's KV share is measured after the previous
            # models took theirs (see plan_kv_budget).
            for i, m in enumerate(models):
                if isinstance(m, EngineArgs):
                    share = next(shares)
                    start = CoreStart(share.args, config, i, len(models), share.rule)
                else:
                    start = CoreStart(m, config, i, len(models), "")
                core = await _start_core(nursery, start)
                cores.append(core)
                ready = await core.client.handshake(on_progress)
                fronts[ready.name] = await trio.to_thread.run_sync(_prompt_encoder, ready)
                rules[ready.name] = ready.kv_rule
                core.client.proxies[ready.name].tokenizer = fronts[ready.name].tokenizer
                await nursery.start(core.client.run)
                proxies.update(core.client.proxies)
            for proxy in proxies.values():  # the first statistics arrive with the core's first message
                while proxy.available and not proxy.has_statistics:
                    await proxy.wait_changed()
            ingress = Ingress(fronts, proxies, config)
            lag = LoopLagMonitor(config.loop_lag_interval) if config.loop_lag_interval else None
            pids = {
                name: core.process.pid if core.process is not None else None
                for core in cores for name in core.client.proxies
            }
            service = Service(ingress, proxies, BlockManagerActor(proxies, rules), lag, pids)
            if lag is not None:
                await nursery.start(lag.run)
            yield service
        finally:
            with trio.CancelScope(shield=True):
                for core in cores:
                    await _stop_core(core, config.stop_timeout)
            nursery.cancel_scope.cancel()


@attrs.frozen
class _Core:
    client: CoreClient
    link: Link
    process: trio.Process | None  # None: the core runs in this process


async def _start_core(nursery: trio.Nursery, start: CoreStart) -> _Core:
    if start.config.core_process:
        link, process = await spawn_core(start)
        client = CoreClient(link, start.config.max_pending_per_model, functools.partial(_exit_status, process))
        return _Core(client, link, process)
    ours, theirs = memory_link_pair()
    nursery.start_soon(run_core, theirs, start)
    return _Core(CoreClient(ours, start.config.max_pending_per_model, _in_process_exit), ours, None)


def _import_tokenizers() -> None:
    """transformers takes a second or two to import, which the frontend would otherwise spend
    after its first core is ready, before serving."""
    import transformers  # noqa: F401


def _prompt_encoder(model: CoreModel) -> PromptEncoder:
    tokenizer = load_tokenizer(Path(model.tokenizer_dir)) if model.tokenizer_dir is not None else None
    return PromptEncoder(model.name, tokenizer, model.max_model_len, model.vocab_size)


async def _exit_status(process: trio.Process) -> str:
    with trio.move_on_after(2):  # its end of the link closes a moment before the exit is seen
        await process.wait()
    code = process.returncode
    if code is None:
        return "its process closed the link but still runs"
    return f"its process was killed by signal {-code}" if code < 0 else f"its process ended with status {code}"


async def _in_process_exit() -> str:
    return "it ran in this process and stopped"


async def _stop_core(core: _Core, grace: float) -> None:
    """Ask the core to stop and wait for it (what it ends on the way out reaches the streams);
    a core process that does not stop within its grace is killed, never left behind."""
    client = core.client
    if not client.running:  # it never served (still loading, or it failed to): no request to end
        if core.process is not None:  # a load cannot be interrupted halfway (it runs in a thread)
            core.process.kill()
            await core.process.wait()
        with contextlib.suppress(Exception):
            await core.link.aclose()
        return  # an in-process core is cancelled with the service's nursery
    for proxy in client.proxies.values():
        proxy.fail_all("shutting_down", "the service has stopped")
    client.stop("the service has stopped")
    with trio.move_on_after(grace) as waited:
        await client.finished.wait()  # the core's last messages have landed
        if core.process is not None:
            await core.process.wait()
    if core.process is not None and waited.cancelled_caught:
        log.error("the engine core did not stop within %.0f s: killing it", grace)
        core.process.kill()
        await core.process.wait()
    for proxy in client.proxies.values():
        proxy.close("the service has stopped")
    with contextlib.suppress(Exception):
        await core.link.aclose()
