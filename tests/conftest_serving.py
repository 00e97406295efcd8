"""Helpers for the serving tests (actors, server, client, CLI, browser); imported by those modules.

Plain helpers, no fixtures: each test module declares the two it needs (``reference``, ``engine``)
in a few lines, so pytest needs no plugin registration for this file.

Engines are built from the demo model (``demo_model_dir`` from conftest.py) with a small KV cache,
so tests that check "every block is back" look at a small pool. References come from the offline
``LLM`` on the same weights.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from mini_vllm.actors import Service, ServiceConfig, open_service
from mini_vllm.actors.task_group import open_task_group
from mini_vllm.engine import LLM, EngineArgs, LLMEngine, SamplingParams
from mini_vllm.transport.server import Server, ServerLimits, serve

SMALL_KV_BLOCKS = 96


def build_engine(model_dir: Path, name: str = "demo", num_kv_blocks: int = SMALL_KV_BLOCKS, **kw: Any) -> LLMEngine:
    return LLMEngine.from_engine_args(
        EngineArgs(model=str(model_dir), model_name=name, num_kv_blocks=num_kv_blocks, device="cpu", **kw)
    )


@attrs.frozen
class Expected:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str


class Reference:
    """Offline ``LLM`` outputs for (prompt, sampling) pairs, computed once and cached."""

    def __init__(self, model_dir: Path) -> None:
        self._llm = LLM(str(model_dir), num_kv_blocks=512, device="cpu")
        self._cache: dict[str, Expected] = {}

    def __call__(self, prompt: str | Sequence[int], **sampling: Any) -> Expected:
        key = json.dumps([prompt if isinstance(prompt, str) else list(prompt), sorted(sampling.items())])
        if key not in self._cache:
            p = prompt if isinstance(prompt, str) else list(prompt)
            out = self._llm.generate(p, SamplingParams(**sampling))[0].outputs[0]
            self._cache[key] = Expected(out.text, tuple(out.token_ids), out.finish_reason)
        return self._cache[key]

    @property
    def tokenizer(self) -> Any:
        return self._llm.tokenizer


PROMPTS = (
    "Hello",
    "The quick brown fox",
    "mini-vllm streams tokens",
    "a",
    "Über café ñandú 日本語",
    "0123456789",
    "trio nurseries own every task",
    "KV blocks return to the pool",
)


def greedy(max_tokens: int = 12, **more: Any) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **more}


@attrs.define
class Collected:
    text: str = ""
    token_ids: list[int] = attrs.field(factory=list)
    finish_reason: str | None = None
    usage: Any = None
    deltas: int = 0


async def collect(generation: Any) -> Collected:
    """Drain an actors ``Generation`` (sample 0)."""
    out = Collected()
    async for delta in generation:
        out.deltas += 1
        for s in delta.samples:
            if s.index == 0:
                out.text += s.text
                out.token_ids.extend(s.token_ids)
                if s.finish_reason is not None:
                    out.finish_reason = s.finish_reason
        out.usage = delta.usage
    return out


@contextlib.asynccontextmanager
async def running_server(
    engines: Sequence[LLMEngine | EngineArgs],
    limits: ServerLimits | None = None,
    config: ServiceConfig | None = None,
) -> AsyncIterator[tuple[Service, Server]]:
    """A service and its WebSocket server on 127.0.0.1, a free port."""
    async with open_service(engines, config) as service, open_task_group() as nursery:
        server = await nursery.start(serve, service, "127.0.0.1", 0, limits)
        yield service, server


class RawClient:
    """A bare WebSocket speaking JSON, for protocol-level tests."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send_message(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def receive(self) -> dict[str, Any]:
        return json.loads(await self.ws.get_message())

    async def until(self, stop: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Frames up to and including the first one for which ``stop`` is true."""
        frames = []
        while True:
            frame = await self.receive()
            frames.append(frame)
            if stop(frame):
                return frames

    async def request(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Send a generate/chat frame and read its frames until done (all samples) or an error."""
        await self.send(frame)
        rid, n, done = frame["id"], frame.get("n", 1), 0

        def finished(f: dict[str, Any]) -> bool:
            nonlocal done
            if f.get("id") != rid:
                return False
            done += f["type"] == "done"
            return f["type"] == "error" or done == n

        return [f for f in await self.until(finished) if f.get("id") == rid]


@contextlib.asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[RawClient]:
    async with open_websocket_url(url) as ws:
        yield RawClient(ws)


def text_and_ids(frames: Sequence[dict[str, Any]], index: int = 0) -> tuple[str, tuple[int, ...], str | None]:
    text = "".join(f["text"] for f in frames if f["type"] == "token" and f["index"] == index)
    ids = tuple(t for f in frames if f["type"] == "token" and f["index"] == index for t in f["token_ids"])
    reasons = [f["finish_reason"] for f in frames if f["type"] == "done" and f["index"] == index]
    return text, ids, reasons[-1] if reasons else None


async def wait_blocks_released(service: Service) -> None:
    """Wait until every model is idle, then check that no KV block is held."""
    await service.wait_idle()
    for m in service.statistics().blocks.models:
        assert m.blocks.used_blocks == 0, m


class GatedEngine:
    """A real engine whose ``launch`` waits for the test's go-ahead (runs on the executor thread)."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_next: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _gate(self) -> None:
        self.entered.set()
        self.release.wait(timeout=30)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    def launch(self, batch: Any) -> Any:  # the step loop's device job, serial or one step ahead
        self._gate()
        return self._engine.launch(batch)


async def wait_thread_event(event: threading.Event) -> None:
    await trio.to_thread.run_sync(event.wait, 30)


@contextlib.contextmanager
def released(gated: GatedEngine) -> Iterator[None]:
    try:
        yield
    finally:
        gated.release.set()
